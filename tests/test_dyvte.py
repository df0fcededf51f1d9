"""DyVTE (dynamic visual-token exit): forced and router-driven exits against a masked full-sequence reference,
per-row exits in a padded batch, router files (shapes, fingerprints), and the labelling rule of router training.

The reference is the unpatched model in eager attention on the full sequence, with each row's visual tokens
hidden as keys from the layer after its exit on (nothing here uses vlm_accel's runtime).
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

import vlm_accel
from vlm_accel import patch_model
from vlm_accel.methods.dyvte import DyVTE, DyVTEConfig
from vlm_accel.methods.dyvte_routers import DyVTERouters, model_metadata, router_features, text_span_mask
from vlm_accel.registry import list_methods

from families import BATCH_ROWS, BUILDERS
from inputs import batch_inputs, extend_inputs, make_row, reference_position_kwargs
from tiny_models import IMAGE_TOKEN, VIDEO_TOKEN, tiny_llava

if "dyvte" not in list_methods():
    vlm_accel.register_method("dyvte", DyVTE)

ATOL = 3e-5
NEW = 3


@functools.cache
def model(family: str = "llava", attn: str = "sdpa"):
    return BUILDERS[family](attn)


@functools.cache
def inputs_for(family: str = "llava") -> dict:
    m = model(family)
    return batch_inputs(m, [make_row(m, spec) for spec in BATCH_ROWS[family]])


def visual(inputs: dict) -> torch.Tensor:
    ids = inputs["input_ids"]
    return ((ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN)) & inputs["attention_mask"].bool()


def exit_reference(family: str, inputs: dict, exit_layers: list[int | None]) -> torch.Tensor:
    """Eager logits with row b's visual tokens hidden from layer ``exit_layers[b] + 1`` on (None: never)."""
    m = model(family, "eager")
    vis = visual(inputs)
    layers = m.model.language_model.layers

    def hide(index, module, args, kwargs):
        rows = torch.tensor([e is not None and index > e for e in exit_layers])
        mask = kwargs["attention_mask"]
        kwargs["attention_mask"] = mask.masked_fill(
            (vis & rows[:, None])[:, None, None, :], torch.finfo(mask.dtype).min
        )
        return args, kwargs

    handles = [layer.register_forward_pre_hook(functools.partial(hide, i), with_kwargs=True)
               for i, layer in enumerate(layers)]  # fmt: skip
    try:
        with torch.no_grad():
            return m(**{**inputs, **reference_position_kwargs(m, inputs)}, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl"])
def test_forced_exit_equals_masked_reference(family):
    inputs = inputs_for(family)
    with torch.no_grad(), patch_model(model(family), DyVTEConfig(exit_layer=1)) as patch:
        logits = model(family)(**inputs).logits
        stats = patch.stats.methods["dyvte"]
    reference = exit_reference(family, inputs, [1, 1, 1])
    text = inputs["attention_mask"].bool() & ~visual(inputs)
    torch.testing.assert_close(logits[text], reference[text], rtol=0, atol=ATOL)
    assert stats["last_exit_layers"] == [1, 1, 1] and stats["mean_visual_layers"] == 2.0
    assert 0 < stats["prefill_flops_saved"] < 1
    assert patch.stats.tokens_per_layer[2] < patch.stats.tokens_per_layer[1]


def test_forced_exit_generate_equals_masked_reference():
    inputs = inputs_for()
    with torch.no_grad(), patch_model(model(), DyVTEConfig(exit_layer=0)) as patch:
        out = model().generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                               suppress_tokens=[IMAGE_TOKEN], return_dict_in_generate=True, output_logits=True)  # fmt: skip
        kv = patch.stats.kv_length_per_layer
    window = inputs["input_ids"].shape[1]
    for step in range(NEW):
        reference = exit_reference(
            "llava", extend_inputs(inputs, out.sequences[:, : window + step]), [0, 0, 0]
        )
        torch.testing.assert_close(out.logits[step], reference[:, -1], rtol=0, atol=ATOL)
    longest_text = int((inputs["attention_mask"].bool() & ~visual(inputs)).sum(1).max())
    assert kv == [window + NEW - 1] + [longest_text + NEW - 1] * 3  # deeper layers hold no visual K/V


