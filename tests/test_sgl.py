"""SGL (small-VLM guidance + early exit) on a tiny LLaVA pair: a 4-layer large model guided by a 2-layer,
narrower guide with the same vision geometry (16 visual tokens per image).

References are independent of vlm_accel's runtime: the guide's scores from eager ``output_attentions`` on the
full sequence (prompt + generated tokens), the large model's pruned logits from the masked full-sequence reference,
and SEE's consistency score from the eager guide with the dropped visual tokens masked in every layer.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch

import vlm_accel
import vlm_accel.testbed
from vlm_accel import MethodNotApplicable, patch_model
from vlm_accel.methods.sgl import SGL, SGLConfig
from vlm_accel.methods.sgl_guide import run_guide
from vlm_accel.registry import list_methods
from vlm_accel.runtime.state import CACHE_ATTRIBUTE

from families import BATCH_ROWS
from inputs import batch_inputs, make_row, reference_position_kwargs
from reference import keep_top, masked_logits
from tiny_models import IMAGE_TOKEN, tiny_llava_sized, tiny_qwen2_vl

if "sgl" not in list_methods():
    vlm_accel.register_method("sgl", SGL)

NEW = 4
ATOL = 3e-5
# a random tiny model may generate the image placeholder id; keep generated text distinguishable from images
# for the references (the runtime itself treats it as text: no visual inputs at decode)
NO_IMAGE_TOKEN = {"suppress_tokens": [IMAGE_TOKEN]}


@functools.cache
def large(attn: str = "sdpa"):
    return tiny_llava_sized(attn, seed=0, num_layers=4)


@functools.cache
def guide(attn: str = "sdpa"):
    return tiny_llava_sized(attn, seed=1, num_layers=2, hidden_size=48)


@functools.cache
def rows():
    return [make_row(large(), spec) for spec in BATCH_ROWS["llava"]]


def batch(indices=(0, 1, 2)) -> dict:
    return batch_inputs(large(), [rows()[i] for i in indices])


def generate(model, inputs: dict, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, **NO_IMAGE_TOKEN, max_new_tokens=NEW, do_sample=False,
                              return_dict_in_generate=True, output_logits=True, **kwargs)  # fmt: skip


def visual(inputs: dict) -> torch.Tensor:
    return (inputs["input_ids"] == IMAGE_TOKEN) & inputs["attention_mask"].bool()


def eager_guide_scores(inputs: dict, sequences: torch.Tensor, eos: int | None) -> torch.Tensor:
    """Σ layers, heads, rows [last visual token, end of prompt] + every fed-back generated token before EOS."""
    model = guide("eager")
    window = inputs["input_ids"].shape[1]
    fed = sequences[:, :-1]
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(fed[:, window:])], dim=1)
    full = dict(inputs, input_ids=fed, attention_mask=mask)
    with torch.no_grad():
        out = model(**full, **reference_position_kwargs(model, full), output_attentions=True, use_cache=False)
    attn = torch.stack(out.attentions).sum(dim=(0, 2))  # [B, S, S] summed over layers and heads
    vis = visual(inputs)
    scores = torch.zeros(vis.shape)
    for b in range(vis.shape[0]):
        first = int(vis[b].nonzero().max())
        last = fed.shape[1]
        new = sequences[b, window:]
        if eos is not None and bool((new == eos).any()):
            last = window + int((new == eos).nonzero()[0])  # the EOS itself is never fed back as a live row
        scores[b] = attn[b, first:last, :window].sum(0)
    return scores


def test_noop_reproduces_the_unpatched_large_model():
    inputs = batch()
    expected = generate(large(), inputs)
    with torch.no_grad():
        expected_forward = large()(**inputs).logits
    with patch_model(large(), "sgl", guide=guide(), keep_ratio=1.0) as patch:
        got = generate(large(), inputs)
        with torch.no_grad():
            got_forward = large()(**inputs).logits
        assert patch.stats.methods["sgl"]["exited_rows"] == 0
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=0, atol=1e-6)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got_forward[valid], expected_forward[valid], rtol=0, atol=1e-6)


@pytest.mark.parametrize("stop_early", [False, True])
def test_guide_scores_equal_eager_reference(stop_early):
    inputs = batch()
    eos = None
    if stop_early:  # make row 0 finish after its second token, so finished rows must stop counting
        eos = int(generate(guide(), inputs).sequences[0, inputs["input_ids"].shape[1] + 1])
    kwargs = {"max_new_tokens": NEW, **NO_IMAGE_TOKEN} | ({"eos_token_id": eos} if eos is not None else {})
    result = run_guide(guide(), {**inputs, **kwargs}, generate=True)
    reference = eager_guide_scores(inputs, result.sequences, eos)
    vis = visual(inputs)
    torch.testing.assert_close(result.scores[vis], reference[vis], rtol=1e-5, atol=1e-5)
    if stop_early:
        assert not bool(result.answer_mask[0, 2:].any()) and bool(result.answer_mask[1:].all())


def test_large_model_keeps_the_guides_top_tokens_at_layer_k():
    inputs = batch()
    ratio, fraction = 0.25, 0.5  # K = int(4 × 0.5) = 2
    with patch_model(large(), "sgl", guide=guide(), keep_ratio=ratio, layer_fraction=fraction):
        with torch.no_grad():
            out = large()(**inputs, use_cache=True)
    record = getattr(out.past_key_values, CACHE_ATTRIBUTE)
    assert [s.layer for s in record.stages] == [2]
    window = inputs["input_ids"].shape[1]
    # a plain forward scores with the guide's prompt rows only (no answer to generate)
    prompt_only = eager_guide_scores(
        inputs, torch.cat([inputs["input_ids"], inputs["input_ids"][:, -1:]], 1), None
    )
    expected = keep_top(prompt_only, visual(inputs), ratio) & inputs["attention_mask"].bool()
    kept = record.stages[0].plan.keep_mask(window)
    assert torch.equal(kept & inputs["attention_mask"].bool(), expected)
    assert int((kept & visual(inputs)).sum(1)[0]) == math.ceil(16 * ratio)
    reference = masked_logits(large("eager"), inputs, [(2, expected)])
    torch.testing.assert_close(out.logits[expected], reference[expected], rtol=0, atol=ATOL)


def test_generate_prunes_with_prompt_and_generated_rows():
    inputs = batch()
    with patch_model(large(), "sgl", guide=guide(), keep_ratio=0.25, layer_fraction=0.5):
        got = generate(large(), inputs)
    record = getattr(got.past_key_values, CACHE_ATTRIBUTE)
    guide_seq = generate(guide(), inputs).sequences
    expected = keep_top(eager_guide_scores(inputs, guide_seq, None), visual(inputs), 0.25)
    window = inputs["input_ids"].shape[1]
    assert torch.equal(record.stages[0].plan.keep_mask(window) & visual(inputs), expected & visual(inputs))
    for step in range(NEW):
        seq = got.sequences[:, : window + step]
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(seq[:, window:])], 1)
        reference = masked_logits(
            large("eager"), dict(inputs, input_ids=seq, attention_mask=mask), [(2, expected)]
        )
        torch.testing.assert_close(got.logits[step], reference[:, -1], rtol=0, atol=ATOL)


def consistency_reference(inputs: dict, sequences: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Π p(answer) with only the top 5 % visual tokens visible in every layer (eager guide, masked reference)."""
    window = inputs["input_ids"].shape[1]
    keep = keep_top(scores, visual(inputs), 0.05)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(sequences[:, window:])], 1)
    logits = masked_logits(
        guide("eager"), dict(inputs, input_ids=sequences, attention_mask=mask), [(0, keep)]
    )
    logprobs = torch.log_softmax(logits[:, window - 1 : -1].float(), -1)
    return logprobs.gather(-1, sequences[:, window:, None]).squeeze(-1).sum(1).exp()


def test_exit_scores_match_the_paper_definitions():
    inputs = batch()
    with patch_model(large(), "sgl", guide=guide(), keep_ratio=0.25, exit_threshold=1.0) as patch:
        generate(large(), inputs)
        scores = patch.stats.methods["sgl"]["last_scores"]
    ref = generate(guide(), inputs)
    window = inputs["input_ids"].shape[1]
    logprobs = torch.log_softmax(torch.stack(ref.logits, 1), -1).gather(-1, ref.sequences[:, window:, None])
    torch.testing.assert_close(
        torch.tensor(scores["S_conf"]), logprobs.squeeze(-1).mean(1).exp(), rtol=1e-5, atol=0
    )
    guide_scores = eager_guide_scores(inputs, ref.sequences, None)
    cons = consistency_reference(inputs, ref.sequences, guide_scores)
    torch.testing.assert_close(torch.tensor(scores["S_cons"]), cons, rtol=1e-4, atol=0)
    s = 0.5 * (torch.tensor(scores["S_conf"]) + torch.tensor(scores["S_cons"]))
    torch.testing.assert_close(torch.tensor(scores["S"]), s)


def test_rows_above_threshold_return_the_guides_answer_and_skip_the_large_model():
    inputs = batch()
    with patch_model(large(), "sgl", guide=guide(), keep_ratio=0.25, exit_threshold=1.0) as patch:
        generate(large(), inputs)
        s = torch.tensor(patch.stats.methods["sgl"]["last_scores"]["S"])
    tau = float(s.sort().values[1])  # rows with the two highest S exit, the other runs in the large model
    exits = s >= tau
    assert 0 < int(exits.sum()) < 3
    guide_seq = generate(guide(), inputs).sequences
    with patch_model(large(), "sgl", guide=guide(), keep_ratio=0.25, exit_threshold=tau) as patch:
        got = generate(large(), inputs)
        stats = patch.stats.methods["sgl"]
        prefill_rows = patch.stats.visual_tokens_seen // 16
    assert stats["last_exited"] == exits.tolist()
    assert prefill_rows == int((~exits).sum())  # exited rows never reach the large model
    assert torch.equal(got.sequences[exits], guide_seq[exits])
    for b in (~exits).nonzero().flatten().tolist():
        with patch_model(large(), "sgl", guide=guide(), keep_ratio=0.25):
            alone = generate(large(), batch((b,)))
        assert torch.equal(got.sequences[b, -NEW:], alone.sequences[0, -NEW:])
        torch.testing.assert_close(
            torch.stack(got.logits)[:, b], torch.stack(alone.logits)[:, 0], rtol=0, atol=ATOL
        )
    with patch_model(large(), "sgl", guide=guide(), exit_threshold=0.0) as patch:  # everything exits
        with torch.no_grad():
            plain = large().generate(**inputs, **NO_IMAGE_TOKEN, max_new_tokens=NEW, do_sample=False)
        assert patch.stats.forward_calls == 0 and patch.stats.methods["sgl"]["exit_rate"] == 1.0
    assert torch.equal(plain, guide_seq)


