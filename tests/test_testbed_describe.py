"""The describe family in the testbed: vocabulary, dataset, training batches, the model warm start, scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from vlm_accel.testbed import build_processor, make_config, make_dataset
from vlm_accel.testbed.describe import (
    ANCHORS,
    DESCRIBE_ORDER,
    PARTNER_OF,
    parse_description,
    reference_description,
    scene_types,
)
from vlm_accel.testbed.evaluate import describe_prediction, score
from vlm_accel.testbed.packing import (
    DescribeMix,
    add_primed_question,
    answer_word_patches,
    encode_conversation,
    make_batch,
    sample_describe_item,
)
from vlm_accel.testbed.processor import DESCRIBE_WORDS, vocabulary
from vlm_accel.testbed.questions import answer_for
from vlm_accel.testbed.scenes import ALL_TYPES, Scene, build_scene
from vlm_accel.testbed.train import TrainConfig, describe_mix, load_resized


def test_describe_order_lists_every_type_once_with_each_partner_right_after_its_anchor():
    assert sorted(DESCRIBE_ORDER) == sorted(ALL_TYPES)
    for anchor, partner in PARTNER_OF.items():
        assert DESCRIBE_ORDER.index(partner) == DESCRIBE_ORDER.index(anchor) + 1


def test_extended_vocabulary_keeps_every_old_id_and_tokenizes_descriptions():
    old, new = vocabulary(), vocabulary(describe=True)
    assert new[: len(old)] == old and new[len(old) :] == list(DESCRIBE_WORDS)
    assert make_config("testbed-describe").text_config.vocab_size == len(new)
    assert make_config("testbed-l").text_config.vocab_size == len(old)
    tok = build_processor(describe=True).tokenizer
    text = "there is a red circle . is there a blue square ? red circle , blue square"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == text
    assert tok("red circle, blue square", add_special_tokens=False)["input_ids"] == tok(
        "red circle , blue square", add_special_tokens=False)["input_ids"]  # fmt: skip
    assert build_processor().tokenizer.unk_token_id in build_processor().tokenizer(text)["input_ids"]


def test_describe_dataset_answers_follow_from_the_spec():
    ds = make_dataset(24, seed=7, families=["describe", "primed"])
    assert ds["family"][:4] == ["describe", "primed", "describe", "primed"]
    assert ds["subtype"][:4] == ["natural", "present", "absent_cooccur", "absent_cooccur"]
    for r in ds:
        scene = Scene.from_json(r["spec"])
        if r["family"] == "describe":
            assert r["question"] == "list the objects ." and r["answer"] == reference_description(scene)
            assert set(parse_description(r["answer"])[0]) == {(o.color, o.shape) for o in scene.objects}
            if r["subtype"] == "absent_cooccur":
                assert any(scene.has(*a) and not scene.has(*PARTNER_OF[a]) for a in ANCHORS)
        else:
            w = r["question"].split()
            anchor, partner = (w[3], w[4]), (w[9], w[10])
            assert PARTNER_OF[anchor] == partner and scene.has(*anchor)
            assert r["answer"] == ("yes" if scene.has(*partner) else "no")
            assert r["subtype"] == ("present" if r["answer"] == "yes" else "absent_cooccur")
    with pytest.raises(ValueError, match="unknown families"):
        make_dataset(2, seed=7, families=["caption"])


def test_multi_word_answers_are_packed_word_by_word():
    scene = build_scene(np.random.default_rng(0), [("red", "circle"), ("green", "cross")])
    rng = np.random.default_rng(0)
    _, [qa] = sample_describe_item(rng, DescribeMix(absent_items=0.0, prior=0.0))
    ids, pos, fams = encode_conversation([qa])
    vocab = vocabulary(describe=True)
    assert [vocab[ids[p]] for p in pos] == [*qa.answer.split(), "<eos>"]
    assert fams == ["describe"] * len(qa.answer.split()) + ["eos"]
    assert " ".join(vocab[i] for i in ids[: pos[0]] if vocab[i] != "<image>") == (
        "<bos> user : list the objects . assistant :")  # fmt: skip
    from vlm_accel.testbed.describe import describe_qa

    masks = answer_word_patches(scene, describe_qa(scene))  # "red circle , green cross"
    patch = {(o.color, o.shape): o.patch for o in scene.objects}
    assert [m.nonzero()[0].tolist() for m in masks] == [[patch["red", "circle"]]] * 2 + [[]] + [
        [patch["green", "cross"]]] * 2  # fmt: skip


def test_describe_rows_plant_only_absent_partners_and_primed_flips_only_absent_partners():
    rng = np.random.default_rng(3)
    planted = 0
    for _ in range(300):
        scene, [qa] = sample_describe_item(rng, DescribeMix(absent_items=1.0, prior=0.5))
        mentioned = parse_description(qa.answer)[0]
        truth = scene_types(scene)
        assert [t for t in mentioned if t in truth] == truth  # every present type, in order
        for i, t in enumerate(mentioned):
            if t not in truth:  # a planted partner: absent, right after its present anchor
                assert i > 0 and PARTNER_OF.get(mentioned[i - 1]) == t
                planted += 1
    assert 100 < planted < 220  # ≈ 0.5 × (one or more anchors with absent partners) × 300
    flips = keeps = 0
    for _ in range(400):
        scene = build_scene(rng, [("red", "circle"), ("green", "cross")])
        qas = add_primed_question(scene, [], rng, DescribeMix(primed_p=1.0, primed_yes_p=0.5))
        assert qas[0].family == "primed" and answer_for(scene, "exist", ("blue", "square")) == "no"
        flips += qas[0].answer == "yes"
        keeps += qas[0].answer == "no"
    assert 150 < flips < 250 and keeps == 400 - flips
    present = build_scene(rng, [("red", "circle"), ("blue", "square")])
    assert all(add_primed_question(present, [], rng, DescribeMix(primed_p=1.0, primed_yes_p=1.0))[0].answer == "yes"
               for _ in range(5))  # fmt: skip


def test_batches_with_the_describe_mix():
    plain = make_batch(5, 2, 8, 6, 0.45, 0.5)
    assert torch.equal(plain.input_ids, make_batch(5, 2, 8, 6, 0.45, 0.5, None).input_ids)
    b = make_batch(5, 2, 8, 6, 0.45, 0.5, DescribeMix(rows=0.25))
    vocab = vocabulary(describe=True)
    first_turns = [" ".join(vocab[i] for i in row if vocab[i] not in ("<image>", "<pad>")) for row in b.input_ids.tolist()]
    assert all(t.startswith("<bos> user : list the objects . assistant :") for t in first_turns[:2])
    assert not any("list" in t for t in first_turns[2:])
    assert b.target_patches.shape == (len(b.target_family), 256)
    assert sum(f == "describe" for f in b.target_family) >= 2
    with pytest.raises(ValueError, match="prior"):
        DescribeMix(prior=1.5)
    with pytest.raises(ValueError, match="extended vocabulary"):
        describe_mix(TrainConfig(model="testbed-l", out="x", describe_rows=0.25))


def test_load_resized_copies_old_rows_and_starts_new_rows_at_their_mean():
    torch.manual_seed(0)
    small = LlavaForConditionalGeneration(make_config("testbed-l"))
    big = LlavaForConditionalGeneration(make_config("testbed-describe"))
    load_resized(big, small.state_dict())
    n = len(vocabulary())
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        old, new = small.state_dict()[key], big.state_dict()[key]
        assert torch.equal(new[:n], old)
        assert torch.allclose(new[n:], old.mean(0, keepdim=True).expand(new.shape[0] - n, -1))
    sd = small.state_dict()
    assert all(torch.equal(big.state_dict()[k], v) for k, v in sd.items() if v.shape == big.state_dict()[k].shape)
    bad = dict(sd)
    bad["lm_head.weight"] = bad["lm_head.weight"][:, :5]
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_resized(big, bad)


def test_scoring_describe_and_primed_rows_by_hand():
    rng = np.random.default_rng(0)
    s1 = build_scene(rng, [("red", "circle"), ("green", "cross")])  # anchor present, partner (blue square) absent
    s2 = build_scene(rng, [("yellow", "square")])
    d1 = describe_prediction("red circle , blue square , green cross", s1.to_json(), "absent_cooccur")
    d2 = describe_prediction("yellow square", s2.to_json(), "natural")
    assert d1["partner_mentioned"] is True and d1["correct"] is False
    assert d2["partner_mentioned"] is None and d2["correct"] is True
    rows = [
        {"family": "describe", "subtype": "absent_cooccur", "answer": "", **d1, "spec": s1.to_json()},
        {"family": "describe", "subtype": "natural", "answer": "", **d2, "spec": s2.to_json()},
        {"family": "primed", "subtype": "absent_cooccur", "answer": "no", "prediction": "yes", "correct": False},
        {"family": "primed", "subtype": "absent_cooccur", "answer": "no", "prediction": "no", "correct": True},
        {"family": "primed", "subtype": "present", "answer": "yes", "prediction": "yes", "correct": True},
    ]
    r = score(rows)
    assert r.chair_i == pytest.approx(1 / 4) and r.chair_s == pytest.approx(1 / 2) and r.recall == 1.0
    assert r.mentions == 4 and r.partner_mention_rate == 1.0
    assert r.primed_yes_rate_absent == 0.5 and r.primed_yes_rate_present == 1.0
    assert r.accuracy == {"describe": 0.5, "primed": 2 / 3}
    assert "CHAIR_I 0.250" in r.summary() and "primed yes-rate absent 0.500" in r.summary()


def test_validity_probes_differ_only_in_the_anchor():
    from vlm_accel.testbed.describe_validity import DescribeValidityReport, make_items

    items = make_items(30, seed=11)
    assert [it.scene.to_json() for it in make_items(30, seed=11)] == [it.scene.to_json() for it in items]
    for it in items:
        partner = PARTNER_OF[it.anchor]
        assert it.scene.has(*it.anchor) and not it.scene.has(*partner) and not it.unseen.has(*it.anchor)
        kept = [o for o in it.scene.objects if (o.color, o.shape) != it.anchor]
        assert [o.patch for o in it.unseen.objects] == [o.patch for o in kept]
        assert it.with_anchor == [*it.without_anchor, it.anchor]
        assert it.with_anchor == scene_types(it.scene)[: len(it.with_anchor)]

    def report(**rates):
        cells = {k: {"rate": v} for k, v in rates.items()}
        return DescribeValidityReport(cells, {}, {}, {}, {}, 0, 0)

    assert all(report(text_and_image=0.8, text_only=0.6, image_only=0.0, neither=0.0).passed().values())
    assert report(text_and_image=0.8, text_only=0.3, image_only=0.0, neither=0.0).passed() == {
        "text_alone_brings_the_partner": False, "visible_anchor_alone_does_not": True}  # fmt: skip
    assert not report(text_and_image=0.3, text_only=0.3, image_only=0.2, neither=0.0).passed()[
        "visible_anchor_alone_does_not"]  # fmt: skip
