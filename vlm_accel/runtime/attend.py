"""What the registered attention function does for a patched layer: score taps, row edits and head gates.

1. **Score taps** (``Method.score_request``): attention probabilities of a few query rows from post-RoPE q and the
   full K, in fp32 — O(rows × N) per scoring layer, the layer itself stays on SDPA / FlashAttention.
2. **The stock attention** (SDPA / eager / flash), unchanged — or, for a decode step whose head gates are a hard
   mask that allows it, the head-sparse op, which reads only the KV groups with an active head.
3. **Row edits** (``Method.row_edit``: PAI, PAINT, GIFT): the few edited rows are recomputed as
   ``softmax(edit(qKᵀ))·V`` and written over the stock output.
4. **Head gates** (``Method.head_gates``: MoH): the per-head output ``[B, q, Hq, D]`` is multiplied by the gates
   before it returns to the module (which reshapes it and applies ``o_proj``): O(tokens × heads), exact, no eager.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from vlm_accel.kernels import head_sparse_decode_attention
from vlm_accel.methods.base import GateContext, HeadGates, Method, ScoreRequest
from vlm_accel.runtime.checks import HAS_VISUAL, PACKED, PACKED_ERROR, RUNTIME_FLAGS
from vlm_accel.runtime.scores import allowed_keys, edited_rows_attention, row_attention_probs
from vlm_accel.runtime.state import ForwardState, ScoreTap

if TYPE_CHECKING:
    from vlm_accel.runtime.engine import Runtime

ATTENTION_INPUT = "_vlm_accel_attention_input"
#: the layer kwarg that carries ``(forward state, stage count)`` into a gradient-checkpointing recomputation
REPLAY_KWARG = "_vlm_accel_replay"


def replay_view(state: ForwardState, stage_count: int) -> ForwardState:
    """``state`` as the attention of a layer saw it in the forward (its stages up to that layer), for the
    recomputation of a checkpointed layer: the same edits and gates, so the same tensors are saved."""
    view = copy.copy(state)
    view.stages = state.stages[:stage_count]
    return view


def _any_visual(state: ForwardState) -> bool:
    """Whether the generation's prompt had visual tokens (read at prefill: no tensor read in a decode step)."""
    flags = state.generation_state(RUNTIME_FLAGS)
    if HAS_VISUAL not in flags:  # a state the engine did not start (e.g. built by hand)
        visual = state.continuing.visual if state.continuing is not None else state.layout.visual
        flags[HAS_VISUAL] = bool(visual.any())
    return flags[HAS_VISUAL]


def resolve_rows(rows: str | torch.Tensor, batch: int, q_len: int, device: torch.device) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        return rows.to(device)
    if rows == "last":
        return torch.full((batch, 1), q_len - 1, device=device)
    if rows == "all":
        return torch.arange(q_len, device=device).expand(batch, q_len)
    raise ValueError(f"unknown rows {rows!r}; use 'last', 'all' or a [B, M] tensor")


def _scaling(module: nn.Module, query: torch.Tensor, kwargs: dict) -> float:
    return kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)


