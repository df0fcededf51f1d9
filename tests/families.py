"""The model families under test: a builder and the row layouts that exercise each one.

Every model type vlm_accel supports must have a builder here (``test_every_supported_family_has_a_builder``).
"""

from __future__ import annotations

from collections.abc import Callable

from inputs import RowSpec
from tiny_models import (
    tiny_internvl,
    tiny_llava,
    tiny_llava_next,
    tiny_llava_onevision,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
)

BUILDERS: dict[str, Callable] = {
    "llava": tiny_llava,
    "llava_next": tiny_llava_next,
    "llava_onevision": tiny_llava_onevision,
    "internvl": tiny_internvl,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
}

# Three prompts of different lengths; except for LLaVA-1.5 (fixed 16 tokens) the image sizes also give
# different visual-token counts per row, so keep plans are padded.
_VARIABLE_ROWS = [
    RowSpec(prefix=3, image_size=(32, 32), suffix=5, seed=1),
    RowSpec(prefix=6, image_size=(32, 64), suffix=2, seed=2),
    RowSpec(prefix=2, image_size=(64, 32), suffix=7, seed=3),
]
_FIXED_ROWS = [
    RowSpec(prefix=3, suffix=5, seed=1),
    RowSpec(prefix=9, suffix=2, seed=2),
    RowSpec(prefix=2, suffix=4, seed=3),
]

BATCH_ROWS: dict[str, list[RowSpec]] = {name: _VARIABLE_ROWS for name in BUILDERS} | {"llava": _FIXED_ROWS}