def designed_routers(m, inputs: dict, pattern: list[int | None], path) -> None:
    """Routers whose ``logit[1] - logit[0]`` is exactly ±1 on these rows' own features, so row b exits after layer
    ``pattern[b]`` (None: never). GELU(s) - GELU(-s) = s makes a two-unit router exactly linear."""
    with torch.no_grad():
        hidden = m(**inputs, output_hidden_states=True, use_cache=False).hidden_states
    vis = visual(inputs)
    span = text_span_mask(vis, inputs["attention_mask"].bool())
    layers = len(hidden) - 1
    d = hidden[0].shape[-1]
    routers = DyVTERouters(d, layers - 1, 2)
    routers.w1.data.zero_()
    routers.w2.data.zero_()
    for layer in range(layers - 1):
        x = router_features(hidden[layer + 1], span).double()
        target = torch.tensor(
            [1.0 if p is not None and p == layer else -1.0 for p in pattern], dtype=torch.float64
        )
        u = torch.linalg.lstsq(x, target[:, None]).solution[:, 0].float()
        routers.w1.data[layer, 0] = u
        routers.w1.data[layer, 1] = -u
        routers.w2.data[layer, 1] = torch.tensor([1.0, -1.0])
    routers.save(path, model_metadata(m))


def test_routers_exit_per_row_and_each_row_gives_what_it_gives_alone(tmp_path):
    inputs = inputs_for()
    path = tmp_path / "routers.safetensors"
    pattern = [0, 1, None]
    designed_routers(model(), inputs, pattern, path)
    config = DyVTEConfig(routers=str(path))
    with torch.no_grad(), patch_model(model(), config) as patch:
        logits = model()(**inputs).logits
        assert patch.stats.methods["dyvte"]["last_exit_layers"] == pattern
        reference = exit_reference("llava", inputs, pattern)
        text = inputs["attention_mask"].bool() & ~visual(inputs)
        torch.testing.assert_close(logits[text], reference[text], rtol=0, atol=ATOL)
        together = model().generate(**inputs, max_new_tokens=NEW, do_sample=False)
        for b in range(3):
            alone_inputs = batch_inputs(model(), [make_row(model(), BATCH_ROWS["llava"][b])])
            alone = model().generate(**alone_inputs, max_new_tokens=NEW, do_sample=False)
            assert patch.stats.methods["dyvte"]["last_exit_layers"] == [pattern[b]]
            assert torch.equal(together[b, -NEW:], alone[0, -NEW:])
            n = alone_inputs["input_ids"].shape[1]
            torch.testing.assert_close(logits[b, -n:][text[b, -n:]], model()(**alone_inputs).logits[0][text[b, -n:]],
                                       rtol=0, atol=ATOL)  # fmt: skip


def test_batch_savings_count_only_what_the_padded_batch_skipped(tmp_path):
    """A row that never exits keeps the batch at full width: the exited rows' visual slots are masked, not skipped,
    so the batch saves nothing, although each exited row alone would (runtime issue, bug 4)."""
    inputs = inputs_for()
    path = tmp_path / "routers.safetensors"
    designed_routers(model(), inputs, [0, 1, None], path)
    with torch.no_grad(), patch_model(model(), DyVTEConfig(routers=str(path))) as patch:
        model()(**inputs)
        stats = patch.stats.methods["dyvte"]
    assert stats["last_exit_layers"] == [0, 1, None]
    assert stats["prefill_flops_saved"] == 0.0
    assert stats["prefill_flops_saved_alone"] > 0.05
    with torch.no_grad(), patch_model(model(), DyVTEConfig(exit_layer=1)) as patch:
        model()(**inputs)
        stats = patch.stats.methods["dyvte"]
    assert 0 < stats["prefill_flops_saved"] <= stats["prefill_flops_saved_alone"]


