"""Shared base of the "score the visual tokens, keep the best, from layer K on" methods (FastV, random, ...).

Layers ``0..K-1`` see every token; from layer ``K`` on, each row keeps all of its non-visual tokens plus its
``ceil(keep_ratio × n_visual)`` (or ``keep_count``) best-scoring visual tokens, in original order and at their
original positions. Composed after another selection stage, ``n_visual`` counts the visual tokens that stage kept.
Subclasses only say how visual tokens are scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_accel.config import MethodConfig, check_int, check_ratio
from vlm_accel.methods.base import KIND_SELECTION, Method
from vlm_accel.runtime.plan import KeepPlan, keep_counts_from_ratio, top_visual_keep_mask
from vlm_accel.runtime.state import ForwardState


def check_drop_layer(method: str, layer: int, num_layers: int) -> None:
    """A layer that may first see a shortened sequence: in ``[1, num_layers - 1]`` (layer 0 is never shortened)."""
    if not 1 <= layer <= num_layers - 1:
        raise ValueError(
            f"{method}: layer must be in [1, {num_layers - 1}] for this {num_layers}-layer language model, got {layer}"
        )


@dataclass
class PruneAtLayerConfig(MethodConfig):
    """``layer``: the first layer that sees only kept tokens (an int in [1, num_layers - 1]).
    ``keep_ratio``: fraction of each row's visual tokens kept, in (0, 1]; or ``keep_count``: how many (≥ 1)."""

    layer: int = 2
    keep_ratio: float | None = None
    keep_count: int | None = None

    def validate(self) -> None:
        check_int("layer", self.layer, low=1)
        if self.keep_ratio is not None and self.keep_count is not None:
            raise ValueError("give keep_ratio or keep_count, not both")
        if self.keep_count is not None:
            check_int("keep_count", self.keep_count, low=1)
        else:
            if self.keep_ratio is None:
                self.keep_ratio = 0.5
            check_ratio("keep_ratio", self.keep_ratio)

    @property
    def is_noop(self) -> bool:
        return self.keep_count is None and self.keep_ratio == 1.0


class PruneAtLayer(Method):
    """Plumbing shared by single-stage visual-token pruning methods; subclasses implement :meth:`visual_scores`."""

    changes_length = True
    kind_rank = KIND_SELECTION
    config: PruneAtLayerConfig

    @classmethod
    def noop_config(cls) -> PruneAtLayerConfig:
        return cls.config_cls(keep_ratio=1.0)

    def bind(self, ctx) -> None:
        super().bind(ctx)
        check_drop_layer(self.name, self.config.layer, ctx.num_layers)

    def keep_counts(self, visual_counts: torch.Tensor) -> torch.Tensor:
        if self.config.keep_count is not None:
            return torch.minimum(visual_counts, torch.full_like(visual_counts, self.config.keep_count))
        return keep_counts_from_ratio(visual_counts, self.config.keep_ratio)

    def visual_scores(self, state: ForwardState) -> torch.Tensor:
        """Float ``[B, W]`` scores over the query window; only visual positions are compared."""
        raise NotImplementedError

    def select(self, layer: int, state: ForwardState) -> KeepPlan | None:
        if layer != self.config.layer or not state.is_prefill or not state.layout.any_visual:
            return None
        present = state.present_mask()
        candidates = state.layout.visual & present  # composed after another stage: act on what it kept
        counts = self.keep_counts(candidates.sum(dim=1))
        keep = top_visual_keep_mask(self.visual_scores(state), candidates, present, counts)
        return KeepPlan.from_keep_mask(keep)
