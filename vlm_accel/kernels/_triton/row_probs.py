"""Triton two-pass attention row probabilities (see :mod:`vlm_accel.kernels.row_probs`).

Pass 1 (``_row_lse_kernel``), grid ``(row blocks, Hkv·splits, B)``: the G query heads of one KV head are
packed as ``G·M`` rows so each K tile is read once per group; online max/sum over one split of the keys gives
each row's partial base-2 log-sum-exp ``[B,Hq,M,splits]`` (fp32, tiny). Splitting N keeps the GPU busy when
``B·Hkv·G·M`` is small (FastV at B = 1); pass 2 merges the splits.

Pass 2 (``_row_probs_kernel``), grid ``(row blocks of M, key blocks of N, B)``: each program owns one
``[BLOCK_M, BLOCK_N]`` output tile and loops over every head, recomputing ``p = exp2(s·log2e − lse)``. It
stores ``p`` per head (``reduce="none"``), or accumulates the head sum in registers and stores the head mean,
or column sums per row block (``reduce="sum"``; the few row-block partials are summed afterwards). No
atomics, so results are deterministic, and no ``O(Hq·M·N)`` temporary when reducing.
"""

import torch
import triton
import triton.language as tl

from ._common import dot_precision, new_output, next_pow2, upcast_for
from ._tiles import load_query_rows

_LOG2E = 1.4426950408889634
_REDUCE_CODE = {"none": 0, "head_mean": 1, "sum": 2}


