"""Data-parallel evaluation (issue #17, part 2): ``vlm-accel eval --num-processes 2`` on two CPU processes (gloo,
set up by accelerate under torchrun) gives the same metrics and the same per-document answers as one process, and
its single results file carries the patch config and the merged statistics of both processes.

The end-to-end check runs the shipped ``testbed-s`` on the shipped ``vlm_accel_testbed_color`` task with
``--limit 5`` (odd, so lm-eval pads one rank: rank 0 gets 3 documents, rank 1 gets 2). The unit tests pin the
pieces: padding detection, the merge, the launcher command and the option parsing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("lm_eval")

from vlm_accel.eval.distributed import (  # noqa: E402
    generate_without_padding,
    launch_command,
    merge_stats,
    padding_sources,
    pop_num_processes,
)

TASK = "vlm_accel_testbed_color"
METRIC = "exact_match,first_word"
LIMIT = 5
MODEL_ARGS = {"pretrained": "testbed-s", "method": "fastv", "layer": 1, "keep_ratio": 0.5}


# ---------------------------------------------------------------------------------------------- pieces


def test_padding_copies_are_found_and_answered_from_their_original():
    a, b = SimpleNamespace(repeats=1), SimpleNamespace(repeats=2)
    requests = [a, b, b, a, a]  # b repeated by design; a padded twice (lm-eval appends the last request again)
    assert padding_sources(requests) == [None, None, None, 0, 0]
    calls = []

    def generate(real, disable_tqdm=False):
        calls.append(list(real))
        return [f"answer{i}" for i in range(len(real))]

    assert generate_without_padding(generate, requests) == ["answer0", "answer1", "answer2", "answer0", "answer0"]
    assert calls == [[a, b, b]]


def test_merge_sums_counters_and_recomputes_fractions():
    one = {"generate_calls": 2, "rows": 3, "generate_time_s": 1.0, "visual_tokens_seen": 300,
           "visual_tokens_kept": 150, "visual_keep_fraction": 0.5, "kv_bytes": 10, "kv_bytes_unpatched": 40,
           "kv_bytes_fraction": 0.25, "tokens_per_layer_last_prefill": [9, 5], "methods": {"fastv": {}}}  # fmt: skip
    two = {**one, "rows": 2, "visual_tokens_seen": 100, "visual_tokens_kept": 10, "kv_bytes": 30,
           "kv_bytes_unpatched": 40, "tokens_per_layer_last_prefill": [7, 3]}  # fmt: skip
    merged = merge_stats([one, two])
    assert merged["rows"] == 5 and merged["generate_calls"] == 4
    assert merged["visual_tokens_seen"] == 400 and merged["visual_keep_fraction"] == 160 / 400
    assert merged["kv_bytes_fraction"] == 40 / 80
    assert merged["tokens_per_layer_last_prefill"] == [9, 5]  # rank 0's
    assert merged["processes"] == 2 and merged["per_process"] == [one, two]
    assert merge_stats([one]) == one


def test_num_processes_option_and_launch_commands():
    assert pop_num_processes(["--tasks", "t", "--num-processes", "3"]) == (3, ["--tasks", "t"])
    assert pop_num_processes(["--num-processes=2", "--limit", "4"]) == (2, ["--limit", "4"])
    assert pop_num_processes(["--limit", "4"]) == (1, ["--limit", "4"])
    for bad in (["--num-processes", "0"], ["--num-processes=x"], ["--num-processes"]):
        with pytest.raises(ValueError, match="--num-processes"):
            pop_num_processes(bad)
    cmd, env = launch_command(2, ["--tasks", "t"], cuda=False)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node"] and cmd[5] == "2"
    assert cmd[-4:] == ["-m", "vlm_accel.eval.lm_eval_cli", "--tasks", "t"]
    assert env["ACCELERATE_USE_CPU"] == "true"
    with pytest.raises(ValueError, match="positive integer"):
        launch_command(0, [], cuda=False)


def test_bad_num_processes_is_one_line(capsys):
    from vlm_accel.eval.lm_eval_cli import main

    assert main(["--num-processes", "two", "--tasks", TASK]) == 2
    assert "--num-processes must be a positive integer" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- end to end


def _samples(path) -> dict[int, list]:
    return {s["doc_id"]: s["filtered_resps"] for s in map(json.loads, path.read_text().splitlines())}


@pytest.mark.slow
def test_two_cpu_processes_equal_one(tmp_path, monkeypatch):
    from vlm_accel.eval.lm_eval_cli import testbed_tasks_dir

    testbed = pytest.importorskip("vlm_accel.testbed")
    if testbed_tasks_dir() is None or not (testbed.model_dir("testbed-s") / "model.safetensors").exists():
        pytest.skip("testbed tasks or testbed-s weights not packaged")
    cache = tmp_path / "cache"  # shared: the task data is generated once, by the one-process run
    monkeypatch.setenv("VLM_ACCEL_CACHE", str(cache))
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from vlm_accel.eval.lm_eval_model import VLMAccelLM

    lm = VLMAccelLM(**MODEL_ARGS, device="cpu", batch_size=2)
    single = simple_evaluate(
        model=lm, tasks=[TASK], limit=LIMIT, log_samples=True,
        task_manager=TaskManager(include_path=str(testbed_tasks_dir()), include_defaults=False),
    )  # fmt: skip
    single_answers = {s["doc_id"]: s["filtered_resps"] for s in single["samples"][TASK]}

    out = tmp_path / "out"
    model_args = ",".join(f"{k}={v}" for k, v in MODEL_ARGS.items())
    cmd = [
        sys.executable, "-m", "vlm_accel.cli", "eval", "--num-processes", "2", "--model", "vlm-accel",
        "--model_args", model_args, "--tasks", TASK, "--limit", str(LIMIT), "--batch_size", "2",
        "--device", "cpu", "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "VLM_ACCEL_CACHE": str(cache)}  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "on rank 1" in proc.stderr, "the second process must build its own shard"
    result_files = list(out.rglob("results_*.json"))
    assert len(result_files) == 1, "one merged results file"
    results = json.loads(result_files[0].read_text())

    assert results["results"][TASK][METRIC] == single["results"][TASK][METRIC]
    (sample_file,) = out.rglob(f"samples_{TASK}_*.jsonl")
    assert _samples(sample_file) == single_answers  # every document, the same answer

    info = results["config"]["vlm_accel"]
    assert info["method_config"] == single["config"]["vlm_accel"]["method_config"]
    stats, one = info["stats"], single["config"]["vlm_accel"]["stats"]
    assert stats["processes"] == 2
    assert [p["rows"] for p in stats["per_process"]] == [3, 2]  # lm-eval's padding copy is not generated
    for key in ("rows", "visual_tokens_seen", "visual_tokens_kept", "visual_keep_fraction"):
        assert stats[key] == one[key], key
