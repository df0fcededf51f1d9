"""vlm_accel: inference acceleration and hallucination mitigation for Hugging Face VLMs, as one-line patches.

>>> patch = patch_model(model, "fastv", layer=2, keep_ratio=0.25)   # doctest: +SKIP

The public names are imported on first use (PEP 562), so ``import vlm_accel`` and ``vlm-accel --help`` do not pay
for torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "Patch": "vlm_accel.api",
    "get_patch": "vlm_accel.api",
    "patch_model": "vlm_accel.api",
    "unpatch_model": "vlm_accel.api",
    "MethodConfig": "vlm_accel.config",
    "MethodNotApplicable": "vlm_accel.errors",
    "DyVTEConfig": "vlm_accel.methods.dyvte",
    "FastVConfig": "vlm_accel.methods.fastv",
    "GIFTConfig": "vlm_accel.methods.gift",
    "MoHConfig": "vlm_accel.methods.moh",
    "RandomHeadsConfig": "vlm_accel.methods.random_heads",
    "PAIConfig": "vlm_accel.methods.pai",
    "PAINTConfig": "vlm_accel.methods.paint",
    "PoolConfig": "vlm_accel.methods.pool",
    "RandomPruneConfig": "vlm_accel.methods.random_prune",
    "SGLConfig": "vlm_accel.methods.sgl",
    "TTFConfig": "vlm_accel.methods.ttf",
    "supported_model_types": "vlm_accel.patches",
    "list_methods": "vlm_accel.registry",
    "register_method": "vlm_accel.registry",
    "PatchStats": "vlm_accel.runtime.stats",
}

__all__ = [
    "DyVTEConfig",
    "FastVConfig",
    "GIFTConfig",
    "MoHConfig",
    "RandomHeadsConfig",
    "PAIConfig",
    "PAINTConfig",
    "PoolConfig",
    "SGLConfig",
    "TTFConfig",
    "MethodConfig",
    "MethodNotApplicable",
    "Patch",
    "PatchStats",
    "RandomPruneConfig",
    "get_patch",
    "list_methods",
    "patch_model",
    "register_method",
    "supported_model_types",
    "unpatch_model",
]

if TYPE_CHECKING:
    from vlm_accel.api import Patch, get_patch, patch_model, unpatch_model
    from vlm_accel.config import MethodConfig
    from vlm_accel.errors import MethodNotApplicable
    from vlm_accel.methods.dyvte import DyVTEConfig
    from vlm_accel.methods.fastv import FastVConfig
    from vlm_accel.methods.gift import GIFTConfig
    from vlm_accel.methods.moh import MoHConfig
    from vlm_accel.methods.pai import PAIConfig
    from vlm_accel.methods.paint import PAINTConfig
    from vlm_accel.methods.pool import PoolConfig
    from vlm_accel.methods.random_heads import RandomHeadsConfig
    from vlm_accel.methods.random_prune import RandomPruneConfig
    from vlm_accel.methods.sgl import SGLConfig
    from vlm_accel.methods.ttf import TTFConfig
    from vlm_accel.patches import supported_model_types
    from vlm_accel.registry import list_methods, register_method
    from vlm_accel.runtime.stats import PatchStats


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vlm_accel' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