def test_router_files_are_checked_against_the_model(tmp_path):
    m = model()
    good = tmp_path / "good.safetensors"
    DyVTERouters(64, 3, 8).save(good, model_metadata(m))
    patch_model(m, DyVTEConfig(routers=str(good))).remove()
    cases = {
        "hidden": (DyVTERouters(32, 3, 8), model_metadata(m), "hidden size is 64"),
        "count": (DyVTERouters(64, 5, 8), model_metadata(m), "needs 3"),
        "other": (DyVTERouters(64, 3, 8), model_metadata(tiny_llava(seed=7)), "trained for another model"),
    }
    for name, (routers, meta, match) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        routers.save(path, meta)
        with pytest.raises(ValueError, match=match):
            patch_model(m, DyVTEConfig(routers=str(path)))
    patch_model(m, DyVTEConfig(routers=str(tmp_path / "other.safetensors"), check_fingerprint=False)).remove()
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a DyVTE router file"):
        patch_model(m, DyVTEConfig(routers=str(tmp_path / "plain.safetensors")))
    with pytest.raises(FileNotFoundError, match="train"):
        patch_model(m, DyVTEConfig(routers=str(tmp_path / "missing.safetensors")))
    assert vlm_accel.get_patch(m) is None


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({}, ValueError, "exactly one"),
        ({"routers": "r.safetensors", "exit_layer": 1}, ValueError, "exactly one"),
        ({"exit_layer": -1}, ValueError, "exit_layer"),
        ({"exit_layer": "2"}, TypeError, "exit_layer"),
        ({"exit_layer": 3}, ValueError, r"\[0, 2\]"),
        ({"routers": 5}, TypeError, "routers"),
        ({"exit_layer": 1, "exit_probability": 1.0}, ValueError, "exit_probability"),
    ],
)
def test_bad_parameters(params, error, match):
    with pytest.raises(error, match=match):
        patch_model(model(), "dyvte", **params)


def test_labelling_rule_matches_a_direct_computation():
    """The exit label of (sample, layer e) = argmax agreement > 0.99 and loss_B < 1.03 loss_A, B hiding the image
    from every query after layer e — checked against separate forwards per exit layer."""
    from vlm_accel.train.dyvte import DyVTETrainConfig, label_batch

    m = model("llava", "eager")
    inputs = dict(inputs_for())
    window = inputs["input_ids"].shape[1]
    answers = torch.tensor([[5, 2], [7, -100], [9, 2]])
    full = extend_inputs(inputs, torch.cat([inputs["input_ids"], answers.clamp(min=0)], 1))
    full["attention_mask"][:, window:] = (answers >= 0).long()
    full |= reference_position_kwargs(m, full)
    features, labels = label_batch(m, full, answers, window, DyVTETrainConfig())
    assert features.shape == (3, 3, 128) and labels.shape == (3, 3)
    valid = answers >= 0

    def loss_and_pred(logits):
        logits = logits[:, window - 1 : window + 1].float()
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), answers.clamp(min=0), reduction="none")
        return (ce * valid).sum(1) / valid.sum(1), logits.argmax(-1)

    loss_a, pred_a = loss_and_pred(exit_reference("llava", full, [None] * 3))
    for e in range(3):
        loss_b, pred_b = loss_and_pred(exit_reference("llava", full, [e] * 3))
        agree = ((pred_a == pred_b) & valid).sum(1) / valid.sum(1)
        expected = (agree > 0.99) & (loss_b < 1.03 * loss_a)
        assert labels[:, e].bool().tolist() == expected.tolist()


def test_train_cli_writes_routers_that_load(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from vlm_accel.cli import main
    from vlm_accel.testbed import build_processor, make_config

    torch.manual_seed(0)
    config = make_config("testbed-s")
    tiny = LlavaForConditionalGeneration(config).eval()
    tiny.save_pretrained(tmp_path / "m")
    build_processor().save_pretrained(tmp_path / "m")
    out = tmp_path / "routers.safetensors"
    assert main(["train", "dyvte", "--model", str(tmp_path / "m"), "--out", str(out), "--n", "4", "--epochs", "2",
                 "--router-hidden", "16", "--label-batch-size", "4"]) == 0  # fmt: skip
    routers, meta = DyVTERouters.load(out)
    assert routers.num_routers == config.text_config.num_hidden_layers - 1 and routers.router_hidden == 16
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "m").eval()
    with patch_model(loaded, DyVTEConfig(routers=str(out))):
        pass
    assert meta["model_type"] == "llava" and "positive_rate_per_layer" in meta["training"]


def test_training_rows_from_a_jsonl_file(tmp_path):
    from PIL import Image

    from vlm_accel.train.cli import load_rows

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    lines = [{"image": "a.png", "question": "colour?", "answer": "red"}] * 3
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    rows = load_rows(str(tmp_path / "data.jsonl"), n=2, seed=0)
    assert len(rows) == 2 and rows[0]["answer"] == "red" and rows[0]["image"].size == (8, 8)
    with pytest.raises(ValueError, match="--data"):
        load_rows(str(tmp_path / "missing.csv"), n=2, seed=0)
