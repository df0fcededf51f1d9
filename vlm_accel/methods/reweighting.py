"""Shared plumbing of the attention-reweighting (hallucination-mitigation) methods: PAI, PAINT, GIFT.

The papers give absolute layer indices for LLaVA-1.5-7B (32 layers); here layer ranges are fractions of depth,
``layers=(start, end)`` → decoder layers ``[round(start·L), round(end·L))``, so one config serves any depth. The
edits act on the last query row (the last prompt token at prefill, the new token at each decode step) through the
runtime's row edits: the rest of each layer stays on SDPA / FlashAttention.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlm_accel.config import MethodConfig, check_number
from vlm_accel.methods.base import KIND_REWEIGHT, Method


def check_layer_fractions(name: str, value: object) -> tuple[float, float]:
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise TypeError(f"{name} must be a (start, end) pair of depth fractions, got {value!r}")
    start, end = (check_number(f"{name}[{i}]", v) for i, v in enumerate(value))
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"{name} must satisfy 0 <= start < end <= 1 (fractions of depth), got {tuple(value)}")
    return start, end


def layer_range(fractions: tuple[float, float], num_layers: int) -> range:
    """Decoder layers ``[round(start·L), round(end·L))``; at least one layer."""
    start = min(num_layers - 1, round(fractions[0] * num_layers))
    return range(start, max(start + 1, round(fractions[1] * num_layers)))


@dataclass
class ReweightConfig(MethodConfig):
    """``alpha``: the method's strength (0 leaves the model unchanged); ``layers``: (start, end) depth fractions."""

    alpha: float = 0.5
    layers: tuple[float, float] = (2 / 32, 1.0)

    def validate(self) -> None:
        self.alpha = check_number("alpha", self.alpha)
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        self.layers = check_layer_fractions("layers", self.layers)


class ReweightMethod(Method):
    """Binds a layer range; subclasses implement ``row_edit``."""

    config: ReweightConfig
    kind_rank = KIND_REWEIGHT

    @classmethod
    def noop_config(cls) -> ReweightConfig:
        return cls.config_cls(alpha=0.0)

    def bind(self, ctx) -> None:
        super().bind(ctx)
        self.layers = layer_range(self.config.layers, ctx.num_layers)

    def active(self, layer: int) -> bool:
        return self.config.alpha > 0 and layer in self.layers
