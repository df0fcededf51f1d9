"""FlashAttention under the runtime, on CPU: which route transformers' flash integration takes for the exact
kwargs the runtime's attention wrapper hands the stock flash function, for every family, batch 1 and a padded
batch (see vlm_accel/runtime/flash_route.py for the two facts checked here).

The flash kernels do not exist on CPU, so transformers' ``lazy_import_flash_attention`` is replaced by exact fp32
torch stand-ins for ``flash_attn_func`` / ``flash_attn_varlen_func`` (bottom-right causal alignment, GQA). Every
other line that runs is transformers' own: ``flash_attention_forward``, ``_flash_attention_forward`` and its
route decision, ``_upad_input`` / ``_pad_input``, the flash mask function. The kwargs each stock call receives are
captured by replacing the stock ``flash_attention_2`` entry of ``ALL_ATTENTION_FUNCTIONS`` (which the runtime's
registered ``vlm_accel_flash_attention_2`` resolves at call time) with a recording wrapper around it.

The ``gpu``-marked test at the end runs the real flash_attn kernels against SDPA for every method and family.
"""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch
import transformers.modeling_flash_attention_utils as fa_utils
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from vlm_accel import MethodNotApplicable, list_methods, patch_model, supported_model_types
from vlm_accel.registry import get_method_class
from vlm_accel.runtime.state import CACHE_ATTRIBUTE

from families import BATCH_ROWS, BUILDERS
from inputs import batch_inputs, make_row
from tiny_models import IMAGE_TOKEN, VIDEO_TOKEN

FAMILIES = supported_model_types()
PRUNING = "fastv"  # example config prunes after layer 1 or 2 of the 4-layer tiny models
GENERATE = dict(
    max_new_tokens=3, min_new_tokens=3, do_sample=False, suppress_tokens=[IMAGE_TOKEN, VIDEO_TOKEN]
)


