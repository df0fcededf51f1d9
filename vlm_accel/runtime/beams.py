"""Beam search on a pruned cache: the plan record follows the cache's beam reordering.

Beam search runs the prefill on ``batch × num_beams`` rows and, after each step, ``cache.reorder_cache(beam_idx)``
permutes the cache's batch rows (``index_select`` on dim 0 of every layer's keys and values, whatever each layer's
length). The record the prefill left on the cache (:class:`~vlm_accel.runtime.state.PlanRecord`) holds per-row
tensors too — each stage's kept window positions and the prompt's visual mask — so the same permutation is applied
to them, and decode steps keep remapping each row's mask columns to what *that row's* cache holds.

Per-generation method state (``ForwardState.generation_state``) has no row layout the runtime knows; a method that
keeps any is refused under beam reordering with a clear error rather than read on the wrong rows.
"""

from __future__ import annotations

from typing import Any

import torch

from vlm_accel.runtime.checks import RUNTIME_FLAGS
from vlm_accel.runtime.plan import KeepPlan
from vlm_accel.runtime.state import CACHE_ATTRIBUTE, PlanRecord

_WRAPPED = "_vlm_accel_follows_beams"


def reorder_record(record: PlanRecord, beam_idx: torch.Tensor) -> None:
    """Permute the record's per-row tensors as ``reorder_cache(beam_idx)`` permutes the cache's rows."""
    for key, value in record.method_state.items():
        if key != RUNTIME_FLAGS and value:
            name = getattr(key, "name", type(key).__name__)
            raise ValueError(
                f"{name}: beam search cannot follow this method's per-generation state; use greedy or sampling"
            )
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
