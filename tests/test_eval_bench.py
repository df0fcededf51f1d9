"""``vlm-accel bench`` on the tiny geometry: a well-formed JSON, consistent token / KV / FLOPs accounting, a plot,
and the analytic mode on the LLaVA-1.5-7B geometry (no weights built)."""

from __future__ import annotations

import json

import pytest

from vlm_accel.cli import main
from vlm_accel.eval.bench import GEOMETRIES, geometry_config, parse_method_spec, visual_tokens_per_image
from vlm_accel.eval.flops import TextGeometry, prefill_flops
from vlm_accel.eval.plots import pareto_front, pareto_plot

PNG_MAGIC = b"\x89PNG"


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = main([
        "bench", "--model", "tiny", "--device", "cpu", "--method", "fastv:layer=2,keep_ratio=0.25",
        "--methods", "random", "--keep-counts", "8", "--batch-sizes", "1,2", "--warmup", "0", "--repeats", "2", "--threads", "1",
        "--new-tokens", "3", "--text-tokens", "8", "--json", str(out / "r.json"), "--plot", str(out / "r.png"),
        "--no-progress",
    ])  # fmt: skip
    assert code == 0
    return json.loads((out / "r.json").read_text()), out


def test_json_is_well_formed(tiny_result):
    result, _ = tiny_result
    meta, rows = result["meta"], result["rows"]
    assert meta["settings"]["model"] == "tiny" and meta["settings"]["batch_sizes"] == [1, 2]
    assert meta["visual_tokens_per_image"] == 16
    assert "not measured on CPU" in meta["peak_memory"]
    assert [(r["arm"], r["batch"]) for r in rows] == [
        (arm, b) for b in (1, 2) for arm in ("unpatched", "fastv:layer=2,keep_ratio=0.25", "random:layer=2,keep_count=8")
    ]
    for r in rows:
        assert len(r["prefill_s_runs"]) == 2 and len(r["e2e_s_runs"]) == 2
        assert 0 < r["prefill_s"] < r["e2e_s"] and r["decode_tok_s"] > 0
        assert 0 < r["ttft_s"] < r["e2e_s"] and len(r["decode_step_s_runs"]) == 2 and r["decode_step_s"] > 0
        low, high = r["decode_cpu_speedup_range"]
        assert low <= r["decode_cpu_speedup"] <= high
        assert r["peak_mem_bytes"] is None
        for key in ("prefill_speedup", "e2e_speedup", "flops_ideal_speedup", "kv_fraction"):
            assert isinstance(r[key], float)


def test_token_kv_and_flops_accounting(tiny_result):
    result, _ = tiny_result
    geometry = TextGeometry.from_config(geometry_config("tiny"))
    seq = 1 + 8 + 16
    kept = {"unpatched": 16, "fastv:layer=2,keep_ratio=0.25": 4, "random:layer=2,keep_count=8": 8}
    # tiny: 4 layers, 2 KV heads × head_dim 16, fp32 keys + values
    per_token = 2 * 2 * 16 * 4
    for r in result["rows"]:
        short = seq - 16 + kept[r["arm"]]
        expected = [seq] * 4 if r["arm"] == "unpatched" else [seq, seq, short, short]
        assert r["seq_len"] == seq and r["tokens_per_layer"] == expected
        assert r["kv_length_per_layer"] == expected
        assert r["visual_tokens_kept"] == kept[r["arm"]] * r["batch"]
        assert r["kv_bytes"] == r["batch"] * per_token * sum(expected)
        assert r["prefill_flops"] == prefill_flops(geometry, expected, r["batch"])
        unpatched = prefill_flops(geometry, [seq] * 4, r["batch"])
        assert r["flops_ideal_speedup"] == pytest.approx(unpatched / r["prefill_flops"])


def test_plot_written(tiny_result):
    _, out = tiny_result
    assert (out / "r.png").read_bytes()[:4] == PNG_MAGIC


