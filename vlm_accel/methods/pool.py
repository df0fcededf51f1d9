"""Pool — average-pool each image's visual-token grid at layer K: the downsampling control.

Layers ``0..K-1`` see every token. From layer ``K`` on, each image's ``s × s`` grid of visual tokens is replaced by
its ``⌈s/f⌉ × ⌈s/f⌉`` grid of ``f × f`` block means (edge blocks average what they hold), each pooled token placed
at its block's *first* original position (the top-left token, whose RoPE position it keeps); non-visual tokens are
untouched. The averaging is carried by the keep plan's ``groups`` (``vlm_accel.runtime.plan.KeepPlan``), so the
runtime does all the gathering, positions, masks and cache bookkeeping as for pruning.

Why it is here: plain downsampling of the visual tokens is the control that recent studies found hard to beat
(VTC-Bench, arXiv 2510.07143; "Token Pruning in MLLMs: Are We Solving the Right Problem?", arXiv 2502.11501).
``factor=2`` keeps 1/4 of the visual tokens, ``3`` ~1/9, ``4`` 1/16; ``factor=1`` is the exact no-op.

Layouts: one square grid per image (LLaVA-1.5, ``vision_feature_select_strategy="default"``); an image's tokens
must be contiguous, and a run of several images splits into grids of the per-image count. AnyRes layouts
(LLaVA-NeXT / OneVision tiles with newline tokens), Qwen2-VL and InternVL are refused with a ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vlm_accel.config import MethodConfig, check_int
from vlm_accel.errors import MethodNotApplicable
from vlm_accel.methods.base import KIND_SELECTION, Method
from vlm_accel.methods.pruning import check_drop_layer
from vlm_accel.runtime.plan import KeepPlan
from vlm_accel.runtime.state import ForwardState

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llava",)


@dataclass
class PoolConfig(MethodConfig):
    """``layer``: the first layer that sees pooled tokens (in [1, num_layers - 1]). ``factor``: the pooling window
    side ``f`` (``f × f`` visual tokens → 1; 1 = no-op)."""

    method_name: ClassVar[str] = "pool"
    layer: int = 2
    factor: int = 2

    def validate(self) -> None:
        check_int("layer", self.layer, low=1)
        check_int("factor", self.factor, low=1)


def grid_groups(side: int, factor: int) -> torch.Tensor:
    """Long ``[⌈side/f⌉², f²]``: row-major local token indices of each ``f × f`` block of a ``side × side`` grid,
    blocks in row-major order; slot 0 is the block's top-left (smallest) index, ``-1`` marks slots an edge block
    does not have."""
    check_int("side", side, low=1)
    check_int("factor", factor, low=1)
    blocks = math.ceil(side / factor)
    local = torch.arange(side * side)
    row, col = local // side, local % side
    block = (row // factor) * blocks + col // factor
    slot = (row % factor) * factor + col % factor
    groups = torch.full((blocks * blocks, factor * factor), -1, dtype=torch.long)
    groups[block, slot] = local
    return groups


def pool_plan(visual: torch.Tensor, present: torch.Tensor, groups: torch.Tensor, per_image: int) -> KeepPlan:
    """The keep plan that pools every image of every row.

    Args:
        visual: bool ``[B, W]`` visual-token positions of the query window.
        present: bool ``[B, W]`` positions in the sequence (padding included: it stays, masked, as for pruning).
        groups: :func:`grid_groups` of one image.
        per_image: visual tokens per image (``side²``).
    """
    rows_index, rows_groups = [], []
    size = groups.shape[1]
    template = groups.to(visual.device)
    for b in range(visual.shape[0]):
        positions = visual[b].nonzero().squeeze(1)
        if positions.numel() % per_image:
            raise ValueError(
                f"pool: row {b} has {positions.numel()} visual tokens, not a multiple of the {per_image} "
                "tokens of one image grid (anyres or cropped layouts are not supported)"
            )
        images = positions.view(-1, per_image)
        if images.numel() and bool(((images[:, -1] - images[:, 0]) != per_image - 1).any()):
            raise ValueError(f"pool: row {b} has an image whose {per_image} visual tokens are not contiguous")
        members = images[:, template.clamp(min=0)]  # [I, G, S]
        members = torch.where(template >= 0, members, -1).reshape(-1, size)
        others = (present[b] & ~visual[b]).nonzero().squeeze(1)
        singles = torch.full((others.numel(), size), -1, dtype=torch.long, device=visual.device)
        singles[:, 0] = others
        index = torch.cat([others, members[:, 0]])
        order = index.argsort()
        rows_index.append(index[order])
        rows_groups.append(torch.cat([singles, members])[order])
    width = max(int(r.numel()) for r in rows_index)
    index = torch.full((len(rows_index), width), -1, dtype=torch.long, device=visual.device)
    merged = torch.full((len(rows_index), width, size), -1, dtype=torch.long, device=visual.device)
    for b, (row_index, row_groups) in enumerate(zip(rows_index, rows_groups)):
        n = row_index.numel()  # left-padded, like every keep plan
        if n:
            index[b, width - n :] = row_index
            merged[b, width - n :] = row_groups
    return KeepPlan(index=index, groups=merged)


def visual_grid_side(config: Any) -> int:
    """Side of the square visual-token grid of one image, or ``MethodNotApplicable`` for a layout pool cannot
    handle."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        kind = (
            "anyres tiles with newline tokens"
            if model_type in ("llava_next", "llava_onevision")
            else "its layout"
        )
        raise MethodNotApplicable(
            f"pool supports one square visual-token grid per image ({', '.join(SUPPORTED_MODEL_TYPES)}); "
            f"model_type {model_type!r} uses {kind}, which is not supported yet"
        )
    if getattr(config, "vision_feature_select_strategy", "default") != "default":
        raise MethodNotApplicable(
            "pool: vision_feature_select_strategy='full' keeps the CLS token, so the grid is not square"
        )
    vision = config.vision_config
    image_size, patch = vision.image_size, vision.patch_size
    if isinstance(image_size, list | tuple):
        if len(set(image_size)) != 1:
            raise MethodNotApplicable(f"pool needs square images, got image_size {image_size}")
        image_size = image_size[0]
    return int(image_size) // int(patch)