def test_each_row_of_a_padded_batch_gives_what_it_gives_alone():
    inputs = batch()
    with patch_model(large(), "sgl", guide=guide(), keep_ratio=0.25, layer_fraction=0.5):
        together = generate(large(), inputs)
        for b in range(3):
            alone = generate(large(), batch((b,)))
            assert torch.equal(together.sequences[b, -NEW:], alone.sequences[0, -NEW:])
            torch.testing.assert_close(torch.stack(together.logits)[:, b], torch.stack(alone.logits)[:, 0],
                                       rtol=0, atol=ATOL)  # fmt: skip


def test_mismatched_guides_are_clear_errors():
    with pytest.raises(MethodNotApplicable, match="image_size"):
        patch_model(large(), "sgl", guide=tiny_llava_sized(image_size=64, num_layers=2))
    with pytest.raises(MethodNotApplicable, match="qwen2_vl"):
        patch_model(large(), "sgl", guide=tiny_qwen2_vl())
    with pytest.raises(ValueError, match="different"):
        patch_model(large(), "sgl", guide=large())
    with patch_model(guide(), "fastv", layer=1), pytest.raises(ValueError, match="itself patched"):
        patch_model(large(), "sgl", guide=guide())
    assert vlm_accel.get_patch(large()) is None


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"guide": None}, ValueError, "needs a guide"),
        ({"guide": 3}, TypeError, "guide must be"),
        ({"keep_ratio": 0.0}, ValueError, "keep_ratio"),
        ({"layer_fraction": 1.0}, ValueError, "layer_fraction"),
        ({"exit_threshold": 1.5}, ValueError, "exit_threshold"),
        ({"consistency_ratio": -0.1}, ValueError, "consistency_ratio"),
        ({"layer_fraction": 0.1}, ValueError, "prune layer 0"),
        ({"guide": "no-such-model"}, ValueError, "neither a model"),
    ],
)
def test_bad_parameters(params, error, match):
    params = {"guide": guide(), **params}
    with pytest.raises(error, match=match):
        patch_model(large(), "sgl", **params)


def test_json_round_trip_names_the_guide_and_needs_it_again():
    config = SGLConfig(guide=guide(), keep_ratio=0.09, layer_fraction=0.5, exit_threshold=0.7)
    data = config.to_dict()
    assert data["guide"] == guide().config._name_or_path or data["guide"] == "LlavaForConditionalGeneration"
    back = SGLConfig.from_json(config.to_json())
    assert isinstance(back.guide, str) and back.keep_ratio == 0.09 and back.exit_threshold == 0.7
    restored = back.with_guide(guide())
    assert all(getattr(restored, f.name) is getattr(config, f.name) or getattr(restored, f.name) == getattr(config, f.name)
               for f in dataclasses.fields(config))  # fmt: skip
    assert "guide=" in repr(config) and "Linear" not in repr(config)


