"""Bad and edge inputs (issue #16): a clear, specific error or a correct run, and the model exactly as it was after
any failure. Packed (padding-free) rows, custom 4-D masks, meta tensors, generation modes set through a
``GenerationConfig``, malformed configs and router files, and a prompt with no image."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from vlm_accel import MethodConfig, patch_model
from vlm_accel.methods.dyvte_routers import DyVTERouters

from families import BATCH_ROWS, BUILDERS
from inputs import batch_inputs, make_row


def _model_and_inputs(family: str, rows: int = 2):
    torch.manual_seed(0)
    model = BUILDERS[family]("sdpa").eval()
    inputs = batch_inputs(model, [make_row(model, spec) for spec in BATCH_ROWS[family][:rows]])
    return model, inputs


def _packed(model, inputs: dict) -> dict:
    """The padded batch as one packed row: position ids restart per sequence, no attention mask (Qwen2-VL: the
    4-row ``[text; t; h; w]`` layout, as transformers reads packing from it)."""
    mask = inputs["attention_mask"].bool()
    text = torch.cat([torch.arange(int(n)) for n in mask.sum(1)])[None]
    if "image_grid_thw" in inputs:
        rope, _ = model.model.get_rope_index(
            input_ids=inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"], mm_token_type_ids=inputs["mm_token_type_ids"],
        )  # fmt: skip
        positions = torch.cat([text, rope[:, mask].view(3, -1)])[:, None, :]
    else:
        positions = text
    packed = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    packed["input_ids"] = inputs["input_ids"][mask][None]
    if "mm_token_type_ids" in inputs:
        packed["mm_token_type_ids"] = inputs["mm_token_type_ids"][mask][None]
    packed["position_ids"] = positions
    return packed


def _logits(model, inputs: dict, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_packed_rows_are_refused_by_an_acting_patch_and_exact_under_a_noop_one(family):
    model, inputs = _model_and_inputs(family)
    packed = _packed(model, inputs)
    reference = _logits(model, packed, use_cache=False)
    padded = _logits(model, inputs, use_cache=False)[inputs["attention_mask"].bool()]
    assert torch.allclose(reference[0], padded, atol=1e-5)  # the packed input itself is right, unpatched
    for method, params in [("fastv", {"keep_ratio": 0.5}), ("pai", {"alpha": 0.5})]:
        with patch_model(model, method, **params), pytest.raises(ValueError, match="packed .padding-free"):
            _logits(model, packed, use_cache=False)
        assert torch.equal(_logits(model, packed, use_cache=False), reference)  # back to unpatched
    for method, params in [("fastv", {"keep_ratio": 1.0}), ("pai", {"alpha": 0.0})]:
        with patch_model(model, method, **params):
            assert torch.equal(_logits(model, packed, use_cache=False), reference)


def test_packed_detection_follows_transformers_rule():
    """With a cache (or a 2-D mask) transformers does not read packing from positions, and neither do we: pruning
    then runs as for any single row."""
    model, inputs = _model_and_inputs("llava", rows=1)
    positions = torch.arange(inputs["input_ids"].shape[1])[None]
    with patch_model(model, "fastv", keep_ratio=0.5):
        _logits(model, inputs, position_ids=positions)  # monotone positions with a mask: an ordinary call
        _logits(model, {"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"]},
                position_ids=positions, use_cache=False)  # fmt: skip


def _causal_4d(mask_2d: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    length = mask_2d.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & mask_2d.bool()[:, None, None, :]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def test_custom_4d_mask_runs_under_noop_and_reweighting_and_is_refused_by_a_drop():
    model, inputs = _model_and_inputs("llava")
    custom = {**inputs, "attention_mask": _causal_4d(inputs["attention_mask"])}
    reference = _logits(model, custom)
    for method, params in [("fastv", {"keep_ratio": 1.0}), ("pai", {"alpha": 0.0})]:
        with patch_model(model, method, **params):
            assert torch.equal(_logits(model, custom), reference)
    with patch_model(model, "pai", alpha=0.5):  # a reweighting method reads the 4-D mask as the layer does
        valid = inputs["attention_mask"].bool()  # (padded query rows differ between mask forms, unpatched too)
        assert torch.allclose(_logits(model, custom)[valid], _logits(model, inputs)[valid], atol=1e-5)
    with patch_model(model, "fastv", keep_ratio=0.5), pytest.raises(ValueError, match="need a 2-D attention_mask"):
        _logits(model, custom)
    assert torch.equal(_logits(model, custom), reference)


def test_meta_inputs_raise_a_clear_error():
    model, inputs = _model_and_inputs("llava", rows=1)
    meta = {k: v.to("meta") for k, v in inputs.items()}
    with patch_model(model, "fastv", keep_ratio=0.5), pytest.raises(ValueError, match="meta device"):
        model(**meta)


@pytest.mark.parametrize("method", ["pai", "paint", "gift"])
def test_reweighting_without_an_image_is_bitwise_unchanged(method):
    model, inputs = _model_and_inputs("llava", rows=1)
    text = {"input_ids": inputs["input_ids"][:, :3], "attention_mask": inputs["attention_mask"][:, :3]}
    reference = _logits(model, text)
    with patch_model(model, method):
        assert torch.equal(_logits(model, text), reference)


@pytest.mark.parametrize("where", ["generation_config", "model.generation_config", "keyword"])
def test_static_cache_is_refused_wherever_it_is_set(where):
    model, inputs = _model_and_inputs("llava", rows=1)
    kwargs = {}
    if where == "generation_config":
        kwargs["generation_config"] = GenerationConfig(max_new_tokens=3, cache_implementation="static")
    elif where == "model.generation_config":
        model.generation_config.cache_implementation = "static"
    else:
        kwargs["cache_implementation"] = "static"
    with patch_model(model, "fastv", keep_ratio=0.5):
        with pytest.raises(ValueError, match="cache_implementation='static' is not supported with token-pruning"):
            model.generate(**inputs, max_new_tokens=3, do_sample=False, **kwargs)


def _greedy(model, inputs: dict, **kwargs) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False, **kwargs)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_prompt_lookup_decoding_equals_greedy_under_pruning(family):
    """Prompt-lookup decoding is exact: a pruned model verifying candidates (several tokens per decode call, rejected
    ones cropped from every layer's end) gives its own greedy output, however the mode is set. An assistant model
    is refused."""
    model, inputs = _model_and_inputs(family, rows=1)
    with patch_model(model, "fastv", keep_ratio=0.25):
        greedy = _greedy(model, inputs)
        assert torch.equal(_greedy(model, inputs, prompt_lookup_num_tokens=3), greedy)
        config = GenerationConfig(max_new_tokens=10, min_new_tokens=10, do_sample=False, prompt_lookup_num_tokens=3)
        assert torch.equal(model.generate(**inputs, generation_config=config), greedy)
        model.generation_config.prompt_lookup_num_tokens = 3
        assert torch.equal(_greedy(model, inputs), greedy)
        model.generation_config.prompt_lookup_num_tokens = None
        with pytest.raises(ValueError, match="assisted decoding with an assistant model is not supported"):
            _greedy(model, inputs, assistant_model=model)


def test_config_json_that_is_not_an_object_is_a_type_error():
    with pytest.raises(TypeError, match="must be a mapping"):
        MethodConfig.from_json("[1, 2]")


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\x80\x04\x95\x00\x00\x00"])
def test_unreadable_router_file_names_the_file_and_method(tmp_path, content):
    path = tmp_path / "routers.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"dyvte: cannot read router file {path}"):
        DyVTERouters.load(path)
