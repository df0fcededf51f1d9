"""Composition: order-free, several selection stages, reweighting after pruning, state with the generation.

- Every pair of registered methods, on every family, in both list orders: identical outputs, or — only for pairs
  that are ill-defined — the same clear error either way (runtime issue: composition must not depend on the list).
- Per-call state lives with the generation: under PAI's image-free guidance (once a second, text-only generation
  inside the first; now image-free rows in the same batch) PAINT and GIFT keep editing every decode step (before:
  0 edits after the first token).
- A second ``generate()`` run in the middle of another (from a logits processor) disturbs neither.
- SGL's guide never inherits the caller's (or a composed method's) logits processors.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from vlm_accel import MethodNotApplicable, list_methods, patch_model
from vlm_accel.methods.pai import PAIConfig
from vlm_accel.registry import get_method_class

from test_matrix import FAMILIES, GENERATE, NEW_TOKENS, example_config, inputs_for, model_for

PAIRS = list(itertools.combinations(list_methods(), 2))


def generate(model, methods, inputs):
    with torch.no_grad(), patch_model(model, methods):
        out = model.generate(**inputs, **GENERATE)
    return torch.stack(out.logits, dim=1), out.sequences


def patch_or_error(model, methods, inputs):
    """(logits, sequences) or the error message of a refused composition."""
    try:
        return generate(model, methods, inputs)
    except MethodNotApplicable:
        pytest.skip("composition: one of the methods does not apply to this family (MethodNotApplicable)")
    except ValueError as err:
        return str(err)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pair", PAIRS, ids=["+".join(p) for p in PAIRS])
def test_every_pair_composes_the_same_in_both_orders(family, pair):
    model = model_for(family, "sdpa")
    inputs = inputs_for(family, 3)
    first, second = (example_config(name) for name in pair)
    forward = patch_or_error(model, [first, second], inputs)
    backward = patch_or_error(model, [second, first], inputs)
    classes = [get_method_class(name) for name in pair]
    if isinstance(forward, str):  # refused: only ill-defined pairs, and the same way in both orders
        assert forward == backward
        assert all(c.changes_length for c in classes) and any(c.merges_tokens for c in classes), forward
        assert "cannot be composed" in forward
        return
    assert not isinstance(backward, str), backward
    torch.testing.assert_close(forward[0], backward[0], rtol=0, atol=0)
    assert torch.equal(forward[1], backward[1])


class DecodeEditCounter:
    """Counts, per method, the row edits it returns at decode steps (not at any prefill)."""

    def __init__(self, patch) -> None:
        self.counts: dict[str, int] = {}
        for method in patch.methods:
            original = method.row_edit

            def counted(layer, state, original=original, name=method.name):
                edit = original(layer, state)
                if edit is not None and not state.is_prefill:
                    self.counts[name] = self.counts.get(name, 0) + 1
                return edit

            method.row_edit = counted


@pytest.mark.parametrize("method", ["paint", "gift"])
def test_state_survives_image_free_guidance(method):
    """``[method, PAI(alpha=0, gamma=1.1)]``: the method must still edit at every decode step under PAI's guidance
    (regression: it reset its per-prompt state on the object when guidance prefilled its text-only prompt)."""
    model = model_for("llava", "sdpa")
    inputs = inputs_for("llava", 3)
    counts = {}
    for configs in ([example_config(method)], [example_config(method), PAIConfig(alpha=0.0, gamma=1.1)]):
        with torch.no_grad(), patch_model(model, configs) as patch:
            counter = DecodeEditCounter(patch)
            model.generate(**inputs, **GENERATE)
            layers = len(patch.methods[0].layers)
        counts[len(configs)] = counter.counts.get(method, 0)
    assert counts[1] == (NEW_TOKENS - 1) * layers
    assert counts[2] == counts[1]


class NestedGeneration(LogitsProcessor):
    """At the first decode step of the outer generation, runs a whole other generation on the same model."""

    def __init__(self, model, inputs) -> None:
        self.model, self.inputs, self.result = model, inputs, None

    def __call__(self, input_ids, scores):
        if self.result is None:
            out = self.model.generate(**self.inputs, **GENERATE)
            self.result = (torch.stack(out.logits, dim=1), out.sequences)
        return scores


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", list_methods())
def test_a_generation_in_between_disturbs_neither(family, method):
    model = model_for(family, "sdpa")
    config = example_config(method)
    outer_inputs, inner_inputs = inputs_for(family, 3), inputs_for(family, 1)
    try:
        alone_outer = generate(model, [config], outer_inputs)
    except MethodNotApplicable as err:
        pytest.skip(f"{method}: {err}")
    alone_inner = generate(model, [config], inner_inputs)
    with torch.no_grad(), patch_model(model, config):
        nested = NestedGeneration(model, inner_inputs)
        out = model.generate(**outer_inputs, **GENERATE, logits_processor=LogitsProcessorList([nested]))
    torch.testing.assert_close(torch.stack(out.logits, dim=1), alone_outer[0], rtol=0, atol=0)
    torch.testing.assert_close(nested.result[0], alone_inner[0], rtol=0, atol=0)
    assert torch.equal(out.sequences, alone_outer[1]) and torch.equal(nested.result[1], alone_inner[1])


def test_sgl_guide_never_sees_logits_processors(monkeypatch):
    from test_sgl import batch, guide, large

    seen = []
    cls = type(guide())
    original = cls.generate

    def spy(self, *args, **kwargs):
        if self is guide():
            seen.append(kwargs.get("logits_processor"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "generate", spy)
    inputs = batch()
    results = []
    sgl = get_method_class("sgl").config_cls(guide=guide(), keep_ratio=0.5, layer_fraction=0.5)
    for configs in ([sgl, PAIConfig(alpha=0.2, gamma=1.1)], [PAIConfig(alpha=0.2, gamma=1.1), sgl]):
        results.append(generate(large(), configs, inputs))
    assert len(seen) == 2 and all(not processors for processors in seen)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    assert torch.equal(results[0][1], results[1][1])


def test_selection_stages_compose_fastv_after_dyvte_exit():
    """DyVTE exits every row's visual tokens after layer 1; FastV at layer 2 then has none left to choose from and
    adds an empty stage: the result equals DyVTE alone."""
    model = model_for("llava", "sdpa")
    inputs = inputs_for("llava", 3)
    dyvte = get_method_class("dyvte").config_cls(exit_layer=0)
    fastv = get_method_class("fastv").config_cls(layer=2, keep_ratio=0.25)
    alone = generate(model, [dyvte], inputs)
    both = generate(model, [fastv, dyvte], inputs)
    torch.testing.assert_close(both[0], alone[0], rtol=0, atol=1e-6)


def test_gift_after_pruning_keeps_editing():
    """GIFT's saliency is well defined over the kept visual tokens: ``["fastv", "gift"]`` runs (was
    NotImplementedError) and GIFT edits at every decode step."""
    model = model_for("llava", "sdpa")
    inputs = inputs_for("llava", 3)
    fastv = get_method_class("fastv").config_cls(layer=1, keep_ratio=0.5)
    with torch.no_grad(), patch_model(model, [fastv, example_config("gift")]) as patch:
        counter = DecodeEditCounter(patch)
        model.generate(**inputs, **GENERATE)
        gift = next(m for m in patch.methods if m.name == "gift")
    assert counter.counts.get("gift", 0) == (NEW_TOKENS - 1) * len(gift.layers)
