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


def test_the_prior_flips_only_absent_cooccurrence_partners():
    rng = np.random.default_rng(1)
    flipped = kept = 0
    for _ in range(600):
        scene, qas = sample_training_item(rng, 12, prior_yes_p=0.5)
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
                           warmup=10, pretrain_steps=2, pretrain_pool=4, pretrain_batch=2, ckpt_every=1,
                           eval_every=1000, eval_per_family=1, probe_layer=1, family_weights={"count": 2.0},
                           prior_yes_p=0.5, bg_drop_from=1, bg_keep=(0, 8), bg_full_p=0.5)  # fmt: skip

    train(cfg("straight", 3), progress=False)
    train(cfg("resumed", 2), progress=False)
    train(cfg("resumed", 3), progress=False)  # picks up resumed/checkpoint at step 2
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = json.loads((tmp_path / "resumed" / "train_log.json").read_text())
    assert log["config"]["prior_yes_p"] == 0.5 and log["log"][-1]["step"] == 3