def test_registry_drivers_use_the_testbed_guide_or_skip(monkeypatch, tmp_path):
    """example/sweep configs name the testbed guide when it is installed (patching any other model then raises
    MethodNotApplicable, which the matrix and compare skip), and raise MethodNotApplicable when it is not."""
    monkeypatch.setattr(vlm_accel.testbed, "model_dir", lambda name: tmp_path / name)
    with pytest.raises(MethodNotApplicable, match="needs a guide"):
        SGL.example_config()
    with pytest.raises(MethodNotApplicable, match="needs a guide"):
        SGL.sweep_configs([0.5])
    (tmp_path / "testbed-s").mkdir()
    (tmp_path / "testbed-s" / "model.safetensors").touch()
    assert SGL.example_config().guide == "testbed-s"
    sweep = SGL.sweep_configs([0.5, 0.25])
    assert [(c.keep_ratio, c.exit_threshold is None) for c in sweep] == [(0.5, True), (0.5, False), (0.25, True),
                                                                          (0.25, False)]  # fmt: skip
    configs = SGL.sweep_with_guide(guide(), [0.5], exit_thresholds=(0.9,))
    assert [(c.guide, c.keep_ratio, c.exit_threshold) for c in configs] == [(guide(), 0.5, 0.9)]


def test_exit_batches_are_split_per_row_where_the_visual_inputs_allow_it():
    from vlm_accel.methods.batch_rows import merge_sequences, slice_rows

    ids, mask = torch.arange(12).view(3, 4), torch.ones(3, 4)
    per_row = slice_rows({"input_ids": ids, "attention_mask": mask, "pixel_values": torch.arange(3.0)},
                         torch.tensor([0, 2]), 3)  # fmt: skip
    assert per_row["input_ids"].tolist() == [[0, 1, 2, 3], [8, 9, 10, 11]]
    assert per_row["pixel_values"].tolist() == [0.0, 2.0]
    grid = torch.tensor([[1, 2, 2], [1, 2, 4], [1, 2, 2]])  # 4, 8 and 4 patches
    qwen = slice_rows({"input_ids": ids, "pixel_values": torch.arange(16.0)[:, None], "image_grid_thw": grid},
                      torch.tensor([1]), 3)  # fmt: skip
    assert qwen["pixel_values"].flatten().tolist() == list(range(4, 12)) and qwen[
        "image_grid_thw"
    ].tolist() == [[1, 2, 4]]
    tiles = {"input_ids": ids, "pixel_values": torch.zeros(5, 3)}  # 5 tiles for 3 rows: which row owns which?
    assert slice_rows(tiles, torch.tensor([0]), 3) is None
    merged = merge_sequences(
        torch.tensor([[7, 7, 7]]), torch.tensor([1]), torch.tensor([[1, 2], [3, 4]]), pad=0
    )
    assert merged.tolist() == [[1, 2, 0], [7, 7, 7]]


@pytest.mark.parametrize("family", ["internvl", "qwen2_vl"])
def test_other_families_noop_and_early_exit(family):
    """SGL's own setting is InternVL (2B guiding 26B); Qwen2-VL has M-RoPE positions and flattened patches."""
    from families import BUILDERS

    big, small = BUILDERS[family]("sdpa", seed=0), BUILDERS[family]("sdpa", seed=1)
    inputs = batch_inputs(big, [make_row(big, spec) for spec in BATCH_ROWS[family]])
    kwargs = {"max_new_tokens": 3, "do_sample": False, "suppress_tokens": [IMAGE_TOKEN, IMAGE_TOKEN - 1]}
    with torch.no_grad():
        expected = big.generate(**inputs, **kwargs)
        guide_seq = small.generate(**inputs, **kwargs)
        with patch_model(big, "sgl", guide=small, keep_ratio=1.0):
            assert torch.equal(big.generate(**inputs, **kwargs), expected)
        with patch_model(big, "sgl", guide=small, keep_ratio=0.25, exit_threshold=1.0) as patch:
            big.generate(**inputs, **kwargs)
            s = torch.tensor(patch.stats.methods["sgl"]["last_scores"]["S"])
        exits = s >= s.sort().values[1]
        with patch_model(big, "sgl", guide=small, keep_ratio=0.25, exit_threshold=float(s.sort().values[1])):
            got = big.generate(**inputs, **kwargs)
        with patch_model(big, "sgl", guide=small, keep_ratio=0.25):
            pruned = big.generate(**inputs, **kwargs)
    assert torch.equal(got[exits], guide_seq[exits])
    assert torch.equal(got[~exits][:, -3:], pruned[~exits][:, -3:])
