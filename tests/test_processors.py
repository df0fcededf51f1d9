"""Qwen2-VL / Qwen2.5-VL / InternVL processors built offline without torchvision, driving patched tiny models
through the standard processor → generate flow, and round-tripping through save_pretrained / from_pretrained."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vlm_accel import patch_model
from vlm_accel.patches.processors import (
    InternVLProcessorNoVideo,
    Qwen2_5_VLProcessorNoVideo,
    Qwen2VLProcessorNoVideo,
)

from tiny_models import IMAGE_TOKEN, VIDEO_TOKEN, tiny_internvl, tiny_qwen2_5_vl, tiny_qwen2_vl

IMG_START, IMG_END = 296, 297


def tokenizer(special: dict[int, str], extra: dict[str, str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose special tokens sit at the tiny models' ids."""
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, 300)]
    for index, token in special.items():
        words[index] = token
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="left", extra_special_tokens=extra,
    )


def image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8"))


def qwen_processor(cls):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = tokenizer({IMAGE_TOKEN: "<|image_pad|>", VIDEO_TOKEN: "<|video_pad|>"},
                    {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    return cls(image_processor=image_processor, tokenizer=tok)


def internvl_processor():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tok = tokenizer(
        {IMAGE_TOKEN: "<IMG_CONTEXT>", IMG_START: "<img>", IMG_END: "</img>", VIDEO_TOKEN: "<video>"},
        {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
         "video_token": "<video>"},
    )
    image_processor = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True,
                                               min_patches=1, max_patches=4)
    return InternVLProcessorNoVideo(image_processor=image_processor, tokenizer=tok, image_seq_length=4)


CASES = {
    "qwen2_vl": (lambda: qwen_processor(Qwen2VLProcessorNoVideo), tiny_qwen2_vl, "<|image_pad|>"),
    "qwen2_5_vl": (lambda: qwen_processor(Qwen2_5_VLProcessorNoVideo), tiny_qwen2_5_vl, "<|image_pad|>"),
    "internvl": (internvl_processor, tiny_internvl, "<IMG_CONTEXT>"),
}


@pytest.mark.parametrize("family", list(CASES))
def test_offline_processor_drives_a_patched_model(family, tmp_path):
    make_processor, build, image_token = CASES[family]
    processor = make_processor()
    processor.save_pretrained(tmp_path)
    reloaded = type(processor).from_pretrained(tmp_path)
    texts = [f"w5 w6 {image_token} w7 w8 w9", f"w10 {image_token} w11"]
    images = [image(0, (56, 56)), image(1, (56, 112))]
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
    again = reloaded(images=images, text=texts, padding=True, return_tensors="pt")
    assert all(torch.equal(inputs[k], again[k]) for k in inputs)
    n_visual = (inputs["input_ids"] == IMAGE_TOKEN).sum(1)
    assert n_visual.min() > 0 and n_visual[0] != n_visual[1], "two image sizes should give different counts"
    model = build()
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        with patch_model(model, "fastv", layer=2, keep_ratio=1.0):
            noop = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        with patch_model(model, "fastv", layer=2, keep_ratio=0.25) as patch:
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(plain, noop)
    assert patch.stats.visual_tokens_seen == int(n_visual.sum())
    assert patch.stats.visual_tokens_kept < patch.stats.visual_tokens_seen


def test_video_input_is_a_clear_error():
    processor = qwen_processor(Qwen2VLProcessorNoVideo)
    with pytest.raises(ValueError, match="images only"):
        processor(text=["w5 <|video_pad|>"], videos=[np.zeros((2, 56, 56, 3), dtype="uint8")])
