"""``@triton.jit`` building blocks shared by the attention kernels."""

import triton
import triton.language as tl


@triton.jit
def load_query_rows(q_ptr, b, sq_b, sq_h, sq_m, kvh, pid_r, G, M, D, UPCAST: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """The query tile of program ``pid_r`` for KV head ``kvh``: rows ``r`` enumerate (group member, query row) so
    GQA reads each K/V tile once for its ``G`` query heads. Returns ``(q, r_ok, m, h, d, d_ok)``."""
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < G * M
    m = r % M
    h = kvh * G + r // M
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(
        q_ptr + b * sq_b + (h * sq_h + m * sq_m)[:, None] + d[None, :],
        mask=r_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    return q, r_ok, m, h, d, d_ok


@triton.jit
def online_softmax_step(s, m_i, l_i, acc, v_ptrs, kv_mask, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One KV tile of a base-2 online softmax: fold logits ``s`` (``-inf`` where masked) into the running max
    ``m_i``, denominator ``l_i`` and output ``acc``, loading the tile's V from ``v_ptrs``. Returns the new state."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc
