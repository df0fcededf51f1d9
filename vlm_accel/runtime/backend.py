"""How a patched model's attention reaches the runtime while the model still reports its stock backend.

The model's configs are never renamed: ``config._attn_implementation`` (and the text config's) stay ``"sdpa"`` /
``"eager"`` / ``"flash_attention_2"``, so code that inspects or switches them (``set_attn_implementation``,
``output_attentions`` with eager, transformers' own model tests) sees the stock model, and masks are built for the
stock backend. Only the language model's attention modules look the implementation up through a
:class:`RoutedConfig`: the same config object for every attribute, except that ``_attn_implementation`` names the
registered ``vlm_accel_<backend>`` wrapper of whatever backend the real config names *now* — so switching the
backend on a patched model keeps the patch working on the new backend, and ``remove()`` leaves the backend the
user chose.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vlm_accel.runtime.attention import SUPPORTED_BACKENDS, wrapped_name

_REAL = "_vlm_accel_real_config"


class RoutedConfig:
    """An attention module's view of its (text) config; see the module docstring."""

    def __init__(self, config: Any) -> None:
        object.__setattr__(self, _REAL, config)

    @property
    def _attn_implementation(self) -> str:
        current = getattr(self, _REAL)._attn_implementation
        return wrapped_name(current) if current in SUPPORTED_BACKENDS else current

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, _REAL), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(getattr(self, _REAL), name, value)

    def __repr__(self) -> str:
        return f"RoutedConfig({getattr(self, _REAL)!r})"


def check_backend(implementation: str | None) -> None:
    """Refuse, in one line, a backend the runtime cannot route (at patch time and on each forward)."""
    if implementation not in SUPPORTED_BACKENDS:
        raise ValueError(
            f"attention implementation {implementation!r} is not supported by vlm_accel; "
            f"use one of {', '.join(SUPPORTED_BACKENDS)} (or remove the patch first)"
        )


def route_attention(modules: list[nn.Module]) -> None:
    for module in modules:
        if not isinstance(module.config, RoutedConfig):
            module.config = RoutedConfig(module.config)


def unroute_attention(modules: list[nn.Module]) -> None:
    for module in modules:
        if isinstance(module.config, RoutedConfig):
            module.config = getattr(module.config, _REAL)
