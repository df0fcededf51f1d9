"""Faithfulness of the hallucination methods to their official code (issue #15): GIFT's per-model layers, question
span from the chat template, content-word rows and separate saliency pass; PAI's / PAINT's image-free guidance in a
doubled batch. References are written by hand from the official formulas (amazon-science/GIFT ``inference.py``,
``configs/*.yaml``; LALBJ/PAI ``CFG.py``) and never use vlm_accel's runtime."""

from __future__ import annotations

import pytest
import torch
from test_reweighting import PLACEHOLDERS, gift_edit, prompt_inputs, visual_columns

from vlm_accel import patch_model
from vlm_accel.methods.gift import GIFTConfig, resolve_layers
from vlm_accel.methods.gift_query import CLOSED_CLASS_WORDS, chat_template_offsets, content_token_mask
from vlm_accel.testbed import load_model

from families import BUILDERS
from inputs import extend_inputs
from reference import edited_reference_logits
from tiny_models import IMAGE_TOKEN

# ---- GIFT: layers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_type", "depth", "saliency", "layers"),
    [
        ("llava", 32, 11, range(12, 23)),  # configs/llava_1.5_7b.yaml
        ("llava", 40, 10, range(14, 21)),  # configs/llava_1.5_13b.yaml
        ("qwen2_vl", 28, 14, range(5, 19)),  # configs/qwen2_vl_7b.yaml
    ],
)
def test_gift_defaults_are_the_official_layer_settings(model_type, depth, saliency, layers):
    assert resolve_layers(GIFTConfig(), model_type, depth) == (saliency, layers)


def test_gift_explicit_fractions_and_small_depths_resolve_to_valid_layers():
    assert resolve_layers(GIFTConfig(layers=(0.5, 1.0), saliency_layer=0.25), "llava", 32) == (8, range(16, 32))
    for depth in (1, 2, 3, 5):
        saliency, layers = resolve_layers(GIFTConfig(), "llava", depth)
        assert 0 <= saliency < depth and len(layers) >= 1 and 0 <= layers.start < layers.stop <= depth


# ---- GIFT: question span and content words ----------------------------------------------------------------


@pytest.fixture(scope="module")
def testbed():
    return load_model("testbed-s")


def test_gift_query_span_offsets_come_from_the_chat_template(testbed):
    _, processor = testbed
    # the testbed template is "user : <image> {question} assistant :" → nothing between image and question,
    # two template tokens ("assistant", ":") after it
    assert chat_template_offsets(processor) == (0, 2)
    config = GIFTConfig(processor=processor)
    assert (config.query_head, config.query_tail) == (0, 2)
    assert "processor" not in config.to_dict() and GIFTConfig.from_json(config.to_json()).query_tail == 2
    with pytest.raises(TypeError, match="chat template"):
        chat_template_offsets(object())


def test_gift_closed_class_filter_keeps_the_content_words(testbed):
    _, processor = testbed
    ids = processor.tokenizer("is there a red circle ?", add_special_tokens=False)["input_ids"]
    assert content_token_mask(ids, processor.tokenizer, None) == [False, False, False, True, True, False]
    assert {"is", "there", "a", "the", "of", "and"} <= CLOSED_CLASS_WORDS
    assert not {"red", "circle", "left", "two", "how"} & CLOSED_CLASS_WORDS


def test_gift_spacy_filter_when_installed(testbed):
    pytest.importorskip("spacy")
    from vlm_accel.methods.gift_query import load_spacy

    nlp = load_spacy()
    if nlp is None:
        pytest.skip("spaCy is installed without en_core_web_sm")
    _, processor = testbed
    ids = processor.tokenizer("is there a red circle ?", add_special_tokens=False)["input_ids"]
    assert content_token_mask(ids, processor.tokenizer, nlp) == [False, False, False, True, True, False]


