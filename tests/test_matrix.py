"""One matrix over every registered method × every supported family × {sdpa, eager} × {batch 1, left-padded
batch of 3} × {forward, generate}.

A method joins by registering (its ``example_config()`` and ``noop_config()`` drive it) and a family by being
supported (it must have a tiny builder in ``families.py``) — no edits here. Checks:

- no-op exactness: the method's no-op setting reproduces the unpatched logits / generated tokens;
- reference equality (length-changing methods): the patched model equals the unpatched model on the full
  sequence in eager attention with the dropped tokens hidden by masks from their stage's layer on, using the keep
  set the runtime recorded — so every family's gather of hidden states, cos/sin (M-RoPE included), position ids
  and masks is checked, independently of how a method chose the tokens (test_pruning.py checks the choosing);
- batch invariance: each row of a left-padded batch gives what it gives alone;
- per-layer KV lengths: each layer's cache holds exactly the tokens its stage kept, plus the generated ones.
"""

from __future__ import annotations

import functools

import pytest
import torch

from vlm_accel import MethodNotApplicable, list_methods, patch_model, supported_model_types
from vlm_accel.registry import get_method_class
from vlm_accel.runtime.state import CACHE_ATTRIBUTE

from families import BATCH_ROWS, BUILDERS
from inputs import batch_inputs, extend_inputs, make_row
from reference import masked_logits
from tiny_models import IMAGE_TOKEN, VIDEO_TOKEN

# random tiny models may generate a placeholder id, which a no-cache reference would read as an image slot
PLACEHOLDERS = [IMAGE_TOKEN, VIDEO_TOKEN]
ATOL = 3e-5
NEW_TOKENS = 3
METHODS = list_methods()
FAMILIES = supported_model_types()


def test_every_supported_family_has_a_builder():
    assert set(FAMILIES) == set(BUILDERS), "add a tiny builder for every supported model type to families.py"


@functools.cache
def model_for(family: str, attn: str):
    return BUILDERS[family](attn)


@functools.cache
def rows_for(family: str):
    model = model_for(family, "sdpa")
    return [make_row(model, spec) for spec in BATCH_ROWS[family]]


def inputs_for(family: str, batch: int) -> dict:
    rows = rows_for(family)
    return batch_inputs(model_for(family, "sdpa"), rows if batch == 3 else rows[1:2])


def stage_visibility(record, window: int) -> list[tuple[int, torch.Tensor]]:
    """(first layer, bool [B, window] visible prompt positions) for every stage of a recorded plan."""
    return [(stage.layer, stage.plan.keep_mask(window)) for stage in record.stages]


def masked_reference_logits(
    family: str, inputs: dict, stages: list[tuple[int, torch.Tensor]]
) -> torch.Tensor:
    return masked_logits(model_for(family, "eager"), inputs, stages)


GENERATE = {
    "max_new_tokens": NEW_TOKENS,
    "min_new_tokens": NEW_TOKENS,
    "do_sample": False,
    "output_logits": True,
    "suppress_tokens": PLACEHOLDERS,
    "return_dict_in_generate": True,
}


def example_config(method: str):
    """The method's example config, or a skip when it needs something absent here (e.g. SGL's guide weights)."""
    try:
        return get_method_class(method).example_config()
    except MethodNotApplicable as err:
        pytest.skip(f"{method}: {err}")


def patched_run(model, config, inputs: dict, mode: str):
    """Logits [B, steps, V] (forward: every position) and the recorded plan of one patched call."""
    try:
        patch = patch_model(model, config)
    except MethodNotApplicable as err:
        pytest.skip(f"{config.method_name} does not apply to {model.config.model_type}: {err}")
    with torch.no_grad(), patch:
        if mode == "forward":
            out = model(**inputs, use_cache=True)
            return out.logits, getattr(out.past_key_values, CACHE_ATTRIBUTE, None), None, patch.stats
        out = model.generate(**inputs, **GENERATE)
        record = getattr(out.past_key_values, CACHE_ATTRIBUTE, None)
        return torch.stack(out.logits, dim=1), record, out.sequences, patch.stats


