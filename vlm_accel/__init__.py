"""vlm_accel: inference acceleration and hallucination mitigation for Hugging Face VLMs, as one-line patches.

>>> patch = patch_model(model, "fastv", layer=2, keep_ratio=0.25)   # doctest: +SKIP
"""

from vlm_accel.api import Patch, get_patch, patch_model, unpatch_model
from vlm_accel.config import MethodConfig
from vlm_accel.errors import MethodNotApplicable
from vlm_accel.methods.dyvte import DyVTEConfig
from vlm_accel.methods.fastv import FastVConfig
from vlm_accel.methods.gift import GIFTConfig
from vlm_accel.methods.pai import PAIConfig
from vlm_accel.methods.paint import PAINTConfig
from vlm_accel.methods.pool import PoolConfig
from vlm_accel.methods.random_prune import RandomPruneConfig
from vlm_accel.methods.sgl import SGLConfig
from vlm_accel.patches import supported_model_types
from vlm_accel.registry import list_methods, register_method
from vlm_accel.runtime.stats import PatchStats

__version__ = "0.1.0"

__all__ = [
    "DyVTEConfig",
    "FastVConfig",
    "GIFTConfig",
    "PAIConfig",
    "PAINTConfig",
    "PoolConfig",
    "SGLConfig",
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
