"""Compile every Triton kernel for sm_90 (H100) without a GPU, at the tile sizes the launchers pick on CUDA.

The interpreter cannot see compile-time problems of the real backend (``tl.dot`` minimum sizes, layout or type
errors, shared-memory overflow, register spills). This compiles the production configurations (bf16, D = 128,
Qwen2.5-VL-7B geometry, masks on) down to a cubin and checks ptxas reports no spills. It needs triton's
bundled ptxas, not a driver.
"""

import kernel_aot
import pytest

pytest.importorskip("triton")


def _has_ptxas() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return bool(get_ptxas(90).path)
    except Exception:
        return False


if not _has_ptxas():
    pytest.skip("triton's NVIDIA backend / bundled ptxas is not available", allow_module_level=True)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

_WANTED = {
    "row_probs bf16 D128 none",
    "row_probs bf16 D128 sum",
    "row_probs bf16 D128 head_mean",
    "compact_kv bf16 D128",
    "head_sparse bf16 D128 G7",
    "biased_attn bf16 D128 M1 causal=False",
    "biased_attn bf16 D128 M300 causal=True",
}
CASES = [c for c in kernel_aot.kernel_matrix() if c[0] in _WANTED]


def test_matrix_covers_wanted_cases():
    assert {c[0] for c in CASES} == _WANTED


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernels_compile_for_sm90_without_spills(case):
    label, module, call = case
    launches = kernel_aot.record_launches(module, call)
    assert launches, f"{label}: the launcher launched nothing"
    for fn, _grid, args, kwargs in launches:
        kernel = kernel_aot.compile_launch(fn, args, kwargs, arch=90)
        assert kernel.asm.get("cubin"), f"{label}: no cubin for {fn.__name__}"
        usage = kernel_aot.ptxas_usage(kernel, arch=90)
        assert usage["spill_stores"] == 0, f"{label}: {fn.__name__} spills: {usage}"
        assert usage["shared"] <= 227 * 1024, f"{label}: {fn.__name__} shared memory {usage}"


def test_launch_recording_uses_gpu_tiles():
    """On meta (non-CPU) tensors the launchers pick CUDA tiles, without the interpreter's fp32 upcast."""
    (fn, _grid, _args, kwargs), *_ = kernel_aot.record_launches(
        "row_probs", [c for c in CASES if c[0] == "row_probs bf16 D128 sum"][0][2]
    )
    assert kwargs["UPCAST"] is False and kwargs["BLOCK_D"] == 128 and kwargs["BLOCK_N"] == 64
