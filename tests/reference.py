"""Independent references for pruning: the unpatched model on the FULL sequence, in eager attention, with
per-layer attention masks hiding the dropped tokens from layer K on (testbed.md §3 showed this equals physically
dropping them). Nothing here uses vlm_accel's runtime."""

from __future__ import annotations

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


def masked_logits(model, inputs: dict, keep: torch.Tensor, layer: int) -> torch.Tensor:
    """Logits of the full sequence where layers >= ``layer`` cannot see the prompt positions ``~keep``.

    ``keep`` covers the first ``keep.shape[1]`` positions; later positions (generated tokens) are always visible.
    """
    seq = inputs["input_ids"].shape[1]
    visible = torch.ones(keep.shape[0], seq, dtype=torch.bool)
    visible[:, : keep.shape[1]] = keep
    layers = model.model.language_model.layers

    def hide(module, args, kwargs):
        mask = kwargs["attention_mask"]
        kwargs["attention_mask"] = mask.masked_fill(~visible[:, None, None, :], torch.finfo(mask.dtype).min)
        return args, kwargs

    handles = [layers[i].register_forward_pre_hook(hide, with_kwargs=True) for i in range(layer, len(layers))]
    try:
        with torch.no_grad():
            out = model(**inputs, **reference_position_kwargs(model, inputs), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out.logits


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
    handles = []
    if hide is not None:
        seq = inputs["input_ids"].shape[1]
        visible = torch.ones(hide.shape[0], seq, dtype=torch.bool)
        visible[:, : hide.shape[1]] = ~hide

        def mask_hook(module, args, kwargs):
            mask = kwargs["attention_mask"]
            kwargs["attention_mask"] = mask.masked_fill(~visible[:, None, None, :], torch.finfo(mask.dtype).min)
            return args, kwargs

        layers = model.model.language_model.layers
        handles = [layers[i].register_forward_pre_hook(mask_hook, with_kwargs=True) for i in range(hide_from, len(layers))]
    try:
        with torch.no_grad():
            return model(**inputs, **reference_position_kwargs(model, inputs), use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
        _REFERENCE_EDITS.clear()
        model.set_attn_implementation({"text_config": original})