def official_log_multiplier(attn: torch.Tensor, visual: torch.Tensor, rows: list[list[int]], alpha: float):
    """``inference.py::process_attention_maps`` + ``compute_attention_heatmap`` by hand, per batch row: Δ over the
    given query rows (each minus the row before it), top-H/2 heads by ΣΔ, mean, 3σ clip, min-max, ×α."""
    log_m = torch.zeros(visual.shape)
    for b, chosen in enumerate(rows):
        delta = (attn[b][:, chosen] - attn[b][:, [r - 1 for r in chosen]]).clamp(min=0)[:, :, visual[b]]
        heads = delta.sum((1, 2)).topk(attn.shape[1] // 2).indices
        s = delta[heads].mean((0, 1))
        s = s.clamp(s.mean() - 3 * s.std(), s.mean() + 3 * s.std())
        spread = s.max() - s.min()  # the official code divides by 0 here (NaN); the method leaves such a map at 0
        log_m[b, visual[b]] = alpha * (s - s.min()) / spread if spread > 0 else 0.0
    return log_m


def test_gift_on_the_testbed_uses_the_template_span_and_content_rows(testbed):
    model, processor = testbed
    question = "is there a red circle ?"
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True,
    )
    from PIL import Image

    image = Image.new("RGB", (64, 64), (200, 30, 30))
    inputs = dict(processor(images=[image], text=[text], return_tensors="pt"))
    ids = inputs["input_ids"]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    visual = ids == image_id
    last = int(visual[0].nonzero().max())
    span = torch.zeros_like(visual)
    span[0, last + 1 : ids.shape[1] - 2] = True  # the question, without "assistant :"
    content = [last + 4, last + 5]  # "red", "circle"
    with torch.no_grad(), patch_model(model, "gift", alpha=5.0, processor=processor, content_words="closed_class") as p:
        got = model(**inputs).logits
        method = p.methods[0]
    saliency, layers = method.saliency_index, list(method.layers)
    assert method.separate_pass  # 3 layers: saliency 1, boost [1]
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            attn = model(**inputs, output_attentions=True).attentions[saliency]
        log_m = official_log_multiplier(attn, visual, [content], 5.0)
        edits = dict.fromkeys(layers, gift_edit(log_m, span, visual))
        reference = edited_reference_logits(model, inputs, edits)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-4)


# ---- GIFT: separate saliency pass -------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_gift_boosting_at_or_before_the_saliency_layer_runs_a_separate_pass(family):
    """The official Qwen2-VL shape (saliency 14 inside boost 5–18) on a 4-layer model: saliency 2, boost 1–3."""
    inputs = prompt_inputs(family)
    model = BUILDERS[family]("sdpa")
    with torch.no_grad(), patch_model(model, "gift", alpha=4.0, saliency_layer=0.5, layers=(0.25, 1.0),
                                      query_tail=1) as patch:  # fmt: skip
        forward = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True,
                             suppress_tokens=PLACEHOLDERS, return_dict_in_generate=True)  # fmt: skip
    method = patch.methods[0]
    assert (method.saliency_index, list(method.layers), method.separate_pass) == (2, [1, 2, 3], True)
    eager = BUILDERS[family]("eager")
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    visual = (ids == IMAGE_TOKEN) & mask
    window = ids.shape[1]
    span = torch.zeros_like(visual)
    rows = []
    for b in range(ids.shape[0]):
        last = int(visual[b].nonzero().max())
        span[b, last + 1 : window - 1] = True
        rows.append(list(range(last + 1, window - 1)))
    with torch.no_grad():  # the pass is an unedited prefill: the plain model's attention
        attn = eager(**inputs, output_attentions=True).attentions[2]
    log_m = official_log_multiplier(attn, visual, rows, 4.0)
    columns = visual_columns(inputs, window + 3)
    edits = dict.fromkeys([1, 2, 3], gift_edit(log_m, span, columns))
    reference = edited_reference_logits(eager, inputs, edits)
    torch.testing.assert_close(forward[mask], reference[mask], rtol=0, atol=1e-4)
    for step in range(3):
        step_inputs = extend_inputs(inputs, out.sequences[:, : window + step])
        reference = edited_reference_logits(eager, step_inputs, edits, first_row=window - 1)
        torch.testing.assert_close(out.logits[step], reference[:, -1], rtol=0, atol=1e-4)


