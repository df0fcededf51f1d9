"""Random visual-token pruning: the control every pruning comparison needs.

Same schedule as FastV (all tokens up to layer ``K-1``, kept tokens from ``K`` on, original positions), but the
kept visual tokens are a seeded uniform choice. The draw for a row depends only on ``seed`` and that row's visual
token count, so a row gives the same choice alone or in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vlm_accel.config import check_int
from vlm_accel.methods.pruning import PruneAtLayer, PruneAtLayerConfig
from vlm_accel.runtime.state import ForwardState


@dataclass
class RandomPruneConfig(PruneAtLayerConfig):
    method_name: ClassVar[str] = "random"
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        check_int("seed", self.seed, low=0)


class RandomPrune(PruneAtLayer):
    config_cls = RandomPruneConfig

    def visual_scores(self, state: ForwardState) -> torch.Tensor:
        visual = state.layout.visual
        scores = torch.zeros(visual.shape, dtype=torch.float32)
        for row, count in enumerate(visual.sum(dim=1).tolist()):
            generator = torch.Generator().manual_seed(self.config.seed)
            scores[row, visual[row].cpu()] = torch.rand(count, generator=generator)
        return scores.to(visual.device)
