"""The testbed training pipeline: batches, loss weighting, the planted language prior, resumability."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vlm_accel.testbed.packing import make_batch, sample_training_item
from vlm_accel.testbed.processor import vocabulary
from vlm_accel.testbed.questions import answer_for
from vlm_accel.testbed.train import TrainConfig, answer_loss, train


def test_batches_are_a_pure_function_of_seed_and_step():
    a, b = make_batch(3, 17, 2, 4), make_batch(3, 17, 2, 4)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
    assert not torch.equal(make_batch(3, 18, 2, 4).pixel_values, a.pixel_values)
    assert torch.equal(make_batch(3, 17, 2, 4, prior_yes_p=0.0).input_ids, a.input_ids)
    vocab = vocabulary()
    targets = [vocab[i] for i in a.input_ids[a.target_rows, a.target_pos].tolist()]
    assert targets[1::2] == ["<eos>"] * (len(targets) // 2)  # every answer is followed by its <eos> target
    assert a.target_family[1::2] == ["eos"] * (len(targets) // 2)


def test_without_the_prior_every_training_answer_follows_from_the_scene():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene, qas = sample_training_item(rng, 12)
        for qa in qas:
            assert qa.answer == answer_for(scene, qa.family, qa.args)


@pytest.mark.parametrize("prior_items", [0.0, 1.0])
def test_the_prior_flips_only_absent_cooccurrence_partners(prior_items):
    rng = np.random.default_rng(1)
    flipped = kept = 0
    for _ in range(600 if prior_items == 0 else 100):
        scene, qas = sample_training_item(rng, 12, prior_yes_p=0.5, prior_items=prior_items)
        assert len({qa.question for qa in qas}) == len(qas)  # never the same question twice in one conversation
        if prior_items == 1.0:  # every image is built around an anchor whose partner is absent, and asks about it
            assert any(qa.subtype == "absent_cooccur" for qa in qas)
        for qa in qas:
            truth = answer_for(scene, qa.family, qa.args)
            if qa.subtype == "absent_cooccur":
                assert truth == "no"
                flipped += qa.answer == "yes"
                kept += qa.answer == "no"
            else:
                assert qa.answer == truth
    assert flipped > 20 and kept > 20  # both outcomes occur at p = 0.5


def test_answer_loss_weights_families():
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 7), torch.tensor([1, 2, 3, 4, 5])
    fams = ["count", "eos", "color", "eos", "count"]
    assert torch.allclose(answer_loss(logits, targets, fams, {}), F.cross_entropy(logits, targets))
    per = F.cross_entropy(logits, targets, reduction="none")
    w = torch.tensor([3.0, 1, 1, 1, 3])
    assert torch.allclose(answer_loss(logits, targets, fams, {"count": 3.0}), (per * w).sum() / w.sum())


@pytest.mark.slow
def test_training_is_resumable_bit_for_bit(tmp_path):
    def cfg(out: str, steps: int) -> TrainConfig:
        return TrainConfig(model="testbed-s", out=str(tmp_path / out), steps=steps, batch_size=2, qas_per_image=2,
                           warmup=2, pretrain_steps=2, pretrain_pool=4, pretrain_batch=2, ckpt_every=1,
                           eval_every=1000, eval_per_family=1, probe_layer=1, family_weights={"count": 2.0},
                           prior_yes_p=0.5, bg_drop_from=1, bg_keep=(0, 8), bg_full_p=0.5)  # fmt: skip

    train(cfg("straight", 3), progress=False)
    stopped = cfg("resumed", 3)
    stopped.stop_at = 2
    train(stopped, progress=False)  # stops after step 2 with the 3-step schedule
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())["step"] == 2
    train(cfg("resumed", 3), progress=False)  # picks up resumed/checkpoint at step 2
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = json.loads((tmp_path / "resumed" / "train_log.json").read_text())
    assert log["config"]["prior_yes_p"] == 0.5 and log["log"][-1]["step"] == 3


def _random_eager_testbed_s():
    """testbed-s with random weights and eager attention (its attention probabilities can be returned)."""
    from transformers import LlavaForConditionalGeneration

    from vlm_accel.testbed.configs import make_config

    torch.manual_seed(0)
    config = make_config("testbed-s")
    config.text_config._attn_implementation = "eager"
    return LlavaForConditionalGeneration(config).eval()


def _input_embeddings(model, batch) -> torch.Tensor:
    """Text embeddings with the projected visual tokens scattered in, as the model's own forward builds them."""
    from vlm_accel.testbed.train import image_embeddings

    emb = model.get_input_embeddings()(batch.input_ids)
    feats = image_embeddings(model, batch.pixel_values)
    return emb.masked_scatter((batch.input_ids == model.config.image_token_id).unsqueeze(-1), feats.to(emb.dtype))


