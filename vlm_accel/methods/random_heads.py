"""Random heads: the control every MoH comparison needs.

The same head budget as :mod:`~vlm_accel.methods.moh` — the same shared units (always on) and the same number
``k`` of routed units — but the routed units are a seeded uniform choice per layer instead of a router's per-token
choice: ``k`` of the routed units of layer ``l``, drawn from ``torch.Generator().manual_seed(seed·1000 + l)``, for
every token. It uses no input at all, so a row gives the same result alone or in any batch. Binary gates; decode
runs on the head-sparse op like MoH's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vlm_accel.config import check_int
from vlm_accel.methods.base import GateContext
from vlm_accel.methods.moh import MoH, MoHConfig


@dataclass
class RandomHeadsConfig(MoHConfig):
    """MoH's head budget (``active_heads``, ``shared_heads``, ``per_kv_group``) with seeded random routed units."""

    method_name: ClassVar[str] = "random_heads"
    seed: int = 0

    def validate(self) -> None:
        if self.router != "qnorm" or self.router_file is not None:
            raise ValueError("random_heads has no router: leave router/router_file at their defaults")
        super().validate()
        check_int("seed", self.seed, low=0)

    def label(self) -> str:
        return super().label().replace("moh-qnorm", "random_heads")


class RandomHeads(MoH):
    """Seeded random routed units per layer; see the module docstring."""

    config_cls = RandomHeadsConfig
    config: RandomHeadsConfig

    @classmethod
    def example_config(cls) -> RandomHeadsConfig:
        return RandomHeadsConfig()

    @classmethod
    def noop_config(cls) -> RandomHeadsConfig:
        return RandomHeadsConfig(active_heads=1.0)

    @classmethod
    def sweep_configs(cls, keep_ratios) -> list:
        return [RandomHeadsConfig(active_heads=0.75), RandomHeadsConfig(active_heads=0.5)]

    def layer_units(self, layer: int) -> torch.Tensor:
        """Bool ``[U]``: the units layer ``layer`` keeps on."""
        u = self.units
        keep = torch.zeros(u.units, dtype=torch.bool)
        keep[: u.shared] = True
        generator = torch.Generator().manual_seed(self.config.seed * 1000 + layer)
        keep[u.shared + torch.randperm(u.routed, generator=generator)[: u.top_k]] = True
        return keep

    def unit_gates(self, layer: int, ctx: GateContext) -> torch.Tensor:
        batch, _, q_len, _ = ctx.query.shape
        return self.layer_units(layer).to(ctx.query.device).expand(batch, q_len, -1)
