"""Attention probabilities of a few query rows, computed inside the attention function.

SDPA and FlashAttention never materialise attention weights, and switching the model to eager costs the full
``[B, H, L, L]`` matrix at every layer. Methods that read attention (FastV's last-row scores, SGL, GIFT, TTF) need
only a few rows at a few layers, so the wrapper computes exactly those rows from the post-RoPE queries and the full
(cached) keys, with the layer's own mask, in fp32 — O(rows × N) per scoring layer (DESIGN.md, runtime contract).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vlm_accel.kernels import attention_row_probs
from vlm_accel.kernels._reference import fp32_logits


def allowed_keys(
    attention_mask: torch.Tensor | None, rows: torch.Tensor, q_len: int, kv_len: int
) -> torch.Tensor | None:
    """Bool ``[B, M, N]``: which keys each requested query row may attend, whatever the mask's backend form.

    Handles the bool 4-D (sdpa), additive float 4-D (eager), 2-D padding (flash) and ``None`` (plain causal)
    forms transformers passes to attention functions.
    """
    batch = rows.shape[0]
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask[:, 0] if attention_mask.shape[1] == 1 else attention_mask.amin(1)
        mask = mask.expand(batch, -1, -1) if mask.shape[0] == 1 else mask
        picked = mask.gather(1, rows[:, :, None].expand(-1, -1, mask.shape[-1]))[..., -kv_len:]
        if picked.dtype == torch.bool:
            return picked
        return picked > torch.finfo(picked.dtype).min / 2
    # Causal by index: query row r sits at cache position kv_len - q_len + r.
    key_pos = torch.arange(kv_len, device=rows.device)
    allowed = key_pos[None, None, :] <= (kv_len - q_len + rows)[:, :, None]
    if attention_mask is not None:  # 2-D padding mask (flash): [B, kv_len] (sliced from the right, as flash does)
        allowed = allowed & attention_mask[:, None, -kv_len:].bool()
    return allowed


def row_attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    rows: torch.Tensor,
    scaling: float,
    reduce: str,
) -> torch.Tensor:
    """Probabilities of query ``rows`` (``[B, M]`` indices into the layer's queries) over every key.

    ``query`` is ``[B, Hq, q, D]`` post-RoPE, ``key`` ``[B, Hkv, N, D]`` post-RoPE and already concatenated with the
    cache (before ``repeat_kv``; GQA is resolved inside the op). Returns fp32, shaped as ``reduce`` says
    (see :func:`vlm_accel.kernels.attention_row_probs`).
    """
    q_rows = query.gather(2, rows[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[-1]))
    allowed = allowed_keys(attention_mask, rows, query.shape[2], key.shape[2])
    return attention_row_probs(q_rows, key, allowed, float(scaling), reduce)


@dataclass
class RowContext:
    """What a row edit may read besides the logits.

    ``visual``: bool ``[B, M, N]`` — allowed keys that hold prompt visual tokens (following any kept set);
    ``allowed``: bool ``[B, M, N]``; ``rows``: ``[B, M]`` query indices; ``layer``; ``state`` (the ForwardState).
    """

    visual: torch.Tensor
    allowed: torch.Tensor
    rows: torch.Tensor
    layer: int
    state: Any


RowEditFn = Callable[[torch.Tensor, RowContext], torch.Tensor]


def edited_rows_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    rows: torch.Tensor,
    scaling: float,
    visual_columns: torch.Tensor,
    edits: list[RowEditFn],
    layer: int,
    state: Any,
) -> torch.Tensor:
    """Attention output ``[B, M, Hq, D]`` of query ``rows`` with their fp32 logits edited before the softmax.

    ``edits`` receive logits ``[B, Hq, M, N]`` (``-inf`` at disallowed keys) and return new ones; the result is
    ``softmax(edited) · V`` — the eager semantics of the hallucination-mitigation methods (PAI, PAINT, GIFT),
    computed for a few rows only so the rest of the layer stays on SDPA / FlashAttention. Logits and softmax are
    fp32; on CUDA ``V`` stays in its dtype (:func:`probs_times_values`). On CPU a 16-bit K is still upcast for the logits
    (:func:`~vlm_accel.kernels._reference.fp32_logits`; CUDA accumulates in fp32 without the copy).
    """
    batch, heads, q_len, dim = query.shape
    kv_heads, groups, m = key.shape[1], heads // key.shape[1], rows.shape[1]
    # a decode step edits its only row: no gather
    q_rows = query if m == q_len == 1 else query.gather(2, rows[:, None, :, None].expand(-1, heads, -1, dim))
    allowed = allowed_keys(attention_mask, rows, q_len, key.shape[2])
    logits = fp32_logits(q_rows.reshape(batch, kv_heads, groups * m, dim), key).mul_(scaling)
    logits = logits.view(batch, heads, m, -1).masked_fill(~allowed[:, None], float("-inf"))
    # edits read per-call state, which lives on the home device (runtime/devices.py): only the few edited rows'
    # logits cross over, and back (no copy on a one-device model)
    home = visual_columns.device
    allowed_home = allowed.to(home)
    context = RowContext(visual_columns[:, None, :] & allowed_home, allowed_home, rows.to(home), layer, state)
    edited = logits.to(home)
    for edit in edits:
        edited = edit(edited, context)
    logits = edited.to(query.device)
    # disallowed keys are -inf (the edits keep them so); a row with no allowed key gives NaN → 0, as masked_softmax_;
    # out of place when training through the edit (autograd keeps the softmax's output)
    probs = torch.softmax(logits, dim=-1)
    probs = probs.nan_to_num(0.0) if probs.requires_grad else probs.nan_to_num_(0.0)
    out = probs_times_values(probs.view(batch, kv_heads, groups * m, -1), value)
    return out.view(batch, heads, m, dim).transpose(1, 2).to(query.dtype)


def probs_times_values(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``P · V`` for fp32 ``probs [B, Hkv, R, N]`` and ``value [B, Hkv, N, D]`` without copying V to fp32.

    fp32 V: one fp32 matmul. 16-bit V on CUDA: the probabilities are cast to V's dtype (what SDPA / FlashAttention
    feed their ``P·V`` product too) and ``bmm(out_dtype=float32)`` accumulates in fp32, so the V cache (the largest
    tensor of the step) is read once in its dtype instead of being copied to fp32 at every edited layer of every
    step. 16-bit V on CPU: upcast, which measured faster than a 16-bit GEMV on this CPU.
    """
    if value.dtype == torch.float32:
        return torch.matmul(probs, value)
    if value.device.type == "cuda":
        low = probs.to(value.dtype)
        try:
            lead = low.shape[:-2]
            out = torch.bmm(low.reshape(-1, *low.shape[-2:]), value.reshape(-1, *value.shape[-2:]),
                            out_dtype=torch.float32)  # fmt: skip
            return out.view(*lead, low.shape[-2], value.shape[-1])
        except (TypeError, RuntimeError):
            return torch.matmul(low, value)
    # CPU: a 16-bit single-row GEMV measured slower here than upcasting V and one fp32 GEMV
    # (benchmarks/reweighting_decode.py --attention), so V is upcast on CPU
    return torch.matmul(probs, value.float())
