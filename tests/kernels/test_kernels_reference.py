"""Torch reference kernels vs an independent dense-eager computation (CPU; always runs)."""

import importlib

import kernel_naive as naive
import pytest
import torch

import vlm_accel.kernels as K
from vlm_accel.kernels import _dispatch

row_probs_mod = importlib.import_module("vlm_accel.kernels.row_probs")

DTYPES = [torch.float32, torch.bfloat16]


# ----------------------------------------------------------------------------------------- attention_row_prob
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", naive.ROW_SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_row_probs_reference(dtype, shape, masked):
    b, hq, hkv, m, n, d = shape
    g = naive.gen(hash((shape, masked)) % 1000)
    q, k = naive.randn((b, hq, m, d), dtype, g), naive.randn((b, hkv, n, d), dtype, g)
    allowed = naive.padded_mask(b, m, n, g) if masked else None
    scaling = 0.7 * d**-0.5
    p = naive.row_probs(q, k, allowed, scaling)
    for reduce in K.REDUCTIONS:
        out = K.attention_row_probs(q, k, allowed, scaling, reduce)
        assert out.dtype == torch.float32
        assert not out.isnan().any()
        torch.testing.assert_close(
            out.double(), naive.reduce_probs(p, reduce), atol=naive.PROB_TOL[dtype], rtol=0
        )
    if masked:  # the fully masked row is exactly zero
        assert K.attention_row_probs(q, k, allowed, scaling)[0, :, 0].abs().max() == 0


def test_row_probs_default_scaling_and_noncontiguous_query():
    g = naive.gen(3)
    q = naive.randn((2, 7, 4, 24), torch.float32, g).transpose(1, 2)  # [B,Hq=4,M=7,D] non-contiguous
    k = naive.randn((2, 2, 33, 24), torch.float32, g)
    out = K.attention_row_probs(q, k, reduce="head_mean")
    torch.testing.assert_close(out.double(), naive.row_probs(q, k, None, 24**-0.5).mean(1), atol=2e-6, rtol=0)


def test_row_probs_reference_chunks_rows_when_reducing(monkeypatch):
    monkeypatch.setattr(row_probs_mod, "_REFERENCE_CHUNK_ELEMS", 4 * 33 * 2)  # 2 rows per chunk
    g = naive.gen(4)
    q, k = naive.randn((2, 4, 7, 16), torch.float32, g), naive.randn((2, 2, 33, 16), torch.float32, g)
    allowed = naive.padded_mask(2, 7, 33, g)
    p = naive.row_probs(q, k, allowed, 0.25)
    for reduce in ("head_mean", "sum"):
        out = K.attention_row_probs(q, k, allowed, 0.25, reduce)
        torch.testing.assert_close(out.double(), naive.reduce_probs(p, reduce), atol=2e-6, rtol=0)


