"""Attention-reweighting methods (PAI, PAINT, GIFT) against an independent dense eager reference that edits the
last row's logits directly (tests/reference.py); alpha=0 and batch invariance run for every method in
test_matrix.py."""

from __future__ import annotations

import pytest
import torch

from vlm_accel import patch_model
from vlm_accel.methods.reweighting import layer_range

from families import BATCH_ROWS, BUILDERS
from inputs import batch_inputs, extend_inputs, make_row
from reference import edited_reference_logits
from tiny_models import IMAGE_TOKEN

ATOL = 3e-5
FAMILIES = list(BUILDERS)


def prompt_inputs(family: str, batch: int = 3) -> dict:
    model = BUILDERS[family]("sdpa")
    rows = [make_row(model, s) for s in BATCH_ROWS[family]]
    return batch_inputs(model, rows if batch == 3 else rows[:1])


def visual_columns(inputs: dict, kv_len: int) -> torch.Tensor:
    """Prompt visual positions as key columns (generated tokens are never visual)."""
    prompt = inputs["input_ids"]
    visual = torch.zeros(prompt.shape[0], kv_len, dtype=torch.bool)
    visual[:, : prompt.shape[1]] = (prompt == IMAGE_TOKEN) & inputs["attention_mask"].bool()
    return visual


def pai_edit(alpha: float, visual: torch.Tensor):
    def edit(logits: torch.Tensor, layer: int) -> torch.Tensor:
        cols = visual[:, None, None, : logits.shape[-1]]
        return torch.where(cols, logits + alpha * logits.abs(), logits)

    return edit


@pytest.mark.parametrize("family", FAMILIES)
def test_pai_forward_equals_dense_eager_reference(family):
    inputs = prompt_inputs(family)
    model = BUILDERS[family]("sdpa")
    layers = layer_range((0.25, 1.0), len(model.model.language_model.layers))
    with torch.no_grad(), patch_model(model, "pai", alpha=0.6, layers=(0.25, 1.0)):
        got = model(**inputs).logits
    visual = visual_columns(inputs, inputs["input_ids"].shape[1])
    reference = edited_reference_logits(BUILDERS[family]("eager"), inputs, dict.fromkeys(layers, pai_edit(0.6, visual)))
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], reference[valid], rtol=0, atol=ATOL)
    with torch.no_grad():
        unpatched = BUILDERS[family]("sdpa")(**inputs).logits
    assert (got[:, -1] - unpatched[:, -1]).abs().max() > 1e-4, "the edit should change the last row"
    torch.testing.assert_close(got[:, :-1][valid[:, :-1]], unpatched[:, :-1][valid[:, :-1]], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_pai_generate_equals_reference_at_every_step(family):
    inputs = prompt_inputs(family)
    model = BUILDERS[family]("sdpa")
    with torch.no_grad(), patch_model(model, "pai", alpha=0.6, layers=(0.25, 1.0)):
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)  # fmt: skip
    eager = BUILDERS[family]("eager")
    layers = layer_range((0.25, 1.0), len(eager.model.language_model.layers))
    window = inputs["input_ids"].shape[1]
    for step in range(3):
        step_inputs = extend_inputs(inputs, out.sequences[:, : window + step])
        visual = visual_columns(inputs, window + step)
        edits = dict.fromkeys(layers, pai_edit(0.6, visual))
        reference = edited_reference_logits(eager, step_inputs, edits, first_row=window - 1)
        torch.testing.assert_close(out.logits[step], reference[:, -1], rtol=0, atol=ATOL)


def test_pai_composed_with_fastv_reweights_only_the_kept_visual_tokens():
    from vlm_accel.runtime.state import CACHE_ATTRIBUTE

    inputs = prompt_inputs("llava_next")
    model = BUILDERS["llava_next"]("sdpa")
    with torch.no_grad(), patch_model(model, ["fastv", "pai"], layer=2, keep_ratio=0.3, alpha=0.6,
                                      layers=(0.25, 1.0)):  # fmt: skip
        out = model(**inputs, use_cache=True)
    record = getattr(out.past_key_values, CACHE_ATTRIBUTE)
    window = inputs["input_ids"].shape[1]
    kept = record.stages[0].plan.keep_mask(window)
    visual = visual_columns(inputs, window)
    eager = BUILDERS["llava_next"]("eager")
    layers = layer_range((0.25, 1.0), 4)
    edits = {i: pai_edit(0.6, visual & kept if i >= 2 else visual) for i in layers}
    reference = edited_reference_logits(eager, inputs, edits, hide=~kept, hide_from=2)
    torch.testing.assert_close(out.logits[:, -1], reference[:, -1], rtol=0, atol=ATOL)