class AttentionDispatch:
    """The runtime's attention path for one patch (see the module docstring for the order of operations)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.gating = [m for m in runtime.methods if type(m).head_gates is not Method.head_gates]

    def capture_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Attention-module pre-hook (installed only when a method gates heads): keep the layer's normed input."""
        setattr(module, ATTENTION_INPUT, args[0] if args else kwargs["hidden_states"])

    def __call__(self, stock: Callable, module: nn.Module, query, key, value, attention_mask, **kwargs):
        runtime = self.runtime
        state = runtime.state
        replay = kwargs.pop(REPLAY_KWARG, None)
        recompute = state is None and replay is not None
        if recompute:
            state = replay_view(*replay)
        if state is None:
            return stock(module, query, key, value, attention_mask, **kwargs)
        layer = module.layer_idx
        with runtime.timed():
            row_mask = self._row_mask(query, key, attention_mask)
            for method in runtime.methods:
                request = method.score_request(layer, state)
                if request is not None:
                    self._tap_scores(method, request, module, query, key, row_mask, kwargs, state, recompute)
            edits = [e for e in (m.row_edit(layer, state) for m in runtime.methods) if e is not None]
            if edits and not _any_visual(state):
                edits = []  # no image: nothing to reweight, and the stock rows stay bitwise unchanged
            if edits and state.extras.get(PACKED):
                raise ValueError(PACKED_ERROR)
            gates = self._gates(module, layer, query, key, state)
        sparse = gates is not None and self._sparse_decode_ok(gates, query, edits)
        if sparse:
            with runtime.timed():
                output = self._head_sparse_decode(module, query, key, value, attention_mask, gates, kwargs)
            return output, None
        if edits:
            output, weights = self._edited(
                stock, module, query, key, value, attention_mask, edits, kwargs, state, row_mask
            )
        else:
            output, weights = stock(module, query, key, value, attention_mask, **kwargs)
        if gates is not None:
            output = output * gates.weights.to(output.device, output.dtype)[..., None]
        return output, weights

    def _row_mask(self, query: torch.Tensor, key: torch.Tensor, attention_mask):
        """The mask the recomputed rows (taps, edits) must use: the layer's own, except where SDPA got none and
        runs ``is_causal`` over more keys than queries (a static cache's empty slots at prefill): SDPA aligns that
        causal mask top-left, so the rows do too (the index rule of a missing mask is FlashAttention's)."""
        q_len, kv_len = query.shape[2], key.shape[2]
        if attention_mask is not None or q_len in (1, kv_len):
            return attention_mask
        if self.runtime.text_config._attn_implementation != "sdpa":
            return attention_mask
        return torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()[None, None]

    # ------------------------------------------------------------------------------------------------ taps

    def _tap_scores(
        self,
        method: Method,
        request: ScoreRequest,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        kwargs: dict,
        state: ForwardState,
        recompute: bool = False,
    ) -> None:
        rows = resolve_rows(request.rows, query.shape[0], query.shape[2], query.device)
        probs = row_attention_probs(query, key, attention_mask, rows, _scaling(module, query, kwargs), request.reduce)
        if recompute:
            return  # the same ops as the forward (a checkpoint replay must save the same tensors), no new decisions
        home = state.layout.visual.device  # methods keep their state on the home device (runtime/devices.py)
        tap = ScoreTap(probs.to(home), rows.to(home), state.current_index)
        state.taps[(id(method), module.layer_idx)] = tap
        method.on_scores(module.layer_idx, tap, state)

    # ------------------------------------------------------------------------------------------------ edits

    def _edited(self, stock, module, query, key, value, attention_mask, edits, kwargs, state, row_mask):
        layer = module.layer_idx
        batch, heads, q_len, _ = query.shape
        rows = resolve_rows(edits[0].rows, batch, q_len, query.device)
        if any(not (isinstance(e.rows, str) and e.rows == edits[0].rows) for e in edits[1:]):
            raise ValueError("composed row edits must act on the same query rows")
        every_row = rows.shape[1] == q_len
        output, weights = (None, None) if every_row else stock(module, query, key, value, attention_mask, **kwargs)
        with self.runtime.timed():
            visual = state.visual_key_mask(layer, key.shape[2])
            edited = edited_rows_attention(
                query, key, value, row_mask, rows, _scaling(module, query, kwargs), visual,
                [e.edit for e in edits], layer, state,
            )  # fmt: skip
            if every_row:
                return edited[:, rows[0].argsort()].contiguous(), None
            output = output.scatter(1, rows[:, :, None, None].expand(-1, -1, heads, output.shape[-1]), edited)
        return output, weights

    # ------------------------------------------------------------------------------------------------ gates

    def _gates(self, module: nn.Module, layer: int, query, key, state: ForwardState) -> HeadGates | None:
        if not self.gating:
            return None
        hidden = getattr(module, ATTENTION_INPUT, None)
        ctx = GateContext(layer, hidden, query, key.shape[1], is_decode=not state.is_prefill and query.shape[2] == 1)
        combined: HeadGates | None = None
        for method in self.gating:
            gates = method.head_gates(layer, ctx, state)
            if gates is None:
                continue
            expected = (query.shape[0], query.shape[2], query.shape[1])
            if tuple(gates.weights.shape) != expected:
                raise ValueError(
                    f"{method.name}: head gates of shape {tuple(gates.weights.shape)}, expected [B, q, Hq] = {expected}"
                )
            if combined is None:
                combined = gates
            elif combined.weights.dtype == torch.bool and gates.weights.dtype == torch.bool:
                combined = HeadGates(combined.weights & gates.weights, combined.sparse_decode and gates.sparse_decode)
            else:
                combined = HeadGates(
                    combined.weights.float() * gates.weights.float(), combined.sparse_decode and gates.sparse_decode
                )
        return combined

    @staticmethod
    def _sparse_decode_ok(gates: HeadGates, query: torch.Tensor, edits: list) -> bool:
        return gates.sparse_decode and query.shape[2] == 1 and not edits

    @staticmethod
    def _head_sparse_decode(module, query, key, value, attention_mask, gates: HeadGates, kwargs) -> torch.Tensor:
        """One decode row per sample on the head-sparse op: inactive KV groups are never read. Weighted (float)
        gates run on the op with their non-zero pattern as the mask, then scale the heads' outputs."""
        batch = query.shape[0]
        rows = torch.zeros(batch, 1, dtype=torch.long, device=query.device)
        allowed = allowed_keys(attention_mask, rows, 1, key.shape[2])
        allowed = None if allowed is None else allowed[:, 0]
        weights = gates.weights[:, 0]
        mask = weights if weights.dtype == torch.bool else weights != 0
        out = head_sparse_decode_attention(query, key, value, mask, allowed, float(_scaling(module, query, kwargs)))
        if weights.dtype != torch.bool:
            out = out * weights.to(out.dtype)[:, :, None, None]
        return out.transpose(1, 2).contiguous()
