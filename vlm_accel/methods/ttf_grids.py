"""How TTF (Temporal Token Fusion, arXiv 2508.19257) sees one family's images: the fusion unit (one LLM visual
token), the pixel test pooled onto those units, and the vision features in token order — one class per pixel
layout, so the method (:mod:`vlm_accel.methods.ttf`) is family-free.

- **LLaVA-1.5** (``llava``): ``pixel_values [images, 3, H, W]``; one visual token per ViT patch (plus a leading CLS
  token with the ``"full"`` feature strategy, always recomputed); the pixel test pools ``|ΔY|`` over each
  ``patch × patch`` block (the released code's 14×14 average pooling). Features ``[images, tokens, d]``.
- **Qwen2-VL / Qwen2.5-VL** (``qwen2_vl``, ``qwen2_5_vl``): ``pixel_values [Σ t·h·w, C·T·p·p]`` flattened patches
  with ``image_grid_thw [images, 3]``. The processor orders the patches so that every ``m²`` consecutive rows
  (``m = spatial_merge_size``, 2) are one 2×2 block, which the merger turns into one LLM token: that merged token
  is the fusion unit. The pixel test pools ``|ΔY|`` over the unit's ``m²·T·p·p`` values — its ``2p × 2p`` area
  (28×28 px) and the processor's ``T`` temporal copies of the image. Pre-merger features ``[Σ t·h·w, d_vision]``
  (``m²`` rows per unit; hard fusion replaces a unit's ``m²`` rows together, so the merger — LayerNorm per row,
  then an MLP on the unit's concatenated rows — maps a reused unit to the cached unit's token); post-merger
  ``[Σ units, d_text]``. Qwen2.5-VL's tower runs the merged units in window-attention order (``window_index``, the
  model's own :func:`transformers.vision_utils.get_vision_window_index`) up to and through the merger, and
  un-permutes after it: its features are un-permuted here before fusion and permuted back after.

Other layouts (LLaVA-NeXT / OneVision anyres crops, InternVL tiles with pixel shuffle) have no grid here: ttf binds
on them only as its no-op (``keyframe_interval=1``).
"""

from __future__ import annotations

from typing import Any

import torch

from vlm_accel.methods.ttf_fusion import GRAY_WEIGHTS, grayscale, patch_difference


