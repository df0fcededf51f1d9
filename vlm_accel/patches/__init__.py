"""``model_type`` -> family adapter dispatch (the Liger-Kernel idiom)."""

from __future__ import annotations

from torch import nn

from vlm_accel.patches.base import FamilyAdapter
from vlm_accel.patches.internvl import INTERNVL
from vlm_accel.patches.llava import LLAVA, LLAVA_NEXT, LLAVA_ONEVISION
from vlm_accel.patches.qwen2_vl import QWEN2_5_VL, QWEN2_VL

ADAPTERS: dict[str, FamilyAdapter] = {
    model_type: adapter for adapter in (LLAVA, LLAVA_NEXT, LLAVA_ONEVISION, INTERNVL, QWEN2_VL, QWEN2_5_VL) for model_type in adapter.model_types
}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(model: object) -> FamilyAdapter:
    """The adapter for ``model``, or a clear error naming the supported model types."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model, nn.Module) or model_type is None:
        raise TypeError(
            f"patch_model expects a transformers vision-language model, got {type(model).__name__}; "
            f"supported model types: {', '.join(supported_model_types())}"
        )
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported model type {model_type!r} ({type(model).__name__}); "
            f"supported model types: {', '.join(supported_model_types())}"
        )
    adapter = ADAPTERS[model_type]
    adapter.check_model(model)
    return adapter


__all__ = ["ADAPTERS", "FamilyAdapter", "adapter_for", "supported_model_types"]
