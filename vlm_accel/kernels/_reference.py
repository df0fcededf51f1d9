"""Pure-torch building blocks shared by the reference implementations (the CPU path and the CUDA default)."""

import torch

NEG_INF = float("-inf")


def check_gqa(query: torch.Tensor, key: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """Validate ``query [B,Hq,M,D]`` against ``key [B,Hkv,N,D]``; return ``(B, Hq, Hkv, G, M, N)``."""
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(
            f"query and key must be 4-D [B,H,S,D], got {tuple(query.shape)} and {tuple(key.shape)}"
        )
    b, hq, m, d = query.shape
    bk, hkv, n, dk = key.shape
    if bk != b or dk != d:
        raise ValueError(
            f"query {tuple(query.shape)} and key {tuple(key.shape)} disagree on batch or head dim"
        )
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    return b, hq, hkv, hq // hkv, m, n


def check_mask(mask: torch.Tensor | None, shape: tuple[int, ...], name: str) -> None:
    if mask is None:
        return
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")


def fp32_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q @ kᵀ`` in fp32 for ``q [..., R, D]``, ``k [..., N, D]`` with equal leading dims.

    On CUDA, 16-bit inputs use ``bmm(out_dtype=float32)`` (fp32 accumulation without upcasting K); elsewhere
    the operands are upcast.
    """
    if q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16):
        lead = q.shape[:-2]
        try:
            out = torch.bmm(
                q.reshape(-1, *q.shape[-2:]),
                k.reshape(-1, *k.shape[-2:]).transpose(1, 2),
                out_dtype=torch.float32,
            )
            return out.view(*lead, q.shape[-2], k.shape[-2])
        except (TypeError, RuntimeError):
            pass
    return torch.matmul(q.float(), k.float().transpose(-1, -2))


def masked_softmax_(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """In-place fp32 softmax over the last dim; ``allowed`` False ⇒ 0, rows with nothing allowed ⇒ all 0."""
    if allowed is not None:
        logits.masked_fill_(~allowed, NEG_INF)
    mx = logits.amax(dim=-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    logits.sub_(mx).exp_()
    total = logits.sum(dim=-1, keepdim=True)
    return logits.div_(torch.where(total > 0, total, torch.ones_like(total)))


def causal_allowed(m: int, n: int, device: torch.device) -> torch.Tensor:
    """``[M, N]`` bool, bottom-right aligned: query row i sits at absolute position ``N - M + i``."""
    rows = torch.arange(m, device=device)[:, None] + (n - m)
    return torch.arange(n, device=device)[None, :] <= rows