def test_pai_image_free_guidance_mixes_log_probs_with_the_text_only_prompt():
    inputs = prompt_inputs("llava", batch=1)
    model = BUILDERS["llava"]("sdpa")
    gamma = 1.5
    with torch.no_grad(), patch_model(model, "pai", alpha=0.0, gamma=gamma):
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_scores=True, output_logits=True,
                             return_dict_in_generate=True)  # fmt: skip
    text_only = inputs["input_ids"][inputs["input_ids"] != IMAGE_TOKEN][None]
    with torch.no_grad():
        unconditional = torch.log_softmax(model(input_ids=text_only).logits[:, -1].float(), -1)
    conditional = torch.log_softmax(out.logits[0].float(), -1)
    expected = gamma * (conditional - unconditional) + unconditional
    plausible = conditional >= conditional.max(-1, keepdim=True).values + torch.log(torch.tensor(0.1))
    torch.testing.assert_close(out.scores[0][plausible], expected[plausible], rtol=0, atol=1e-4)
    assert torch.isinf(out.scores[0][~plausible]).all()


@pytest.mark.parametrize(
    ("params", "error", "message"),
    [
        ({"alpha": -1.0}, ValueError, "alpha must be >= 0"),
        ({"alpha": "strong"}, TypeError, "alpha must be a number"),
        ({"layers": (0.5, 0.2)}, ValueError, "start < end"),
        ({"layers": 3}, TypeError, "pair of depth fractions"),
        ({"gamma": 0.5}, ValueError, "gamma must be >= 1"),
    ],
)
def test_pai_bad_parameters(params, error, message):
    with pytest.raises(error, match=message):
        patch_model(BUILDERS["llava"]("sdpa"), "pai", **params)



# ---- PAINT -------------------------------------------------------------------------------------------------


def paint_categories(model, inputs: dict, summary_layer: int, local_ratio: float = 0.25) -> torch.Tensor:
    """Local (1) / summary (2) tokens per prompt position, from eager CLIP attentions (independent of the patch)."""
    import numpy as np

    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    local_scores = out.attentions[0][:, :, 0, 1:].sum(1)
    summary_scores = out.attentions[summary_layer][:, :, 0, 1:].sum(1)
    per_image = []
    for local, summary in zip(local_scores, summary_scores):
        category = torch.zeros(local.shape[0], dtype=torch.long)
        category[local.topk(int(local.shape[0] * local_ratio)).indices] = 1
        q1, q3 = np.percentile(summary.numpy(), [25, 75])
        outliers = int((summary.numpy() > q3 + 1.5 * (q3 - q1)).sum())
        if outliers:
            category[summary.topk(outliers).indices] = 2
        per_image.append(category)
    visual = (inputs["input_ids"] == IMAGE_TOKEN) & inputs["attention_mask"].bool()
    categories = torch.zeros(visual.shape, dtype=torch.long)
    categories[visual] = torch.cat(per_image)
    return categories


def paint_edit(categories: torch.Tensor, visual: torch.Tensor, a: float, b: float, head_specific: bool):
    def edit(logits: torch.Tensor, layer: int) -> torch.Tensor:
        n = logits.shape[-1]
        cats = categories[:, None, None, :n]
        boost = torch.where(cats == 1, a, torch.where(cats == 2, b, 0.0))
        if head_specific:
            mass = (torch.softmax(logits, -1) * visual[:, None, None, :n]).sum(-1, keepdim=True)
            boost = boost * mass / mass.mean(1, keepdim=True)
        return torch.where(boost > 0, logits + boost * logits.abs(), logits)

    return edit


@pytest.mark.parametrize("head_specific", [False, True])
def test_paint_equals_dense_eager_reference(head_specific):
    inputs = prompt_inputs("llava")
    model = BUILDERS["llava"]("sdpa")
    with torch.no_grad(), patch_model(model, "paint", alpha=1.0, layers=(0.25, 1.0), head_specific=head_specific,
                                      summary_layer=-1) as patch:  # fmt: skip
        got = model(**inputs).logits
        stats = patch.stats.methods["paint"]
    eager = BUILDERS["llava"]("eager")
    categories = paint_categories(eager, inputs, summary_layer=-1)
    assert stats["local_tokens"] == int((categories == 1).sum()) > 0
    visual = visual_columns(inputs, inputs["input_ids"].shape[1])
    edits = dict.fromkeys(layer_range((0.25, 1.0), 4), paint_edit(categories, visual, 0.7, 0.3, head_specific))
    reference = edited_reference_logits(eager, inputs, edits)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], reference[valid], rtol=0, atol=ATOL)


def test_paint_refuses_models_without_a_cls_patch_layout():
    from vlm_accel import MethodNotApplicable

    with pytest.raises(MethodNotApplicable, match="CLIP vision tower with a CLS token"):
        patch_model(BUILDERS["qwen2_vl"]("sdpa"), "paint")
