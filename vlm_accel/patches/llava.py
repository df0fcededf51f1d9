"""LLaVA, LLaVA-NeXT and LLaVA-OneVision (transformers ``models/llava*``).

All three merge visual features into ``inputs_embeds`` in ``<Family>Model.forward`` and call
``self.language_model`` (a Llama / Mistral / Qwen2 text model) without ``input_ids`` (hf_internals §1.1).
NeXT/OneVision anyres images give different visual-token counts per row (newline tokens carry the image id);
OneVision videos use ``video_token_id``.
"""

from vlm_accel.patches.base import FamilyAdapter

LLAVA = FamilyAdapter(
    family="llava",
    model_types=("llava",),
    class_names=("LlavaForConditionalGeneration",),
)

LLAVA_NEXT = FamilyAdapter(
    family="llava_next",
    model_types=("llava_next",),
    class_names=("LlavaNextForConditionalGeneration",),
)

LLAVA_ONEVISION = FamilyAdapter(
    family="llava_onevision",
    model_types=("llava_onevision",),
    class_names=("LlavaOnevisionForConditionalGeneration",),
    visual_token_attributes=("image_token_id", "video_token_id"),
)
