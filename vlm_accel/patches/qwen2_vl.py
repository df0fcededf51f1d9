"""Qwen2-VL and Qwen2.5-VL (transformers ``models/qwen2_vl``, ``models/qwen2_5_vl``).

M-RoPE: positions are computed once on the full prompt (``get_rope_index`` → ``[3, B, L]``; ``generate()`` passes a
4-row ``[text; t; h; w]`` layout) and the text model turns them into per-token cos/sin of shape ``[B, L, D]``
before the layer loop. After a drop the runtime gathers those cos/sin and the text position row for the kept
tokens — it never lets ``get_rope_index`` run on a shortened sequence — so kept tokens keep their 3-D positions and
``rope_deltas`` / ``mm_token_type_ids`` (owned by ``generate()``) stay consistent (hf_internals §1.3, §4.2).
Images and videos use ``image_token_id`` and ``video_token_id``.
"""

from vlm_accel.patches.base import FamilyAdapter

QWEN2_VL = FamilyAdapter(
    family="qwen2_vl",
    model_types=("qwen2_vl",),
    class_names=("Qwen2VLForConditionalGeneration",),
    visual_token_attributes=("image_token_id", "video_token_id"),
)

QWEN2_5_VL = FamilyAdapter(
    family="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    class_names=("Qwen2_5_VLForConditionalGeneration",),
    visual_token_attributes=("image_token_id", "video_token_id"),
)