class FrameGrid:
    """The images of one call, cut into TTF's fusion units (one per LLM visual token, in token order)."""

    #: leading units of every image that are always recomputed (a CLS token)
    lead: int = 0

    def check(self, inputs: dict[str, Any]) -> None:
        """Raise ``ValueError`` (one line) for pixel inputs this layout cannot fuse."""

    def units(self, inputs: dict[str, Any]) -> list[int]:
        """LLM visual tokens per image of the call (``lead`` included)."""
        raise NotImplementedError

    def gray(self, inputs: dict[str, Any]) -> list[torch.Tensor]:
        """Per image, its grayscale ``Y = 0.299R + 0.587G + 0.114B`` in a form :meth:`difference` pools."""
        raise NotImplementedError

    def difference(self, previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """Mean ``|Y_t − Y_{t−1}|`` per unit (``lead`` excluded), ``[units − lead]``; same-shaped inputs."""
        raise NotImplementedError

    def split(
        self, features: torch.Tensor, where: str, images: list[int], inputs: dict[str, Any]
    ) -> list[torch.Tensor]:
        """The features of ``images`` (the call's encoded images, in order) as ``[units, ...]`` each, token order."""
        raise NotImplementedError

    def join(
        self, pieces: list[torch.Tensor], where: str, images: list[int], inputs: dict[str, Any]
    ) -> torch.Tensor:
        """The inverse of :meth:`split`."""
        raise NotImplementedError


class PatchGrid(FrameGrid):
    """LLaVA-1.5: one token per ``patch × patch`` block of ``pixel_values [images, 3, H, W]``."""

    def __init__(self, patch: int, lead: int) -> None:
        self.patch = patch
        self.lead = lead

    def check(self, inputs: dict[str, Any]) -> None:
        pixels = inputs.get("pixel_values")
        if not torch.is_tensor(pixels) or pixels.dim() != 4:
            raise ValueError(
                "ttf: needs pixel_values [images, 3, H, W] (LLaVA-1.5 style), one entry per image"
            )
        height, width = pixels.shape[-2:]
        if height % self.patch or width % self.patch:
            raise ValueError(
                f"ttf: image size {height}×{width} is not a multiple of the patch size {self.patch}"
            )

    def units(self, inputs: dict[str, Any]) -> list[int]:
        pixels = inputs["pixel_values"]
        height, width = pixels.shape[-2:]
        return [(height // self.patch) * (width // self.patch) + self.lead] * pixels.shape[0]

    def gray(self, inputs: dict[str, Any]) -> list[torch.Tensor]:
        return list(grayscale(inputs["pixel_values"]))

    def difference(self, previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        return patch_difference(previous[None], current[None], self.patch)[0]

    def split(
        self, features: torch.Tensor, where: str, images: list[int], inputs: dict[str, Any]
    ) -> list[torch.Tensor]:
        return list(features)

    def join(
        self, pieces: list[torch.Tensor], where: str, images: list[int], inputs: dict[str, Any]
    ) -> torch.Tensor:
        return torch.stack(pieces)


class MergedPatchGrid(FrameGrid):
    """Qwen2-VL / Qwen2.5-VL: one token per ``m × m`` block of flattened patches (``m²`` consecutive rows)."""

    def __init__(self, vision_config: Any, windowed: bool) -> None:
        self.merge = int(vision_config.spatial_merge_size)
        self.channels = int(getattr(vision_config, "in_channels", getattr(vision_config, "in_chans", 3)))
        self.patch = int(vision_config.patch_size)
        self.temporal = int(vision_config.temporal_patch_size)
        self.window_size = int(vision_config.window_size) if windowed else None

    def check(self, inputs: dict[str, Any]) -> None:
        if inputs.get("pixel_values_videos") is not None:
            raise ValueError("ttf: fusing Qwen-VL video input is not supported; pass the frames as images")
        pixels, grid = inputs.get("pixel_values"), inputs.get("image_grid_thw")
        width = self.channels * self.temporal * self.patch**2
        if not torch.is_tensor(pixels) or pixels.dim() != 2 or pixels.shape[1] != width or grid is None:
            raise ValueError(f"ttf: needs flattened patches pixel_values [N, {width}] with image_grid_thw")
        if int(grid.prod(-1).sum()) != pixels.shape[0]:
            raise ValueError(f"ttf: image_grid_thw {grid.tolist()} does not cover {pixels.shape[0]} patches")

    def _patches(self, inputs: dict[str, Any], images: list[int] | None = None) -> list[int]:
        grid = inputs["image_grid_thw"]
        return grid.prod(-1).tolist() if images is None else grid[images].prod(-1).tolist()

    def units(self, inputs: dict[str, Any]) -> list[int]:
        return [n // self.merge**2 for n in self._patches(inputs)]

    def gray(self, inputs: dict[str, Any]) -> list[torch.Tensor]:
        pixels = inputs["pixel_values"].float()
        # a patch row is (C, T, p, p) in the processor's flattening; Y over C
        patches = pixels.reshape(pixels.shape[0], self.channels, -1)
        weights = torch.tensor(GRAY_WEIGHTS, dtype=torch.float32, device=pixels.device)
        y = (patches * weights[None, :, None]).sum(dim=1)  # [N, T·p·p]
        return [g.reshape(-1, self.merge**2 * y.shape[1]) for g in y.split(self._patches(inputs))]

    def difference(self, previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        return (current - previous).abs().mean(dim=-1)

    def _window_order(self, inputs: dict[str, Any], images: list[int]) -> torch.Tensor | None:
        """Qwen2.5-VL: ``order[i]`` = the token-order unit at window-order slot ``i`` of these images' tower call."""
        if self.window_size is None:
            return None
        from transformers.vision_utils import get_vision_window_index

        grid = inputs["image_grid_thw"][images]
        order, _ = get_vision_window_index(grid, self.merge, self.window_size, self.patch)
        return order

    def split(
        self, features: torch.Tensor, where: str, images: list[int], inputs: dict[str, Any]
    ) -> list[torch.Tensor]:
        rows = self.merge**2 if where == "pre_projector" else 1
        units = features.reshape(features.shape[0] // rows, rows * features.shape[-1])
        order = self._window_order(inputs, images)
        if order is not None:
            units = units[torch.argsort(order.to(units.device))]
        return list(units.split([n // self.merge**2 for n in self._patches(inputs, images)]))

    def join(
        self, pieces: list[torch.Tensor], where: str, images: list[int], inputs: dict[str, Any]
    ) -> torch.Tensor:
        rows = self.merge**2 if where == "pre_projector" else 1
        units = torch.cat(pieces)
        order = self._window_order(inputs, images)
        if order is not None:
            units = units[order.to(units.device)]
        return units.reshape(units.shape[0] * rows, units.shape[-1] // rows)


def frame_grid(model_type: str, config: Any) -> FrameGrid | None:
    """The family's grid, or None where TTF does not fuse (it then binds only as its no-op)."""
    if model_type == "llava":
        return PatchGrid(
            int(config.vision_config.patch_size), int(config.vision_feature_select_strategy == "full")
        )
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        return MergedPatchGrid(config.vision_config, windowed=model_type == "qwen2_5_vl")
    return None


FUSING_FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl")
