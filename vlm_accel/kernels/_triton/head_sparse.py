"""Triton head-sparse split-K decode attention (see :mod:`vlm_accel.kernels.head_sparse`).

``_partial_kernel``, grid ``(Hkv, B, splits)``: the G query heads of one KV head form the rows of a
``[BLOCK_G, D]`` tile; if none of them is selected the program's key loop has zero iterations (K/V never
loaded) and it writes an empty partial (lse = -inf). Otherwise it runs an online softmax over its slice of N
and writes the normalised partial output and base-2 log-sum-exp. ``_combine_kernel``, grid ``(B·Hq,)``, merges
the splits by their LSE and zeroes unselected heads and rows with no allowed key.
"""

import torch
import triton
import triton.language as tl

from ._common import dot_precision, new_output, next_pow2, upcast_for
from ._tiles import online_softmax_step

_LOG2E = 1.4426950408889634


@triton.jit
def _partial_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    hm_ptr,
    a_ptr,
    po_ptr,
    pl_ptr,
    sq_b,
    sq_h,
    sk_b,
    sk_h,
    sk_n,
    sv_b,
    sv_h,
    sv_n,
    sa_b,
    N,
    D,
    G,
    HQ,
    SPLITS,
    SPLIT_LEN,
    qk_scale,
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # int64 only in scalar base pointers; offsets inside a tile are int32.
    kvh = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < G
    h = kvh * G + g
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    sel = tl.load(hm_ptr + b * HQ + h, mask=g_ok, other=0) != 0
    any_sel = tl.max(sel.to(tl.int32), 0) > 0
    q = tl.load(
        q_ptr + b * sq_b + (h * sq_h)[:, None] + d[None, :], mask=sel[:, None] & d_ok[None, :], other=0.0
    )
    if UPCAST:
        q = q.to(tl.float32)
    n_lo = sp * SPLIT_LEN
    n_hi = tl.minimum(n_lo + SPLIT_LEN, N)
    n_hi = tl.where(any_sel, n_hi, n_lo)  # no selected head ⇒ zero iterations, K/V never read
    k_base = k_ptr + b * sk_b + kvh.to(tl.int64) * sk_h
    v_base = v_ptr + b * sv_b + kvh.to(tl.int64) * sv_h
    a_base = a_ptr + b * sa_b
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < n_hi
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + (n * sk_n)[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        valid = sel[:, None] & n_ok[None, :]
        if HAS_MASK:
            a = tl.load(a_base + n, mask=n_ok, other=0)
            valid = valid & (a != 0)[None, :]
        s = tl.where(valid, s, float("-inf"))
        v_ptrs = v_base + (n * sv_n)[:, None] + d[None, :]
        m_i, l_i, acc = online_softmax_step(s, m_i, l_i, acc, v_ptrs, kv_mask, UPCAST, PRECISION)
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    row = h * SPLITS + sp
    tl.store(
        po_ptr + b * HQ * SPLITS * D + (row * D)[:, None] + d[None, :], o, mask=g_ok[:, None] & d_ok[None, :]
    )
    tl.store(pl_ptr + b * HQ * SPLITS + row, lse, mask=g_ok)


@triton.jit
def _combine_kernel(
    po_ptr, pl_ptr, hm_ptr, out_ptr, so_b, so_h, HQ, SPLITS, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr
):
    bh = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < SPLITS
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    lse = tl.load(pl_ptr + bh * SPLITS + s, mask=s_ok, other=float("-inf"))
    mx = tl.max(lse, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.where(s_ok & (lse > float("-inf")), tl.exp2(lse - mx), 0.0)
    tot = tl.sum(w, 0)
    o = tl.load(
        po_ptr + (bh * SPLITS + s)[:, None] * D + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0
    )
    res = tl.sum(o * w[:, None], 0) / tl.where(tot > 0, tot, 1.0)
    sel = tl.load(hm_ptr + bh) != 0
    res = tl.where(sel & (tot > 0), res, 0.0)
    b = bh // HQ
    h = bh % HQ
    tl.store(out_ptr + b * so_b + h * so_h + d, res.to(out_ptr.dtype.element_ty), mask=d_ok)


def _num_splits(b: int, hkv: int, n: int, block_n: int, cpu: bool) -> int:
    if cpu:
        return 1 if n <= 2 * block_n else 2
    want = max(1, 264 // max(1, b * hkv))  # ~2 programs per SM on an H100 (132 SMs)
    return max(1, min(want, triton.cdiv(n, 4 * block_n)))


def head_sparse_decode_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    head_mask: torch.Tensor,
    allowed: torch.Tensor | None,
    scaling: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    b, hq, _, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    g = hq // hkv
    dev = query.device
    q = query if query.stride(-1) == 1 else query.contiguous()
    k = key if key.stride(-1) == 1 else key.contiguous()
    v = value if value.stride(-1) == 1 else value.contiguous()
    hm = head_mask.contiguous().view(torch.uint8)
    has_mask = allowed is not None
    if has_mask:
        a = allowed.contiguous().view(torch.uint8)
        sa_b = a.stride(0)
    else:
        a, sa_b = hm, 0  # never read
    block_d = next_pow2(d)
    block_g = next_pow2(g)
    cpu = dev.type == "cpu"
    block_n = min(next_pow2(n), 128) if cpu else (64 if block_d <= 128 else 32)
    splits = num_splits or _num_splits(b, hkv, n, block_n, cpu)
    split_len = triton.cdiv(max(n, 1), splits)
    split_len = triton.cdiv(split_len, block_n) * block_n
    splits = max(1, triton.cdiv(max(n, 1), split_len))
    part_o = new_output((b, hq, splits, d), torch.float32, dev)
    part_l = new_output((b, hq, splits), torch.float32, dev)
    upcast, precision = upcast_for(query), dot_precision(query)
    _partial_kernel[(hkv, b, splits)](
        q,
        k,
        v,
        hm,
        a,
        part_o,
        part_l,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        sa_b,
        n,
        d,
        g,
        hq,
        splits,
        split_len,
        float(scaling) * _LOG2E,
        HAS_MASK=has_mask,
        UPCAST=upcast,
        PRECISION=precision,
        BLOCK_G=block_g,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=4,
    )
    out = new_output((b, hq, 1, d), query.dtype, dev)
    _combine_kernel[(b * hq,)](
        part_o,
        part_l,
        hm,
        out,
        out.stride(0),
        out.stride(1),
        hq,
        splits,
        d,
        BLOCK_S=next_pow2(splits, 2),
        BLOCK_D=block_d,
        num_warps=4,
    )
    return out


__all__ = ["head_sparse_decode_triton"]
