"""The Triton kernels themselves, run by the Triton interpreter on CPU tensors at tiny shapes.

The interpreter proves indexing, masking and numerics (fp32, and bf16/fp16 through the ``UPCAST`` workaround
for its broken 16-bit ``tl.dot``); it says nothing about compiled performance or the real bf16 dot (see
``test_kernels_gpu.py``).

``TRITON_INTERPRET=1`` must be set before ``triton`` is imported (triton's own ``tl.zeros``/``tl.sum``... are
decorated at import), and importing transformers imports triton. So unless this process was started with it
(``TRITON_INTERPRET=1 pytest tests/kernels/test_kernels_interpreter.py``), the single test
``test_interpreter_suite_in_subprocess`` reruns this file in a fresh interpreter-mode process and the
in-process tests skip.

Every Triton output is poisoned with NaN before the launch, and the reference implementations are replaced by
functions that raise, so a test can only pass if the Triton path produced every element.
"""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import kernel_naive as naive
import pytest
import torch

pytest.importorskip("triton")

import vlm_accel.kernels as K  # noqa: E402

# (the package re-exports functions under some module names, so fetch the modules themselves)
ba_mod = importlib.import_module("vlm_accel.kernels.biased_attention")
compact_mod = importlib.import_module("vlm_accel.kernels.compact")
hs_mod = importlib.import_module("vlm_accel.kernels.head_sparse")
rp_mod = importlib.import_module("vlm_accel.kernels.row_probs")

DTYPES = [torch.float32, torch.bfloat16]


def _interpreting_from_start() -> bool:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return K.interpreter_active() and isinstance(tl.zeros, InterpretedFunction)


INTERPRETING = _interpreting_from_start()
interp = pytest.mark.skipif(not INTERPRETING, reason="run by test_interpreter_suite_in_subprocess")


@pytest.mark.skipif(INTERPRETING, reason="already running under the interpreter")
def test_interpreter_suite_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("VLM_ACCEL_TRITON", None)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x", __file__],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout


@pytest.fixture(scope="module")
def interpreter():
    """The kernel modules (decorated in interpreter mode), with output poisoning on for this module."""
    from vlm_accel.kernels._triton import _common

    mods = {
        name: importlib.import_module(f"vlm_accel.kernels._triton.{name}")
        for name in ["row_probs", "compact", "head_sparse", "biased_attention"]
    }
    old_poison, _common.POISON_OUTPUTS = _common.POISON_OUTPUTS, True
    yield mods
    _common.POISON_OUTPUTS = old_poison


@pytest.fixture(autouse=True)
def no_reference(monkeypatch, request):
    """Make a silent fallback to the reference impossible."""

    if request.node.name == "test_interpreter_suite_in_subprocess":
        return
    request.getfixturevalue("interpreter")

    def boom(*args, **kwargs):
        raise AssertionError("the reference ran instead of the Triton kernel")

    for mod, name in [
        (rp_mod, "attention_row_probs_reference"),
        (compact_mod, "compact_kv_reference"),
        (hs_mod, "head_sparse_decode_attention_reference"),
        (ba_mod, "biased_attention_reference"),
    ]:
        monkeypatch.setattr(mod, name, boom)


@interp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", naive.ROW_SHAPES)
def test_row_probs_interpreter(dtype, shape):
    b, hq, hkv, m, n, d = shape
    g = naive.gen(hash(shape) % 1000 + 11)
    q, k = naive.randn((b, hq, m, d), dtype, g), naive.randn((b, hkv, n, d), dtype, g)
    scaling = 0.7 * d**-0.5
    for allowed in (None, naive.padded_mask(b, m, n, g)):
        p = naive.row_probs(q, k, allowed, scaling)
        for reduce in K.REDUCTIONS:
            out = K.attention_row_probs(q, k, allowed, scaling, reduce, use_triton=True)
            torch.testing.assert_close(
                out.double(), naive.reduce_probs(p, reduce), atol=naive.PROB_TOL[dtype], rtol=0
            )


