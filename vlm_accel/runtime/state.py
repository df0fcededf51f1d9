"""Per-call and per-generation state of the runtime.

Three lifetimes, never mixed (docs/architecture.md, "State"):

- ``ForwardState`` lives for one forward of the base VLM model.
- ``PlanRecord`` is attached to the KV cache object at prefill, so decode steps (and any later call that continues
  the same cache) see which tokens each layer kept and the per-generation state of every method
  (:meth:`ForwardState.generation_state`); it lives exactly as long as the generation (hf_internals §3.3). Two
  generations interleaved on one patched model (e.g. a logits processor that runs another ``generate()``) each
  carry their own record, so neither disturbs the other. A forward without a cache keeps that state for its own duration only.
- ``StreamState`` lives across ``generate()`` calls on purpose, only inside ``patch.stream()`` (frame streams:
  TTF); ``patch.reset()`` empties it. Outside a stream a method gets no cross-call state at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vlm_accel.runtime.layout import VisualLayout
from vlm_accel.runtime.plan import KeepPlan

CACHE_ATTRIBUTE = "_vlm_accel_plan_record"


@dataclass
class Stage:
    """From ``layer`` on (until the next stage), the sequence holds the window positions ``plan.index``."""

    layer: int
    plan: KeepPlan


@dataclass
class PlanRecord:
    """What a prefill left in the cache for later calls on it: where its query window sat in the cache, which
    window positions were visual, and the stages (kept positions per layer range) of any drop."""

    stages: list[Stage]
    prefix_len: int
    window_len: int
    visual: torch.Tensor  # bool [B, W]
    method_state: dict[Any, dict[str, Any]] = field(default_factory=dict)

    def stage_for_layer(self, layer: int) -> Stage | None:
        current = None
        for stage in self.stages:
            if stage.layer <= layer:
                current = stage
        return current


@dataclass
class ScoreTap:
    """Attention probabilities requested by a method at one layer.

    ``probs`` is ``[B, M, N]`` (head mean, ``reduce="head_mean"``), ``[B, N]`` (``"sum"``) or ``[B, H, M, N]``
    (``"none"``). Key column ``n`` is cache position ``n``: the first ``prefix_len`` columns are the cached prefix,
    the rest follow the sequence the layer saw (``window_index``; None means the whole window).
    """

    probs: torch.Tensor
    rows: torch.Tensor
    window_index: torch.Tensor | None

    def window_scores(self, prefix_len: int, window_len: int, reduce_rows: str = "sum") -> torch.Tensor:
        """Scores per query-window position ``[B, W]`` (zero where a position is no longer in the sequence)."""
        probs = self.probs
        if probs.dim() == 4:
            probs = probs.mean(dim=1)
        if probs.dim() == 3:
            probs = probs.sum(dim=1) if reduce_rows == "sum" else probs.mean(dim=1)
        cols = probs[:, prefix_len:]
        if self.window_index is None:
            return cols[:, :window_len].clone()
        out = torch.zeros(cols.shape[0], window_len + 1, dtype=cols.dtype, device=cols.device)
        index = self.window_index
        target = torch.where(index >= 0, index, window_len)
        out.scatter_(1, target, cols[:, : index.shape[1]])
        return out[:, :window_len]


class StreamState:
    """Per-method state carried across ``generate()`` calls of one stream (``Patch.stream()``).

    Methods keep whatever they need under their own key (e.g. TTF: the previous frame's pixels and tokens, per batch
    row); ``reset()`` starts a new episode. ``calls`` counts the base-model prefills seen in this stream.
    """

    def __init__(self) -> None:
        self.method_state: dict[Any, dict[str, Any]] = {}
        self.calls = 0

    def reset(self) -> None:
        self.method_state.clear()
        self.calls = 0

    def for_method(self, method: object) -> dict[str, Any]:
        return self.method_state.setdefault(method, {})


@dataclass
class ForwardState:
    """Everything the hooks share during one forward of the base VLM model."""

    layout: VisualLayout
    batch: int
    window_len: int
    prefix_len: int
    attention_mask_2d: torch.Tensor | None
    continuing: PlanRecord | None = None
    restore_full_length: bool = True
    stages: list[Stage] = field(default_factory=list)
    taps: dict[tuple[int, int], ScoreTap] = field(default_factory=dict)
    memo: dict[Any, Any] = field(default_factory=dict)
    full_hidden: torch.Tensor | None = None
    layer_input: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    pixel_inputs: dict[str, Any] = field(default_factory=dict)
    vision_taps: dict[int, torch.Tensor] = field(default_factory=dict)
    stream: StreamState | None = None
    _generation: dict[Any, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.continuing is not None:
            self._generation = self.continuing.method_state

    def generation_state(self, method: object) -> dict[str, Any]:
        """``method``'s state for the current generation: created at prefill, seen again by every decode step on
        the same cache, gone with the cache. Never on the method object (a second generation running in between
        has its own)."""
        return self._generation.setdefault(method, {})

    def stream_state(self, method: object) -> dict[str, Any] | None:
        """``method``'s state across calls of the open stream, or None outside ``patch.stream()``."""
        return None if self.stream is None else self.stream.for_method(method)

    def new_record(self) -> PlanRecord:
        """The record a prefill leaves on its cache (the live ``stages`` list and generation state)."""
        return PlanRecord(self.stages, self.prefix_len, self.window_len, self.layout.visual, self._generation)

    @property
    def is_prefill(self) -> bool:
        return self.continuing is None

    @property
    def current_index(self) -> torch.Tensor | None:
        """Window positions in the sequence right now (``[B, W']``, -1 = padded slot), or None for all of them."""
        return self.stages[-1].plan.index if self.stages else None

    def present_mask(self) -> torch.Tensor:
        """Bool ``[B, W]``: window positions still in the sequence."""
        if not self.stages:
            return torch.ones_like(self.layout.visual)
        return self.stages[-1].plan.keep_mask(self.window_len)

    def tap(self, owner: object, layer: int) -> ScoreTap | None:
        return self.taps.get((id(owner), layer))

    def visual_key_mask(self, layer: int, kv_len: int) -> torch.Tensor:
        """Bool ``[B, kv_len]``: which key columns of ``layer`` hold visual tokens of the prompt.

        Follows whatever the layer kept (so reweighting composes with pruning): cached prefix columns are never
        visual; at decode, the columns after the recorded prompt are generated tokens.
        """
        visual = self.continuing.visual if self.continuing is not None else self.layout.visual
        return self.window_to_columns(visual, layer, kv_len, False)

    def window_to_columns(self, values: torch.Tensor, layer: int, kv_len: int, fill: object) -> torch.Tensor:
        """Map per-prompt-position ``values [B, W]`` onto the key columns of ``layer`` (``[B, kv_len]``).

        Prefix columns, columns after the prompt (generated tokens) and padded slots get ``fill``.
        """
        if self.continuing is not None:
            stage, prefix = self.continuing.stage_for_layer(layer), self.continuing.prefix_len
        else:
            stage, prefix = (self.stages[-1] if self.stages else None), self.prefix_len
        if stage is not None:
            gathered = values.gather(1, stage.plan.safe_index)
            values = torch.where(stage.plan.valid, gathered, torch.full_like(gathered, fill))
        columns = torch.full((values.shape[0], kv_len), fill, dtype=values.dtype, device=values.device)
        width = min(values.shape[1], kv_len - prefix)
        columns[:, prefix : prefix + width] = values[:, :width]
        return columns
