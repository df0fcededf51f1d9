"""``vlm-accel compare`` end to end on a random-weight testbed-shaped model (fast; accuracy is not the point)."""

from __future__ import annotations

import json

import torch
from transformers import LlavaForConditionalGeneration

from vlm_accel.cli import main
from vlm_accel.testbed import build_processor, make_config


def test_compare_runs_every_requested_method_and_writes_json_and_plot(tmp_path):
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    LlavaForConditionalGeneration(make_config("testbed-s")).save_pretrained(model_dir)
    build_processor().save_pretrained(model_dir)
    out = tmp_path / "out"
    code = main(["compare", "--model", str(model_dir), "--n", "4", "--batch-size", "4", "--keep", "0.5,0.25",
                 "--methods", "fastv,random,pai,paint", "--out", str(out), "--threads", "1"])  # fmt: skip
    assert code == 0
    result = json.loads((out / "compare.json").read_text())
    labels = [(row["label"], row["keep_ratio"]) for row in result["rows"]]
    assert labels == [("unpatched", 1.0), ("fastv", 0.5), ("fastv", 0.25), ("random", 0.5), ("random", 0.25),
                      ("pai", 1.0)]  # fmt: skip
    assert "paint" in result["skipped"]  # the testbed's 1-layer tower has no penultimate layer
    for row in result["rows"]:
        assert row["prefill_s"] > 0 and set(row["per_family"]) <= {"color", "shape", "count", "exist", "position"}
    kept = {(r["label"], r["keep_ratio"]): r["visual_kept"] for r in result["rows"]}
    assert kept[("fastv", 0.25)] == kept[("random", 0.25)] == 0.25
    assert all(row["decode_step_s"] > 0 for row in result["rows"])
    assert (out / "pareto.png").stat().st_size > 0
