"""Shipped testbed models: offline loading, shared vision tower, standard generate() flow, accuracy smoke check."""

from __future__ import annotations

import pytest
import torch

from vlm_accel.testbed import MODEL_NAMES, evaluate, keep_fn, load_model, make_config, make_dataset, model_dir
from vlm_accel.testbed.evaluate import build_messages

SMOKE_SEED = 424242  # never used in training
# Chance per family: color 1/6, shape 1/5, count 1/6 (0..5), exist 1/2, position 1/4 → mean ≈ 0.26.
# Thresholds sit well above chance (and the always-"no" prior on exist) but below the shipped models' accuracy.
SMOKE_MIN_MEAN = {"testbed-l": 0.75, "testbed-s": 0.70, "testbed-describe": 0.75}


@pytest.fixture(scope="module")
def smoke_ds():
    return make_dataset(40, seed=SMOKE_SEED)


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return {name: load_model(name) for name in MODEL_NAMES}


def test_shipped_files_are_safetensors_and_small():
    total = 0
    for name in MODEL_NAMES:
        d = model_dir(name)
        assert (d / "model.safetensors").is_file()
        assert not list(d.glob("*.bin")) and not list(d.glob("*.pt"))
        for f in ("config.json", "tokenizer.json", "processor_config.json", "chat_template.jinja"):
            assert (d / f).is_file(), f
        total += sum(f.stat().st_size for f in d.iterdir())
    assert total <= 40 * 2**20


def test_unknown_model_name():
    with pytest.raises(ValueError, match="testbed-s"):
        load_model("testbed-xl")
    with pytest.raises(ValueError, match="testbed-l"):
        model_dir("nope")


def test_models_load_offline_and_share_the_vision_tower(models, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    large, proc_l = models["testbed-l"]
    small, proc_s = models["testbed-s"]
    assert type(large).__name__ == "LlavaForConditionalGeneration" == type(small).__name__
    assert large.config.text_config.num_hidden_layers >= 8
    assert small.config.text_config.num_hidden_layers < large.config.text_config.num_hidden_layers
    sl, ss = large.model.vision_tower.state_dict(), small.model.vision_tower.state_dict()
    assert sl.keys() == ss.keys() and all(torch.equal(sl[k], ss[k]) for k in sl)
    assert proc_l.tokenizer.get_vocab() == proc_s.tokenizer.get_vocab()
    assert proc_l.chat_template == proc_s.chat_template and proc_l.chat_template
    assert large.config.to_dict()["text_config"]["hidden_size"] == make_config("testbed-l").text_config.hidden_size
    describe, proc_d = models["testbed-describe"]  # testbed-l's frozen tower and projector, extended vocabulary
    for part in ("vision_tower", "multi_modal_projector"):
        a, b = getattr(large.model, part).state_dict(), getattr(describe.model, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    old = proc_l.tokenizer.get_vocab()
    assert {w: i for w, i in proc_d.tokenizer.get_vocab().items() if w in old} == old
    assert {"list", ",", "."} <= set(proc_d.tokenizer.get_vocab()) - set(old)
    assert describe.config.text_config.vocab_size == len(proc_d.tokenizer.get_vocab())


def test_standard_generate_flow(models, smoke_ds):
    model, proc = models["testbed-l"]
    rows = [smoke_ds[i] for i in range(4)]
    texts = [proc.apply_chat_template(build_messages(r["question"]), add_generation_prompt=True) for r in rows]
    inputs = proc(images=[r["image"] for r in rows], text=texts, padding=True, return_tensors="pt")
    assert inputs["pixel_values"].shape == (4, 3, 256, 256)
    assert ((inputs["input_ids"] == model.config.image_token_id).sum(-1) == 256).all()
    out = model.generate(**inputs, do_sample=False, max_new_tokens=3)
    words = [d.split()[0] if d.split() else "" for d in
             proc.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]  # fmt: skip
    vocab = set(proc.tokenizer.get_vocab())
    assert all(w in vocab for w in words)
    # batched (left-padded) answers equal one-by-one answers
    single = []
    for r, t in zip(rows, texts):
        enc = proc(images=[r["image"]], text=[t], return_tensors="pt")
        o = model.generate(**enc, do_sample=False, max_new_tokens=3)
        single.append(proc.batch_decode(o[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)[0].split()[0])
    assert single == words


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_accuracy_smoke(models, smoke_ds, name):
    model, proc = models[name]
    res = evaluate(model, proc, smoke_ds, batch_size=20)
    assert res.n == {f: 8 for f in ("color", "shape", "count", "exist", "position")}
    assert res.mean >= SMOKE_MIN_MEAN[name], res.summary()


def test_random_weights_fail_the_smoke_threshold(smoke_ds):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(make_config("testbed-s")).eval()
    _, proc = load_model("testbed-s")
    res = evaluate(model, proc, smoke_ds.select(range(20)), batch_size=20)
    assert res.mean < SMOKE_MIN_MEAN["testbed-s"]


def test_keep_masks(models, smoke_ds):
    """Keeping every visual token through the mask path reproduces the full answers; hiding all changes them."""
    model, proc = models["testbed-l"]
    sub = smoke_ds.select(range(10))
    full = evaluate(model, proc, sub, batch_size=10)
    all_kept = evaluate(model, proc, sub, batch_size=10, visual_keep=lambda r: range(256))
    assert [p["prediction"] for p in full.predictions] == [p["prediction"] for p in all_kept.predictions]
    oracle = keep_fn("oracle", 0.1)
    for r in sub:
        kept = oracle(r)
        assert len(kept) == 26 and set(r["object_patches"]) <= set(kept)
        assert not set(keep_fn("background", 0.1)(r)) & set(r["object_patches"])


def test_describe_model_describes_and_carries_the_planted_prior(models):
    """testbed-describe names almost every present object, and names the absent partner after its anchor."""
    from vlm_accel.testbed.describe_validity import run_describe_validity

    model, proc = models["testbed-describe"]
    res = evaluate(model, proc, make_dataset(20, seed=SMOKE_SEED, families=["describe"]), batch_size=20)
    assert res.recall >= 0.85 and res.partner_mention_rate >= 0.5 and res.chair_i > 0, res.summary()
    rep = run_describe_validity(model, proc, n=20, seed=SMOKE_SEED, batch_size=20)
    rates = {k: v["rate"] for k, v in rep.next_is_partner.items()}
    assert rates["text_and_image"] >= 0.5 and rates["image_only"] <= 0.1, rates
    assert rep.next_is_anchor_image_only["rate"] >= 0.8  # with the anchor left out of the text, it names the anchor