# ---- PAI / PAINT: image-free guidance in a doubled batch --------------------------------------------------


def official_guidance(cond: torch.Tensor, uncond: torch.Tensor, gamma: float) -> torch.Tensor:
    """``CFG.py::CFGLogits`` by hand: γ·(ℓ_c − ℓ_u) + ℓ_u, −inf below log(0.1) + max ℓ_c."""
    lc, lu = torch.log_softmax(cond.float(), -1), torch.log_softmax(uncond.float(), -1)
    out = gamma * (lc - lu) + lu
    return torch.where(lc < lc.max(-1, keepdim=True).values + torch.log(torch.tensor(0.1)), float("-inf"), out)


def suppressed(logits: torch.Tensor, eos: int | list[int] | None) -> torch.Tensor:
    """What generate's own processors do before the guidance: suppress_tokens, and min_new_tokens on EOS."""
    out = logits.clone()
    out[..., PLACEHOLDERS] = float("-inf")
    if eos is not None:
        out[..., eos] = float("-inf")
    return out


@pytest.mark.parametrize(("family", "method", "alpha"), [("llava", "pai", 0.6), ("qwen2_vl", "pai", 0.6),
                                                         ("llava", "paint", 1.0)])  # fmt: skip
def test_image_free_guidance_runs_in_one_doubled_forward_and_equals_cfg(family, method, alpha):
    inputs = prompt_inputs(family)
    model = BUILDERS[family]("sdpa")
    steps, gamma = 3, 1.5
    extra = {"summary_layer": -1} if method == "paint" else {}
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape[0]), with_kwargs=True)
    with torch.no_grad(), patch_model(model, method, alpha=alpha, layers=(0.25, 1.0), gamma=gamma, **extra):
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_scores=True,
                             output_logits=True, suppress_tokens=PLACEHOLDERS, return_dict_in_generate=True)  # fmt: skip
    hook.remove()
    batch, window = inputs["input_ids"].shape
    assert calls == [2 * batch] * steps  # one forward per step, image and image-free rows together
    assert out.sequences.shape == (batch, window + steps) and out.past_key_values is None
    # the image-free branch: each prompt without its image tokens (unpadded), plus the generated tokens, unpatched
    plain = BUILDERS[family]("sdpa")
    eos = model.generation_config.eos_token_id
    for step in range(steps):
        # conditional: the patched model's own logits at this step (its intervention is tested elsewhere)
        cond = suppressed(out.logits[step], eos)
        for b in range(batch):
            keep = inputs["attention_mask"][b].bool() & (inputs["input_ids"][b] != IMAGE_TOKEN)
            ids = torch.cat([inputs["input_ids"][b][keep], out.sequences[b, window : window + step]])[None]
            with torch.no_grad():
                uncond = suppressed(plain(input_ids=ids).logits[:, -1], eos)
            expected = official_guidance(cond[b : b + 1], uncond, gamma)
            finite = torch.isfinite(expected)
            assert torch.equal(finite, torch.isfinite(out.scores[step][b : b + 1]))
            torch.testing.assert_close(out.scores[step][b : b + 1][finite], expected[finite], rtol=0, atol=1e-4)
        assert torch.equal(out.sequences[:, window + step], out.scores[step].argmax(-1))


def test_image_free_guidance_is_on_by_default_and_refuses_sampling():
    from vlm_accel.methods.pai import PAIConfig
    from vlm_accel.methods.paint import PAINTConfig

    assert PAIConfig().gamma == 1.1 and PAINTConfig().gamma == 1.1
    inputs = prompt_inputs("llava", batch=1)
    model = BUILDERS["llava"]("sdpa")
    with patch_model(model, "pai"), pytest.raises(ValueError, match="greedy decoding only"):
        model.generate(**inputs, max_new_tokens=2, do_sample=True)