# ------------------------------------------------------------------------------------ exact torch stand-ins
def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, causal: bool
) -> torch.Tensor:
    """One sequence, flash layout: q ``[Lq, H, D]``, k/v ``[Lk, Hkv, D]``; causal is bottom-right aligned."""
    lq, h, d = q.shape
    lk = k.shape[0]
    k = k.repeat_interleave(h // k.shape[1], dim=1)
    v = v.repeat_interleave(h // v.shape[1], dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * (scale if scale is not None else d**-0.5)
    if causal:
        future = torch.arange(lk)[None, :] > torch.arange(lq)[:, None] + (lk - lq)
        s = s.masked_fill(future, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v.double()).to(q.dtype)


class FakeFlash:
    """Records which flash function transformers called, and which implementation name it loaded."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.loaded: list[str | None] = []

    def flash_fn(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                 softcap=0.0, deterministic=False):  # fmt: skip
        assert window_size == (-1, -1) and not softcap and not dropout_p
        self.calls.append("dense")
        return torch.stack([_attend(q[b], k[b], v[b], softmax_scale, causal) for b in range(q.shape[0])])

    def varlen_fn(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
                  softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, deterministic=False):  # fmt: skip
        assert window_size == (-1, -1) and not softcap and not dropout_p
        self.calls.append("varlen")
        out = torch.empty_like(q)
        for i in range(len(cu_seqlens_q) - 1):
            (a, b), (c, e) = cu_seqlens_q[i : i + 2].tolist(), cu_seqlens_k[i : i + 2].tolist()
            out[a:b] = _attend(q[a:b], k[c:e], v[c:e], softmax_scale, causal)
        return out

    def lazy_import(self, implementation, attention_wrapper=None, allow_all_kernels=False):
        self.loaded.append(implementation)
        if implementation not in ("flash_attention_2", "flash_attention_3"):
            # what transformers does with any other name: look for a hub kernel of that name (and fail)
            raise ValueError(f"no flash kernels for implementation {implementation!r}")
        process = fa_utils._lazy_define_process_function(self.varlen_fn)
        return (self.flash_fn, self.varlen_fn, None, fa_utils._pad_input, fa_utils._unpad_input), (
            process,
            dict,
        )


def transformers_route(query: torch.Tensor, attention_mask, kwargs: dict) -> str:
    """The route ``_flash_attention_forward`` takes for a call, in its own order, using its own packed-sequence
    decision (``query`` is the ``[B, H, L, D]`` the attention function receives)."""
    if attention_mask is not None:
        return "unpad"
    if all(
        kwargs.get(n) is not None for n in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    ):
        return "varlen-kwargs"
    if fa_utils._is_packed_sequence(kwargs.get("position_ids"), query.shape[0]):
        return "packed-from-position-ids"
    return "dense"


def sdpa_on_flash_inputs(
    module, query, key, value, attention_mask, kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA on the exact inputs of one flash call, in flash's output layout ``[B, Lq, H, D]``, and the bool
    ``[B, Lq]`` query rows that are real tokens. Flash's mask is 2-D key padding (or None); causality is
    bottom-right aligned, as flash's."""
    b, h, lq, _ = query.shape
    lk = key.shape[2]
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril(diagonal=lk - lq)[None, None]
    rows = torch.ones(b, lq, dtype=torch.bool, device=query.device)
    if attention_mask is not None:
        padding = attention_mask.bool()
        allowed = allowed & padding[:, None, None, -lk:]
        rows = padding[:, -lq:]
    scaling = kwargs.get("scaling") or module.scaling
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=allowed, scale=scaling, enable_gqa=key.shape[1] != h
    )
    return out.transpose(1, 2), rows


def _record_flash_calls(monkeypatch, recorder) -> None:
    """Every stock flash call: recorded (layer, query shape, mask, kwargs) and compared with SDPA on its inputs."""
    stock = ALL_ATTENTION_FUNCTIONS["flash_attention_2"]
    recorder.stock_calls, recorder.errors = [], []

    def recording(module, query, key, value, attention_mask, **kwargs):
        recorder.stock_calls.append((module.layer_idx, query.shape, attention_mask, dict(kwargs)))
        out, weights = stock(module, query, key, value, attention_mask, **kwargs)
        expected, rows = sdpa_on_flash_inputs(module, query, key, value, attention_mask, kwargs)
        recorder.errors.append(float((out.float() - expected.float())[rows].abs().max()))
        return out, weights

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flash_attention_2", recording)


@pytest.fixture
def fake_flash(monkeypatch):
    """Fake kernels + a recorder of every stock flash call (and its error against SDPA on the same inputs)."""
    fake = FakeFlash()
    monkeypatch.setattr(fa_utils, "lazy_import_flash_attention", fake.lazy_import)
    _record_flash_calls(monkeypatch, fake)
    return fake


@functools.cache
def _rows(family: str):
    model = BUILDERS[family]("sdpa")
    return [make_row(model, spec) for spec in BATCH_ROWS[family]]


def _model_and_inputs(family: str, batch: int):
    """A fresh tiny model (SDPA) and its inputs: one row, or the left-padded batch of three."""
    model = BUILDERS[family]("sdpa")
    rows = _rows(family)
    return model, batch_inputs(model, rows if batch == 3 else rows[1:2])


def _to_flash(model) -> None:
    # set directly: set_attn_implementation would refuse flash_attention_2 without the flash_attn package
    model.config.get_text_config()._attn_implementation = "flash_attention_2"


def _run(model, config, inputs: dict, modes: tuple[str, ...]) -> dict:
    """Per mode, the logits of a forward (every position) or the generated sequences, with ``config`` patched in
    once (None: unpatched). A flash-patched model is left patched: restoring flash_attention_2 needs the flash_attn
    package."""
    if config is not None:
        patch_model(model, config)
    out = {}
    with torch.no_grad():
        for mode in modes:
            out[mode] = model(**inputs).logits if mode == "forward" else model.generate(**inputs, **GENERATE)
    return out


def _routes(fake: FakeFlash) -> list[str]:
    return [transformers_route(torch.empty(q), m, kw) for _, q, m, kw in fake.stock_calls]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mode", ["forward", "generate"])
def test_pruned_layers_take_the_unpatched_flash_route(family, batch, mode, fake_flash):
    """Every flash call of a pruned model (prefill and decode steps) takes the route the unpatched model takes at
    the same call: dense without padding, unpad with it; never the packed-sequence route."""
    config = get_method_class(PRUNING).example_config()
    model, inputs = _model_and_inputs(family, batch)
    sdpa_out = _run(model, config, inputs, (mode,))[mode]
    model, _ = _model_and_inputs(family, batch)
    _to_flash(model)
    _run(model, None, inputs, (mode,))
    unpatched_routes, unpatched_calls = _routes(fake_flash), list(fake_flash.calls)
    fake_flash.stock_calls.clear()
    fake_flash.calls.clear()
    flash_out = _run(model, config, inputs, (mode,))[mode]  # the same model, now patched

    assert set(fake_flash.loaded) == {"flash_attention_2"}, (
        "the stock flash function must load flash_attention_2"
    )
    layers = model.config.get_text_config().num_hidden_layers
    steps = 1 if mode == "forward" else GENERATE["max_new_tokens"]
    assert [c[0] for c in fake_flash.stock_calls] == list(range(layers)) * steps
    expected = "unpad" if batch > 1 else "dense"  # what the unpatched model does with this batch
    assert _routes(fake_flash) == unpatched_routes == [expected] * layers * steps
    assert fake_flash.calls == unpatched_calls == ["varlen" if batch > 1 else "dense"] * layers * steps
    assert max(fake_flash.errors) < 1e-5  # each call equals SDPA on its own inputs
    for layer, q_shape, mask, kwargs in fake_flash.stock_calls:
        assert mask is None or mask.dim() == 2
        if layer >= config.layer and q_shape[2] > 1:  # the pruned prefill
            assert kwargs.get("position_ids") is None
    if mode == "forward":
        valid = inputs["attention_mask"].bool()
        torch.testing.assert_close(flash_out[valid], sdpa_out[valid], rtol=0, atol=1e-5)
    else:
        assert torch.equal(flash_out, sdpa_out)


@pytest.mark.parametrize("family", FAMILIES)
def test_gathered_positions_would_be_read_as_packed(family):
    """Why the runtime must not hand gathered positions to flash: transformers calls them packed (batch 1)."""
    model, inputs = _model_and_inputs(family, 1)
    with torch.no_grad(), patch_model(model, get_method_class(PRUNING).example_config()):
        record = getattr(model(**inputs, use_cache=True).past_key_values, CACHE_ATTRIBUTE)
    window = inputs["input_ids"].shape[1]
    gathered = torch.arange(window).gather(0, record.stages[0].plan.index[0])[None]
    assert fa_utils._is_packed_sequence(gathered, batch_size=1)
    assert not fa_utils._is_packed_sequence(torch.arange(window)[None], batch_size=1)


def _example(method: str):
    try:
        return get_method_class(method).example_config()
    except MethodNotApplicable as err:
        pytest.skip(f"{method}: {err}")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list_methods())
