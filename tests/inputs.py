"""Build prompts for the tiny test models: one row at a time, or a left-padded batch of rows.

Each family encodes images differently (hf_internals §1.1): LLaVA one tensor per image; LLaVA-NeXT/OneVision
anyres tiles + ``image_sizes``; InternVL a flat list of tiles; Qwen2-VL flattened patches + ``image_grid_thw`` +
``mm_token_type_ids``. ``RowSpec.image_size`` is interpreted per family so rows get different visual-token counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from tiny_models import IMAGE_TOKEN, PAD


@dataclass(frozen=True)
class RowSpec:
    """``prefix`` text tokens, an image of ``image_size`` (None: text only), then ``suffix`` text tokens."""

    prefix: int = 3
    image_size: tuple[int, int] | None = (32, 32)
    suffix: int = 5
    seed: int = 0


@dataclass
class Row:
    input_ids: torch.Tensor  # [L]
    pixel_values: torch.Tensor | None
    image_size: tuple[int, int] | None
    grid_thw: tuple[int, int, int] | None = None


def kind(model) -> str:
    model_type = model.config.model_type
    if model_type in ("llava_next", "llava_onevision"):
        return "anyres"
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        return "qwen"
    return model_type  # llava, internvl


def _pixels(model, spec: RowSpec, g: torch.Generator) -> tuple[torch.Tensor, tuple[int, int, int] | None]:
    h, w = spec.image_size
    family = kind(model)
    if family == "qwen":
        # image_size in units of 16 px → a (1, 2h/16·2, ...) grid: (32, 32) → 4×4 patches → 4 merged tokens
        grid = (1, 4 * h // 32, 4 * w // 32)
        patch = model.config.vision_config.patch_size
        temporal = model.config.vision_config.temporal_patch_size
        return torch.randn(grid[0] * grid[1] * grid[2], 3 * temporal * patch * patch, generator=g), grid
    side = model.config.vision_config.image_size
    side = side[0] if isinstance(side, list | tuple) else side
    if family == "anyres":
        patches = image_size_to_num_patches(spec.image_size, model.config.image_grid_pinpoints, side)
        return torch.randn(patches, 3, side, side, generator=g), None
    if family == "internvl":
        tiles = (h // side) * (w // side)
        tiles += 1 if tiles > 1 else 0  # thumbnail
        return torch.randn(tiles, 3, side, side, generator=g), None
    return torch.randn(3, side, side, generator=g), None


def visual_token_count(model, row: Row) -> int:
    with torch.no_grad():
        family = kind(model)
        if family == "anyres":
            out = model.model.get_image_features(
                pixel_values=row.pixel_values[None], image_sizes=torch.tensor([row.image_size])
            )
        elif family == "qwen":
            out = model.model.get_image_features(
                pixel_values=row.pixel_values, image_grid_thw=torch.tensor([row.grid_thw])
            )
        elif family == "internvl":
            out = model.model.get_image_features(pixel_values=row.pixel_values)
        else:
            out = model.model.get_image_features(pixel_values=row.pixel_values[None])
    features = out.pooler_output
    return (
        sum(int(f.shape[0]) for f in features)
        if isinstance(features, list | tuple)
        else features.shape[:-1].numel()
    )


def make_row(model, spec: RowSpec) -> Row:
    g = torch.Generator().manual_seed(spec.seed)
    prefix = torch.cat([torch.tensor([1]), torch.randint(3, 250, (spec.prefix - 1,), generator=g)])
    suffix = torch.randint(3, 250, (spec.suffix,), generator=g)
    if spec.image_size is None:
        return Row(torch.cat([prefix, suffix]), None, None)
    pixel_values, grid = _pixels(model, spec, g)
    row = Row(prefix, pixel_values, spec.image_size, grid)
    count = visual_token_count(model, row)
    row.input_ids = torch.cat([prefix, torch.full((count,), IMAGE_TOKEN), suffix])
    return row


def batch_inputs(model, rows: list[Row]) -> dict[str, torch.Tensor]:
    """Left-padded model inputs (the layout processors produce for generation)."""
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row.input_ids) :] = row.input_ids
        attention_mask[i, width - len(row.input_ids) :] = 1
    inputs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
    family = kind(model)
    if family == "qwen":
        inputs["mm_token_type_ids"] = (input_ids == IMAGE_TOKEN).int()
    return inputs | pixel_inputs(model, [r for r in rows if r.pixel_values is not None])


def pixel_inputs(model, images: list[Row]) -> dict[str, torch.Tensor]:
    """The family's pixel inputs for ``images`` (single-image rows), in order."""
    family = kind(model)
    inputs: dict[str, torch.Tensor] = {}
    if not images:
        return inputs
    if family == "anyres":
        most = max(r.pixel_values.shape[0] for r in images)
        pv = torch.zeros(len(images), most, *images[0].pixel_values.shape[1:])
        for i, row in enumerate(images):
            pv[i, : row.pixel_values.shape[0]] = row.pixel_values
        inputs["pixel_values"] = pv
        inputs["image_sizes"] = torch.tensor([r.image_size for r in images])
    elif family == "qwen":
        inputs["pixel_values"] = torch.cat([r.pixel_values for r in images])
        inputs["image_grid_thw"] = torch.tensor([r.grid_thw for r in images])
    elif family == "internvl":
        inputs["pixel_values"] = torch.cat([r.pixel_values for r in images])
    else:
        inputs["pixel_values"] = torch.stack([r.pixel_values for r in images])
    return inputs


def clip_inputs(model, clips: list[list[Row]]) -> dict[str, torch.Tensor]:
    """Left-padded inputs where row ``b`` is the concatenation of the single-image rows ``clips[b]`` (their text and
    image tokens in order: a multi-image prompt), with every row's images in order in the pixel inputs."""
    merged = [Row(torch.cat([r.input_ids for r in clip]), None, None) for clip in clips]
    return batch_inputs(model, merged) | pixel_inputs(model, [r for clip in clips for r in clip])


def extend_inputs(inputs: dict[str, torch.Tensor], sequences: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inputs of a no-cache forward over ``sequences`` (prompt + generated tokens)."""
    extra = sequences.shape[1] - inputs["input_ids"].shape[1]
    out = dict(inputs, input_ids=sequences)
    ones = torch.ones(sequences.shape[0], extra, dtype=torch.long)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], ones], dim=1)
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], 0 * ones.int()], dim=1)
    return out


def reference_position_kwargs(model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Explicit position ids as generate() derives them (Qwen2-VL computes its own M-RoPE positions)."""
    if kind(model) == "qwen":
        return {}
    mask = inputs["attention_mask"]
    return {"position_ids": (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)}
