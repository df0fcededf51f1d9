"""Keep plans: which query-window positions each row keeps from a given layer on.

A plan is a ``[B, W']`` index into the original query window, in ascending (original) order. Rows keeping fewer
tokens than the longest row are *left*-padded with ``-1`` slots: later layers see them exactly like left padding
(masked as keys, harmless as queries), so transformers' own padding handling applies unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KeepPlan:
    """Positions kept from ``layer`` on. ``index[b, j]`` is a query-window position, or -1 for a padded slot.

    ``groups`` (optional, long ``[B, W', G]`` of window positions, -1 = unused) makes slot ``j`` carry the mean of
    the hidden states of ``groups[b, j]`` instead of its own (token merging / pooling); the slot keeps the position
    ``index[b, j]`` (its RoPE), which should be one of its group's positions.
    """

    index: torch.Tensor
    groups: torch.Tensor | None = None

    @property
    def valid(self) -> torch.Tensor:
        return self.index >= 0

    @property
    def safe_index(self) -> torch.Tensor:
        """The index with padded slots pointing at position 0 (for gathers whose result is masked anyway)."""
        return self.index.clamp(min=0)

    @property
    def kept_counts(self) -> torch.Tensor:
        return self.valid.sum(dim=1)

    @classmethod
    def from_keep_mask(cls, keep: torch.Tensor) -> KeepPlan:
        """Build a left-padded plan from a bool ``[B, W]`` keep mask."""
        counts = keep.sum(dim=1)
        width = int(counts.max()) if keep.shape[0] else 0
        positions = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
        # Sort kept positions to the right end of each row, preserving their order; dropped ones go left.
        sort_key = torch.where(keep, positions + keep.shape[1], positions)
        order = sort_key.argsort(dim=1)[:, -width:] if width else sort_key[:, :0]
        slot = torch.arange(width, device=keep.device).expand(keep.shape[0], width)
        valid = slot >= (width - counts)[:, None]
        return cls(index=torch.where(valid, order, torch.full_like(order, -1)))

    def keep_mask(self, window: int) -> torch.Tensor:
        """The bool ``[B, W]`` mask of kept positions."""
        mask = torch.zeros(self.index.shape[0], window + 1, dtype=torch.bool, device=self.index.device)
        mask.scatter_(1, torch.where(self.valid, self.index, window), True)
        return mask[:, :window]


def keep_counts_from_ratio(visual_counts: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """``ceil(r × n_visual)`` per row (at least one visual token where a row has any)."""
    counts = torch.ceil(visual_counts.double() * keep_ratio).long()
    return torch.minimum(torch.clamp(counts, min=1), visual_counts)


def top_visual_keep_mask(
    scores: torch.Tensor, candidates: torch.Tensor, present: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Keep every present non-candidate position plus the ``counts[b]`` best-scoring candidates of each row.

    Args:
        scores: float ``[B, W]`` over window positions (higher is kept first); ties break toward earlier positions.
        candidates: bool ``[B, W]`` — the positions competing for the budget (visual tokens still present).
        present: bool ``[B, W]`` — positions currently in the sequence (everything before the first drop).
        counts: long ``[B]`` — how many candidates each row keeps.
    """
    window = scores.shape[1]
    ranked = torch.where(candidates, scores.float(), torch.tensor(float("-inf"), device=scores.device))
    # Stable descending sort so equal scores keep the earliest positions (deterministic across backends).
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(window, device=scores.device).expand_as(order))
    chosen = candidates & (rank < counts[:, None])
    return (present & ~candidates) | chosen
