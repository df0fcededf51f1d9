"""Independent references for pruning: the unpatched model on the FULL sequence, in eager attention, with
per-layer attention masks hiding the dropped tokens from layer K on (testbed.md §3 showed this equals physically
dropping them). Nothing here uses vlm_accel's runtime."""

from __future__ import annotations

import functools
import math

import torch

from inputs import reference_position_kwargs


def fastv_keep_mask(model, inputs: dict, layer: int, keep_ratio: float, visual: torch.Tensor) -> torch.Tensor:
    """FastV's kept set from eager attention weights: head-mean last-row probabilities at layer K-1, top-k."""
    with torch.no_grad():
        out = model(**inputs, **reference_position_kwargs(model, inputs), output_attentions=True)
    scores = out.attentions[layer - 1][:, :, -1, :].mean(1)
    return keep_top(scores, visual, keep_ratio)


def keep_top(scores: torch.Tensor, visual: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    keep = ~visual.clone()
    for b in range(scores.shape[0]):
        idx = visual[b].nonzero().squeeze(1)
        k = max(1, math.ceil(len(idx) * keep_ratio)) if len(idx) else 0
        order = sorted(range(len(idx)), key=lambda j: (-float(scores[b, idx[j]]), j))[:k]
        keep[b, idx[order]] = True
    return keep


def hide_from_layers(model, stages: list[tuple[int, torch.Tensor]], seq: int) -> list:
    """Hooks making layers ``>= first`` unable to see prompt positions ``~keep`` for each ``(first, keep)`` stage
    (``keep`` covers the first ``keep.shape[1]`` positions; later ones, the generated tokens, stay visible)."""
    layers = model.model.language_model.layers

    def hide(index, module, args, kwargs):
        visible = torch.ones(stages[0][1].shape[0], seq, dtype=torch.bool)
        for first, keep in stages:
            if index >= first:
                visible[:, : keep.shape[1]] = keep
        mask = kwargs["attention_mask"]
        kwargs["attention_mask"] = mask.masked_fill(~visible[:, None, None, :], torch.finfo(mask.dtype).min)
        return args, kwargs

    return [layer.register_forward_pre_hook(functools.partial(hide, i), with_kwargs=True) for i, layer in
            enumerate(layers)]  # fmt: skip


def masked_logits(model, inputs: dict, stages: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """Logits of the full sequence (eager ``model``, no cache) with every stage's dropped prompt positions hidden
    from its first layer on — the reference for pruning (testbed.md §3: equal to physically dropping them)."""
    handles = hide_from_layers(model, stages, inputs["input_ids"].shape[1])
    try:
        with torch.no_grad():
            return model(**inputs, **reference_position_kwargs(model, inputs), use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


def dropped_position_logits(model, inputs: dict, layer: int) -> torch.Tensor:
    """What a dropped token's logits are: the LM head on the final norm of its hidden state entering ``layer``."""
    with torch.no_grad():
        out = model(
            **inputs, **reference_position_kwargs(model, inputs), output_hidden_states=True, use_cache=False
        )
    hidden = out.hidden_states[layer]
    return model.lm_head(model.model.language_model.norm(hidden))


# ---- reweighting references: a full-matrix eager attention that edits the last row's logits -------------------

_REFERENCE_EDITS: dict = {}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Dense eager attention in fp32 with ``_REFERENCE_EDITS[layer](logits [B, H, M, N], layer)`` applied to the
    rows from ``_REFERENCE_EDITS["first_row"]`` on (every row that was the last one when it was computed)."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1).float()
    value = value.repeat_interleave(groups, dim=1).float()
    logits = torch.matmul(query.float(), key.transpose(2, 3)) * (scaling or query.shape[-1] ** -0.5)
    if attention_mask is not None:
        logits = logits + attention_mask[:, :, :, : key.shape[-2]].float()
    edit = _REFERENCE_EDITS.get(module.layer_idx)  # layer -> fn
    if edit is not None:
        first = _REFERENCE_EDITS["first_row"]
        logits[:, :, first:, :] = edit(logits[:, :, first:, :].clone(), module.layer_idx)
    probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs, value).to(query.dtype)
    return out.transpose(1, 2).contiguous(), probs


def edited_reference_logits(
    model, inputs: dict, edits: dict, first_row: int = -1, hide: torch.Tensor | None = None, hide_from: int = 0
):
    """Logits of the full sequence (no cache) with ``edits[layer](logits [B,H,M,N], layer)`` applied to query rows
    ``first_row:`` — the last prompt row and every generated row, which a cached generation edits one at a time.

    ``model`` must be an eager model; ``hide`` (bool [B, P] prompt positions to hide) hides keys from layer
    ``hide_from`` on, as the masked pruning reference does (for composition with pruning).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = "vlm_accel_test_reference"
    AttentionInterface.register(name, _reference_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    original = model.config.text_config._attn_implementation
    model.set_attn_implementation({"text_config": name})
    _REFERENCE_EDITS.clear()
    _REFERENCE_EDITS.update(edits)
    _REFERENCE_EDITS["first_row"] = first_row
    seq = inputs["input_ids"].shape[1]
    handles = [] if hide is None else hide_from_layers(model, [(hide_from, ~hide)], seq)
    try:
        with torch.no_grad():
            return model(**inputs, **reference_position_kwargs(model, inputs), use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
        _REFERENCE_EDITS.clear()
        model.set_attn_implementation({"text_config": original})