def unpatched_run(model, inputs: dict, mode: str):
    with torch.no_grad():
        if mode == "forward":
            return model(**inputs).logits, None
        out = model.generate(**inputs, **GENERATE)
        return torch.stack(out.logits, dim=1), out.sequences


matrix = pytest.mark.parametrize("family", FAMILIES)
methods = pytest.mark.parametrize("method", METHODS)
attns = pytest.mark.parametrize("attn", ["sdpa", "eager"])
batches = pytest.mark.parametrize("batch", [1, 3])
modes = pytest.mark.parametrize("mode", ["forward", "generate"])


@matrix
@methods
@attns
@batches
@modes
def test_noop_setting_reproduces_unpatched(family, method, attn, batch, mode):
    noop = get_method_class(method).noop_config()
    if noop is None:
        pytest.skip(f"{method} has no no-op setting")
    model = model_for(family, attn)
    inputs = inputs_for(family, batch)
    expected, expected_seq = unpatched_run(model, inputs, mode)
    got, _, sequences, _ = patched_run(model, noop, inputs, mode)
    valid = inputs["attention_mask"].bool() if mode == "forward" else slice(None)
    torch.testing.assert_close(got[valid], expected[valid], rtol=0, atol=1e-6)
    if mode == "generate":
        assert torch.equal(sequences, expected_seq)


@matrix
@methods
@attns
@batches
@modes
def test_patched_equals_masked_reference_and_kv_lengths(family, method, attn, batch, mode):
    method_cls = get_method_class(method)
    if not method_cls.changes_length or method_cls.merges_tokens:
        pytest.skip(f"{method} does not only drop tokens; its reference lives in its own tests")
    model = model_for(family, attn)
    inputs = inputs_for(family, batch)
    logits, record, sequences, stats = patched_run(model, example_config(method), inputs, mode)
    assert record is not None, "an active pruning method must record its plan on the cache"
    window = inputs["input_ids"].shape[1]
    stages = stage_visibility(record, window)
    valid = inputs["attention_mask"].bool()
    if mode == "forward":
        reference = masked_reference_logits(family, inputs, stages)
        kept = stages[-1][1] & valid
        torch.testing.assert_close(logits[kept], reference[kept], rtol=0, atol=ATOL)
        new_tokens = 0
    else:
        for step in range(NEW_TOKENS):
            step_inputs = extend_inputs(inputs, sequences[:, : window + step])
            reference = masked_reference_logits(family, step_inputs, stages)[:, -1]
            torch.testing.assert_close(logits[:, step], reference, rtol=0, atol=ATOL)
        new_tokens = NEW_TOKENS - 1  # the last generated token is never fed back
    expected_lengths = []
    for layer in range(len(stats.kv_length_per_layer)):
        width = window
        for first, _ in stages:
            if layer >= first:
                width = record.stage_for_layer(layer).plan.index.shape[1]
        expected_lengths.append(width + new_tokens)
    assert stats.kv_length_per_layer == expected_lengths
    assert stats.kv_bytes < stats.kv_bytes_unpatched


@matrix
@methods
@attns
@modes
def test_each_row_of_a_padded_batch_gives_what_it_gives_alone(family, method, attn, mode):
    model = model_for(family, attn)
    config = example_config(method)
    rows = rows_for(family)
    batch_logits, _, batch_seq, _ = patched_run(model, config, batch_inputs(model, rows), mode)
    for i, row in enumerate(rows):
        logits, _, sequences, _ = patched_run(model, config, batch_inputs(model, [row]), mode)
        if mode == "forward":
            n = len(row.input_ids)
            torch.testing.assert_close(batch_logits[i, -n:], logits[0], rtol=0, atol=ATOL)
        else:
            torch.testing.assert_close(batch_logits[i], logits[0], rtol=0, atol=ATOL)
            assert torch.equal(batch_seq[i, -NEW_TOKENS:], sequences[0, -NEW_TOKENS:])
