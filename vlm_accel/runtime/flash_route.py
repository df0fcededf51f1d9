"""FlashAttention under the runtime: what the stock flash function must (not) see.

Two facts of transformers 5.23's flash integration (``integrations/flash_attention.py``,
``modeling_flash_attention_utils.py``) decide this module:

1. ``flash_attention_forward`` hands ``module.config._attn_implementation`` to ``lazy_import_flash_attention``,
   which loads the kernels *by that name*. Under the runtime the name is ``vlm_accel_flash_attention_2``, which is
   neither ``flash_attention_2`` nor ``flash_attention_3``, so transformers would look for a hub kernel of that
   name and fail on the first call. :func:`stock_flash_call` therefore calls the stock function with a view of
   the attention module whose config reports the stock backend name (nothing is mutated).
2. ``_flash_attention_forward`` picks its route in this order: a 2-D ``attention_mask`` (padding) → unpad +
   ``flash_attn_varlen_func``; explicit ``cu_seq_lens_*`` → varlen; ``_is_packed_sequence(position_ids, batch)``
   → varlen with ``cu_seqlens`` built from ``position_ids``; otherwise the dense ``flash_attn_func``. For batch 1
   ``_is_packed_sequence`` is true whenever the position ids are not one contiguous run, which is exactly what the
   gathered original positions of a pruned layer's kept tokens are. That route reads the positions on the host
   (a device sync per layer) and starts a new sequence at every position equal to the row's minimum: one segment
   for the runtime's rows, so the result is right, but it is the varlen route plus a sync, and a row whose minimum
   position repeats would be split. A pruned layer's row is always one sequence (its rebuilt mask says so), so
   :func:`pruned_layer_position_ids` passes ``None`` to flash backends: flash then takes the dense route without
   padding and the unpad route with it, the same routes as the unpatched model. The supported families' decoder
   layers pass ``position_ids`` only through to the attention function ("pass positions for FA2"); cos/sin carry
   the positions for RoPE, so nothing else reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

FLASH_BACKENDS: tuple[str, ...] = ("flash_attention_2", "flash_attention_3")


def is_flash(backend: str) -> bool:
    """Whether a stock backend name (``vlm_accel_`` prefix already removed) is a FlashAttention backend."""
    return backend in FLASH_BACKENDS


def pruned_layer_position_ids(backend: str, position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """The ``position_ids`` a pruned layer passes on: ``None`` for flash backends (see the module docstring, 2.),
    the gathered original positions otherwise (SDPA and eager ignore them)."""
    return None if is_flash(backend) else position_ids


class _ConfigView:
    """Read-only view of a config that reports ``backend`` as its attention implementation."""

    def __init__(self, config: Any, backend: str) -> None:
        self._config = config
        self._attn_implementation = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


class _ModuleView:
    """Read-only view of an attention module whose ``config`` is a :class:`_ConfigView`.

    The stock flash function reads ``config``, ``layer_idx``, ``is_causal`` and, for fp32 inputs, ``modules()``;
    everything but ``config`` is forwarded to the real module."""

    def __init__(self, module: torch.nn.Module, backend: str) -> None:
        self._module = module
        self.config = _ConfigView(module.config, backend)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def stock_flash_call(stock: Callable[..., Any], backend: str) -> Callable[..., Any]:
    """``stock`` (transformers' flash attention function for ``backend``) called so that it loads the kernels of
    ``backend`` rather than of the runtime's registered name (see the module docstring, 1.)."""

    def call(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return stock(_ModuleView(module, backend), *args, **kwargs)

    call.__name__ = f"stock_{backend}"
    return call
