"""The GPU suite's ``--dry-run`` (every section at tiny sizes on CPU) and what it writes, so the suite cannot rot.

Checks the contents, not just the exit code: the meta the issue asks for, every section's status, the llava rows
and their ratios (recomputed here from the stored times and FLOPs), the targets table, the markdown, the plots,
and that a rerun on the same folder keeps finished units and measures only what is missing.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _suite_module():
    name = "vlm_accel_gpu_suite"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


suite_mod = _suite_module()


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-suite")
    code = suite_mod.main(["--dry-run", "--out", str(out)])
    return code, out, json.loads((out / "suite.json").read_text())


def test_dry_run_exits_cleanly_and_records_meta(dry):
    code, _, suite = dry
    assert code == 0
    meta = suite["meta"]
    assert set(meta["versions"]) >= {"torch", "transformers", "triton", "flash_attn"}
    assert meta["versions"]["torch"] == torch.__version__
    assert "--dry-run" in meta["command"]
    assert meta["device_name"] and meta["cuda_available"] == torch.cuda.is_available()
    assert suite["profile"]["name"] == "dry-run"
    assert list(suite["sections"]) == list(suite_mod.SECTION_ORDER)
    assert {s["status"] for s in suite["sections"].values()} == {"done"}, suite["sections"]


def test_pytest_section_ran_the_gpu_marked_tests(dry):
    data = dry[2]["sections"]["pytest_gpu"]["data"]
    assert data["tests"] > 0 and data["failures"] == 0 and data["errors"] == 0
    if not torch.cuda.is_available():
        assert data["skipped"] == data["tests"]  # every gpu test skips without CUDA


def test_llava_rows_and_ratios(dry):
    data = dry[2]["sections"]["llava"]["data"]
    p = suite_mod.DRY
    n_visual = data["visual_tokens_per_image"]
    assert n_visual == 16
    rows = {(r["attn"], r["batch"], r["arm"]): r for r in data["rows"]}
    labels = {"unpatched", "no-op (fastv keep 100 %)", "pool 2x2 (4/16)"}
    labels |= {f"{m} {k}/16" for m in ("fastv", "random") for k in p.keep_counts}
    for batch in p.batches:
        assert {arm for attn, b, arm in rows if b == batch and attn == "sdpa"} == labels
        base = rows[("sdpa", batch, "unpatched")]
        seq = base["seq_len"]
        for label in labels:
            row = rows[("sdpa", batch, label)]
            assert row["prefill_speedup"] == pytest.approx(base["prefill_s"] / row["prefill_s"])
            assert row["e2e_speedup"] == pytest.approx(base["e2e_s"] / row["e2e_s"])
            assert row["flops_ideal_speedup"] == pytest.approx(base["prefill_flops"] / row["prefill_flops"])
            kept = int(label.split()[1].split("/")[0]) if label.split()[0] in ("fastv", "random") else None
            if kept is not None:  # layers from K on hold the text tokens and the kept visual tokens
                assert row["tokens_per_layer"] == [seq] * p.layer + [seq - n_visual + kept] * (4 - p.layer)
                assert row["visual_tokens_kept"] == kept * batch
                assert row["flops_ideal_speedup"] > 1 and row["kv_fraction"] < 1
        assert rows[("sdpa", batch, "no-op (fastv keep 100 %)")]["flops_ideal_speedup"] == 1.0
        for label in ("unpatched", f"fastv {min(p.keep_counts)}/16", f"random {min(p.keep_counts)}/16"):
            assert rows[("sdpa", batch, label)][f"e2e_{p.new_tokens[1]}_speedup"] > 0
    flash = {k: s for k, s in data["units"].items() if k.startswith("flash")}
    assert flash and all("needs CUDA" in s for s in flash.values()) or torch.cuda.is_available()


def test_targets_follow_the_measurements(dry):
    suite = dry[2]
    targets = {t["target"]: t for t in suite["targets"]}
    assert len(targets) == 8
    headline = next(
        r for r in suite["sections"]["llava"]["data"]["rows"]
        if r["attn"] == "sdpa" and r["batch"] == 1 and r["arm"] == "fastv 2/16"
    )  # fmt: skip
    prefill = next(t for name, t in targets.items() if name.startswith("prefill speedup"))
    assert prefill["measured"] == headline["prefill_speedup"]
    for t in targets.values():
        if t["measured"] is None:
            assert t["met"] is None
        else:
            goal = float(t["goal"].split()[1].rstrip("×% "))
            assert t["met"] == (t["measured"] >= goal if t["goal"].startswith("≥") else t["measured"] <= goal)
    if not torch.cuda.is_available():  # Triton is not timed on CPU: no number, no verdict
        assert targets["Triton row-probs vs torch at ≥ 64 rows (worst point)"]["met"] is None


def test_kernel_and_moh_sections(dry):
    sections = dry[2]["sections"]
    kernels = sections["kernels"]["data"]
    assert {r["op"] for r in kernels["rows"]} == {"row_probs", "compact_kv", "biased_attn", "head_sparse"}
    assert all(r["ms"] is not None and r["ms"] > 0 for r in kernels["rows"])
    assert set(kernels["decisions"]) == {"row_probs", "compact_kv", "biased_attn", "head_sparse"}
    moh = sections["moh"]["data"]
    p = suite_mod.DRY
    expected = len(p.moh_geometries) * len(p.moh_batches) * len(p.moh_lengths) * len(p.moh_fractions)
    assert len(moh["rows"]) == expected
    assert all(r["dense_sdpa_ms"] > 0 and r["reference_ms"] > 0 for r in moh["rows"])
    from vlm_accel import list_methods

    if "moh" not in list_methods():
        assert moh["moh_method"] == "moh method not registered"


def test_markdown_and_plots(dry):
    _, out, suite = dry
    md = (out / "summary.md").read_text()
    assert "dry run at tiny sizes on CPU" in md
    for heading in (
        "## Sections",
        "## Targets",
        "## pytest -m gpu",
        "### sdpa",
        "## Kernels",
        "## Head-sparse",
    ):
        assert heading in md
    for row in suite["sections"]["llava"]["data"]["rows"]:
        assert f"| {row['arm']} | {row['batch']} |" in md
    assert suite["plots"]
    for plot in suite["plots"]:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_keeps_finished_units_and_measures_the_missing_one(dry):
    _, out, _ = dry
    units = out / "sections" / "llava"
    victim = units / "sdpa-prefill-b2.json"
    kept_before = (units / "sdpa-prefill-b1.json").read_text()
    kernels_before = (out / "sections" / "kernels.json").read_text()
    victim.unlink()
    (out / "sections" / "llava.json").unlink()  # as if the run was cut inside the llava section
    assert suite_mod.main(["--dry-run", "--out", str(out)]) == 0
    suite = json.loads((out / "suite.json").read_text())
    statuses = suite["sections"]["llava"]["data"]["units"]
    assert statuses["sdpa-prefill-b2"] == "done"
    assert statuses["sdpa-prefill-b1"] == "done (resumed)"
    assert victim.exists()
    assert (units / "sdpa-prefill-b1.json").read_text() == kept_before
    assert (
        out / "sections" / "kernels.json"
    ).read_text() == kernels_before  # a finished section is not redone
    assert suite["sections"]["kernels"]["resumed"] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown without CUDA")
def test_without_cuda_the_full_suite_refuses_clearly(tmp_path, capsys):
    assert suite_mod.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "--dry-run" in err
    assert not (tmp_path / "suite.json").exists()


def test_pytest_section_subprocess_timeout_is_recorded(tmp_path):
    """The GPU run's pytest goes through a subprocess with the section's cap; a cut run says so and keeps counts."""
    ctx = suite_mod.Context(profile=suite_mod.FULL, out=tmp_path, dry_run=False, force=False)
    result = suite_mod.section_pytest_gpu(ctx, cap=0.5)
    assert result["status"] == "timeout" and "ran past" in result["reason"]
    assert result["tests"] == result["passed"] + result["failures"] + result["errors"] + result["skipped"]
    assert (tmp_path / "logs" / "pytest_gpu.txt").exists()
