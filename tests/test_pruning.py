"""FastV and random pruning: the tokens they choose, on every family.

The generic exactness checks (no-op, masked reference with the recorded plan, batch invariance, KV lengths) run
for every method in test_matrix.py. Here the *selection* is checked against an independent computation: FastV's
kept set from eager attention weights (head-mean last row at layer K-1), random's from the seeded draw; pruned
logits must equal the masked full-sequence reference with that set, and dropped positions keep the logits of the
hidden state they had when dropped.
"""

from __future__ import annotations

import pytest
import torch

from vlm_accel import patch_model
from vlm_accel.methods.random_prune import RandomPrune, RandomPruneConfig

from families import BATCH_ROWS, BUILDERS
from inputs import RowSpec, batch_inputs, make_row
from reference import dropped_position_logits, fastv_keep_mask, keep_top, masked_logits
from tiny_models import IMAGE_TOKEN, VIDEO_TOKEN

FAMILIES = list(BUILDERS)
ATOL = 2e-5
LAYER = 2


def visual_mask(inputs: dict) -> torch.Tensor:
    ids = inputs["input_ids"]
    return ((ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN)) & inputs["attention_mask"].bool()


def expected_keep(method: str, model, inputs: dict, keep_ratio: float) -> torch.Tensor:
    """The kept set, computed without vlm_accel's runtime."""
    visual = visual_mask(inputs)
    if method == "fastv":
        eager = BUILDERS[model.config.model_type]("eager")
        return fastv_keep_mask(eager, inputs, LAYER, keep_ratio, visual)
    scores = torch.zeros(visual.shape)
    for b in range(visual.shape[0]):
        g = torch.Generator().manual_seed(0)
        scores[b, visual[b]] = torch.rand(int(visual[b].sum()), generator=g)
    return keep_top(scores, visual, keep_ratio)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def single_row_inputs(model, family: str) -> dict:
    return batch_inputs(model, [make_row(model, BATCH_ROWS[family][1])])


@pytest.mark.parametrize("method", ["fastv", "random"])
def test_remove_restores_bitwise_identical_outputs(family, method):
    model = BUILDERS[family]("sdpa")
    inputs = single_row_inputs(model, family)
    with torch.no_grad():
        before = model(**inputs).logits
        patch = patch_model(model, method, layer=LAYER, keep_ratio=0.25)
        pruned = model(**inputs).logits
        patch.remove()
        after = model(**inputs).logits
    assert not torch.equal(pruned, before), "pruning at 25% should change the logits"
    assert torch.equal(after, before)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert "generate" not in vars(model)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["fastv", "random"])
def test_pruned_forward_equals_masked_reference(family, attn, method):
    model = BUILDERS[family](attn)
    inputs = batch_inputs(model, [make_row(model, s) for s in BATCH_ROWS[family]])
    keep = expected_keep(method, model, inputs, 0.25)
    eager = BUILDERS[family]("eager")
    reference = masked_logits(eager, inputs, [(LAYER, keep)])
    dropped_reference = dropped_position_logits(eager, inputs, LAYER)
    with torch.no_grad(), patch_model(model, method, layer=LAYER, keep_ratio=0.25) as patch:
        logits = model(**inputs).logits
        kept_visual = int((keep & visual_mask(inputs)).sum())
        assert patch.stats.visual_tokens_kept == kept_visual
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[keep & valid], reference[keep & valid], rtol=0, atol=ATOL)
    dropped = ~keep & valid
    assert dropped.any()
    torch.testing.assert_close(logits[dropped], dropped_reference[dropped], rtol=0, atol=ATOL)


def test_keep_count_keeps_exactly_n_visual_tokens(family):
    model = BUILDERS[family]("sdpa")
    inputs = single_row_inputs(model, family)
    with torch.no_grad(), patch_model(model, "fastv", layer=1, keep_count=3) as patch:
        model(**inputs)
    assert patch.stats.visual_tokens_kept == 3


def test_text_only_prompt_runs_unchanged(family):
    model = BUILDERS[family]("sdpa")
    row = make_row(model, RowSpec(prefix=4, image_size=None, suffix=6))
    inputs = batch_inputs(model, [row])
    with torch.no_grad():
        expected = model(**inputs).logits
        with patch_model(model, "fastv", layer=LAYER, keep_ratio=0.1) as patch:
            got = model(**inputs).logits
            tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, expected)
    assert tokens.shape[1] == inputs["input_ids"].shape[1] + 3
    assert patch.stats.visual_tokens_seen == 0


def test_generate_logits_to_keep_does_not_restore_full_length():
    """generate() computes only what it needs: the LM head runs on the last position only."""
    model = BUILDERS["llava"]("sdpa")
    inputs = single_row_inputs(model, "llava")
    with torch.no_grad(), patch_model(model, "fastv", layer=LAYER, keep_ratio=0.25):
        last = model(**inputs, logits_to_keep=1).logits
        full = model(**inputs).logits
    assert last.shape[1] == 1
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=0, atol=1e-6)


def test_random_choice_depends_only_on_seed_and_row():
    config = RandomPruneConfig(layer=2, keep_ratio=0.5, seed=3)
    assert RandomPrune(config).config.seed == 3
    model = BUILDERS["llava"]("sdpa")
    inputs = single_row_inputs(model, "llava")
    kept = []
    for seed in (3, 3, 4):
        with torch.no_grad(), patch_model(model, "random", layer=2, keep_ratio=0.5, seed=seed):
            kept.append(model(**inputs).logits)
    assert torch.equal(kept[0], kept[1])
    assert not torch.equal(kept[0], kept[2])
