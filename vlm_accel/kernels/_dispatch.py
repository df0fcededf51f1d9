"""Backend selection shared by every kernel op.

The torch reference is the default on every device. The Triton path is opt-in until a GPU benchmark shows it
wins (see ``docs/kernels.md``): pass ``use_triton=True`` to an op, or set ``VLM_ACCEL_TRITON=1``.

* On CUDA the Triton path runs the compiled kernels when ``triton`` imports.
* On CPU the Triton path runs only under the Triton interpreter (``TRITON_INTERPRET=1``), which is how the CPU
  test suite checks the kernels' indexing, masking and numerics; otherwise CPU always uses the reference.
"""

import os
import warnings

import torch

ENV_FLAG = "VLM_ACCEL_TRITON"

__all__ = [
    "ENV_FLAG",
    "interpreter_active",
    "offsets_fit_int32",
    "resolve_use_triton",
    "triton_available",
    "triton_runs_on",
]


_TRITON_OK: bool | None = None


@torch.compiler.assume_constant_result
def triton_available() -> bool:
    """True when the optional ``triton`` package imports (it is never imported at package import time)."""
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON_OK = True
        except Exception:  # ImportError, or a broken install raising something else
            _TRITON_OK = False
    return _TRITON_OK


def interpreter_active() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set, i.e. Triton kernels decorated now run in the CPU
    interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _env_requested() -> bool:
    return os.environ.get(ENV_FLAG, "0").lower() in ("1", "true", "yes", "on")


def resolve_use_triton(use_triton: bool | None) -> bool:
    """Turn an op's ``use_triton`` argument into a bool: explicit value, else the ``VLM_ACCEL_TRITON`` flag.

    An explicit ``True`` without triton installed raises; the environment flag without triton warns once and
    falls back to the reference.
    """
    if use_triton is None:
        if not _env_requested():
            return False
        if not triton_available():
            _warn_missing()
            return False
        return True
    if use_triton and not triton_available():
        raise ImportError(
            "use_triton=True needs the optional 'triton' package (pip install 'vlm-accel[triton]')"
        )
    return bool(use_triton)


_WARNED = False


def _warn_missing() -> None:
    global _WARNED
    if not _WARNED:
        _WARNED = True
        warnings.warn(
            f"{ENV_FLAG}=1 but triton is not installed; using the torch reference kernels", stacklevel=3
        )


def triton_runs_on(device: torch.device, requested: bool) -> bool:
    """Whether an op asked for Triton (``requested``) can actually run it on ``device``."""
    if not requested or not triton_available():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_active()


def offsets_fit_int32(*tensors: torch.Tensor | None) -> bool:
    """The Triton kernels use int64 only for per-batch base pointers and int32 offsets inside one batch row,
    so every tensor's per-batch element count must stay below 2**31 (larger inputs take the reference
    path)."""
    return all(t is None or t.dim() == 0 or t[0].numel() < 2**31 for t in tensors)
