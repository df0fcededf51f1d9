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
