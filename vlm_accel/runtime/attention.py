"""The registered attention functions (and their mask functions) that route LM attention through the runtime.

For each stock backend ``X`` in ``sdpa``, ``eager``, ``flash_attention_2``, ``flash_attention_3`` we register
``vlm_accel_X`` in transformers' ``AttentionInterface`` and ``AttentionMaskInterface``. The attention function
taps the score rows methods asked for, then calls the stock ``X`` function unchanged: the model keeps running on
SDPA / FlashAttention. Registering the mask function too is mandatory — an unknown implementation name makes
``masking_utils`` return no mask at all, silently ignoring padding (hf_internals §2.2, pitfall 1).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from vlm_accel.runtime.flash_route import is_flash, stock_flash_call

PREFIX = "vlm_accel_"
SUPPORTED_BACKENDS: tuple[str, ...] = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
RUNTIME_ATTRIBUTE = "_vlm_accel_runtime"

AttentionFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def wrapped_name(backend: str) -> str:
    return PREFIX + backend


def base_backend(implementation: str) -> str:
    return implementation[len(PREFIX) :] if implementation.startswith(PREFIX) else implementation


def _stock_attention(backend: str, module: torch.nn.Module) -> AttentionFn:
    if backend == "eager":
        # "eager" is not in the global table: each modeling file defines its own eager_attention_forward.
        return sys.modules[type(module).__module__].eager_attention_forward
    if is_flash(backend):  # the flash function loads its kernels by the config's name, which is ours
        return stock_flash_call(ALL_ATTENTION_FUNCTIONS[backend], backend)
    return ALL_ATTENTION_FUNCTIONS[backend]


def _make_attention_function(backend: str) -> AttentionFn:
    def attention(module, query, key, value, attention_mask, **kwargs):
        stock = _stock_attention(backend, module)
        runtime = getattr(module, RUNTIME_ATTRIBUTE, None)
        if runtime is None:  # a vision-tower module, or a model whose patch was removed
            return stock(module, query, key, value, attention_mask, **kwargs)
        return runtime.attend(stock, module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{PREFIX}{backend}_attention"
    return attention


def register_attention_functions() -> None:
    """Idempotently register ``vlm_accel_<backend>`` attention and mask functions for every supported backend."""
    for backend in SUPPORTED_BACKENDS:
        name = wrapped_name(backend)
        if name in ALL_ATTENTION_FUNCTIONS.valid_keys():
            continue
        AttentionInterface.register(name, _make_attention_function(backend))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[backend])


register_attention_functions()
