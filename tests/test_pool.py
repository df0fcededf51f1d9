"""The ``pool`` method: grid grouping, plans, exactness against an independent reference, batching, errors."""

from __future__ import annotations

import math

import pytest
import torch

from vlm_accel import patch_model
from vlm_accel.config import MethodConfig
from vlm_accel.methods.pool import Pool, PoolConfig, grid_groups, pool_plan

from families import BUILDERS
from inputs import RowSpec, batch_inputs, make_row
from tiny_models import IMAGE_TOKEN, tiny_llava

LAYER = 2
ATOL = 3e-5


def test_grid_groups_hand_checked():
    assert grid_groups(4, 2).tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    # a 3×3 grid pooled 2×2: edge blocks hold fewer tokens; slot 0 is always the block's first (top-left) token
    assert grid_groups(3, 2).tolist() == [[0, 1, 3, 4], [2, -1, 5, -1], [6, 7, -1, -1], [8, -1, -1, -1]]
    assert grid_groups(2, 1).tolist() == [[0], [1], [2], [3]]


def test_pool_plan_two_images_padding_and_text():
    # row 0: 1 pad, 1 text, image (4 tokens = 2×2), text, image; row 1: text, image, text ×2
    visual = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    present = torch.ones_like(visual)
    plan = pool_plan(visual, present, grid_groups(2, 2), per_image=4)
    assert plan.index.tolist() == [[-1, -1, -1, 0, 1, 2, 6, 7], [0, 1, 2, 3, 4, 8, 9, 10]]
    pad, single = [-1, -1, -1, -1], lambda p: [p, -1, -1, -1]  # noqa: E731
    assert plan.groups[0].tolist() == [pad, pad, pad, single(0), single(1), [2, 3, 4, 5], single(6), [7, 8, 9, 10]]
    assert plan.groups[1, 4].tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="not a multiple of the 4 tokens"):
        pool_plan(visual[:, :-1], present[:, :-1], grid_groups(2, 2), per_image=4)
    gapped = torch.tensor([[1, 1, 0, 1, 1]], dtype=torch.bool)
    with pytest.raises(ValueError, match="not contiguous"):
        pool_plan(gapped, torch.ones_like(gapped), grid_groups(2, 2), per_image=4)


def test_pool_plan_left_pads_rows_with_fewer_slots():
    # row 0 holds two 2×2 images and one text token; row 1 one image and five text tokens
    visual = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    plan = pool_plan(visual, torch.ones_like(visual), grid_groups(2, 2), per_image=4)
    assert plan.index.tolist() == [[-1, -1, -1, 0, 4, 8], [0, 1, 2, 3, 4, 5]]
    assert plan.groups[0, 4].tolist() == [4, 5, 6, 7] and plan.groups[1, 5].tolist() == [5, 6, 7, 8]


def test_config_validation_and_json_round_trip():
    config = PoolConfig(layer=3, factor=4)
    assert MethodConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="factor must be in"):
        PoolConfig(factor=0)
    with pytest.raises(TypeError, match="factor must be an int"):
        PoolConfig(factor=2.0)
    assert [c.factor for c in Pool.sweep_configs([0.5, 0.25, 0.1, 0.0625])] == [2, 3, 4]


