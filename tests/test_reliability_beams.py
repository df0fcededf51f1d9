"""Beam search with a token-pruning method (issue #16): the plan record on the cache follows the cache's beam
reordering, so each row's decode steps keep masking what *that row's* layers hold."""

from __future__ import annotations

import functools

import pytest
import torch

from vlm_accel import patch_model

from families import BATCH_ROWS, BUILDERS
from inputs import batch_inputs, make_row
from reference import fastv_keep_mask


def _model_and_rows(family: str, attn: str = "sdpa"):
    torch.manual_seed(0)
    model = BUILDERS[family](attn).eval()
    return model, [make_row(model, spec) for spec in BATCH_ROWS[family][:2]]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_reorder_cache_permutes_the_plan_record_with_the_rows(family):
    """Prefill [a, b], reorder the cache to [b, a], decode: the same logits as prefilling [b, a] and decoding.

    Qwen2-VL's rows keep different numbers of visual tokens (padded plans), so a record left in the old row order
    masks the wrong slots; LLaVA's rows keep equal counts and only exercise the plumbing."""
    model, rows = _model_and_rows(family)
    forward, backward = batch_inputs(model, rows), batch_inputs(model, rows[::-1])
    assert forward["input_ids"].shape == backward["input_ids"].shape

    def decode(inputs: dict, reorder: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            cache = out.past_key_values
            if reorder is not None:
                cache.reorder_cache(reorder)
            tokens = torch.tensor([[7], [11]])
            mask = torch.cat([inputs["attention_mask"][reorder if reorder is not None else slice(None)],
                              torch.ones_like(tokens)], dim=1)  # fmt: skip
            kwargs = {}
            if "image_grid_thw" in inputs:  # M-RoPE: the next text position of each row
                _, deltas = model.model.get_rope_index(
                    input_ids=inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"],
                    attention_mask=inputs["attention_mask"], mm_token_type_ids=inputs["mm_token_type_ids"],
                )  # fmt: skip
                if reorder is not None:
                    deltas = deltas[reorder]
                position = torch.full((2, 1), inputs["input_ids"].shape[1]) + deltas.view(2, 1)
                kwargs["position_ids"] = position[None].expand(3, -1, -1)
            return model(input_ids=tokens, attention_mask=mask, past_key_values=cache, **kwargs).logits

    with patch_model(model, "fastv", keep_ratio=0.25):
        swapped = decode(forward, torch.tensor([1, 0]))
        direct = decode(backward, None)
    assert torch.allclose(swapped, direct, atol=1e-5)


def test_beam_search_matches_the_masked_reference():
    """FastV under beam search equals beam search of the unpatched eager model with the dropped prompt tokens hidden
    from layer K on (the independent reference of tests/reference.py)."""
    model, rows = _model_and_rows("llava", attn="eager")
    inputs = batch_inputs(model, rows)
    beams, layer, ratio = 3, 2, 0.25
    visual = inputs["input_ids"] == model.config.image_token_id
    keep = fastv_keep_mask(model, inputs, layer, ratio, visual).repeat_interleave(beams, dim=0)
    width = keep.shape[1]

    def hide(index, module, args, kwargs):
        if index < layer:
            return None
        mask = kwargs["attention_mask"]
        visible = torch.ones(mask.shape[0], mask.shape[-1], dtype=torch.bool)
        visible[:, :width] = keep  # every beam row of a sample keeps that sample's set
        kwargs["attention_mask"] = mask.masked_fill(~visible[:, None, None, :], torch.finfo(mask.dtype).min)
        return args, kwargs

    settings = dict(max_new_tokens=5, min_new_tokens=5, num_beams=beams, do_sample=False, num_return_sequences=2)
    layers = model.model.language_model.layers
    handles = [m.register_forward_pre_hook(functools.partial(hide, i), with_kwargs=True) for i, m in enumerate(layers)]
    try:
        expected = model.generate(**inputs, **settings)
    finally:
        for handle in handles:
            handle.remove()
    with patch_model(model, "fastv", layer=layer, keep_ratio=ratio):
        tokens = model.generate(**inputs, **settings)
    assert torch.equal(tokens, expected)


def test_reorder_permutes_per_generation_method_state_rows():
    """Per-generation method state follows the beams: tensors whose first dimension is the batch are permuted with
    the rows, anything else stays as it is."""
    from vlm_accel.runtime.beams import reorder_record
    from vlm_accel.runtime.state import PlanRecord

    owner = object()
    scores = torch.arange(6.0).view(3, 2)
    record = PlanRecord([], 0, 2, torch.zeros(3, 2, dtype=torch.bool), {owner: {"scores": scores, "alpha": 2.0}})
    reorder_record(record, torch.tensor([2, 0, 0]))
    assert torch.equal(record.method_state[owner]["scores"], scores[[2, 0, 0]])
    assert record.method_state[owner]["alpha"] == 2.0


def test_beam_search_with_stateful_methods_gives_each_sample_what_it_gives_alone():
    """GIFT keeps its saliency per generation and DyVTE its exits: under beam search (with FastV pruning) a batch
    gives each sample what it gives alone (was: refused)."""
    from vlm_accel import DyVTEConfig, FastVConfig, GIFTConfig

    model, rows = _model_and_rows("llava")
    settings = dict(max_new_tokens=4, min_new_tokens=4, num_beams=2, do_sample=False)
    for configs in ([FastVConfig(layer=1, keep_ratio=0.5), GIFTConfig()], [DyVTEConfig(exit_layer=1)]):
        with torch.no_grad(), patch_model(model, configs):
            together = model.generate(**batch_inputs(model, rows), **settings)
            for i, row in enumerate(rows):
                alone = model.generate(**batch_inputs(model, [row]), **settings)
                assert torch.equal(together[i, -4:], alone[0, -4:])
