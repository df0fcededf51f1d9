"""Attention masks of shortened layers, rebuilt with transformers' own mask factories.

Pruned layers call ``create_causal_mask(..., layer_idx=i)`` (or the sliding-window variant) with a gathered 2-D mask
instead of slicing the 4-D one: one code path for sdpa, eager and flash, and transformers handles fully padded rows
and the sdpa ``is_causal`` skip exactly as it does unpatched. Masks are memoised per stage in the forward state.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from vlm_accel.runtime.state import ForwardState, Stage


class LayerMasks:
    """Builds (and memoises per forward) the mask each shortened layer needs."""

    def __init__(self, text_config: Any) -> None:
        self.text_config = text_config

    def layer_type(self, index: int) -> str:
        layer_types = getattr(self.text_config, "layer_types", None)
        return layer_types[index] if layer_types else "full_attention"

    def build(self, layer_type: str, hidden: torch.Tensor, mask_2d: torch.Tensor, kwargs: dict, index: int) -> Any:
        """The layer's mask from a 2-D one, sized by that layer's cache length."""
        build = create_sliding_window_causal_mask if layer_type == "sliding_attention" else create_causal_mask
        return build(
            config=self.text_config,
            inputs_embeds=hidden,
            attention_mask=mask_2d,
            past_key_values=kwargs.get("past_key_values"),
            position_ids=None,  # gapped original positions must not be read as packed sequences
            layer_idx=index,
        )

    def prefill(
        self, index: int, stage_number: int, stage: Stage, hidden: torch.Tensor, kwargs: dict, state: ForwardState
    ) -> Any:
        """Mask of a prefill layer inside stage ``stage_number``: the 2-D mask gathered to the kept slots."""
        layer_type = self.layer_type(index)
        key = ("mask", stage_number, layer_type, hidden.device)  # one per device of a multi-device model
        if key not in state.memo:
            mask_2d = state.attention_mask_2d
            if mask_2d is None:
                mask_2d = torch.ones(state.batch, state.prefix_len + state.window_len, device=stage.plan.index.device)
            window = mask_2d[:, state.prefix_len :].gather(1, stage.plan.safe_index).bool() & stage.plan.valid
            stage_2d = torch.cat([mask_2d[:, : state.prefix_len].bool(), window], dim=1).to(hidden.device)
            state.memo[key] = self.build(layer_type, hidden, stage_2d, kwargs, index)
        return state.memo[key]

    def continuation(self, index: int, stage: Stage, hidden: torch.Tensor, kwargs: dict, state: ForwardState) -> Any:
        """Mask for a later call on a cache whose layer kept fewer prompt tokens: the 2-D mask's columns remapped
        to what the layer holds."""
        record = state.continuing
        layer_type = self.layer_type(index)
        key = ("continue", id(stage), layer_type, hidden.device)
        if key not in state.memo:
            total = state.prefix_len + state.window_len
            mask_2d = state.attention_mask_2d
            if mask_2d is None:
                mask_2d = torch.ones(state.batch, total, dtype=torch.bool, device=stage.plan.index.device)
            start, end = record.prefix_len, record.prefix_len + record.window_len
            window = mask_2d[:, start:end].gather(1, stage.plan.safe_index).bool() & stage.plan.valid
            stage_2d = torch.cat([mask_2d[:, :start].bool(), window, mask_2d[:, end:].bool()], dim=1).to(hidden.device)
            state.memo[key] = self.build(layer_type, hidden, stage_2d, kwargs, index)
        return state.memo[key]
