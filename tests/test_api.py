"""The public API: configs, registry, patch handle, composition rules, and clear errors on bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vlm_accel import (
    FastVConfig,
    MethodConfig,
    RandomPruneConfig,
    get_patch,
    list_methods,
    patch_model,
    supported_model_types,
    unpatch_model,
)

from families import BATCH_ROWS, BUILDERS
from inputs import batch_inputs, make_row
from tiny_models import IMAGE_TOKEN


@pytest.fixture
def model():
    return BUILDERS["llava"]("sdpa")


def test_list_methods_and_supported_types():
    assert {"fastv", "random"} <= set(list_methods())
    assert {"llava", "llava_next", "llava_onevision"} <= set(supported_model_types())


def test_config_round_trips_through_json():
    config = FastVConfig(layer=3, keep_ratio=0.25)
    text = config.to_json()
    assert json.loads(text)["method"] == "fastv"
    assert MethodConfig.from_json(text) == config
    assert FastVConfig.from_json(text) == config
    assert RandomPruneConfig.from_dict(RandomPruneConfig(seed=7, keep_count=4).to_dict()).seed == 7
    assert "keep_ratio=0.25" in repr(config)


def test_patch_accepts_a_config_object_and_exposes_it(model):
    config = FastVConfig(layer=1, keep_ratio=0.5)
    patch = patch_model(model, config)
    assert patch.config is config
    assert get_patch(model) is patch
    unpatch_model(model)
    assert get_patch(model) is None
    assert not patch.active
    unpatch_model(model)  # a no-op on an unpatched model


def test_context_manager_removes_the_patch(model):
    with patch_model(model, "random", layer=2, keep_ratio=0.5) as patch:
        assert patch.active
    assert get_patch(model) is None


def test_stats_record_calls_and_time(model):
    inputs = batch_inputs(model, [make_row(model, BATCH_ROWS["llava"][0])])
    with torch.no_grad(), patch_model(model, "fastv", layer=2, keep_ratio=0.25) as patch:
        model.generate(**inputs, max_new_tokens=3, do_sample=False, min_new_tokens=3)
        stats = patch.stats.as_dict()
    assert stats["prefill_calls"] == 1 and stats["decode_calls"] == 2
    assert stats["visual_tokens_seen"] == 16 and stats["visual_tokens_kept"] == 4
    assert stats["time_in_patch_s"] > 0
    assert stats["kv_bytes"] < stats["kv_bytes_unpatched"]


# ---- bad input: each raises a clear error naming the problem ------------------------------------------------


@pytest.mark.parametrize(
    ("params", "error", "message"),
    [
        ({"keep_ratio": 0.0}, ValueError, "keep_ratio must be in \\(0, 1\\]"),
        ({"keep_ratio": -0.5}, ValueError, "keep_ratio must be in"),
        ({"keep_ratio": 1.5}, ValueError, "keep_ratio must be in"),
        ({"keep_ratio": "half"}, TypeError, "keep_ratio must be a number"),
        ({"keep_ratio": float("nan")}, ValueError, "keep_ratio must be finite"),
        ({"layer": 2.5}, TypeError, "layer must be an int"),
        ({"layer": 0}, ValueError, "layer must be in"),
        ({"layer": True}, TypeError, "layer must be an int"),
        ({"keep_count": 0}, ValueError, "keep_count must be in"),
        ({"keep_ratio": 0.5, "keep_count": 3}, ValueError, "not both"),
        ({"ratio": 0.5}, TypeError, "unknown parameter.*'ratio'.*parameters are"),
    ],
)
def test_bad_parameters_raise(model, params, error, message):
    with pytest.raises(error, match=message):
        patch_model(model, "fastv", **params)
    assert get_patch(model) is None


def test_layer_beyond_the_model_raises(model):
    with pytest.raises(ValueError, match=r"layer must be in \[1, 3\] for this 4-layer"):
        patch_model(model, "fastv", layer=4)
    assert model.config.text_config._attn_implementation == "sdpa"


def test_unknown_method_lists_the_known_ones(model):
    with pytest.raises(ValueError, match="unknown method 'fastvv'; known methods: .*fastv.*random"):
        patch_model(model, "fastvv")


def test_method_of_wrong_type_raises(model):
    with pytest.raises(TypeError, match="registered name"):
        patch_model(model, 3)


def test_config_object_with_keywords_raises(model):
    with pytest.raises(TypeError, match="inside the config object"):
        patch_model(model, FastVConfig(), keep_ratio=0.3)


def test_not_a_vlm_names_the_supported_types():
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2))
    with pytest.raises(ValueError, match="unsupported model type 'llama'.*supported model types: .*llava"):
        patch_model(lm, "fastv")
    with pytest.raises(TypeError, match="expects a transformers vision-language model"):
        patch_model(object(), "fastv")


def test_base_model_instead_of_top_level_raises(model):
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        patch_model(model.model, "fastv")


def test_double_patch_raises_and_list_refuses_only_ill_defined_compositions(model):
    patch_model(model, "fastv")
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model, "random")
    unpatch_model(model)
    with pytest.raises(ValueError, match="pool averages each image's full visual-token grid"):
        patch_model(model, ["fastv", "pool"], keep_ratio=0.5)
    with pytest.raises(ValueError, match="only once"):
        patch_model(model, ["fastv", FastVConfig(keep_ratio=0.25)], keep_ratio=0.5)
    assert get_patch(model) is None
    with patch_model(model, ["fastv", "random"], keep_ratio=0.5) as patch:  # successive selection stages
        assert [m.name for m in patch.methods] == ["fastv", "random"]
    with pytest.raises(TypeError, match="match none of the methods"):
        patch_model(model, ["fastv"], alpha=1.0)
    assert get_patch(model) is None


def test_unsupported_attention_backend_raises(model):
    model.set_attn_implementation({"text_config": "flex_attention"})
    with pytest.raises(ValueError, match="'flex_attention' is not supported"):
        patch_model(model, "fastv")


def test_image_features_that_do_not_match_image_tokens_raise(model):
    inputs = batch_inputs(model, [make_row(model, BATCH_ROWS["llava"][0])])
    inputs["input_ids"][0, 3] = 5  # one image placeholder replaced by text: 15 tokens for 16 features
    with patch_model(model, "fastv"), pytest.raises(ValueError, match="(?i)image features and image tokens"):
        model(**inputs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cache_implementation": "offloaded_static"}, "cache_implementation='offloaded_static'"),
        ({"cache_implementation": "static"}, "cache_implementation='static'"),
    ],
)
def test_unsupported_generation_modes_raise(model, kwargs, message):
    inputs = batch_inputs(model, [make_row(model, BATCH_ROWS["llava"][0])])
    with patch_model(model, "fastv"), pytest.raises(ValueError, match=message):
        model.generate(**inputs, max_new_tokens=2, **kwargs)


def test_new_images_on_a_pruned_cache_raise(model):
    inputs = batch_inputs(model, [make_row(model, BATCH_ROWS["llava"][0])])
    with torch.no_grad(), patch_model(model, "fastv", keep_ratio=0.5):
        out = model(**inputs, use_cache=True)
        with pytest.raises(ValueError, match="new visual tokens cannot be appended"):
            model(**inputs, past_key_values=out.past_key_values)


def test_a_generated_placeholder_id_without_visual_inputs_is_plain_text(model):
    """A decode step may feed back a token equal to the image placeholder id; with no visual inputs it is text."""
    inputs = batch_inputs(model, [make_row(model, BATCH_ROWS["llava"][0])])
    step = torch.tensor([[IMAGE_TOKEN]])
    mask = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], dim=1)
    with torch.no_grad():
        prefill = model(**inputs, use_cache=True)
        expected = model(input_ids=step, attention_mask=mask, past_key_values=prefill.past_key_values).logits
        with patch_model(model, "fastv", keep_ratio=1.0):
            prefill = model(**inputs, use_cache=True)
            got = model(input_ids=step, attention_mask=mask, past_key_values=prefill.past_key_values).logits
        with patch_model(model, "fastv", keep_ratio=0.5):
            prefill = model(**inputs, use_cache=True)
            pruned = model(input_ids=step, attention_mask=mask, past_key_values=prefill.past_key_values).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert torch.isfinite(pruned).all()