@triton.jit
def _row_lse_kernel(
    q_ptr,
    k_ptr,
    a_ptr,
    lse_ptr,
    sq_b,
    sq_h,
    sq_m,
    sk_b,
    sk_h,
    sk_n,
    sa_b,
    sa_m,
    M,
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
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # int64 only in the scalar per-(batch, head) base pointers; offsets inside a tile are int32.
    pid_r = tl.program_id(0)
    kvh = tl.program_id(1) // SPLITS
    sp = tl.program_id(1) % SPLITS
    b = tl.program_id(2).to(tl.int64)
    q, r_ok, m, h, d, d_ok = load_query_rows(q_ptr, b, sq_b, sq_h, sq_m, kvh, pid_r, G, M, D, UPCAST, BLOCK_R,
                                             BLOCK_D)  # fmt: skip
    k_base = k_ptr + b * sk_b + kvh.to(tl.int64) * sk_h
    a_base = a_ptr + b * sa_b
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    n_lo = sp * SPLIT_LEN
    n_hi = tl.minimum(n_lo + SPLIT_LEN, N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < n_hi
        k = tl.load(k_base + (n * sk_n)[:, None] + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        valid = r_ok[:, None] & n_ok[None, :]
        if HAS_MASK:
            a = tl.load(a_base + (m * sa_m)[:, None] + n[None, :], mask=valid, other=0)
            valid = valid & (a != 0)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + b * HQ * M * SPLITS + (h * M + m) * SPLITS + sp, lse, mask=r_ok)


@triton.jit
def _row_probs_kernel(
    q_ptr,
    k_ptr,
    a_ptr,
    lse_ptr,
    out_ptr,
    sq_b,
    sq_h,
    sq_m,
    sk_b,
    sk_h,
    sk_n,
    sa_b,
    sa_m,
    so_0,
    so_1,
    so_2,
    M,
    N,
    D,
    HKV,
    G,
    qk_scale,
    inv_hq,
    SPLITS,
    REDUCE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    valid = m_ok[:, None] & n_ok[None, :]
    if HAS_MASK:
        a = tl.load(a_ptr + b * sa_b + (m * sa_m)[:, None] + n[None, :], mask=valid, other=0)
        valid = valid & (a != 0)
    hq = HKV * G
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kvh in range(0, HKV):
        k = tl.load(
            k_ptr + b * sk_b + tl.cast(kvh, tl.int64) * sk_h + (n * sk_n)[:, None] + d[None, :],
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
        for g in range(0, G):
            h = tl.cast(kvh * G + g, tl.int64)
            q = tl.load(
                q_ptr + b * sq_b + h * sq_h + (m * sq_m)[:, None] + d[None, :],
                mask=m_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            if UPCAST:
                q = q.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            # merge pass 1's per-split base-2 LSEs of these rows: lse = log2(sum_s 2^lse_s)
            sp = tl.arange(0, BLOCK_S)
            part = tl.load(
                lse_ptr + (b * hq + h) * M * SPLITS + (m * SPLITS)[:, None] + sp[None, :],
                mask=m_ok[:, None] & (sp < SPLITS)[None, :],
                other=float("-inf"),
            )
            pmax = tl.max(part, 1)
            pmax_safe = tl.where(pmax == float("-inf"), 0.0, pmax)
            ptot = tl.sum(tl.exp2(part - pmax_safe[:, None]), 1)
            lse = tl.where(ptot > 0, pmax_safe + tl.log2(tl.where(ptot > 0, ptot, 1.0)), float("-inf"))
            keep = valid & (lse[:, None] > float("-inf"))
            p = tl.where(keep, tl.exp2(s - tl.where(keep, lse[:, None], 0.0)), 0.0)
            if REDUCE == 0:
                tl.store(
                    out_ptr + b * so_0 + h * so_1 + (m * so_2)[:, None] + n[None, :],
                    p,
                    mask=m_ok[:, None] & n_ok[None, :],
                )
            else:
                acc += p
    if REDUCE == 1:
        tl.store(
            out_ptr + b * so_0 + (m * so_1)[:, None] + n[None, :],
            acc * inv_hq,
            mask=m_ok[:, None] & n_ok[None, :],
        )
    if REDUCE == 2:
        tl.store(out_ptr + b * so_0 + pid_m * so_1 + n, tl.sum(acc, 0), mask=n_ok)


def _blocks(query: torch.Tensor, b: int, hkv: int, g: int, m: int, n: int, d: int) -> dict:
    """Tile sizes, pass-1 key splits and launch options for both passes.

    Interpreter (CPU): the biggest tiles and one split, since its cost is per tile step. GPU: tiles chosen so
    that ptxas reports no spills for sm_90 at D = 64/128 (tests/kernels/kernel_aot.py, docs/kernels.md), and
    pass 1 split over N until it has ~2 programs per SM of an H100; not yet timed on a GPU.
    """
    block_d = next_pow2(d)
    if query.device.type == "cpu":
        return dict(
            BLOCK_R=next_pow2(g * m),
            BLOCK_M=next_pow2(m),
            BLOCK_N=min(next_pow2(n), 128),
            BLOCK_D=block_d,
            SPLITS=1,
            lse_opts={},
            probs_opts={},
        )
    if query.dtype == torch.float32:  # IEEE fp32 dot runs on FMA units: small tiles
        cfg = dict(
            BLOCK_R=min(32, next_pow2(g * m)),
            BLOCK_M=min(32, next_pow2(m)),
            BLOCK_N=32,
            BLOCK_D=block_d,
            lse_opts=dict(num_warps=4, num_stages=2),
            probs_opts=dict(num_warps=8, num_stages=1),
        )
    else:
        warps = 4 if block_d <= 64 else 8
        cfg = dict(
            BLOCK_R=min(64, next_pow2(g * m)),
            BLOCK_M=min(64, next_pow2(m)),
            BLOCK_N=64 if block_d <= 128 else 32,
            BLOCK_D=block_d,
            lse_opts=dict(num_warps=warps),
            probs_opts=dict(num_warps=warps),
        )
    programs = triton.cdiv(g * m, cfg["BLOCK_R"]) * hkv * b
    want = triton.cdiv(264, programs)  # ~2 programs per SM on an H100 (132 SMs)
    cfg["SPLITS"] = max(1, min(want, triton.cdiv(n, 8 * cfg["BLOCK_N"]), 64))  # >= 8 key tiles per split
    return cfg


def attention_row_probs_triton(
    query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor | None, scaling: float, reduce: str
) -> torch.Tensor:
    """Launch both passes; shapes were validated by the public op."""
    b, hq, m, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    g = hq // hkv
    if query.stride(-1) != 1:
        query = query.contiguous()
    if key.stride(-1) != 1:
        key = key.contiguous()
    dev = query.device
    has_mask = allowed is not None
    if has_mask:
        a = allowed.view(torch.uint8)
        if a.stride(-1) != 1:
            a = a.contiguous()
        sa_b, sa_m = a.stride(0), a.stride(1)
    else:
        a, sa_b, sa_m = query, 0, 0  # never read
    upcast, precision = upcast_for(query), dot_precision(query)
    cfg = _blocks(query, b, hkv, g, m, n, d)
    block_r, block_m, block_n, block_d = cfg["BLOCK_R"], cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"]
    qk_scale = float(scaling) * _LOG2E
    # key splits of pass 1, each a whole number of key tiles; every split is non-empty
    split_len = triton.cdiv(triton.cdiv(max(n, 1), cfg["SPLITS"]), block_n) * block_n
    splits = triton.cdiv(max(n, 1), split_len)

    lse = new_output((b, hq, m, splits), torch.float32, dev)
    _row_lse_kernel[(triton.cdiv(g * m, block_r), hkv * splits, b)](
        query,
        key,
        a,
        lse,
        query.stride(0),
        query.stride(1),
        query.stride(2),
        key.stride(0),
        key.stride(1),
        key.stride(2),
        sa_b,
        sa_m,
        m,
        n,
        d,
        g,
        hq,
        splits,
        split_len,
        qk_scale,
        HAS_MASK=has_mask,
        UPCAST=upcast,
        PRECISION=precision,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        **cfg["lse_opts"],
    )

    row_blocks = triton.cdiv(m, block_m)
    if reduce == "none":
        out = new_output((b, hq, m, n), torch.float32, dev)
        so = (out.stride(0), out.stride(1), out.stride(2))
    elif reduce == "head_mean":
        out = new_output((b, m, n), torch.float32, dev)
        so = (out.stride(0), out.stride(1), 0)
    else:
        out = new_output((b, row_blocks, n), torch.float32, dev)
        so = (out.stride(0), out.stride(1), 0)
    _row_probs_kernel[(row_blocks, triton.cdiv(n, block_n), b)](
        query,
        key,
        a,
        lse,
        out,
        query.stride(0),
        query.stride(1),
        query.stride(2),
        key.stride(0),
        key.stride(1),
        key.stride(2),
        sa_b,
        sa_m,
        *so,
        m,
        n,
        d,
        hkv,
        g,
        qk_scale,
        1.0 / hq,
        splits,
        REDUCE=_REDUCE_CODE[reduce],
        HAS_MASK=has_mask,
        UPCAST=upcast,
        PRECISION=precision,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        BLOCK_S=next_pow2(splits, 2),
        **cfg["probs_opts"],
    )
    if reduce == "sum":
        out = out[:, 0] if row_blocks == 1 else out.sum(dim=1)
    return out


__all__ = ["attention_row_probs_triton"]