@interp
def test_row_probs_interpreter_fp16_many_row_blocks(interpreter):
    """Several row and key blocks in both passes and 3 key splits in pass 1 (tiles forced small), and a
    non-contiguous query."""
    tk = interpreter["row_probs"]
    g = naive.gen(12)
    q = naive.randn((1, 20, 4, 24), torch.float16, g).transpose(1, 2)  # [1, Hq=4, M=20, D=24]
    k = naive.randn((1, 2, 45, 24), torch.float16, g)
    allowed = naive.padded_mask(1, 20, 45, g)
    allowed[0, 5, :32] = False  # row 5: the first two key splits see no allowed key
    orig = tk._blocks
    tk._blocks = lambda *a: dict(
        BLOCK_R=16, BLOCK_M=16, BLOCK_N=16, BLOCK_D=32, SPLITS=3, lse_opts={}, probs_opts={}
    )
    try:
        p = naive.row_probs(q, k, allowed, 0.2)
        for reduce in K.REDUCTIONS:
            out = K.attention_row_probs(q, k, allowed, 0.2, reduce, use_triton=True)
            torch.testing.assert_close(out.double(), naive.reduce_probs(p, reduce), atol=2e-6, rtol=0)
    finally:
        tk._blocks = orig


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compact_kv_interpreter(dtype):
    g = naive.gen(13)
    tensors = [naive.randn((2, 3, 37, 24), dtype, g) for _ in range(5)]
    index = torch.stack([torch.randperm(37, generator=g)[:11].sort().values for _ in range(2)])
    index[0, :3] = 0
    out = K.compact_kv(tensors, index, use_triton=True)
    for t, o in zip(tensors, out):
        assert torch.equal(o, t[torch.arange(2)[:, None], :, index].transpose(1, 2))


@interp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", naive.DECODE_SHAPES)
def test_head_sparse_interpreter(dtype, shape):
    b, hq, hkv, n, d = shape
    g = naive.gen(hash(shape) % 1000 + 14)
    q, k, v = (naive.randn(s, dtype, g) for s in [(b, hq, 1, d), (b, hkv, n, d), (b, hkv, n, d)])
    head_mask = torch.rand((b, hq), generator=g) > 0.5
    head_mask[0, : hq // hkv] = False
    allowed = torch.rand((b, n), generator=g) > 0.3
    allowed[-1] = False
    for mask in (None, allowed):
        out = K.head_sparse_decode_attention(q, k, v, head_mask, mask, use_triton=True)
        expected = naive.attention(
            q, k, v, d**-0.5, allowed=None if mask is None else mask[:, None, :], head_mask=head_mask
        )
        torch.testing.assert_close(out.double(), expected, atol=naive.OUT_TOL[dtype], rtol=0)


@interp
def test_head_sparse_interpreter_skips_inactive_groups_and_splits(interpreter):
    """K/V of a KV group with no selected head are never used (NaN there stays out), across 3 key splits."""
    tk = interpreter["head_sparse"]
    b, hq, hkv, n, d = 2, 6, 3, 150, 32
    g = naive.gen(15)
    q, k, v = (naive.randn(s, torch.float32, g) for s in [(b, hq, 1, d), (b, hkv, n, d), (b, hkv, n, d)])
    head_mask = torch.ones(b, hq, dtype=torch.bool)
    head_mask[0, 2:4] = False  # sample 0, KV group 1 fully off
    head_mask[1, 5] = False  # sample 1, one head of group 2 off (group still read)
    expected = naive.attention(q, k, v, 0.3, head_mask=head_mask)
    k[0, 1], v[0, 1] = float("nan"), float("nan")
    for splits in (1, 3):
        out = tk.head_sparse_decode_triton(q, k, v, head_mask, None, 0.3, num_splits=splits)
        torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=0)


@interp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", naive.ATTN_SHAPES)
def test_biased_attention_interpreter(dtype, shape):
    b, hq, hkv, m, n, d = shape
    g = naive.gen(hash(shape) % 1000 + 16)
    q, k, v = (naive.randn(s, dtype, g) for s in [(b, hq, m, d), (b, hkv, n, d), (b, hkv, n, d)])
    for hb, causal in [(1, False), (hq, True), (hq, False)]:
        bias = torch.randn((b, hb, n), generator=g)
        for allowed in (None, naive.padded_mask(b, m, n, g)):
            out = K.biased_attention(q, k, v, bias, allowed, causal, use_triton=True)
            expected = naive.attention(q, k, v, d**-0.5, bias, allowed, causal)
            torch.testing.assert_close(out.double(), expected, atol=naive.OUT_TOL[dtype], rtol=0)


@interp
def test_biased_attention_interpreter_causal_decode_prefix():
    """M < N causal (chunked prefill after a cache) with more rows than a tile, and a bf16 bias tensor."""
    g = naive.gen(17)
    b, hq, hkv, m, n, d = 1, 2, 1, 40, 100, 16
    q, k, v = (naive.randn(s, torch.float32, g) for s in [(b, hq, m, d), (b, hkv, n, d), (b, hkv, n, d)])
    bias = torch.randn((b, 1, n), generator=g).to(torch.bfloat16)
    out = K.biased_attention(q, k, v, bias, None, True, 0.3, use_triton=True)
    torch.testing.assert_close(
        out.double(), naive.attention(q, k, v, 0.3, bias, None, True), atol=2e-5, rtol=0
    )
