"""Head-sparse decode attention for MoH (op ``vlm_accel::head_sparse_decode_attention``).

Mixture-of-Head attention routes each token to a subset of heads. In decode (one query row per sample) the
output of query head ``h`` is::

    out[b,h,0] = softmax(scaling · q[b,h,0] · K[b,h//G]ᵀ over allowed[b,:]) · V[b,h//G]   if head_mask[b,h]
               = 0                                                                        otherwise

(rows with no allowed key give 0). Both paths skip every ``(b, KV head)`` whose G query heads are all
unselected, so their K/V are never read:

- **torch** (the default, CPU and CUDA): rows with the same pattern of active KV groups are handled together, and
  each run of consecutive active groups is one SDPA call on a *view* of the cache (the G query heads of a group are
  packed as G query rows of its KV head, so K/V are neither copied nor repeated; a subset of rows is gathered);
- **Triton** (opt-in): splits N across programs (flash-decoding) and merges the partial results by their
  log-sum-exp; an inactive group's program runs zero key iterations.

:func:`head_sparse_decode_attention_reference` (dense SDPA over all heads, then zeroing — it reads all K/V) is kept
as the test oracle. Savings need whole inactive KV groups, so route at KV-group granularity to benefit
(research/kernels.md §3).
"""

import torch
import torch.nn.functional as F

from ._dispatch import offsets_fit_int32, resolve_use_triton, triton_runs_on
from ._reference import check_gqa, check_mask

__all__ = [
    "head_sparse_decode_attention",
    "head_sparse_decode_attention_reference",
    "head_sparse_decode_attention_torch",
]


def _check(query, key, value, head_mask, allowed) -> None:
    b, hq, _, _, m, n = check_gqa(query, key)
    if m != 1:
        raise ValueError(f"head_sparse_decode_attention is for decode: query must have 1 row, got {m}")
    if value.shape != key.shape:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must have the same shape")
    check_mask(head_mask, (b, hq), "head_mask")
    check_mask(allowed, (b, n), "allowed")


def head_sparse_decode_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    head_mask: torch.Tensor,
    allowed: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Dense SDPA over all heads (GQA), then unselected heads and rows with no allowed key set to 0."""
    _check(query, key, value, head_mask, allowed)
    b, hq = query.shape[:2]
    attn_mask = None if allowed is None else allowed[:, None, None, :]
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, scale=scaling, enable_gqa=key.shape[1] != hq
    )
    keep = head_mask.view(b, hq, 1, 1)
    if allowed is not None:
        keep = keep & allowed.any(dim=-1).view(b, 1, 1, 1)
    return torch.where(keep, out, torch.zeros((), dtype=out.dtype, device=out.device))


def _active_runs(pattern: list[bool]) -> list[tuple[int, int]]:
    """``[start, stop)`` of every run of consecutive True entries."""
    runs, start = [], None
    for i, on in enumerate([*pattern, False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append((start, i))
            start = None
    return runs


def head_sparse_decode_attention_torch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    head_mask: torch.Tensor,
    allowed: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Head-sparse decode in torch that never reads an inactive KV group (see the module docstring)."""
    _check(query, key, value, head_mask, allowed)
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    out = torch.zeros_like(query)
    groups = head_mask.view(b, hkv, g).any(dim=-1)
    if allowed is not None:
        groups = groups & allowed.any(dim=-1, keepdim=True)  # a row with no allowed key gives 0
    if b == 1:
        patterns, inverse = groups, None
    else:
        patterns, inverse = torch.unique(groups, dim=0, return_inverse=True)
    for p, pattern in enumerate(patterns.tolist()):
        runs = _active_runs(pattern)
        if not runs:
            continue
        rows: slice | torch.Tensor = slice(None)
        if len(patterns) > 1:
            rows = (inverse == p).nonzero().flatten()
            first, count = int(rows[0]), rows.numel()
            if int(rows[-1]) - first + 1 == count:  # consecutive rows (e.g. one row): a view, no gather
                rows = slice(first, first + count)
        for start, stop in runs:
            heads = slice(start * g, stop * g)
            # a slice of rows is a view of the cache; an index tensor gathers only these rows' active groups
            q, k, v = query[rows, heads], key[rows, start:stop], value[rows, start:stop]
            a = None if allowed is None else allowed[rows]
            n = q.shape[0]
            attn_mask = None if a is None else a[:, None, None, :]
            o = F.scaled_dot_product_attention(q.reshape(n, stop - start, g, d), k, v, attn_mask=attn_mask, scale=scaling)
            out[rows, heads] = o.reshape(n, (stop - start) * g, 1, d)
    if g > 1:  # an inactive head inside an active group
        out = torch.where(head_mask.view(b, hq, 1, 1), out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def _eligible(query, key, value, allowed) -> bool:
    return (
        query.dtype == key.dtype == value.dtype
        and query.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and 1 <= query.shape[-1] <= 256
        and query.numel() > 0
        and key.numel() > 0
        and offsets_fit_int32(query, key, value, allowed)
    )


def _triton(query, key, value, head_mask, allowed, scaling):
    from ._triton import head_sparse as tk

    return tk.head_sparse_decode_triton(query, key, value, head_mask, allowed, scaling)


@torch.library.custom_op("vlm_accel::head_sparse_decode_attention", mutates_args=())
def _op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    head_mask: torch.Tensor,
    allowed: torch.Tensor | None,
    scaling: float,
    use_triton: bool,
) -> torch.Tensor:
    # CPU: Triton only under the interpreter (tests); otherwise the torch path
    if triton_runs_on(query.device, use_triton) and _eligible(query, key, value, allowed):
        return _triton(query, key, value, head_mask, allowed, scaling)
    return head_sparse_decode_attention_torch(query, key, value, head_mask, allowed, scaling)


@_op.register_kernel("cuda")
def _op_cuda(query, key, value, head_mask, allowed, scaling, use_triton):
    if use_triton and _eligible(query, key, value, allowed):
        return _triton(query, key, value, head_mask, allowed, scaling)
    return head_sparse_decode_attention_torch(query, key, value, head_mask, allowed, scaling)


@_op.register_fake
def _op_fake(query, key, value, head_mask, allowed, scaling, use_triton):
    return torch.empty_like(query)


def head_sparse_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    head_mask: torch.Tensor,
    allowed: torch.Tensor | None = None,
    scaling: float | None = None,
    *,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """Decode attention ``[B,Hq,1,D]`` that computes (and, on Triton, reads K/V for) selected heads only.

    Args:
        query: ``[B,Hq,1,D]`` post-RoPE query of the new token.
        key, value: ``[B,Hkv,N,D]`` the layer's cache (pre-``repeat_kv``), ``Hq = Hkv·G``.
        head_mask: bool ``[B,Hq]``, True = head selected by the MoH router; unselected heads output 0.
        allowed: bool ``[B,N]`` key mask (padding); None ⇒ all keys.
        scaling: logit scale; default ``D ** -0.5``.
        use_triton: None ⇒ the ``VLM_ACCEL_TRITON`` environment flag; default the torch path (which skips
            inactive KV groups too).
    """
    _check(query, key, value, head_mask, allowed)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return _op(query, key, value, head_mask, allowed, float(scaling), resolve_use_triton(use_triton))
