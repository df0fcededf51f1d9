"""How TTF (Temporal Token Fusion, arXiv 2508.19257) sees one family's images: the fusion units, the pixel test
pooled onto them, the vision features cut into them, and which LLM visual token carries which unit — one class per
pixel layout, so the method (:mod:`vlm_accel.methods.ttf`) is family-free.

A *fusion unit* is the smallest block of the projector's input that becomes LLM tokens on its own; hard fusion
replaces whole units (paper §3.3: ``token[p] = fresh[p] if recompute[p] else cache[p]``, at the vision output,
before the projector).

- **LLaVA-1.5** (``llava``): ``pixel_values [images, 3, H, W]``; a unit is one ViT patch = one LLM token (plus a
  leading CLS unit with the ``"full"`` feature strategy, always recomputed); the pixel test pools ``|ΔY|`` over each
  ``patch × patch`` block (the released code's 14×14 average pooling). Features ``[images, tokens, d]``.
- **Qwen2-VL / Qwen2.5-VL** (``qwen2_vl``, ``qwen2_5_vl``): ``pixel_values [Σ t·h·w, C·T·p·p]`` flattened patches
  with ``image_grid_thw [images, 3]``. The processor orders the patches so that every ``m²`` consecutive rows
  (``m = spatial_merge_size``, 2) are one 2×2 block, which the merger turns into one LLM token: that merged token
  is the unit. The pixel test pools ``|ΔY|`` over the unit's ``m²·T·p·p`` values — its ``2p × 2p`` area (28×28 px)
  and the processor's ``T`` temporal copies of the image. Pre-merger features ``[Σ t·h·w, d_vision]`` (``m²`` rows
  per unit: the merger — LayerNorm per row, then an MLP on the unit's concatenated rows — maps a reused unit to the
  cached unit's token); post-merger ``[Σ units, d_text]``. Qwen2.5-VL's tower runs the merged units in
  window-attention order (``window_index``, from the model's own
  :func:`transformers.vision_utils.get_vision_window_index`) up to and through the merger, and un-permutes after
  it: its features are un-permuted here before fusion and permuted back after.
- **InternVL** (``internvl``): ``pixel_values [tiles, 3, s, s]``, each image's tiles in order (a thumbnail last when
  tiled); pixel shuffle (``downsample_ratio`` 0.5) makes each 2×2 patch block one token before the projector, so a
  unit is one such token (its 4 patches from the model's own ``pixel_shuffle`` on patch indices) and the pixel test
  pools ``|ΔY|`` over its ``2p × 2p`` area. The inputs do not say how many tiles an image has: each contiguous run of
  visual tokens in a row is one image, of ``run / tokens_per_tile`` tiles. Features ``[tiles, tokens, d]``. A tile
  fuses with the same tile of the previous frame; frames with a different tile count are keyframes.
- **LLaVA-NeXT / LLaVA-OneVision** (``llava_next``, ``llava_onevision``, anyres): ``pixel_values [images, crops,
  3, s, s]`` + ``image_sizes``; each image is a base crop (the whole image resized) and a grid of crops, encoded
  separately. A unit is one patch of one crop (the projector's input ``[Σ crops, P, d]``); the pixel test pools
  ``|ΔY|`` per patch of each crop. After the projector the model packs the crops into LLM tokens (grid crops
  stitched, padding cut off, a newline token per row): the token → unit map is that packing run by the model's own
  ``pack_image_features`` on unit indices, so newline tokens carry no unit and cut-off patches reach no token. A
  crop fuses with the same crop of the previous frame when the layout matches (same crops, same map), else the
  frame is a keyframe. OneVision's ``anyres_max`` downsampling (bilinear interpolation of the packed grid, for large
  images) mixes units into one token: such images are always keyframes. OneVision multi-image rows
  (``batch_num_images``) use the base crop only, as the model does. Only the default CLS-free features are mapped.

Video inputs (``pixel_values_videos``) are not fused (frames as images are); the no-op binds everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlm_accel.methods.ttf_fusion import GRAY_WEIGHTS, grayscale, patch_difference


@dataclass
class ImageUnits:
    """One image of a call as TTF fuses it.

    ``units``: its fusion units (rows of its features after :meth:`FrameGrid.split`). ``token_unit``: long
    ``[LLM tokens]``, the unit each of its LLM visual tokens carries (−1: none, e.g. a newline token), or None when
    token ``i`` is unit ``i``. ``gray``: its grayscale as :meth:`FrameGrid.difference` pools it. ``fusable``: False
    when tokens mix units (then the image is always a keyframe).
    """

    units: int
    gray: torch.Tensor
    token_unit: torch.Tensor | None = None
    fusable: bool = True

    @property
    def tokens(self) -> int:
        return self.units if self.token_unit is None else len(self.token_unit)

    def token_map(self) -> torch.Tensor:
        if self.token_unit is None:
            return torch.arange(self.units, device=self.gray.device)
        return self.token_unit

    def same_layout(self, other: ImageUnits) -> bool:
        """Whether ``other`` (a previous frame) has the same units, grid and token map, so units correspond."""
        if self.units != other.units or self.gray.shape != other.gray.shape:
            return False
        if self.token_unit is None or other.token_unit is None:
            return self.token_unit is None and other.token_unit is None
        return torch.equal(self.token_unit, other.token_unit.to(self.token_unit.device))


class FrameGrid:
    """A family's images, cut into TTF's fusion units."""

    #: leading units of every image that are always recomputed (a CLS token)
    lead: int = 0
    #: whether the runtime can encode a subset of the call's images (:mod:`vlm_accel.runtime.vision`), so that
    #: ``save_compute`` may skip an image with nothing to recompute
    skips_images: bool = False

    def check(self, inputs: dict[str, Any]) -> None:
        """Raise ``ValueError`` (one line) for pixel inputs this layout cannot fuse."""
        if inputs.get("pixel_values_videos") is not None:
            raise ValueError(
                "ttf: fusing video input (pixel_values_videos) is not supported; pass frames as images"
            )

    def images(self, inputs: dict[str, Any], runs: list[int]) -> list[ImageUnits]:
        """The call's images in order; ``runs`` = lengths of the contiguous visual-token runs, rows in order."""
        raise NotImplementedError

    def difference(self, previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """Mean ``|Y_t − Y_{t−1}|`` per unit (``lead`` excluded), ``[units − lead]``; same-shaped inputs."""
        raise NotImplementedError

    def split(self, features: torch.Tensor, where: str, encoded: list[int], layout: list[ImageUnits],
              inputs: dict[str, Any]) -> list[torch.Tensor]:  # fmt: skip
        """The features of the images ``encoded`` (indices into the call's ``layout``, in order) as ``[units, ...]``
        each, at ``where`` (``"pre_projector"`` / ``"post_projector"``)."""
        raise NotImplementedError

    def join(self, pieces: list[torch.Tensor], where: str, encoded: list[int], layout: list[ImageUnits],
             inputs: dict[str, Any]) -> torch.Tensor:  # fmt: skip
        """The inverse of :meth:`split`."""
        raise NotImplementedError


def _gray_patches(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """``[N, 3, H, W]`` → grayscale ``[N, H, W]`` (checked to tile into ``patch × patch`` blocks)."""
    if pixels.shape[-1] % patch or pixels.shape[-2] % patch:
        raise ValueError(
            f"ttf: image size {tuple(pixels.shape[-2:])} is not a multiple of the patch size {patch}"
        )
    return grayscale(pixels)


class PatchGrid(FrameGrid):
    """LLaVA-1.5: one token per ``patch × patch`` block of ``pixel_values [images, 3, H, W]``."""

    skips_images = True

    def __init__(self, patch: int, lead: int) -> None:
        self.patch = patch
        self.lead = lead

    def check(self, inputs: dict[str, Any]) -> None:
        super().check(inputs)
        pixels = inputs.get("pixel_values")
        if not torch.is_tensor(pixels) or pixels.dim() != 4:
            raise ValueError(
                "ttf: needs pixel_values [images, 3, H, W] (LLaVA-1.5 style), one entry per image"
            )

    def images(self, inputs: dict[str, Any], runs: list[int]) -> list[ImageUnits]:
        gray = _gray_patches(inputs["pixel_values"], self.patch)
        units = (gray.shape[1] // self.patch) * (gray.shape[2] // self.patch) + self.lead
        return [ImageUnits(units, g) for g in gray]

    def difference(self, previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        return patch_difference(previous[None], current[None], self.patch)[0]

    def split(self, features, where, encoded, layout, inputs):  # noqa: D102 — see FrameGrid
        return list(features)

    def join(self, pieces, where, encoded, layout, inputs):  # noqa: D102
        return torch.stack(pieces)


class TileGrid(FrameGrid):
    """Shared by tiled layouts: each image is ``[tiles, 3, s, s]``; a unit is a block of ``block × block`` patches of
    one tile; ``unit_patches [units per tile, block²]`` lists each unit's patch indices (row-major in the tile)."""

    patch: int
    side: int
    unit_patches: torch.Tensor

    def _gray(self, tiles: torch.Tensor) -> torch.Tensor:
        return _gray_patches(tiles, self.patch)

    def difference(self, previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        per_patch = patch_difference(previous, current, self.patch)  # [tiles, patches per tile]
        return per_patch[:, self.unit_patches.to(per_patch.device)].mean(dim=-1).flatten()

    def split(self, features, where, encoded, layout, inputs):  # noqa: D102 — see FrameGrid
        flat = features.reshape(-1, features.shape[-1])  # [tiles, units per tile, d] → [Σ units, d]
        return list(flat.split([layout[i].units for i in encoded]))

    def join(self, pieces, where, encoded, layout, inputs):  # noqa: D102
        flat = torch.cat(pieces)
        return flat.reshape(-1, self.units_per_tile, flat.shape[-1])

    @property
    def units_per_tile(self) -> int:
        return self.unit_patches.shape[0]


class ShuffledTileGrid(TileGrid):
    """InternVL: tiles ``[Σ tiles, 3, s, s]``; a unit is one pixel-shuffled token (a 2×2 patch block)."""

    def __init__(self, model: Any) -> None:
        config = model.config.vision_config
        self.patch = int(
            config.patch_size[0] if isinstance(config.patch_size, list | tuple) else config.patch_size
        )
        side = config.image_size[0] if isinstance(config.image_size, list | tuple) else config.image_size
        self.side = int(side)
        grid = self.side // self.patch
        index = torch.arange(grid * grid, dtype=torch.float64).reshape(1, grid, grid, 1)
        shuffled = model.model.pixel_shuffle(index, scale_factor=model.config.downsample_ratio)
        self.unit_patches = shuffled.reshape(-1, shuffled.shape[-1]).round().long()

    def check(self, inputs: dict[str, Any]) -> None:
        super().check(inputs)
        pixels = inputs.get("pixel_values")
        if not torch.is_tensor(pixels) or pixels.dim() != 4 or pixels.shape[-1] != self.side:
            raise ValueError(f"ttf: needs InternVL tiles pixel_values [tiles, 3, {self.side}, {self.side}]")

    def images(self, inputs: dict[str, Any], runs: list[int]) -> list[ImageUnits]:
        pixels = inputs["pixel_values"]
        if (
            any(run % self.units_per_tile for run in runs)
            or sum(runs) // self.units_per_tile != pixels.shape[0]
        ):
            raise ValueError(
                f"ttf: {pixels.shape[0]} tiles of {self.units_per_tile} tokens do not match the images' visual-token "
                f"runs {runs}"
            )
        gray = self._gray(pixels)
        out, start = [], 0
        for run in runs:
            tiles = run // self.units_per_tile
            out.append(ImageUnits(run, gray[start : start + tiles]))
            start += tiles
        return out


class CropGrid(TileGrid):
    """LLaVA-NeXT / LLaVA-OneVision anyres: base crop + crop grid per image; a unit is one patch of one crop."""

    def __init__(self, model: Any) -> None:
        self.model = model
        config = model.config
        self.patch = int(config.vision_config.patch_size)
        self.side = int(config.vision_config.image_size)
        self.unit_patches = torch.arange((self.side // self.patch) ** 2)[:, None]
        self.onevision = config.model_type == "llava_onevision"

    def check(self, inputs: dict[str, Any]) -> None:
        super().check(inputs)
        pixels, sizes = inputs.get("pixel_values"), inputs.get("image_sizes")
        if not torch.is_tensor(pixels) or pixels.dim() != 5 or sizes is None or len(sizes) != pixels.shape[0]:
            raise ValueError("ttf: needs anyres pixel_values [images, crops, 3, s, s] with image_sizes")

    def _crops(self, inputs: dict[str, Any]) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        counts = inputs.get("batch_num_images")
        patching = (
            [True] * len(inputs["image_sizes"])
            if counts is None
            else [n == 1 for n in counts for _ in range(n)]
        )
        pinpoints = self.model.config.image_grid_pinpoints
        return [image_size_to_num_patches(size, pinpoints, self.side) if full else 1
                for size, full in zip(inputs["image_sizes"], patching)]  # fmt: skip

    def _token_units(self, crops: int, size: torch.Tensor) -> torch.Tensor:
        """The model's own packing run on unit indices: each LLM token's unit (−1: newline; non-integer: mixed)."""
        per_crop = self.units_per_tile
        index = torch.arange(crops * per_crop, dtype=torch.float64).reshape(crops, per_crop, 1)
        newline = torch.tensor([-1.0], dtype=torch.float64)
        base = self.model.model
        if self.onevision:
            packed, _ = base.pack_image_features([index], size[None], image_newline=newline,
                                                 vision_aspect_ratio=self.model.config.vision_aspect_ratio)  # fmt: skip
        else:
            strategy = self.model.config.vision_feature_select_strategy
            packed, _ = base.pack_image_features([index], size[None], strategy, image_newline=newline)
        return packed[0].flatten()

    def images(self, inputs: dict[str, Any], runs: list[int]) -> list[ImageUnits]:
        pixels = inputs["pixel_values"]
        out = []
        for i, crops in enumerate(self._crops(inputs)):
            values = self._token_units(crops, inputs["image_sizes"][i].cpu())
            mixed = bool((values != values.round()).any())
            token_unit = values.round().long().to(pixels.device)
            out.append(
                ImageUnits(crops * self.units_per_tile, self._gray(pixels[i, :crops]), token_unit, not mixed)
            )
        return out


class MergedPatchGrid(FrameGrid):
    """Qwen2-VL / Qwen2.5-VL: one token per ``m × m`` block of flattened patches (``m²`` consecutive rows)."""

    skips_images = True

    def __init__(self, vision_config: Any, windowed: bool) -> None:
        self.merge = int(vision_config.spatial_merge_size)
        self.channels = int(getattr(vision_config, "in_channels", getattr(vision_config, "in_chans", 3)))
        self.patch = int(vision_config.patch_size)
        self.temporal = int(vision_config.temporal_patch_size)
        self.window_size = int(vision_config.window_size) if windowed else None

    def check(self, inputs: dict[str, Any]) -> None:
        super().check(inputs)
        pixels, grid = inputs.get("pixel_values"), inputs.get("image_grid_thw")
        width = self.channels * self.temporal * self.patch**2
        if not torch.is_tensor(pixels) or pixels.dim() != 2 or pixels.shape[1] != width or grid is None:
            raise ValueError(f"ttf: needs flattened patches pixel_values [N, {width}] with image_grid_thw")
        if int(grid.prod(-1).sum()) != pixels.shape[0]:
            raise ValueError(f"ttf: image_grid_thw {grid.tolist()} does not cover {pixels.shape[0]} patches")

    def images(self, inputs: dict[str, Any], runs: list[int]) -> list[ImageUnits]:
        pixels = inputs["pixel_values"].float()
        # a patch row is (C, T, p, p) in the processor's flattening; Y over C
        patches = pixels.reshape(pixels.shape[0], self.channels, -1)
        weights = torch.tensor(GRAY_WEIGHTS, dtype=torch.float32, device=pixels.device)
        y = (patches * weights[None, :, None]).sum(dim=1)  # [N, T·p·p]
        per_image = y.split(inputs["image_grid_thw"].prod(-1).tolist())
        out = []
        for g in per_image:
            gray = g.reshape(-1, self.merge**2 * y.shape[1])
            out.append(ImageUnits(gray.shape[0], gray))
        return out

    def difference(self, previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        return (current - previous).abs().mean(dim=-1)

    def _window_order(self, inputs: dict[str, Any], encoded: list[int]) -> torch.Tensor | None:
        """Qwen2.5-VL: ``order[i]`` = the token-order unit at window-order slot ``i`` of these images' tower call."""
        if self.window_size is None:
            return None
        from transformers.vision_utils import get_vision_window_index

        order, _ = get_vision_window_index(
            inputs["image_grid_thw"][encoded], self.merge, self.window_size, self.patch
        )
        return order

    def split(self, features, where, encoded, layout, inputs):  # noqa: D102 — see FrameGrid
        rows = self.merge**2 if where == "pre_projector" else 1
        units = features.reshape(features.shape[0] // rows, rows * features.shape[-1])
        order = self._window_order(inputs, encoded)
        if order is not None:
            units = units[torch.argsort(order.to(units.device))]
        return list(units.split([layout[i].units for i in encoded]))

    def join(self, pieces, where, encoded, layout, inputs):  # noqa: D102
        rows = self.merge**2 if where == "pre_projector" else 1
        units = torch.cat(pieces)
        order = self._window_order(inputs, encoded)
        if order is not None:
            units = units[order.to(units.device)]
        return units.reshape(units.shape[0] * rows, units.shape[-1] // rows)


def frame_grid(model: Any) -> FrameGrid | None:
    """The family's grid, or None where TTF does not fuse (it then binds only as its no-op)."""
    config = model.config
    model_type = config.model_type
    if model_type == "llava":
        return PatchGrid(
            int(config.vision_config.patch_size), int(config.vision_feature_select_strategy == "full")
        )
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        return MergedPatchGrid(config.vision_config, windowed=model_type == "qwen2_5_vl")
    if model_type == "internvl" and config.vision_feature_select_strategy == "default":
        return ShuffledTileGrid(model)
    if model_type in ("llava_next", "llava_onevision"):
        cls_free = (
            config.vision_feature_select_strategy == "default"
            or config.vision_config.model_type == "siglip_vision_model"
        )
        return CropGrid(model) if cls_free else None
    return None


FUSING_FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "internvl", "llava_next", "llava_onevision")