class Pool(Method):
    """Average-pool each image's visual-token grid at ``layer`` (see the module docstring)."""

    config_cls = PoolConfig
    changes_length = True
    kind_rank = KIND_SELECTION
    #: kept slots carry group means, so equality with "the unpatched model with dropped tokens masked" does not hold
    merges_tokens = True
    #: the only model types whose visual layout pool understands (others raise MethodNotApplicable at bind)
    model_types: ClassVar[tuple[str, ...]] = SUPPORTED_MODEL_TYPES
    config: PoolConfig

    def bind(self, ctx) -> None:
        super().bind(ctx)
        check_drop_layer("pool", self.config.layer, ctx.num_layers)
        self.side = visual_grid_side(ctx.model.config)
        self.groups = grid_groups(self.side, self.config.factor)
        self.images_pooled = 0

    def select(self, layer: int, state: ForwardState) -> KeepPlan | None:
        if layer != self.config.layer or not state.is_prefill or not state.layout.any_visual:
            return None
        per_image = self.side * self.side
        plan = pool_plan(state.layout.visual, state.present_mask(), self.groups, per_image)
        self.images_pooled += int(state.layout.counts.sum()) // per_image
        return plan

    def stats(self) -> dict[str, Any]:
        return {
            "grid": [self.side, self.side],
            "pooled_grid": [math.ceil(self.side / self.config.factor)] * 2,
            "images_pooled": self.images_pooled,
        }

    @classmethod
    def noop_config(cls) -> PoolConfig:
        return PoolConfig(factor=1)

    @classmethod
    def sweep_configs(cls, keep_ratios: Sequence[float]) -> list[MethodConfig]:
        """One config per distinct factor ``round(1/√r)`` ≥ 2 (pooling keeps ~1/f² of the visual tokens)."""
        factors = sorted({max(2, round(1 / math.sqrt(r))) for r in keep_ratios if r > 0})
        return [PoolConfig(factor=f) for f in factors] or [cls.example_config()]
