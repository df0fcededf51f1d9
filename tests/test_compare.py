"""``vlm-accel compare`` end to end on a random-weight testbed-shaped model (fast; accuracy is not the point), and
its pieces: the step clock, paired speed-ups, the accuracy interval, setting labels, the Pareto plot."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from vlm_accel.cli import main
from vlm_accel.eval.bench import StepClock, paired_speedups, time_generate
from vlm_accel.eval.compare import setting_text, wilson_halfwidth
from vlm_accel.eval.plots import pareto_plot
from vlm_accel.methods.fastv import FastVConfig
from vlm_accel.methods.pai import PAIConfig
from vlm_accel.methods.pool import PoolConfig
from vlm_accel.testbed import build_processor, make_config

PNG_MAGIC = b"\x89PNG"


def test_compare_runs_every_requested_method_and_writes_json_and_plot(tmp_path, capsys):
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    LlavaForConditionalGeneration(make_config("testbed-s")).save_pretrained(model_dir)
    build_processor().save_pretrained(model_dir)
    out = tmp_path / "out"
    code = main(["compare", "--model", str(model_dir), "--n", "4", "--batch-size", "4", "--keep", "0.5,0.25",
                 "--methods", "fastv,random,pai,paint,moh", "--rounds", "2", "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    result = json.loads((out / "compare.json").read_text())
    labels = [(row["label"], row["setting"]) for row in result["rows"]]
    assert labels == [("unpatched", "—"), ("fastv", "keep 0.5"), ("fastv", "keep 0.25"), ("random", "keep 0.5"),
                      ("random", "keep 0.25"), ("pai", "alpha=0.2"), ("moh-qnorm-75%", "router=qnorm"),
                      ("moh-qnorm-50%", "router=qnorm")]  # fmt: skip
    assert "paint" in result["skipped"]  # the testbed's 1-layer tower has no penultimate layer
    # the shipped testbed-l router (and its tuned language model) does not fit this model: that setting is skipped
    assert "does not fit" in result["skipped"]["moh-learned-75%+tuned-LM router=learned"]
    assert result["clock"] == "process CPU" and result["torch_threads"] == 1 and result["timing_rounds"] == 2
    for row in result["rows"]:
        assert set(row["per_family"]) <= {"color", "shape", "count", "exist", "position"}
        assert len(row["prefill_s_runs"]) == 2 and len(row["decode_step_s_runs"]) == 2
        assert row["prefill_s"] > 0 and row["decode_step_s"] > 0
        for key in ("prefill_speedup", "decode_speedup"):
            low, high = row[key + "_range"]
            assert low <= row[key] <= high
        assert 0 < row["accuracy_ci95"] <= 0.5
    kept = {(r["label"], r["keep_ratio"]): r["visual_kept"] for r in result["rows"]}
    assert kept[("fastv", 0.25)] == kept[("random", 0.25)] == 0.25
    assert result["rows"][0]["prefill_speedup"] == result["rows"][0]["decode_speedup"] == 1.0
    assert (out / "pareto.png").read_bytes()[:4] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert "prefill speed-up" in printed and "decode-step speed-up" in printed and "skipped paint" in printed


def test_step_clock_keeps_the_last_generate_and_counts_its_steps():
    from inputs import RowSpec, batch_inputs, make_row
    from tiny_models import tiny_llava

    model = tiny_llava()
    inputs = batch_inputs(model, [make_row(model, RowSpec())])
    clock = StepClock("cpu")
    time_generate(model, inputs, "cpu", new_tokens=5, steps=clock)
    assert len(clock.stamps) == 5 and len(clock.steps) == 4
    assert all(wall >= 0 and cpu >= 0 for wall, cpu in clock.steps) and clock.ttft[0] > 0

    # a generate() running another generate() first (like SGL's guide) with the same criteria: only the outer
    # model's own generation counts, and the time to first token spans both
    guide = tiny_llava(seed=1)
    original = model.generate

    def guided(**kwargs):
        guide.generate(**{**kwargs, "max_new_tokens": 3, "min_new_tokens": 3})
        return original(**kwargs)

    model.generate = guided
    try:
        clock = StepClock("cpu")
        time_generate(model, inputs, "cpu", new_tokens=4, steps=clock)
    finally:
        del model.generate
    assert len(clock.stamps) == 4 and len(clock.steps) == 3


def test_paired_speedups_pair_runs_by_round():
    assert paired_speedups([2.0, 4.0, 6.0], [1.0, 2.0, 2.0]) == (2.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="equally long"):
        paired_speedups([1.0], [1.0, 2.0])


@pytest.mark.parametrize("p, n", [(0.5, 100), (0.96, 200), (1.0, 100), (0.0, 15)])
def test_wilson_halfwidth_matches_the_interval_bounds(p, n):
    z = 1.959964
    # Wilson (1927): bounds = (p + z²/2n ± z·sqrt(p(1−p)/n + z²/4n²)) / (1 + z²/n)
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lower, upper = center - spread, center + spread
    assert wilson_halfwidth(p, n, z=z) == pytest.approx((upper - lower) / 2)
    assert -1e-12 <= lower <= p <= upper <= 1 + 1e-12


def test_setting_text_names_what_distinguishes_a_setting():
    assert setting_text(None) == "—"
    assert setting_text(FastVConfig(keep_ratio=0.25)) == "keep 0.25"
    assert setting_text(PoolConfig(factor=3)) == "factor=3"
    assert setting_text(PAIConfig(alpha=0.5)) == "alpha=0.5"


def test_pareto_plot_with_labels_and_error_bars(tmp_path):
    rows = [  # deliberately not in x order
        {"series": "sgl", "label": "keep 0.1", "x": 0.9, "acc": 0.93, "xr": (0.85, 0.95), "ci": 0.03},
        {"series": "sgl", "label": "keep 0.5", "x": 1.1, "acc": 0.95, "xr": (1.0, 1.2), "ci": 0.03},
        {"series": "sgl", "label": "keep 0.25", "x": 1.0, "acc": 0.95, "xr": (0.9, 1.1), "ci": 0.03},
        {"series": "unpatched", "label": "", "x": 1.0, "acc": 0.96, "xr": (1.0, 1.0), "ci": 0.02},
    ]
    path = pareto_plot(rows, tmp_path / "p.png", x="x", y="acc", series="series", x_range="xr", y_err="ci")
    assert path.read_bytes()[:4] == PNG_MAGIC


def test_round_schedule_brackets_every_setting_with_reference_runs():
    from vlm_accel.eval.timing import bracket_references, round_schedule

    assert round_schedule(5, 0, reference_every=3) == [0, 1, 2, 3, 0, 4, 0]
    assert round_schedule(5, 1, reference_every=3) == [0, 4, 3, 2, 0, 1, 0]
    assert round_schedule(1, 0) == [0]
    order = round_schedule(12, 0, reference_every=5)
    assert order.count(0) == 4 and sorted(i for i in order if i) == list(range(1, 12))
    # each setting is compared with the mean of the reference runs just before and after it
    values = [10.0, 1.0, 2.0, 3.0, 14.0, 4.0, 18.0]  # references at positions 0, 4, 6
    refs = bracket_references([0, 1, 2, 3, 0, 4, 0], values, lambda v: sum(v) / len(v))
    assert refs == [None, 12.0, 12.0, 12.0, None, 16.0, None]
    # a missing reference value (e.g. no decode step) falls back to the next reference out
    refs = bracket_references([0, 1, 0, 2, 0], [4.0, 1.0, None, 2.0, 8.0], lambda v: sum(v) / len(v))
    assert refs == [None, 6.0, None, 6.0, None]
    with pytest.raises(ValueError, match="positions but"):
        bracket_references([0, 1], [1.0], max)


def test_chair_phase_reports_chair_i_for_each_setting_or_why_not(tmp_path):
    out = tmp_path / "out"
    code = main(["compare", "--methods", "fastv,dyvte", "--keep", "0.25", "--n", "4", "--batch-size", "4",
                 "--rounds", "1", "--chair", "4", "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    rows = {r["label"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    for label in ("unpatched", "fastv"):
        assert 0.0 <= rows[label]["chair_i"] <= 1.0 and rows[label]["chair_n"] == 4
        assert 0.0 <= rows[label]["recall"] <= 1.0
    assert "chair_i" not in rows["dyvte"] and "another model" in rows["dyvte"]["chair_skipped"]
