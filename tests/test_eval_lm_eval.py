"""The ``vlm-accel`` lm-eval model end to end, offline: ``simple_evaluate`` and the ``vlm-accel eval`` wrapper.

A tiny random LLaVA (CLIP 32 px / patch 8 → 16 visual tokens, 4-layer Llama) is saved with a real
``LlavaProcessor`` (word-level tokenizer, ``CLIPImageProcessorPil``) to a temp directory, next to a tiny local
``generate_until`` image task (parquet). Random weights give meaningless answers; what is checked is the plumbing:
the patch is applied, batches > 1 run through it, and the results JSON carries the config and stats.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from datasets import Dataset, Features, Image, Value  # noqa: E402
from PIL import Image as PILImage  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from transformers import LlavaProcessor, PreTrainedTokenizerFast  # noqa: E402
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402

from vlm_accel.eval.lm_eval_model import VLMAccelLM, split_method_args  # noqa: E402

from tiny_models import tiny_llava  # noqa: E402

WORDS = ["what", "color", "is", "the", "image", "?", "answer", ":", "red", "green", "blue", "yes", "no"]
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
IMAGE_TOKEN_ID = 299
COLORS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
N_DOCS = 6


def build_processor() -> LlavaProcessor:
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    vocab["<image>"] = IMAGE_TOKEN_ID
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left", extra_special_tokens={"image_token": "<image>"},
    )  # fmt: skip
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=fast, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, image_token="<image>",
    )  # fmt: skip


TASK_YAML = """\
task: tiny_color_vqa
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
test_split: test
output_type: generate_until
doc_to_image: [image]
doc_to_text: "<image> what color is the image ? answer :"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["\\n"], do_sample: false, max_gen_toks: 3}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true}}
metadata: {{version: 0.0}}
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lm_eval_assets")
    model_dir = root / "tiny-llava"
    model = tiny_llava()
    model.generation_config.pad_token_id = 0
    model.save_pretrained(model_dir)
    build_processor().save_pretrained(model_dir)
    names = list(COLORS) * 2
    images = [PILImage.new("RGB", (40, 40), COLORS[n]) for n in names[:N_DOCS]]
    features = Features({"image": Image(), "answer": Value("string")})
    Dataset.from_dict({"image": images, "answer": names[:N_DOCS]}, features=features).to_parquet(
        root / "colors.parquet"
    )
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tiny_color_vqa.yaml").write_text(TASK_YAML.format(parquet=root / "colors.parquet"))
    return {"model": model_dir, "tasks": tasks, "root": root}


def task_manager(assets):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(assets["tasks"]), include_defaults=False)  # skip indexing hub tasks


def test_method_args_split_by_config_fields():
    configs, rest = split_method_args("fastv", None, {"layer": 2, "keep_ratio": 0.25, "dtype": "float32"})
    assert [c.to_dict() for c in configs] == [{"method": "fastv", "layer": 2, "keep_ratio": 0.25, "keep_count": None}]
    assert rest == {"dtype": "float32"}
    from_json, _ = split_method_args(None, '{"method": "random", "layer": 1, "keep_count": 4, "seed": 3}', {})
    assert from_json[0].to_dict()["seed"] == 3
    assert split_method_args("none", None, {"layer": 2}) == ([], {"layer": 2})
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        split_method_args("nope", None, {})
    with pytest.raises(ValueError, match="not both"):
        split_method_args("fastv", {"method": "fastv"}, {})
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        split_method_args("fastv", None, {"keep_ratio": 2.0})


def test_simple_evaluate_patched_batch2_records_config_and_stats(assets):
    from lm_eval import simple_evaluate
    lm = VLMAccelLM(
        pretrained=str(assets["model"]), method="fastv", layer=2, keep_ratio=0.25, device="cpu", batch_size=2,
        dtype="float32",
    )  # fmt: skip
    assert lm.patch is not None and lm.patch.active
    results = simple_evaluate(
        model=lm, tasks=["tiny_color_vqa"], task_manager=task_manager(assets),
        log_samples=True,
    )  # fmt: skip
    assert "exact_match,none" in results["results"]["tiny_color_vqa"]
    assert len(results["samples"]["tiny_color_vqa"]) == N_DOCS
    info = results["config"]["vlm_accel"]
    assert info["method"] == "fastv"
    assert info["method_config"] == [{"method": "fastv", "layer": 2, "keep_ratio": 0.25, "keep_count": None}]
    stats = info["stats"]
    assert stats["generate_calls"] == N_DOCS // 2 and stats["rows"] == N_DOCS
    assert stats["prefill_calls"] == N_DOCS // 2
    assert stats["visual_tokens_seen"] == 16 * N_DOCS
    assert stats["visual_tokens_kept"] == 4 * N_DOCS  # ceil(0.25 × 16) per image
    assert 0 < stats["kv_bytes"] < stats["kv_bytes_unpatched"]
    json.dumps(results["config"], default=str)  # serialisable as lm-eval writes it


