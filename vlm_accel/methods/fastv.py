"""FastV — Chen et al., "An Image is Worth 1/2 Tokens After Layer 2" (ECCV 2024).

Score of visual token ``v`` (paper §4.2, and the released code, which uses the last token's row — FastV issues
#14, #44): ``s[v] = mean_h A^{(K-1),h}[last, v]``, the head-mean attention probability that the last prompt token
gives ``v`` in layer ``K-1``. Keep the top ``ceil(r · N_V)`` visual tokens (paper: drop ratio ``R = 1 - r``) from
layer ``K`` on, with their original positions; the KV-cache variant prunes once at prefill and every decode step
sees the same kept set (FastV README). Paper defaults: ``K=2, R=50%``.

The score row is computed inside the registered attention function from post-RoPE q and the full K
(``vlm_accel.runtime.scores``), so the model keeps running on SDPA / FlashAttention instead of eager.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vlm_accel.methods.base import ScoreRequest
from vlm_accel.methods.pruning import PruneAtLayer, PruneAtLayerConfig
from vlm_accel.runtime.state import ForwardState


@dataclass
class FastVConfig(PruneAtLayerConfig):
    method_name: ClassVar[str] = "fastv"


class FastV(PruneAtLayer):
    config_cls = FastVConfig

    def score_request(self, layer: int, state: ForwardState) -> ScoreRequest | None:
        if state.is_prefill and layer == self.config.layer - 1 and state.layout.any_visual:
            return ScoreRequest(rows="last", reduce="head_mean")
        return None

    def visual_scores(self, state: ForwardState) -> torch.Tensor:
        tap = state.tap(self, self.config.layer - 1)
        if tap is None:
            raise RuntimeError(f"fastv: no attention scores were captured at layer {self.config.layer - 1}")
        return tap.window_scores(state.prefix_len, state.window_len)