def _reference_last_logits(model, inputs: dict, layer: int, factor: int) -> torch.Tensor:
    """Independent of the runtime: capture the input of layer K from the unpatched model, pool it by hand, run
    layers K.. on the shortened sequence at the kept original positions, and take the last position's logits."""
    captured = {}
    lm = model.model.language_model

    def capture(module, args, kwargs) -> None:
        captured["h"] = (args[0] if args else kwargs["hidden_states"]).clone()

    handle = lm.layers[layer].register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    hidden = captured["h"][0]
    ids = inputs["input_ids"][0]
    vis = (ids == IMAGE_TOKEN).nonzero().squeeze(1).tolist()
    side = int(len(vis) ** 0.5)
    keep, rows = [], []
    for pos in range(len(ids)):
        if pos not in vis:
            keep.append(pos)
            rows.append(hidden[pos])
            continue
        r, c = divmod(vis.index(pos), side)
        if r % factor or c % factor:
            continue  # not the first token of its block
        members = [vis[rr * side + cc] for rr in range(r, min(r + factor, side)) for cc in range(c, min(c + factor, side))]
        keep.append(pos)
        rows.append(hidden[members].mean(0))
    h = torch.stack(rows)[None]
    positions = torch.tensor([keep])
    n = len(keep)
    mask = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
    with torch.no_grad():
        cos_sin = lm.rotary_emb(h, positions)
        for decoder_layer in lm.layers[layer:]:
            h = decoder_layer(h, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
        return model.lm_head(lm.norm(h))[:, -1]


@pytest.mark.parametrize("factor", [2, 3])
def test_pooled_logits_equal_hand_pooled_reference(factor):
    model = tiny_llava("eager")
    inputs = batch_inputs(model, [make_row(model, RowSpec(prefix=3, suffix=5, seed=1))])
    expected = _reference_last_logits(model, inputs, LAYER, factor)
    with torch.no_grad(), patch_model(model, "pool", layer=LAYER, factor=factor) as patch:
        out = model(**inputs, use_cache=True)
    torch.testing.assert_close(out.logits[:, -1], expected, rtol=0, atol=ATOL)
    side = math.ceil(4 / factor)
    groups = side * side
    width = inputs["input_ids"].shape[1]
    assert patch.stats.tokens_per_layer == [width] * LAYER + [width - 16 + groups] * (4 - LAYER)
    assert patch.stats.visual_tokens_kept == groups
    assert patch.stats.kv_length_per_layer == [width] * LAYER + [width - 16 + groups] * (4 - LAYER)
    assert patch.stats.methods["pool"]["pooled_grid"] == [side, side]


def test_noop_factor_1_reproduces_unpatched_and_generate():
    model = tiny_llava("sdpa")
    rows = [make_row(model, RowSpec(prefix=p, suffix=s, seed=i)) for i, (p, s) in enumerate([(3, 5), (8, 2)])]
    inputs = batch_inputs(model, rows)
    with torch.no_grad():
        expected = model(**inputs).logits
        expected_tokens = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        with patch_model(model, Pool.noop_config()):
            got = model(**inputs).logits
            tokens = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expected[valid], rtol=0, atol=1e-6)
    assert torch.equal(tokens, expected_tokens)


def test_padded_batch_rows_give_what_they_give_alone_in_generate():
    model = tiny_llava("sdpa")
    rows = [make_row(model, RowSpec(prefix=p, suffix=s, seed=i)) for i, (p, s) in enumerate([(3, 5), (9, 2)])]
    config = PoolConfig(layer=LAYER, factor=2)
    with torch.no_grad(), patch_model(model, config):
        batch = model.generate(**batch_inputs(model, rows), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                               output_logits=True, return_dict_in_generate=True)  # fmt: skip
        for i, row in enumerate(rows):
            alone = model.generate(**batch_inputs(model, [row]), max_new_tokens=4, min_new_tokens=4,
                                   do_sample=False, output_logits=True, return_dict_in_generate=True)  # fmt: skip
            torch.testing.assert_close(
                torch.stack(batch.logits, 1)[i], torch.stack(alone.logits, 1)[0], rtol=0, atol=ATOL
            )
            assert torch.equal(batch.sequences[i, -4:], alone.sequences[0, -4:])


def test_unsupported_layouts_and_layers_raise():
    with pytest.raises(ValueError, match="anyres tiles"):
        patch_model(BUILDERS["llava_next"]("sdpa"), "pool")
    with pytest.raises(ValueError, match=r"layer must be in \[1, 3\]"):
        patch_model(tiny_llava(), "pool", layer=4)
    with pytest.raises(TypeError, match="unknown parameter"):
        patch_model(tiny_llava(), "pool", keep_ratio=0.25)
