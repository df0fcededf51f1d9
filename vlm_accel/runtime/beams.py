"""Beam search on a pruned cache: the plan record follows the cache's beam reordering.

Beam search runs the prefill on ``batch × num_beams`` rows and, after each step, ``cache.reorder_cache(beam_idx)``
permutes the cache's batch rows (``index_select`` on dim 0 of every layer's keys and values, whatever each layer's
length). The record the prefill left on the cache (:class:`~vlm_accel.runtime.state.PlanRecord`) holds per-row
tensors too — each stage's kept window positions and the prompt's visual mask — so the same permutation is applied
to them, and decode steps keep remapping each row's mask columns to what *that row's* cache holds.

Per-generation method state (``ForwardState.generation_state``) follows the same rule: every tensor in it whose
first dimension is the batch (DyVTE's exits, SGL's guide scores, GIFT's saliency, PAINT's token categories — all
``[B, ...]``) is permuted with the rows; anything else (scalars, flags) must not depend on the row, which is the
contract for methods (``docs/architecture.md``).
"""

from __future__ import annotations

from typing import Any

import torch

from vlm_accel.runtime.plan import KeepPlan
from vlm_accel.runtime.state import CACHE_ATTRIBUTE, PlanRecord

_WRAPPED = "_vlm_accel_follows_beams"


def reorder_record(record: PlanRecord, beam_idx: torch.Tensor) -> None:
    """Permute the record's per-row tensors as ``reorder_cache(beam_idx)`` permutes the cache's rows."""
    rows = beam_idx.numel()
    for values in record.method_state.values():
        for name, value in values.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == rows:
                values[name] = value.index_select(0, beam_idx.to(value.device))
    for stage in record.stages:
        plan = stage.plan
        index = beam_idx.to(plan.index.device)
        groups = None if plan.groups is None else plan.groups.index_select(0, index)
        stage.plan = KeepPlan(index=plan.index.index_select(0, index), groups=groups)
    record.visual = record.visual.index_select(0, beam_idx.to(record.visual.device))


def follow_beam_reorder(cache: Any) -> None:
    """Make ``cache.reorder_cache`` permute the plan record attached to it as well (idempotent)."""
    if getattr(cache, _WRAPPED, False) or not hasattr(cache, "reorder_cache"):
        return
    reorder = cache.reorder_cache

    def reorder_cache(beam_idx: torch.Tensor) -> Any:
        record = getattr(cache, CACHE_ATTRIBUTE, None)
        if record is not None:
            reorder_record(record, beam_idx)
        return reorder(beam_idx)

    cache.reorder_cache = reorder_cache
    setattr(cache, _WRAPPED, True)