def test_unpatched_and_noop_give_identical_answers(assets):
    """method=none and a keep_ratio=1 patch answer identically (greedy), through the same lm-eval path."""
    from lm_eval import simple_evaluate
    answers = {}
    for method, params in (("none", {}), ("random", {"layer": 2, "keep_ratio": 1.0})):
        lm = VLMAccelLM(pretrained=str(assets["model"]), method=method, device="cpu", batch_size=3, **params)
        results = simple_evaluate(
            model=lm, tasks=["tiny_color_vqa"], task_manager=task_manager(assets),
            log_samples=True,
        )  # fmt: skip
        answers[method] = [s["resps"] for s in results["samples"]["tiny_color_vqa"]]
        assert results["config"]["vlm_accel"]["method"] == method
    assert answers["none"] == answers["random"]


def test_processor_instance_and_model_instance(assets):
    """The upstream _create_tokenizer bug: a passed processor must become self.processor / self.tokenizer."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(assets["model"])
    processor = AutoProcessor.from_pretrained(assets["model"])
    lm = VLMAccelLM(pretrained=model, processor=processor, method="random", layer=1, keep_count=3, batch_size=2)
    assert lm.processor is processor and lm.tokenizer is processor.tokenizer
    assert lm.image_token_id == IMAGE_TOKEN_ID
    with pytest.raises(TypeError, match="processor must be"):
        VLMAccelLM(pretrained=model, processor=42)


def test_cli_wrapper_writes_results_json(assets, tmp_path):
    """`vlm-accel eval` in a subprocess. With the shipped testbed tasks present, run one of them with no
    --include_path (the wrapper adds it); otherwise the local tiny task."""
    from vlm_accel.eval.lm_eval_cli import testbed_tasks_dir

    out = tmp_path / "out"
    if testbed_tasks_dir() is not None:
        task, include = "vlm_accel_testbed_color", []
    else:
        task, include = "tiny_color_vqa", ["--include_path", str(assets["tasks"])]
    cmd = [
        sys.executable, "-m", "vlm_accel.cli", "eval", "--model", "vlm-accel",
        "--model_args", f"pretrained={assets['model']},method=random,layer=2,keep_ratio=0.5,dtype=float32",
        "--tasks", task, *include, "--device", "cpu", "--batch_size", "4", "--limit", "4",
        "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "VLM_ACCEL_CACHE": str(tmp_path / "cache")}  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert task in proc.stdout  # lm-eval's results table
    result_files = list(out.rglob("results_*.json"))
    assert len(result_files) == 1
    results = json.loads(result_files[0].read_text())
    assert task in results["results"]
    info = results["config"]["vlm_accel"]
    assert info["method_config"][0]["method"] == "random" and info["method_config"][0]["keep_ratio"] == 0.5
    assert info["stats"]["generate_calls"] == 1 and info["stats"]["visual_tokens_kept"] == 8 * 4
    assert list(out.rglob(f"samples_{task}_*.jsonl"))


def test_cli_wrapper_help_is_lm_evals(capsys):
    from vlm_accel.cli import main

    assert main(["eval", "run", "-h"]) == 0
    assert "--model_args" in capsys.readouterr().out


def test_unknown_testbed_weights_raise_clearly(monkeypatch, tmp_path):
    testbed = pytest.importorskip("vlm_accel.testbed")
    from vlm_accel.eval import lm_eval_model

    monkeypatch.setattr(testbed, "model_dir", lambda name: tmp_path / name)
    with pytest.raises(FileNotFoundError, match="testbed model 'testbed-l' has no weights"):
        lm_eval_model.resolve_pretrained("testbed-l")
    assert lm_eval_model.resolve_pretrained("org/some-model") == "org/some-model"


def test_testbed_model_on_a_testbed_task(tmp_path, monkeypatch):
    """`pretrained=testbed-s` on a shipped testbed task (skipped until the testbed weights are packaged)."""
    from vlm_accel.eval.lm_eval_cli import testbed_tasks_dir

    testbed = pytest.importorskip("vlm_accel.testbed")
    if testbed_tasks_dir() is None or not (testbed.model_dir("testbed-s") / "model.safetensors").exists():
        pytest.skip("testbed tasks or testbed-s weights not packaged")
    monkeypatch.setenv("VLM_ACCEL_CACHE", str(tmp_path))
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = VLMAccelLM(pretrained="testbed-s", method="fastv", layer=1, keep_ratio=0.5, device="cpu", batch_size=4)
    results = simple_evaluate(
        model=lm, tasks=["vlm_accel_testbed_color"], limit=8,
        task_manager=TaskManager(include_path=str(testbed_tasks_dir()), include_defaults=False),
    )  # fmt: skip
    assert 0.0 <= results["results"]["vlm_accel_testbed_color"]["exact_match,first_word"] <= 1.0
    stats = results["config"]["vlm_accel"]["stats"]
    assert stats["rows"] == 8 and stats["visual_keep_fraction"] == 0.5


def test_testbed_task_data_ignores_model_args_passed_as_metadata(tmp_path, monkeypatch):
    """lm-eval calls ``custom_dataset(**metadata, **dataset_kwargs)`` with every model argument in the metadata:
    a method's ``seed`` must not collide with the task's own data seed."""
    from vlm_accel.testbed.tasks.utils import load_testbed

    monkeypatch.setenv("VLM_ACCEL_CACHE", str(tmp_path))
    data = load_testbed(pretrained="testbed-l", method="random", seed=3, n=7, family="count",
                        testbed_family="color", testbed_n=2, testbed_seed=5)  # fmt: skip
    assert len(data["test"]) == 2 and set(data["test"]["family"]) == {"color"}
