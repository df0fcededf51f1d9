"""``generate()`` under a patch: refusals of the modes a length-changing patch cannot follow, and the fixed nesting
of methods' ``generate`` wrappers. Beam search is supported (the plan record follows the cache's beam reordering,
:mod:`vlm_accel.runtime.beams`); so is prompt-lookup decoding: its verification forwards are decode
calls of several tokens (masks remapped per layer as for one), and ``Cache.crop`` removes the rejected tokens from
the end of every layer, whatever its length. Assisted decoding with an assistant model is refused (see below).

Wrappers nest by ``Method.generate_rank`` (then name), never by the user's list, so ``["sgl", "pai"]`` and
``["pai", "sgl"]`` are the same patch: PAI / PAINT's image-free guidance (rank 20) is outermost, so the image-free
rows join the batch before anything else sees it; SGL (rank 10) then runs its guide on that batch, dropping any
``logits_processor`` it is handed, and attaches the guide's scores to the large model's cache.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn
from transformers import DynamicCache

from vlm_accel.methods.base import Method
from vlm_accel.runtime.checks import resolved_generation_config

UNSUPPORTED_CACHE_MODES = ("static", "offloaded_static", "sliding_window", "hybrid", "mamba", "quantized")


def nest_generate_wrappers(model: nn.Module, methods: list[Method]) -> Callable[..., Any]:
    """``model``'s class ``generate`` wrapped by every method, innermost first (lowest ``generate_rank``)."""
    generate = type(model).generate.__get__(model)
    for method in sorted(methods, key=lambda m: (m.generate_rank, m.name)):
        generate = method.wrap_generate(generate)
    return generate


def check_generate_mode(model: nn.Module, kwargs: dict[str, Any], changes_length: bool) -> None:
    """Refuse, with one clear line, the generation modes whose cache bookkeeping cannot follow per-layer lengths."""
    if not changes_length:
        return
    config = resolved_generation_config(model, kwargs)  # a mode set in any place generate() reads it from
    cache_mode = getattr(config, "cache_implementation", None)
    if cache_mode in UNSUPPORTED_CACHE_MODES:
        raise ValueError(
            f"cache_implementation={cache_mode!r} is not supported with token-pruning methods "
            "(layers hold different numbers of tokens); use the default dynamic cache"
        )
    if kwargs.get("assistant_model") is not None or getattr(config, "assistant_early_exit", None):
        # prompt-lookup decoding is exact under pruning (tested); with an assistant model the output was seen to
        # differ from greedy, cause not found: refused until it is
        raise ValueError(
            "assisted decoding with an assistant model is not supported with token-pruning methods; "
            "prompt_lookup_num_tokens works"
        )
    cache = kwargs.get("past_key_values")
    if cache is not None and not isinstance(cache, DynamicCache):
        raise ValueError(f"{type(cache).__name__} is not supported with token-pruning methods; pass a DynamicCache")


def guarded_generate(model: nn.Module, generate: Callable[..., Any], changes_length: bool) -> Callable[..., Any]:
    @functools.wraps(generate)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        check_generate_mode(model, kwargs, changes_length)
        return generate(*args, **kwargs)

    return guarded