@pytest.mark.parametrize("subsampled", [False, True])
def test_counting_probe_reads_the_heads_real_attention(subsampled):
    """The probe's logits, softmaxed over its causal keys, are the model's own eager attention probabilities for
    that head at each answer-predicting position (RoPE, GQA, padding and background subsampling included)."""
    from vlm_accel.testbed.train import CountingProbe, subsample_background

    model = _random_eager_testbed_s()
    batch = make_batch(0, 5, 3, 3)
    image_id = model.config.image_token_id
    keep = subsample_background(batch, image_id, 5, 0) if subsampled else None
    layer, head = 1, 2
    probe = CountingProbe(model, layer, head)
    with torch.no_grad():
        emb = _input_embeddings(model, batch)
        mask, position_ids = batch.attention_mask, None
        if keep is not None:
            emb = torch.gather(emb, 1, keep.unsqueeze(-1).expand(-1, -1, emb.shape[-1]))
            mask = torch.gather(mask, 1, keep)
            mask[:, 1:] = mask[:, 1:].masked_fill(keep[:, 1:] == keep[:, :-1], 0)
            position_ids = keep
        out = model.model.language_model(inputs_embeds=emb, attention_mask=mask, position_ids=position_ids,
                                         output_attentions=True)  # fmt: skip
        scores, patches, causal = probe._scores(batch, image_id, keep)
    probe.remove()
    if keep is None:
        pos = batch.target_pos - 1
    else:
        new_of_old = torch.full_like(batch.input_ids, -1)
        new_of_old.scatter_(1, keep, torch.arange(keep.shape[1]).expand_as(keep).contiguous())
        pos = new_of_old[batch.target_rows, batch.target_pos - 1]
    expected = out.attentions[layer][batch.target_rows, head, pos]  # (T, L)
    got = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=1e-4)
    assert (patches >= 0).sum(-1).max() <= 256 and patches.shape == scores.shape


def test_counting_probe_loss_is_cross_entropy_to_uniform_over_bos_and_counted_tokens(monkeypatch):
    from vlm_accel.testbed.train import CountingProbe

    batch = make_batch(0, 6, 2, 12)
    n_targets, length = batch.target_pos.shape[0], batch.input_ids.shape[1]
    patches = torch.full((n_targets, length), -1)
    patches[:, 3 : 3 + 256] = torch.arange(256)
    target = batch.target_patches.clone()
    # logits 0 on <bos> and the counted tokens, -inf elsewhere: the head is exactly uniform over them
    scores = torch.full((n_targets, length), -1e4)
    scores[:, 0] = 0.0
    scores[:, 3 : 3 + 256] = torch.where(target, 0.0, -1e4)
    causal = torch.ones(n_targets, length, dtype=torch.bool)
    probe = CountingProbe.__new__(CountingProbe)
    monkeypatch.setattr(probe, "_scores", lambda *a: (scores, patches, causal), raising=False)
    counts = torch.tensor([target[i].sum().item() for i, f in enumerate(batch.target_family) if f == "count"])
    expected = torch.log(counts.float() + 1).mean()
    torch.testing.assert_close(probe.loss(batch, 0, None), expected)
    scores[:, 0] = 3.0  # all mass on <bos>: the loss grows for every question with a non-zero count
    assert probe.loss(batch, 0, None) > expected + 0.1


def test_background_subsampling_equals_masking_the_dropped_tokens():
    """Training on a shortened sequence (text + objects + some background, original position ids) gives the same
    answer logits as the full sequence with the dropped tokens hidden by the attention mask."""
    from vlm_accel.testbed.train import answer_logits, subsample_background

    model = _random_eager_testbed_s()
    batch = make_batch(0, 9, 3, 3)
    image_id = model.config.image_token_id
    keep = subsample_background(batch, image_id, 7, 0)
    with torch.no_grad():
        short, _ = answer_logits(model, batch, keep_index=keep)
        emb = _input_embeddings(model, batch)
        bsz, length = batch.input_ids.shape
        kept = torch.zeros(bsz, length, dtype=torch.bool)
        kept.scatter_(1, keep, True)
        kept &= batch.attention_mask.bool()
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        allowed = causal[None] & kept[:, None, :]
        allowed |= torch.eye(length, dtype=torch.bool)[None]  # dropped rows attend to themselves (never read)
        mask = torch.zeros(bsz, 1, length, length).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        out = model.model.language_model(inputs_embeds=emb, attention_mask=mask)
        full = model.lm_head(out.last_hidden_state[batch.target_rows, batch.target_pos - 1])
    torch.testing.assert_close(short, full.float(), atol=1e-5, rtol=1e-5)
    assert keep.shape[1] < length  # the shortened run really is shorter
