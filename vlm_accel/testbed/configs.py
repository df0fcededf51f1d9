"""Model configurations of the testbed models (real ``LlavaConfig`` = ``CLIPVisionConfig`` + ``LlamaConfig``).

All share one vision tower (identical weights); testbed-s and testbed-l share one processor, ``testbed-describe``
(testbed-l's geometry and projector) adds the describe family's words to the vocabulary. ``vision_feature_layer=-2`` (as in LLaVA-1.5)
selects, for this 1-layer CLIP tower, ``hidden_states[0]``: the CLIP *embedding* output (patch embedding + position embedding + pre-LayerNorm): every visual token is a function of
its own 16×16 patch only, so background tokens carry no object information, as in real VLMs where object
information sits on object tokens. The one CLIP encoder layer exists only because the hidden-state capture needs ≥ 1 layer
(and ``vision_feature_layer=0`` is falsy, which transformers 5.23 turns into ``output_hidden_states=False``); its
output is not used and it is never trained.
"""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from .processor import IMAGE, vocabulary
from .scenes import IMAGE_SIZE, PATCH_SIZE

MODEL_NAMES: tuple[str, ...] = ("testbed-s", "testbed-l", "testbed-describe")
# models with the describe family's extended vocabulary (``processor.DESCRIBE_WORDS``); ``testbed-describe`` is
# testbed-l's architecture, fine-tuned from testbed-l's language model with testbed-l's frozen tower and projector
DESCRIBE_MODELS: tuple[str, ...] = ("testbed-describe",)

VISION_KW = dict(
    hidden_size=192,
    intermediate_size=384,
    num_hidden_layers=1,
    num_attention_heads=4,
    image_size=IMAGE_SIZE,
    patch_size=PATCH_SIZE,
    projection_dim=192,
)

TEXT_KW: dict[str, dict] = {
    "testbed-l": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=8, num_attention_heads=4,
                      num_key_value_heads=4),
    "testbed-describe": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=8, num_attention_heads=4,
                             num_key_value_heads=4),
    "testbed-s": dict(hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=4),
}  # fmt: skip


def make_config(name: str) -> LlavaConfig:
    """The ``LlavaConfig`` of a testbed model (``testbed-s``, ``testbed-l`` or ``testbed-describe``)."""
    if name not in TEXT_KW:
        raise ValueError(f"unknown testbed model {name!r}; expected one of {MODEL_NAMES}")
    vocab = vocabulary(describe=name in DESCRIBE_MODELS)
    ids = {w: i for i, w in enumerate(vocab)}
    text = LlamaConfig(
        vocab_size=len(vocab),
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<bos>"],
        eos_token_id=ids["<eos>"],
        attention_dropout=0.0,
        **TEXT_KW[name],
    )
    vision = CLIPVisionConfig(**VISION_KW)
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids[IMAGE],
        vision_feature_layer=-2,  # = hidden_states[0] of the 1-layer tower: the embeddings
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        tie_word_embeddings=False,
    )
    cfg.pad_token_id = ids["<pad>"]
    return cfg