def test_row_probs_validation():
    q, k = torch.zeros(1, 6, 2, 8), torch.zeros(1, 4, 5, 8)
    with pytest.raises(ValueError, match="multiple"):
        K.attention_row_probs(q, k)
    with pytest.raises(ValueError, match="reduce"):
        K.attention_row_probs(q[:, :4], k, reduce="max")
    with pytest.raises(ValueError, match="allowed"):
        K.attention_row_probs(q[:, :4], k, torch.ones(1, 5, 2, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------- compact_kv
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compact_kv_reference(dtype):
    g = naive.gen(5)
    tensors = [naive.randn((2, h, 37, d), dtype, g) for h, d in [(3, 24), (3, 24), (2, 40), (3, 24)]]
    index = torch.stack([torch.randperm(37, generator=g)[:11].sort().values for _ in range(2)])
    index[1, :2] = 0  # left padding pointing at a valid slot
    for idx in (index, index.to(torch.int32)):
        out = K.compact_kv(tensors, idx)
        for t, o in zip(tensors, out):
            expected = t[torch.arange(2)[:, None], :, index].transpose(1, 2)
            assert o.shape == expected.shape and torch.equal(o, expected)
            assert o.data_ptr() != t.data_ptr()


def test_compact_kv_edge_cases():
    assert K.compact_kv([], torch.zeros(2, 3, dtype=torch.long)) == []
    t = torch.randn(2, 1, 5, 4)
    assert K.compact_kv([t], torch.zeros(2, 0, dtype=torch.long))[0].shape == (2, 1, 0, 4)
    with pytest.raises(ValueError, match="integer"):
        K.compact_kv([t], torch.zeros(2, 3))
    with pytest.raises(IndexError):
        K.compact_kv([t], torch.full((2, 3), 5, dtype=torch.long))


# ------------------------------------------------------------------------------ head_sparse_decode_attention
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", naive.DECODE_SHAPES)
def test_head_sparse_reference(dtype, shape):
    b, hq, hkv, n, d = shape
    g = naive.gen(hash(shape) % 1000)
    q, k, v = (naive.randn(s, dtype, g) for s in [(b, hq, 1, d), (b, hkv, n, d), (b, hkv, n, d)])
    head_mask = torch.rand((b, hq), generator=g) > 0.5
    head_mask[0, : hq // hkv] = False  # a whole KV group off
    allowed = torch.rand((b, n), generator=g) > 0.3
    allowed[-1] = False  # a sample with no key at all
    for mask in (None, allowed):
        out = K.head_sparse_decode_attention(q, k, v, head_mask, mask)
        expected = naive.attention(
            q, k, v, d**-0.5, allowed=None if mask is None else mask[:, None, :], head_mask=head_mask
        )
        assert out.dtype == dtype and out.shape == q.shape
        torch.testing.assert_close(out.double(), expected, atol=naive.OUT_TOL[dtype], rtol=0)
        assert out[~head_mask].abs().max() == 0


def test_head_sparse_validation():
    q, k = torch.zeros(1, 4, 2, 8), torch.zeros(1, 2, 5, 8)
    with pytest.raises(ValueError, match="1 row"):
        K.head_sparse_decode_attention(q, k, k, torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        K.head_sparse_decode_attention(q[:, :, :1], k, k, torch.ones(1, 4))


# ------------------------------------------------------------------------------------------ biased_attention
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", naive.ATTN_SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_biased_attention_reference(dtype, shape, causal):
    b, hq, hkv, m, n, d = shape
    g = naive.gen(hash((shape, causal)) % 1000)
    q, k, v = (naive.randn(s, dtype, g) for s in [(b, hq, m, d), (b, hkv, n, d), (b, hkv, n, d)])
    for hb in (1, hq):
        bias = torch.randn((b, hb, n), generator=g)
        for allowed in (None, naive.padded_mask(b, m, n, g)):
            out = K.biased_attention(q, k, v, bias, allowed, causal)
            expected = naive.attention(q, k, v, d**-0.5, bias, allowed, causal)
            assert out.dtype == dtype and out.shape == q.shape
            torch.testing.assert_close(out.double(), expected, atol=naive.OUT_TOL[dtype], rtol=0)


def test_biased_attention_validation():
    q, k = torch.zeros(1, 4, 2, 8), torch.zeros(1, 2, 5, 8)
    with pytest.raises(ValueError, match="key_bias"):
        K.biased_attention(q, k, k, torch.zeros(1, 2, 5))
    with pytest.raises(TypeError, match="floating"):
        K.biased_attention(q, k, k, torch.zeros(1, 1, 5, dtype=torch.long))


# -------------------------------------------------------------------------------- custom ops and dispatch
def test_custom_ops_registered_with_fake_kernels():
    g = naive.gen(6)
    q, k, v = (
        naive.randn((2, 4, 3, 16), torch.float32, g),
        *(naive.randn((2, 2, 9, 16), torch.float32, g) for _ in range(2)),
    )
    allowed = naive.padded_mask(2, 3, 9, g)
    ops = torch.ops.vlm_accel
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.attention_row_probs, (q, k, allowed, 0.25, "sum", False), test_utils=checks)
    torch.library.opcheck(ops.compact_kv, ([k, v], torch.tensor([[0, 2], [1, 8]]), False), test_utils=checks)
    torch.library.opcheck(
        ops.head_sparse_decode_attention,
        (q[:, :, :1], k, v, torch.ones(2, 4, dtype=torch.bool), None, 0.25, False),
        test_utils=checks,
    )
    torch.library.opcheck(
        ops.biased_attention, (q, k, v, torch.zeros(2, 1, 9), allowed, True, 0.25, False), test_utils=checks
    )


def test_triton_is_opt_in(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_FLAG, raising=False)
    assert _dispatch.resolve_use_triton(None) is False
    assert _dispatch.resolve_use_triton(False) is False
    assert isinstance(K.triton_available(), bool)
    monkeypatch.setenv(_dispatch.ENV_FLAG, "1")
    assert _dispatch.resolve_use_triton(None) is K.triton_available()
    # on CPU without the interpreter the reference runs even when Triton is requested
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not _dispatch.triton_runs_on(torch.device("cpu"), True)


def test_triton_requested_without_triton_raises(monkeypatch):
    monkeypatch.setattr(_dispatch, "triton_available", lambda: False)
    with pytest.raises(ImportError, match="triton"):
        _dispatch.resolve_use_triton(True)
    monkeypatch.setenv(_dispatch.ENV_FLAG, "1")
    with pytest.warns(UserWarning, match="triton is not installed"):
        monkeypatch.setattr(_dispatch, "_WARNED", False)
        assert _dispatch.resolve_use_triton(None) is False


def test_ops_compile_fullgraph_on_cpu():
    g = naive.gen(7)
    q, k = naive.randn((1, 4, 2, 16), torch.float32, g), naive.randn((1, 2, 9, 16), torch.float32, g)

    def f(q, k):
        return K.attention_row_probs(q, k, None, 0.25, "sum", use_triton=False) * 2

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k), f(q, k))
