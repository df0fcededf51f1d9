"""Method registry: name -> (config class, method class).

Adding a method touches one new file in ``vlm_accel/methods/`` and one line in ``_BUILTIN_METHODS`` below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlm_accel.config import MethodConfig
    from vlm_accel.methods.base import Method

# name -> "module:MethodClass"; imported lazily so importing vlm_accel stays cheap.
_BUILTIN_METHODS: dict[str, str] = {
    "fastv": "vlm_accel.methods.fastv:FastV",
    "random": "vlm_accel.methods.random_prune:RandomPrune",
    "pool": "vlm_accel.methods.pool:Pool",
    "sgl": "vlm_accel.methods.sgl:SGL",
    "dyvte": "vlm_accel.methods.dyvte:DyVTE",
    "pai": "vlm_accel.methods.pai:PAI",
    "paint": "vlm_accel.methods.paint:PAINT",
    "gift": "vlm_accel.methods.gift:GIFT",
    "moh": "vlm_accel.methods.moh:MoH",
    "random_heads": "vlm_accel.methods.random_heads:RandomHeads",
    "ttf": "vlm_accel.methods.ttf:TTF",
}

_REGISTRY: dict[str, type[Method]] = {}


def register_method(name: str, method_cls: type[Method]) -> None:
    """Register a method class (with its ``config_cls``) under ``name``; used by third-party methods too."""
    if name in _REGISTRY and _REGISTRY[name] is not method_cls:
        raise ValueError(f"method {name!r} is already registered to {_REGISTRY[name].__name__}")
    _REGISTRY[name] = method_cls


def list_methods() -> list[str]:
    return sorted(set(_BUILTIN_METHODS) | set(_REGISTRY))


def get_method_class(name: str) -> type[Method]:
    if not isinstance(name, str):
        raise TypeError(f"method must be a registered name or a MethodConfig, got {type(name).__name__}")
    if name not in _REGISTRY:
        if name not in _BUILTIN_METHODS:
            raise ValueError(f"unknown method {name!r}; known methods: {', '.join(list_methods())}")
        module_name, class_name = _BUILTIN_METHODS[name].split(":")
        register_method(name, getattr(importlib.import_module(module_name), class_name))
    return _REGISTRY[name]


def get_config_class(name: str) -> type[MethodConfig]:
    return get_method_class(name).config_cls