def test_analytic_llava_7b_at_64_of_576(tmp_path, capsys):
    path = tmp_path / "a.json"
    assert main(["bench", "--model", "llava-1.5-7b", "--analytic", "--device", "cuda", "--dtype", "bfloat16",
                 "--method", "fastv:layer=2,keep_count=64", "--batch-sizes", "1,32", "--json", str(path)]) == 0  # fmt: skip
    rows = json.loads(path.read_text())["rows"]
    fastv = [r for r in rows if r["arm"] != "unpatched"]
    assert [r["visual_tokens_kept"] for r in fastv] == [64, 64 * 32]
    seq = 1 + 64 + 576
    assert fastv[0]["tokens_per_layer"] == [seq, seq] + [seq - 512] * 30
    assert 3.0 < fastv[0]["flops_ideal_speedup"] < 4.5
    assert "FLOPs-ideal" in capsys.readouterr().out


def test_bad_specs_and_geometry_are_refused():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        parse_method_spec("nope:layer=2")
    with pytest.raises(TypeError, match="unknown parameter"):
        parse_method_spec("fastv:keep=2")
    with pytest.raises(ValueError, match="expected name:param=value"):
        parse_method_spec("fastv:layer")
    with pytest.raises(ValueError, match="unknown geometry"):
        geometry_config("llava-70b")
    assert visual_tokens_per_image(geometry_config("llava-1.5-7b")) == 576
    assert visual_tokens_per_image(geometry_config("cpu-mid")) == 256
    assert set(GEOMETRIES) >= {"tiny", "cpu-mid", "llava-1.5-7b"}


def test_pareto_helper(tmp_path):
    assert pareto_front([(1.0, 0.9), (2.0, 0.8), (1.5, 0.7), (3.0, 0.5)]) == [0, 1, 3]
    rows = [
        {"method": "fastv", "speedup": 1.8, "accuracy": 0.7, "label": "25%"},
        {"method": "fastv", "speedup": 1.2, "accuracy": 0.8},
        {"method": "random", "speedup": 1.8, "accuracy": 0.6},
    ]
    assert pareto_plot(rows, tmp_path / "p.png").read_bytes()[:4] == PNG_MAGIC
    keep_rows = [{**r, "keep_ratio": 0.25} for r in rows]
    assert pareto_plot(keep_rows, tmp_path / "k.png", x="keep_ratio").exists()
    with pytest.raises(ValueError, match="lacks"):
        pareto_plot([{"method": "fastv"}], tmp_path / "x.png")


def test_analytic_prediction_matches_the_measured_run(tiny_result, tmp_path):
    """--analytic (config only) predicts exactly the token counts, KV bytes and FLOPs the real run produced."""
    measured, _ = tiny_result
    path = tmp_path / "analytic.json"
    assert main(["bench", "--model", "tiny", "--analytic", "--device", "cpu", "--method",
                 "fastv:layer=2,keep_ratio=0.25", "--methods", "random", "--keep-counts", "8", "--batch-sizes", "1,2",
                 "--text-tokens", "8", "--json", str(path)]) == 0  # fmt: skip
    predicted = json.loads(path.read_text())["rows"]
    keys = ("arm", "batch", "tokens_per_layer", "kv_bytes", "prefill_flops", "visual_tokens_kept")
    assert [{k: r[k] for k in keys} for r in predicted] == [{k: r[k] for k in keys} for r in measured["rows"]]


def test_testbed_prompts_are_compares_timing_batch():
    """``--prompts testbed`` times exactly the batch ``vlm-accel compare`` times (same questions, template, padding),
    so the two tools' speed columns measure the same tensors; ``auto`` picks it for a testbed model only."""
    import torch

    from vlm_accel.eval.bench import BenchSettings, bench_inputs, testbed_inputs
    from vlm_accel.eval.compare import CompareSettings, timing_batch
    from vlm_accel.testbed import load_model, make_dataset

    model, processor = load_model("testbed-s")
    seed = CompareSettings().seed
    theirs = timing_batch(processor, make_dataset(20, seed=seed), 4, "cpu")  # compare: first 4 of its n questions
    ours = testbed_inputs("testbed-s", 4, "cpu", seed)
    assert set(ours) == set(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    assert bool((ours["attention_mask"] == 0).any())  # real, left-padded questions, unlike the synthetic prompt
    assert BenchSettings(model="testbed-s").resolved_prompts() == "testbed"
    assert BenchSettings(model="tiny").resolved_prompts() == "synthetic"
    with pytest.raises(ValueError, match="--prompts testbed needs a testbed model"):
        bench_inputs(model, 2, BenchSettings(model="tiny", prompts="testbed"))
    with pytest.raises(ValueError, match="--prompts must be"):
        BenchSettings(model="tiny", prompts="real").resolved_prompts()
