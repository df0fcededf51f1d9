"""Launch helpers shared by the Triton kernels (no triton import here)."""

import os

import torch

# Tests set this (or VLM_ACCEL_POISON=1) so every Triton output starts as NaN: an element a kernel forgets to
# write then fails the comparison instead of passing by luck with zeros from the allocator.
POISON_OUTPUTS = False


def poisoning() -> bool:
    return POISON_OUTPUTS or os.environ.get("VLM_ACCEL_POISON", "0") == "1"


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output: uninitialised normally, NaN-filled when poisoning is on."""
    if poisoning():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def next_pow2(x: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(x, minimum) (``tl.dot`` needs tile dims >= 16)."""
    x = max(int(x), minimum)
    return 1 << (x - 1).bit_length()


def interpreting(t: torch.Tensor) -> bool:
    """True when this launch runs in the Triton interpreter (CPU tensors)."""
    return t.device.type == "cpu"


def upcast_for(t: torch.Tensor) -> bool:
    """Cast 16-bit tiles to fp32 before ``tl.dot``: required in the interpreter (bf16 dot is wrong there)."""
    return interpreting(t) and t.dtype in (torch.bfloat16, torch.float16)


def dot_precision(t: torch.Tensor) -> str | None:
    """fp32 operands use exact IEEE products (NVIDIA would default to TF32); 16-bit operands keep the
    default."""
    return "ieee" if (t.dtype == torch.float32 or upcast_for(t)) else None


def check_supported_head_dim(d: int) -> bool:
    return 1 <= d <= 256
