"""Build prompts for the tiny test models: one row at a time, or a left-padded batch of rows."""

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
    pixel_values: torch.Tensor | None  # llava: [3, H, W]; anyres: [patches, 3, H, W]
    image_size: tuple[int, int] | None


def _anyres(model) -> bool:
    return hasattr(model.config, "image_grid_pinpoints")


def visual_token_count(model, pixel_values: torch.Tensor, image_size: tuple[int, int]) -> int:
    with torch.no_grad():
        if _anyres(model):
            out = model.model.get_image_features(
                pixel_values=pixel_values[None], image_sizes=torch.tensor([image_size])
            )
        else:
            out = model.model.get_image_features(pixel_values=pixel_values[None])
    return sum(int(f.shape[0]) for f in out.pooler_output)


def make_row(model, spec: RowSpec) -> Row:
    g = torch.Generator().manual_seed(spec.seed)
    prefix = torch.cat([torch.tensor([1]), torch.randint(3, 250, (spec.prefix - 1,), generator=g)])
    suffix = torch.randint(3, 250, (spec.suffix,), generator=g)
    if spec.image_size is None:
        return Row(torch.cat([prefix, suffix]), None, None)
    side = model.config.vision_config.image_size
    if _anyres(model):
        patches = image_size_to_num_patches(spec.image_size, model.config.image_grid_pinpoints, side)
        pixel_values = torch.randn(patches, 3, side, side, generator=g)
    else:
        pixel_values = torch.randn(3, side, side, generator=g)
    count = visual_token_count(model, pixel_values, spec.image_size)
    ids = torch.cat([prefix, torch.full((count,), IMAGE_TOKEN), suffix])
    return Row(ids, pixel_values, spec.image_size)


def batch_inputs(model, rows: list[Row]) -> dict[str, torch.Tensor]:
    """Left-padded model inputs (the layout processors produce for generation)."""
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row.input_ids) :] = row.input_ids
        attention_mask[i, width - len(row.input_ids) :] = 1
    inputs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
    images = [r for r in rows if r.pixel_values is not None]
    if not images:
        return inputs
    if _anyres(model):
        most = max(r.pixel_values.shape[0] for r in images)
        pv = torch.zeros(len(images), most, *images[0].pixel_values.shape[1:])
        for i, row in enumerate(images):
            pv[i, : row.pixel_values.shape[0]] = row.pixel_values
        inputs["pixel_values"] = pv
        inputs["image_sizes"] = torch.tensor([r.image_size for r in images])
    else:
        inputs["pixel_values"] = torch.stack([r.pixel_values for r in images])
    return inputs


def generation_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position ids generate() derives from a left-padded mask."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
