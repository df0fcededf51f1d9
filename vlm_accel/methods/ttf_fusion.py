"""The per-frame math of TTF (Temporal Token Fusion, arXiv 2508.19257): the pixel test, the attention test, the
hybrid recompute rule and hard fusion — pure tensor functions, so tests can hold them against a hand-written
reference and the method (:mod:`vlm_accel.methods.ttf`) only does the bookkeeping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: ITU-R BT.601 luma weights, as in the released code's grayscale conversion.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def grayscale(pixels: torch.Tensor) -> torch.Tensor:
    """``Y = 0.299 R + 0.587 G + 0.114 B`` of processor-normalised pixels ``[N, 3, H, W]`` → ``[N, H, W]`` fp32."""
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"ttf: the pixel test needs pixel_values [images, 3, H, W], got {tuple(pixels.shape)}")
    weights = torch.tensor(GRAY_WEIGHTS, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() * weights).sum(dim=1)


def patch_difference(previous: torch.Tensor, current: torch.Tensor, patch: int) -> torch.Tensor:
    """Mean absolute grayscale difference per patch: ``[N, H, W]`` twice → ``[N, (H/patch)·(W/patch)]``, in the
    row-major patch order of a ViT's tokens (paper §3.2 pixel dimension; code: 14×14 average pooling)."""
    diff = (current - previous).abs()[:, None]
    return F.avg_pool2d(diff, kernel_size=patch, stride=patch).flatten(1)


def top_k_mask(relevance: torch.Tensor, k: int) -> torch.Tensor:
    """Bool ``[N, P]``: the ``k`` most relevant patches of each row (ties toward earlier patches, deterministic)."""
    k = min(k, relevance.shape[-1])
    mask = torch.zeros(relevance.shape, dtype=torch.bool, device=relevance.device)
    if k > 0:
        order = torch.sort(relevance.float(), dim=-1, descending=True, stable=True).indices[..., :k]
        mask.scatter_(-1, order, True)
    return mask


def recompute_mask(
    difference: torch.Tensor, relevance: torch.Tensor | None, threshold: float, k: int
) -> torch.Tensor:
    """The hybrid rule: recompute patch ``p`` if it is dynamic (``d_p > τ``) or relevant (``p ∈ TopK(r, k)``).

    ``relevance`` None (no previous attention) recomputes everything, as the released code falls back to.
    """
    dynamic = difference > threshold
    if relevance is None:
        return torch.ones_like(dynamic)
    return dynamic | top_k_mask(relevance, k)


def fuse(fresh: torch.Tensor, cached: torch.Tensor, recompute: torch.Tensor) -> torch.Tensor:
    """Hard fusion: ``token[p] = fresh[p] if recompute[p] else cached[p]`` (``[..., P, d]`` with ``[..., P]``)."""
    return torch.where(recompute[..., None], fresh, cached.to(fresh.dtype))
