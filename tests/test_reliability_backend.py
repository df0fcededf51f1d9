"""A patched model reports and switches its attention backend as the stock model does (issue #16, defect 5);
reweighting methods run with a static cache (defect 4) and a compiled decode step (defect 6)."""

from __future__ import annotations

import pytest
import torch
from transformers import StaticCache

from vlm_accel import patch_model

from families import BATCH_ROWS, BUILDERS
from inputs import batch_inputs, make_row


def _model_and_inputs(family: str, rows: int = 2, attn: str = "sdpa"):
    torch.manual_seed(0)
    model = BUILDERS[family](attn).eval()
    inputs = batch_inputs(model, [make_row(model, spec) for spec in BATCH_ROWS[family][:rows]])
    return model, inputs


def _logits(model, inputs: dict, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_patched_model_reports_its_stock_backend(family):
    model, _ = _model_and_inputs(family, rows=1)
    with patch_model(model, "pai"):
        assert model.config._attn_implementation == "sdpa"
        assert model.config.get_text_config()._attn_implementation == "sdpa"
        for layer in model.model.language_model.layers:
            assert layer.self_attn.config._attn_implementation == "vlm_accel_sdpa"  # what the module looks up
    for layer in model.model.language_model.layers:
        assert layer.self_attn.config is model.config.get_text_config()


@pytest.mark.parametrize(("method", "params"), [("pai", {"alpha": 0.5}), ("fastv", {"keep_ratio": 0.5})])
def test_switching_the_backend_of_a_patched_model_keeps_the_patch_working(method, params):
    model, inputs = _model_and_inputs("llava")
    eager, _ = _model_and_inputs("llava", attn="eager")
    with patch_model(eager, method, **params):
        expected = _logits(eager, inputs)
    with patch_model(model, method, **params) as patch:
        model.set_attn_implementation("eager")
        assert model.config.get_text_config()._attn_implementation == "eager"
        assert patch.active
        assert torch.allclose(_logits(model, inputs), expected, atol=1e-5)  # the patch acts on the new backend
        if method == "pai":
            out = model(**inputs, output_attentions=True)
            assert len(out.attentions) == model.config.get_text_config().num_hidden_layers
    assert model.config.get_text_config()._attn_implementation == "eager"  # remove() keeps the user's choice
    eager_unpatched, _ = _model_and_inputs("llava", attn="eager")
    assert torch.equal(_logits(model, inputs), _logits(eager_unpatched, inputs))


def test_switching_to_an_unsupported_backend_is_refused_on_the_next_forward():
    model, inputs = _model_and_inputs("llava", rows=1)
    reference = _logits(model, inputs)
    with patch_model(model, "pai", alpha=0.5):
        model.set_attn_implementation({"text_config": "flex_attention"})
        with pytest.raises(ValueError, match="'flex_attention' is not supported by vlm_accel"):
            model(**inputs)
        model.set_attn_implementation({"text_config": "sdpa"})
    assert torch.equal(_logits(model, inputs), reference)


def _generate(model, inputs: dict, **kwargs):
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4, output_logits=True,
                         return_dict_in_generate=True, **kwargs)  # fmt: skip
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl"])
@pytest.mark.parametrize("rows", [1, 2])
def test_reweighting_with_a_static_cache_matches_the_dynamic_cache(family, rows):
    model, inputs = _model_and_inputs(family, rows=rows)
    unpatched_tokens, unpatched = _generate(model, inputs, cache_implementation="static")
    with patch_model(model, "pai", alpha=0.0, gamma=1.0):
        tokens, logits = _generate(model, inputs, cache_implementation="static")
    assert torch.equal(tokens, unpatched_tokens) and torch.equal(logits, unpatched)
    with patch_model(model, "pai", alpha=0.5, gamma=1.0):
        dynamic_tokens, dynamic = _generate(model, inputs)
        static_tokens, static = _generate(model, inputs, cache_implementation="static")
    assert not torch.allclose(dynamic, unpatched, atol=1e-4)  # the method acts
    assert torch.equal(static_tokens, dynamic_tokens)
    assert torch.allclose(static, dynamic, atol=1e-5)


def test_compiled_fullgraph_decode_step_under_reweighting():
    """The decode step generate() compiles (static cache): no clock read, no tensor-valued branch in the hooks."""
    model, inputs = _model_and_inputs("llava", rows=1)
    length = inputs["input_ids"].shape[1]

    def decode(step_model):
        cache = StaticCache(config=model.config, max_cache_len=length + 2)
        with torch.no_grad():
            prefill = model(**inputs, past_key_values=cache, use_cache=True)
            token = prefill.logits[:, -1:].argmax(-1)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
            return step_model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True).logits

    with patch_model(model, "pai", alpha=0.5) as patch:
        eager = decode(model)
        torch._dynamo.reset()
        compiled = decode(torch.compile(model, fullgraph=True, backend="eager"))
        assert patch.stats.decode_calls == 2
    assert torch.allclose(compiled, eager, atol=1e-6)
