"""Tiny real transformers VLMs built from configs with random weights (no downloads), plus input builders."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

VOCAB = 300
IMAGE_TOKEN = 299
VIDEO_TOKEN = 298
PAD = 0


def _llama(num_layers: int = 4) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
        max_position_embeddings=512,
    )


def _clip(image_size: int = 32) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=8,
    )


def tiny_llava(attn: str = "sdpa", seed: int = 0, num_layers: int = 4) -> LlavaForConditionalGeneration:
    """CLIP (32 px, patch 8 → 16 visual tokens) + Llama (GQA 4/2 heads)."""
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=_clip(), text_config=_llama(num_layers), image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn
    return LlavaForConditionalGeneration(config).eval()


def tiny_llava_next(attn: str = "sdpa", seed: int = 0) -> LlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    config = LlavaNextConfig(
        vision_config=_clip(), text_config=_llama(), image_token_id=IMAGE_TOKEN,
        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]], vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn
    return LlavaNextForConditionalGeneration(config).eval()


def tiny_llava_onevision(attn: str = "sdpa", seed: int = 0) -> LlavaOnevisionForConditionalGeneration:
    torch.manual_seed(seed)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8,
        ),
        text_config=Qwen2Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, max_position_embeddings=512,
        ),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]],
        vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
    )
    config._attn_implementation = attn
    return LlavaOnevisionForConditionalGeneration(config).eval()
