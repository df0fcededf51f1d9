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
from tiny_models import IMAGE_TOKEN, VIDEO_TOKEN

# random tiny models may generate a placeholder id, which a no-cache reference would read as an image slot
PLACEHOLDERS = [IMAGE_TOKEN, VIDEO_TOKEN]
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
    with torch.no_grad(), patch_model(model, "pai", alpha=0.6, layers=(0.25, 1.0), gamma=1.0):
        got = model(**inputs).logits
    visual = visual_columns(inputs, inputs["input_ids"].shape[1])
    reference = edited_reference_logits(
        BUILDERS[family]("eager"), inputs, dict.fromkeys(layers, pai_edit(0.6, visual))
    )
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], reference[valid], rtol=0, atol=ATOL)
    with torch.no_grad():
        unpatched = BUILDERS[family]("sdpa")(**inputs).logits
    assert (got[:, -1] - unpatched[:, -1]).abs().max() > 1e-4, "the edit should change the last row"
    torch.testing.assert_close(
        got[:, :-1][valid[:, :-1]], unpatched[:, :-1][valid[:, :-1]], rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_pai_generate_equals_reference_at_every_step(family):
    inputs = prompt_inputs(family)
    model = BUILDERS[family]("sdpa")
    with torch.no_grad(), patch_model(model, "pai", alpha=0.6, layers=(0.25, 1.0), gamma=1.0):
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True, suppress_tokens=PLACEHOLDERS,
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
    with torch.no_grad(), patch_model(model, ["fastv", "pai"], layer=2, keep_ratio=0.3, alpha=0.6, gamma=1.0,
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
    with torch.no_grad(), patch_model(model, "paint", alpha=1.0, layers=(0.25, 1.0), head_specific=head_specific, gamma=1.0,
                                      summary_layer=-1) as patch:  # fmt: skip
        got = model(**inputs).logits
        stats = patch.stats.methods["paint"]
    eager = BUILDERS["llava"]("eager")
    categories = paint_categories(eager, inputs, summary_layer=-1)
    assert stats["local_tokens"] == int((categories == 1).sum()) > 0
    visual = visual_columns(inputs, inputs["input_ids"].shape[1])
    edits = dict.fromkeys(
        layer_range((0.25, 1.0), 4), paint_edit(categories, visual, 0.7, 0.3, head_specific)
    )
    reference = edited_reference_logits(eager, inputs, edits)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], reference[valid], rtol=0, atol=ATOL)


def test_paint_refuses_models_without_a_cls_patch_layout():
    from vlm_accel import MethodNotApplicable

    with pytest.raises(MethodNotApplicable, match="CLIP vision tower with a CLS token"):
        patch_model(BUILDERS["qwen2_vl"]("sdpa"), "paint")


# ---- GIFT --------------------------------------------------------------------------------------------------


def gift_log_multiplier(model, inputs: dict, layer: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """α·s[v] per prompt position and the query span, from eager attention weights (paper §3.2, by hand)."""
    with torch.no_grad():
        attn = model(**inputs, output_attentions=True).attentions[layer]  # [B, H, L, L]
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    visual = (ids == IMAGE_TOKEN) & mask
    log_m = torch.zeros(ids.shape)
    span = torch.zeros(ids.shape, dtype=torch.bool)
    for b in range(ids.shape[0]):
        last = int(visual[b].nonzero().max())
        rows = list(range(last + 1, ids.shape[1]))
        span[b, rows] = True
        delta = (attn[b][:, rows] - attn[b][:, [r - 1 for r in rows]]).clamp(min=0)[
            :, :, visual[b]
        ]  # [H, T, V]
        heads = delta.sum((1, 2)).topk(attn.shape[1] // 2).indices
        s = delta[heads].mean((0, 1))
        s = s.clamp(s.mean() - 3 * s.std(), s.mean() + 3 * s.std())
        log_m[b, visual[b]] = alpha * (s - s.min()) / (s.max() - s.min())
    return log_m, span


def gift_edit(log_m: torch.Tensor, span: torch.Tensor, visual: torch.Tensor):
    """Paper §3.3 in the probability domain: boost, ratio, query boost, renormalise."""

    def edit(logits: torch.Tensor, layer: int) -> torch.Tensor:
        n = logits.shape[-1]
        vis = visual[:, None, None, :n].float()
        qry = torch.zeros(visual.shape[0], n, dtype=torch.bool)
        qry[:, : span.shape[1]] = span[:, :n]
        qry = qry[:, None, None, :].float()
        m = torch.ones(visual.shape[0], n)
        m[:, : log_m.shape[1]] = log_m[:, :n].exp()
        m = m[:, None, None, :]
        p = torch.softmax(logits, -1)
        k = p.shape[1] // 2
        hv = torch.zeros_like(p[..., :1]).scatter(
            1, (p * vis).sum(-1, keepdim=True).topk(k, dim=1).indices, 1.0
        )
        hq = torch.zeros_like(p[..., :1]).scatter(
            1, (p * qry).sum(-1, keepdim=True).topk(k, dim=1).indices, 1.0
        )
        boosted = torch.where((hv * vis).bool(), p * m, p)
        r = (boosted * hv * vis).sum((1, 3), keepdim=True) / (p * hv * vis).sum((1, 3), keepdim=True)
        boosted = torch.where((hq * qry).bool(), boosted * r, boosted)
        return (boosted / boosted.sum(-1, keepdim=True)).log()

    return edit


@pytest.mark.parametrize("family", ["llava", "llava_onevision", "qwen2_vl"])
def test_gift_forward_and_generate_equal_the_paper_formulas(family):
    inputs = prompt_inputs(family)
    model = BUILDERS[family]("sdpa")
    with torch.no_grad(), patch_model(model, "gift", alpha=5.0) as patch:
        forward = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True, suppress_tokens=PLACEHOLDERS,
                             return_dict_in_generate=True)  # fmt: skip
    method = patch.methods[0]
    assert (method.saliency_index, list(method.layers)) == (1, [2])
    eager = BUILDERS[family]("eager")
    log_m, span = gift_log_multiplier(eager, inputs, 1, 5.0)
    window = inputs["input_ids"].shape[1]
    visual = visual_columns(inputs, window + 3)
    reference = edited_reference_logits(eager, inputs, {2: gift_edit(log_m, span, visual)})
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(forward[valid], reference[valid], rtol=0, atol=1e-4)
    for step in range(3):
        step_inputs = extend_inputs(inputs, out.sequences[:, : window + step])
        reference = edited_reference_logits(eager, step_inputs, {2: gift_edit(log_m, span, visual)},
                                            first_row=window - 1)  # fmt: skip
        torch.testing.assert_close(out.logits[step], reference[:, -1], rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"saliency_layer": 1.0}, "saliency_layer must be a depth fraction"),
        ({"content_words": "nouns"}, "content_words must be one of"),
        ({"content_words": "closed_class"}, "needs processor="),
        ({"head_fraction": 0.0}, "head_fraction must be in"),
        ({"query_tail": -1}, "query_tail must be in"),
    ],
)
def test_gift_bad_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        patch_model(BUILDERS["llava"]("sdpa"), "gift", **params)
