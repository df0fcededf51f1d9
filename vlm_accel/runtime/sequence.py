"""Shortening the prefill sequence after a keep plan: gather hidden states, cos/sin and position ids of the kept
tokens, and give plain forwards full-length outputs again.

Kept tokens keep their original positions: cos/sin (M-RoPE included) are gathered from the layer-0 objects, never
recomputed on shortened ids. Rows with different kept counts are left-padded with masked slots (``KeepPlan``).
"""

from __future__ import annotations

import torch

from vlm_accel.runtime.devices import execution_device
from vlm_accel.runtime.plan import KeepPlan
from vlm_accel.runtime.state import ForwardState, Stage


def relative_positions(positions: torch.Tensor, current: torch.Tensor | None, window_len: int) -> torch.Tensor:
    """Where window ``positions`` ``[B, K]`` sit in the current sequence, whose slots hold window positions
    ``current`` ``[B, W']`` (-1 = padded slot; None = the whole window, in order)."""
    if current is None:
        return positions
    inverse = torch.zeros(current.shape[0], window_len + 1, dtype=torch.long, device=current.device)
    target = torch.where(current >= 0, current, window_len)
    inverse.scatter_(1, target, torch.arange(current.shape[1], device=current.device).expand_as(current))
    return inverse.gather(1, positions)


def scatter_to_window(full: torch.Tensor, hidden: torch.Tensor, current: torch.Tensor, window_len: int) -> torch.Tensor:
    """``full`` ``[B, W, D]`` with the slots of the current sequence (window positions ``current``) overwritten by
    ``hidden`` ``[B, W', D]``; padded slots are ignored."""
    dim = hidden.shape[-1]
    current = current.to(hidden.device)  # multi-device models: the state lives on the home device (devices.py)
    target = torch.where(current >= 0, current, window_len)
    buffer = torch.cat([full.to(hidden.device), hidden.new_zeros(full.shape[0], 1, dim)], dim=1)
    buffer.scatter_(1, target[..., None].expand(-1, -1, dim), hidden)
    return buffer[:, :window_len]


def push_stage(index: int, plan: KeepPlan, hidden: torch.Tensor, state: ForwardState) -> torch.Tensor:
    """Start a new stage at layer ``index``: remember the states being dropped and gather the kept ones."""
    if plan.index.shape[0] != state.batch:
        raise RuntimeError(f"keep plan has {plan.index.shape[0]} rows for a batch of {state.batch}")
    current = state.current_index
    dim = hidden.shape[-1]
    if current is None:
        state.full_hidden = hidden.clone()
    else:
        state.full_hidden = scatter_to_window(state.full_hidden, hidden, current, state.window_len)
    state.stages.append(Stage(index, plan))
    if plan.groups is None:
        relative = relative_positions(plan.safe_index, current, state.window_len).to(hidden.device)
        return hidden.gather(1, relative[..., None].expand(-1, -1, dim))
    # token merging: each kept slot becomes the mean hidden state of its group of window positions
    batch, width, size = plan.groups.shape
    relative = relative_positions(plan.groups.clamp(min=0).view(batch, -1), current, state.window_len)
    members = hidden.gather(1, relative.to(hidden.device)[..., None].expand(-1, -1, dim)).view(batch, width, size, dim)
    weights = (plan.groups >= 0).to(hidden.device, hidden.dtype)[..., None]
    return (members * weights).sum(2) / weights.sum(2).clamp(min=1)


def gather_layer_inputs(stage: Stage, kwargs: dict, state: ForwardState) -> tuple[tuple, torch.Tensor | None]:
    """cos/sin and position ids of the kept tokens: original positions, gathered (never recomputed)."""
    cos, sin = kwargs["position_embeddings"]
    index = stage.plan.safe_index.to(cos.device)

    def gather_rows(t: torch.Tensor) -> torch.Tensor:
        t = t.expand(state.batch, *t.shape[1:])
        return t.gather(1, index.view(*index.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))

    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        position_ids = gather_rows(position_ids.to(cos.device))
    return (gather_rows(cos), gather_rows(sin)), position_ids


def full_length_output(state: ForwardState, hidden: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """The final hidden states at every window position: kept tokens from ``hidden``, dropped ones the final norm
    of the state they had when they were dropped."""
    device = execution_device(norm)  # the final norm may be offloaded: call it (its hook onloads), never read it
    full = norm(state.full_hidden if device is None else state.full_hidden.to(device))
    return scatter_to_window(full, hidden, state.current_index, state.window_len)
