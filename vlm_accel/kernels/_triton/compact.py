"""Triton multi-tensor row gather: one launch compacts every K/V tensor (see
:mod:`vlm_accel.kernels.compact`).

Grid ``(row blocks of B·H·S', L)``: program ``(i, l)`` reads tensor ``l``'s source and destination addresses
from two int64 pointer tables, then copies ``BLOCK_ROWS`` rows of ``D`` elements. Elements are moved as
same-width integers, so any dtype works bit-exactly.
"""

import torch
import triton
import triton.language as tl

from ._common import new_output

_INT_OF_SIZE = {1: tl.int8, 2: tl.int16, 4: tl.int32, 8: tl.int64}


@triton.jit
def _gather_rows_kernel(
    src_tab,
    dst_tab,
    idx_ptr,
    H,
    S,
    S_OUT,
    D,
    TOTAL_ROWS,
    ELEM: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    layer = tl.program_id(1)
    src = tl.load(src_tab + layer).to(tl.pointer_type(ELEM))
    dst = tl.load(dst_tab + layer).to(tl.pointer_type(ELEM))
    if ALIGNED:  # every tensor starts 16-byte aligned: lets the copy use 16-byte vector loads/stores
        src = tl.multiple_of(src, 16)
        dst = tl.multiple_of(dst, 16)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    ok = rows < TOTAL_ROWS
    j = rows % S_OUT
    bh = rows // S_OUT
    b = bh // H
    src_row = tl.load(idx_ptr + b * S_OUT + j, mask=ok, other=0).to(tl.int64)
    src_off = (bh * S + src_row) * D
    dst_off = rows * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = ok[:, None] & (d < D)[None, :]
        x = tl.load(src + src_off[:, None] + d[None, :], mask=m, other=0)
        tl.store(dst + dst_off[:, None] + d[None, :], x, mask=m)


def compact_kv_triton(tensors: list[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
    """All tensors share shape and dtype and are contiguous (checked by the op)."""
    b, h, s, d = tensors[0].shape
    s_out = index.shape[1]
    dev = index.device
    int_tl = _INT_OF_SIZE[tensors[0].element_size()]
    outs = [new_output((b, h, s_out, d), tensors[0].dtype, dev) for _ in tensors]
    total = b * h * s_out
    if total == 0 or d == 0:
        return outs
    src_tab = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=dev)
    dst_tab = torch.tensor([o.data_ptr() for o in outs], dtype=torch.int64, device=dev)
    idx = index.to(torch.int64).contiguous()
    block_d = min(triton.next_power_of_2(d), 256)
    if dev.type == "cpu":
        block_rows = min(triton.next_power_of_2(total), 256)
    else:
        block_rows = max(1, 4096 // block_d)  # 32 rows at D=128: 16-byte vector copies, no spills on sm_90
    _gather_rows_kernel[(triton.cdiv(total, block_rows), len(tensors))](
        src_tab,
        dst_tab,
        idx,
        h,
        s,
        s_out,
        d,
        total,
        ELEM=int_tl,
        ALIGNED=all(t.data_ptr() % 16 == 0 for t in [*tensors, *outs]),
        BLOCK_ROWS=block_rows,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return outs


__all__ = ["compact_kv_triton"]
