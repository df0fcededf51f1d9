"""Triton flash-attention forward with a per-key additive bias (see
:mod:`vlm_accel.kernels.biased_attention`).

Grid ``(row blocks of G·M, Hkv, B)``: the G query heads sharing a KV head are packed as ``G·M`` rows, so each
K/V tile is read once per group (decode, M = 1, gets a full tile of G rows). Per key tile it adds
``key_bias[b, head of row, n]`` (a ``[BLOCK_R, BLOCK_N]`` gather; the head stride is 0 for a shared bias),
applies the bool ``allowed`` tile and/or the bottom-right causal rule, and runs the usual online softmax. With
``is_causal`` the key loop stops after the last position any row of the block may see.
"""

import torch
import triton
import triton.language as tl

from ._common import dot_precision, new_output, next_pow2, upcast_for
from ._tiles import load_query_rows, online_softmax_step

_LOG2E = 1.4426950408889634
LOG2E = tl.constexpr(_LOG2E)


@triton.jit
def _biased_attn_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bias_ptr,
    a_ptr,
    o_ptr,
    sq_b,
    sq_h,
    sq_m,
    sk_b,
    sk_h,
    sk_n,
    sv_b,
    sv_h,
    sv_n,
    sb_b,
    sb_h,
    sa_b,
    sa_m,
    so_b,
    so_h,
    so_m,
    M,
    N,
    D,
    G,
    qk_scale,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # int64 only in scalar base pointers; offsets inside a tile are int32.
    pid_r = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    q, r_ok, m, h, d, d_ok = load_query_rows(q_ptr, b, sq_b, sq_h, sq_m, kvh, pid_r, G, M, D, UPCAST, BLOCK_R,
                                             BLOCK_D)  # fmt: skip
    pos = m + (N - M)  # absolute position of each query row (bottom-right aligned)
    hi = N
    if CAUSAL:
        hi = tl.minimum(tl.max(tl.where(r_ok, pos, -1), 0) + 1, N)
    k_base = k_ptr + b * sk_b + kvh.to(tl.int64) * sk_h
    v_base = v_ptr + b * sv_b + kvh.to(tl.int64) * sv_h
    bias_row = bias_ptr + b * sb_b + (h * sb_h)[:, None]
    a_row = a_ptr + b * sa_b + (m * sa_m)[:, None]
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < N
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + (n * sk_n)[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        valid = r_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            valid = valid & (n[None, :] <= pos[:, None])
        if HAS_MASK:
            a = tl.load(a_row + n[None, :], mask=valid, other=0)
            valid = valid & (a != 0)
        bias = tl.load(bias_row + n[None, :], mask=valid, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale + bias.to(tl.float32) * LOG2E
        s = tl.where(valid, s, float("-inf"))
        v_ptrs = v_base + (n * sv_n)[:, None] + d[None, :]
        m_i, l_i, acc = online_softmax_step(s, m_i, l_i, acc, v_ptrs, kv_mask, UPCAST, PRECISION)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        o_ptr + b * so_b + (h * so_h + m * so_m)[:, None] + d[None, :],
        o.to(o_ptr.dtype.element_ty),
        mask=r_ok[:, None] & d_ok[None, :],
    )


def biased_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_bias: torch.Tensor,
    allowed: torch.Tensor | None,
    is_causal: bool,
    scaling: float,
) -> torch.Tensor:
    b, hq, m, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    g = hq // hkv
    dev = query.device
    q = query if query.stride(-1) == 1 else query.contiguous()
    k = key if key.stride(-1) == 1 else key.contiguous()
    v = value if value.stride(-1) == 1 else value.contiguous()
    bias = key_bias if key_bias.stride(-1) == 1 else key_bias.contiguous()
    sb_h = 0 if bias.shape[1] == 1 else bias.stride(1)
    has_mask = allowed is not None
    if has_mask:
        a = allowed.view(torch.uint8)
        if a.stride(-1) != 1:
            a = a.contiguous()
        sa_b, sa_m = a.stride(0), a.stride(1)
    else:
        a, sa_b, sa_m = bias, 0, 0  # never read
    block_d = next_pow2(d)
    # GPU tiles: no ptxas spills on sm_90 at D = 64/128 (docs/kernels.md); not yet timed on a GPU.
    if dev.type == "cpu":  # interpreter: biggest tiles (its cost is per tile step)
        block_r, block_n, opts = next_pow2(g * m), min(next_pow2(n), 128), {}
    elif query.dtype == torch.float32:
        block_r, block_n, opts = min(32, next_pow2(g * m)), 32, dict(num_warps=4, num_stages=2)
    elif block_d <= 64:
        block_r, block_n, opts = min(64, next_pow2(g * m)), 64, dict(num_warps=4)
    else:
        block_r, block_n, opts = min(64, next_pow2(g * m)), 32, dict(num_warps=8, num_stages=2)
    out = new_output((b, hq, m, d), query.dtype, dev)
    _biased_attn_kernel[(triton.cdiv(g * m, block_r), hkv, b)](
        q,
        k,
        v,
        bias,
        a,
        out,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        bias.stride(0),
        sb_h,
        sa_b,
        sa_m,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        m,
        n,
        d,
        g,
        float(scaling) * _LOG2E,
        HAS_MASK=has_mask,
        CAUSAL=bool(is_causal),
        UPCAST=upcast_for(query),
        PRECISION=dot_precision(query),
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        **opts,
    )
    return out


__all__ = ["biased_attention_triton"]
