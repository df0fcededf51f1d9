"""Compiled Triton kernels on CUDA vs the references and the dense-eager computation (skipped without a GPU).

Run on a GPU machine with ``pytest -m gpu tests/kernels``. Unlike the interpreter, this exercises the real
16-bit ``tl.dot`` (no upcast), TF32-free fp32 dots (``input_precision="ieee"``), real tile sizes, several key
splits and larger, odd shapes.
"""

import importlib

import kernel_naive as naive
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
triton = pytest.importorskip("triton")

import vlm_accel.kernels as K  # noqa: E402
from vlm_accel.kernels._triton import _common  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROW_SHAPES = naive.ROW_SHAPES + [
    (2, 28, 4, 64, 1000, 128),
    (1, 32, 32, 1, 4097, 128),
    (3, 12, 2, 33, 777, 80),
]
DECODE_SHAPES = naive.DECODE_SHAPES + [(2, 28, 4, 5000, 128), (4, 32, 8, 1031, 128), (1, 16, 16, 70000, 64)]
ATTN_SHAPES = naive.ATTN_SHAPES + [
    (2, 28, 4, 1, 3000, 128),
    (1, 32, 8, 300, 1000, 128),
    (2, 8, 2, 257, 257, 96),
]
ATTN_OUT_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.fixture(autouse=True)
def poison():
    old, _common.POISON_OUTPUTS = _common.POISON_OUTPUTS, True
    yield
    _common.POISON_OUTPUTS = old


def _inputs(shapes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [naive.randn(s, dtype, g, device="cuda") for s in shapes], g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_row_probs_gpu(dtype, shape):
    b, hq, hkv, m, n, d = shape
    (q, k), g = _inputs([(b, hq, m, d), (b, hkv, n, d)], dtype, hash(shape) % 1000)
    for allowed in (None, naive.padded_mask(b, m, n, g, device="cuda")):
        p = naive.row_probs(q, k, allowed, d**-0.5)
        for reduce in K.REDUCTIONS:
            out = K.attention_row_probs(q, k, allowed, reduce=reduce, use_triton=True)
            ref = K.attention_row_probs(q, k, allowed, reduce=reduce, use_triton=False)
            exp = naive.reduce_probs(p, reduce)
            scale = 1.0 if reduce != "sum" else float(hq * m)
            torch.testing.assert_close(out.double(), exp, atol=1e-5 * scale, rtol=1e-4)
            torch.testing.assert_close(ref.double(), exp, atol=1e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compact_kv_gpu(dtype):
    (k,), g = _inputs([(8, 4, 3001, 128)], dtype, 1)
    tensors = [k, k + 1, k * 2, -k]
    index = torch.stack([torch.randperm(3001, generator=g)[:750].sort().values for _ in range(8)]).cuda()
    out = K.compact_kv(tensors, index, use_triton=True)
    ref = K.compact_kv(tensors, index, use_triton=False)
    for a, r in zip(out, ref):
        assert torch.equal(a, r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", DECODE_SHAPES)
def test_head_sparse_gpu(dtype, shape):
    b, hq, hkv, n, d = shape
    (q, k, v), g = _inputs([(b, hq, 1, d), (b, hkv, n, d), (b, hkv, n, d)], dtype, hash(shape) % 1000)
    head_mask = (torch.rand((b, hq), generator=g) > 0.5).cuda()
    head_mask[0, : hq // hkv] = False
    allowed = (torch.rand((b, n), generator=g) > 0.3).cuda()
    allowed[-1] = False
    for mask in (None, allowed):
        out = K.head_sparse_decode_attention(q, k, v, head_mask, mask, use_triton=True)
        expected = naive.attention(
            q, k, v, d**-0.5, allowed=None if mask is None else mask[:, None, :], head_mask=head_mask
        )
        torch.testing.assert_close(out.double(), expected, atol=ATTN_OUT_TOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ATTN_SHAPES)
def test_biased_attention_gpu(dtype, shape):
    b, hq, hkv, m, n, d = shape
    (q, k, v), g = _inputs([(b, hq, m, d), (b, hkv, n, d), (b, hkv, n, d)], dtype, hash(shape) % 1000)
    for hb, causal in [(1, False), (hq, True)]:
        bias = torch.randn((b, hb, n), generator=g).cuda()
        for allowed in (None, naive.padded_mask(b, m, n, g, device="cuda")):
            out = K.biased_attention(q, k, v, bias, allowed, causal, use_triton=True)
            expected = naive.attention(q, k, v, d**-0.5, bias, allowed, causal)
            torch.testing.assert_close(out.double(), expected, atol=ATTN_OUT_TOL[dtype], rtol=0)


def test_triton_path_is_taken_on_cuda(monkeypatch):
    rp = importlib.import_module("vlm_accel.kernels.row_probs")

    def boom(*a, **k):
        raise AssertionError("reference ran")

    monkeypatch.setattr(rp, "attention_row_probs_reference", boom)
    q, k = torch.randn(1, 4, 2, 64, device="cuda"), torch.randn(1, 2, 100, 64, device="cuda")
    K.attention_row_probs(q, k, reduce="sum", use_triton=True)


def test_compile_fullgraph_cuda():
    q, k = torch.randn(1, 4, 2, 64, device="cuda"), torch.randn(1, 2, 100, 64, device="cuda")

    def f(q, k):
        return K.attention_row_probs(q, k, None, 0.125, "sum", use_triton=True) * 2

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k), f(q, k))