def test_every_method_on_fake_flash_equals_sdpa(family, method, fake_flash):
    """Padded batch, forward and generate: flash (exact stand-in kernels) gives SDPA's logits and tokens."""
    config = _example(method)
    results = {}
    for attn in ("sdpa", "flash"):
        model, inputs = _model_and_inputs(family, 3)
        if attn == "flash":
            _to_flash(model)
        try:
            out = _run(model, config, inputs, ("forward", "generate"))
        except MethodNotApplicable as err:
            pytest.skip(f"{method} does not apply to {family}: {err}")
        results.update({(attn, mode): value for mode, value in out.items()})
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(results["flash", "forward"][valid], results["sdpa", "forward"][valid], rtol=0,
                               atol=1e-5)  # fmt: skip
    assert torch.equal(results["flash", "generate"], results["sdpa", "generate"])
    assert "packed-from-position-ids" not in _routes(fake_flash)
    assert fake_flash.errors and max(fake_flash.errors) < 1e-5  # every call equals SDPA on its own inputs


# ------------------------------------------------------------------------------------ real kernels (GPU)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs the flash_attn package")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list_methods())
@pytest.mark.parametrize("batch", [1, 3])
def test_flash_attention_2_equals_sdpa_on_gpu(family, method, batch, monkeypatch):
    """The real flash_attn kernels, fp16 on CUDA, forward and generate: every flash call the patched model makes
    equals SDPA on that call's own inputs, and takes the unpatched route (dense at batch 1, unpad when padded).

    Compared call by call, because end-to-end logits of two fp16 backends drift apart layer by layer and a
    score-based method may then keep a different near-tied token; the call-level check has neither problem."""
    config = _example(method)
    calls = type("Calls", (), {})()
    _record_flash_calls(monkeypatch, calls)
    model, inputs = _model_and_inputs(family, batch)
    model = model.to("cuda", torch.float16)
    inputs = {
        k: v.to("cuda", torch.float16) if v.is_floating_point() else v.to("cuda") for k, v in inputs.items()
    }
    model.set_attn_implementation({"text_config": "flash_attention_2"})
    try:
        _run(model, config, inputs, ("forward", "generate"))
    except MethodNotApplicable as err:
        pytest.skip(f"{method} does not apply to {family}: {err}")
    assert calls.stock_calls
    assert max(calls.errors) < 1e-2, max(calls.errors)
    assert set(_routes(calls)) == {"unpad" if batch > 1 else "dense"}
