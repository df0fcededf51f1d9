"""InternVL (transformers ``models/internvl``): InternViT tiles → pixel shuffle → projector → Qwen2 / Llama LM.

Each image is cut into tiles (a thumbnail last), each tile gives ``image_seq_length`` ``<IMG_CONTEXT>`` tokens
between ``<img>`` and ``</img>``; ``InternVLModel.forward`` merges them with ``masked_scatter`` and calls
``self.language_model`` without ``input_ids`` (hf_internals §1.1). Multi-image prompts are consecutive runs of
context tokens, so the per-row layout from ``input_ids == image_token_id`` covers them.
"""

from vlm_accel.patches.base import FamilyAdapter

INTERNVL = FamilyAdapter(
    family="internvl",
    model_types=("internvl",),
    class_names=("InternVLForConditionalGeneration",),
)
