"""Split a generate() call's batch into row subsets and merge generated outputs back (SGL's early exit).

Rows that exit early are answered by the guide and must not run in the large model, so the large model's call is
re-issued on the remaining rows. Per-row tensors (``input_ids``, masks, ``image_sizes`` …) are sliced on dim 0;
visual inputs are sliced when their row structure is known without family code: one image per row with
``pixel_values`` batched per row (LLaVA, LLaVA-NeXT/OneVision, single-tile InternVL), or one image per row with
``image_grid_thw`` (Qwen2-VL patches, sliced by ``t·h·w``). Anything else returns None and the caller runs every
row (correct, without the saving).
"""

from __future__ import annotations

from typing import Any

import torch

_PER_ROW = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "mm_token_type_ids",
    "token_type_ids",
    "image_sizes",
)


def slice_rows(kwargs: dict[str, Any], rows: torch.Tensor, batch: int) -> dict[str, Any] | None:
    """``kwargs`` restricted to batch ``rows`` (long ``[R]``), or None when the visual inputs cannot be split."""
    out = dict(kwargs)
    grid = kwargs.get("image_grid_thw")
    for name, value in kwargs.items():
        if not torch.is_tensor(value):
            continue
        if name in _PER_ROW:
            if value.shape[0] != batch:
                return None
            out[name] = value[rows.to(value.device)]
        elif name == "image_grid_thw":
            if value.shape[0] != batch:
                return None
            out[name] = value[rows.to(value.device)]
        elif name == "pixel_values":
            if grid is not None:
                if grid.shape[0] != batch:
                    return None
                sizes = grid.prod(dim=-1).tolist()
                chunks = torch.split(value, sizes, dim=0)
                out[name] = torch.cat([chunks[i] for i in rows.tolist()], dim=0)
            elif value.shape[0] == batch:
                out[name] = value[rows.to(value.device)]
            else:
                return None
        elif name in ("pixel_values_videos", "video_grid_thw", "mm_encoder_outputs"):
            return None
    return out


def pad_right(sequences: torch.Tensor, width: int, pad: int) -> torch.Tensor:
    if sequences.shape[1] >= width:
        return sequences
    extra = sequences.new_full((sequences.shape[0], width - sequences.shape[1]), pad)
    return torch.cat([sequences, extra], dim=1)


def merge_sequences(
    large: torch.Tensor | None, large_rows: torch.Tensor, guide: torch.Tensor, pad: int
) -> torch.Tensor:
    """``[B, W + T]``: rows ``large_rows`` from the large model (``large`` holds only those), every other row from
    the guide's full-batch ``guide`` sequences; right-padded with ``pad``."""
    width = max(guide.shape[1], large.shape[1] if large is not None else 0)
    out = pad_right(guide, width, pad).clone()
    if large is not None and large_rows.numel():
        out[large_rows] = pad_right(large, width, pad).to(out.device)
    return out


def merge_step_tensors(
    large: tuple | None, large_rows: torch.Tensor, guide: tuple | None, guide_rows: torch.Tensor
) -> tuple | None:
    """Per-step ``[B, V]`` tensors (``scores`` / ``logits``) merged row-wise; steps one side lacks are zero."""
    if guide is None and large is None:
        return None
    template = (guide or large)[0]
    batch = int(large_rows.numel() + guide_rows.numel())
    steps = max(len(guide or ()), len(large or ()))
    merged = []
    for step in range(steps):
        out = template.new_zeros(batch, *template.shape[1:])
        if guide is not None and step < len(guide):
            out[guide_rows] = guide[step][guide_rows].to(out)
        if large is not None and step < len(large):
            out[large_rows] = large[step].to(out)
        merged.append(out)
    return tuple(merged)
