"""Attention probabilities of a few query rows over all keys (op ``vlm_accel::attention_row_probs``).

What FastV (last row, head mean), SparseVLM/PDrop/SGL (many text rows, summed), GIFT and TTF read at their
scoring layers. The runtime calls it from inside its registered attention function with the post-RoPE query
rows and the full cached keys (before ``repeat_kv``), so the model itself keeps running on
SDPA/FlashAttention.

Semantics, for query head ``h`` (reading key head ``h // G``, as transformers' ``repeat_kv`` does)::

    p[b,h,m,:] = softmax_fp32(scaling · q[b,h,m] · K[b,h//G]ᵀ  over keys with allowed[b,m,n])

with masked keys at exactly 0 and rows that allow no key all 0 (never NaN). ``reduce``:

* ``"none"``      → ``[B,Hq,M,N]``
* ``"head_mean"`` → ``[B,M,N]``  (mean over the Hq query heads)
* ``"sum"``       → ``[B,N]``    (sum over heads and rows)

The reference bounds its fp32 transient by chunking rows when reducing; the Triton path (two passes: row
log-sum-exp, then probabilities recomputed from it) never holds an ``O(Hq·M·N)`` temporary when reducing.
"""

import torch

from ._dispatch import offsets_fit_int32, resolve_use_triton, triton_runs_on
from ._reference import check_gqa, check_mask, fp32_logits, masked_softmax_

REDUCTIONS = ("none", "head_mean", "sum")
# Largest fp32 probability chunk (elements) the reference materialises at once when it reduces.
_REFERENCE_CHUNK_ELEMS = 1 << 25

__all__ = ["REDUCTIONS", "attention_row_probs", "attention_row_probs_reference"]


def _out_shape(b: int, hq: int, m: int, n: int, reduce: str) -> tuple[int, ...]:
    return {"none": (b, hq, m, n), "head_mean": (b, m, n), "sum": (b, n)}[reduce]


def attention_row_probs_reference(
    query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor | None, scaling: float, reduce: str = "none"
) -> torch.Tensor:
    """Pure-torch :func:`attention_row_probs` (GQA by reshape, no ``repeat_kv``; fp32 logits and softmax)."""
    b, hq, hkv, g, m, n = check_gqa(query, key)
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    check_mask(allowed, (b, m, n), "allowed")
    d = query.shape[-1]
    if reduce == "none":
        q = query.reshape(b, hkv, g * m, d)
        probs = fp32_logits(q, key).mul_(scaling).view(b, hq, m, n)
        return masked_softmax_(probs, None if allowed is None else allowed[:, None])
    chunk = max(1, min(m, _REFERENCE_CHUNK_ELEMS // max(1, hq * n)))
    out = torch.zeros(_out_shape(b, hq, m, n, reduce), dtype=torch.float32, device=query.device)
    for m0 in range(0, m, chunk):
        m1 = min(m, m0 + chunk)
        q = query[:, :, m0:m1].reshape(b, hkv, g * (m1 - m0), d)
        probs = fp32_logits(q, key).mul_(scaling).view(b, hq, m1 - m0, n)
        mask = None if allowed is None else allowed[:, None, m0:m1, :]
        probs = masked_softmax_(probs, mask)
        if reduce == "head_mean":
            out[:, m0:m1] = probs.mean(dim=1)
        else:
            out += probs.sum(dim=(1, 2))
    return out


def _triton(query, key, allowed, scaling, reduce):
    from ._triton import row_probs as tk

    return tk.attention_row_probs_triton(query, key, allowed, scaling, reduce)


def _eligible(query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor | None, reduce: str) -> bool:
    b, hq, m, _ = query.shape
    out_per_batch = hq * m * key.shape[2] if reduce == "none" else m * key.shape[2]
    return (
        query.dtype == key.dtype
        and query.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and 1 <= query.shape[-1] <= 256
        and query.numel() > 0
        and key.numel() > 0
        and offsets_fit_int32(query, key, allowed)
        and out_per_batch < 2**31
    )


@torch.library.custom_op("vlm_accel::attention_row_probs", mutates_args=())
def _op(
    query: torch.Tensor,
    key: torch.Tensor,
    allowed: torch.Tensor | None,
    scaling: float,
    reduce: str,
    use_triton: bool,
) -> torch.Tensor:
    # CPU: Triton only under the interpreter (tests); otherwise the reference
    if triton_runs_on(query.device, use_triton) and _eligible(query, key, allowed, reduce):
        return _triton(query, key, allowed, scaling, reduce)
    return attention_row_probs_reference(query, key, allowed, scaling, reduce)


@_op.register_kernel("cuda")
def _op_cuda(query, key, allowed, scaling, reduce, use_triton):
    if use_triton and _eligible(query, key, allowed, reduce):
        return _triton(query, key, allowed, scaling, reduce)
    return attention_row_probs_reference(query, key, allowed, scaling, reduce)


@_op.register_fake
def _op_fake(query, key, allowed, scaling, reduce, use_triton):
    b, hq, _, _, m, n = check_gqa(query, key)
    return query.new_empty(_out_shape(b, hq, m, n, reduce), dtype=torch.float32)


def attention_row_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    allowed: torch.Tensor | None = None,
    scaling: float | None = None,
    reduce: str = "none",
    *,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """fp32 attention probabilities of ``query [B,Hq,M,D]`` over ``key [B,Hkv,N,D]`` (GQA, masked).

    Args:
        query: post-RoPE query rows, ``Hq = Hkv·G``.
        key: all keys of the layer (the full cache), pre-``repeat_kv``.
        allowed: bool ``[B,M,N]``; False ⇒ probability 0 (padding, causality). None ⇒ all keys allowed.
        scaling: logit scale; default ``D ** -0.5``.
        reduce: ``"none"`` → ``[B,Hq,M,N]``, ``"head_mean"`` → ``[B,M,N]``, ``"sum"`` → ``[B,N]``.
        use_triton: run the Triton kernel (CUDA; CPU only under ``TRITON_INTERPRET=1``). None ⇒ the
            ``VLM_ACCEL_TRITON`` environment flag; the torch reference is the default.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    b, _, _, _, m, n = check_gqa(query, key)
    check_mask(allowed, (b, m, n), "allowed")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return _op(query, key, allowed, float(scaling), reduce, resolve_use_triton(use_triton))
