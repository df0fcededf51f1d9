"""Input checks of a patched forward and ``generate()`` call: one clear line instead of a deep traceback or a
silently wrong answer.

- **Packed (padding-free) sequences**: several sequences in one row, told apart only by ``position_ids`` that
  restart (transformers builds a block-diagonal mask from them when there is no 2-D mask and no cache). The
  runtime's keep plans, score rows ("the last token") and row edits are per row, not per packed sequence, so a
  patch that acts on such a row would mix sequences; it is refused (a no-op patch passes through exactly).
- **Meta tensors** carry no values: keep plans need them.
- **Generation modes** are read from the *resolved* generation config (keyword arguments over a passed
  ``generation_config`` over ``model.generation_config``), so a mode set in any of those places is seen.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import find_packed_sequence_indices


def text_position_ids(position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """The 1-D-per-row text positions transformers reads packing from: ``[B, L]`` as is; Qwen2-VL's 4-row
    ``[text; t; h; w]`` layout gives its text row; plain 3-row M-RoPE positions are never read as packed."""
    if position_ids is None or not torch.is_tensor(position_ids):
        return None
    if position_ids.dim() == 2:
        return position_ids
    if position_ids.dim() == 3 and position_ids.shape[0] == 4:
        return position_ids[0]
    return None


def is_packed(kwargs: dict[str, Any], use_cache_default: bool) -> bool:
    """Whether transformers will treat this base-model call as packed sequences (the rule of
    ``masking_utils._preprocess_mask_arguments``: position ids that restart, no 2-D mask, no cache)."""
    if kwargs.get("attention_mask") is not None or kwargs.get("past_key_values") is not None:
        return False
    use_cache = kwargs.get("use_cache")
    if use_cache if use_cache is not None else use_cache_default:
        return False  # the text model creates a cache first, and then transformers reads no packing either
    positions = text_position_ids(kwargs.get("position_ids"))
    if positions is None or positions.device.type == "meta":
        return False
    return find_packed_sequence_indices(positions) is not None


def check_tensor_inputs(kwargs: dict[str, Any]) -> None:
    """Refuse inputs on the meta device (they have shapes but no values to plan with)."""
    for name in ("input_ids", "inputs_embeds", "attention_mask", "pixel_values", "position_ids"):
        value = kwargs.get(name)
        if torch.is_tensor(value) and value.device.type == "meta":
            raise ValueError(
                f"{name} is on the meta device: vlm_accel needs real values to plan with; "
                "load the weights and move the inputs to a real device first"
            )


PACKED_ERROR = (
    "packed (padding-free) sequences are not supported by vlm_accel methods that act on the prompt: "
    "position_ids restart inside a row with no attention_mask, and keep plans, scores and row edits are per row; "
    "pass a padded batch with a 2-D attention_mask"
)

CUSTOM_MASK_ERROR = (
    "token-pruning methods need a 2-D attention_mask (or None) to rebuild the masks of shortened layers; "
    "got a custom 4-D / prepared mask"
)


def resolved_generation_config(model: nn.Module, kwargs: dict[str, Any]) -> Any:
    """The generation config ``generate()`` will run with: ``generation_config`` (or the model's), updated by the
    keyword arguments that are config fields. A copy; nothing is changed."""
    base = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    if base is None:
        return None
    config = copy.deepcopy(base)
    fields = {k: v for k, v in kwargs.items() if hasattr(config, k) and k != "generation_config"}
    for key, value in fields.items():
        setattr(config, key, value)
    return config


# keys of ``ForwardState.extras`` the runtime sets at forward start
CUSTOM_MASK = "runtime.custom_mask"
PACKED = "runtime.packed"
# the runtime's own per-generation state (``ForwardState.generation_state(RUNTIME_FLAGS)``) and its keys
RUNTIME_FLAGS = "runtime"
HAS_VISUAL = "has_visual"


def is_identity(plan: Any, state: Any) -> bool:
    """Whether a keep plan keeps every slot of the current sequence in place (keep_ratio=1): no stage is needed,
    and the layers run exactly as unpatched."""
    if plan.groups is not None or state.stages or plan.index.shape[1] != state.window_len:
        return False
    return bool(plan.valid.all())


def check_drop_allowed(state: Any) -> None:
    """Refuse a keep plan that drops tokens on inputs it cannot follow (packed rows, a custom 4-D mask)."""
    if state.extras.get(PACKED):
        raise ValueError(PACKED_ERROR)
    if state.extras.get(CUSTOM_MASK):
        raise ValueError(CUSTOM_MASK_ERROR)
