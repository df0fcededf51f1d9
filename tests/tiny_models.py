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


def tiny_internvl(attn: str = "sdpa", seed: int = 0):
    """InternViT (32 px tiles, patch 8, pixel-shuffle 0.5 → 4 visual tokens per tile) + Qwen2."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig

    torch.manual_seed(seed)
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=[32, 32],
            patch_size=[8, 8],
        ),
        text_config=Qwen2Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, max_position_embeddings=512,
        ),
        image_token_id=IMAGE_TOKEN, downsample_ratio=0.5,
    )
    config._attn_implementation = attn
    return InternVLForConditionalGeneration(config).eval()


def _qwen_vl(module: str, attn: str, seed: int):
    import importlib

    torch.manual_seed(seed)
    lib = importlib.import_module("transformers")
    prefix = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL"}[module]
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 4, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "in_chans": 3}
    if module == "qwen2_5_vl":
        vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64, "num_heads": 4,
                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
                  "fullatt_block_indexes": [1], "in_channels": 3}
    text = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": PAD, "bos_token_id": 1,
            "eos_token_id": 2, "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}}
    config = getattr(lib, f"{prefix}Config")(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
        vision_start_token_id=296, vision_end_token_id=297,
    )
    config._attn_implementation = attn
    return getattr(lib, f"{prefix}ForConditionalGeneration")(config).eval()


def tiny_qwen2_vl(attn: str = "sdpa", seed: int = 0):
    return _qwen_vl("qwen2_vl", attn, seed)


def tiny_qwen2_5_vl(attn: str = "sdpa", seed: int = 0):
    return _qwen_vl("qwen2_5_vl", attn, seed)


def tiny_llava_sized(attn: str = "sdpa", seed: int = 0, num_layers: int = 4, image_size: int = 32,
                     hidden_size: int = 64) -> LlavaForConditionalGeneration:
    """A tiny LLaVA with a chosen LM depth / width and image size (SGL guide pairs: same vision geometry, fewer
    or narrower layers; a different ``image_size`` gives a different visual-token count)."""
    torch.manual_seed(seed)
    text = _llama(num_layers)
    text.hidden_size = hidden_size
    config = LlavaConfig(
        vision_config=_clip(image_size), text_config=text, image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn
    return LlavaForConditionalGeneration(config).eval()
