"""The model families under test: a builder and the row layouts that exercise each one."""

from __future__ import annotations

from collections.abc import Callable

from inputs import RowSpec
from tiny_models import tiny_llava, tiny_llava_next, tiny_llava_onevision

BUILDERS: dict[str, Callable] = {
    "llava": tiny_llava,
    "llava_next": tiny_llava_next,
    "llava_onevision": tiny_llava_onevision,
}

# Three prompts of different lengths; anyres families also get different visual-token counts per row.
_ANYRES_ROWS = [
    RowSpec(prefix=3, image_size=(32, 32), suffix=5, seed=1),
    RowSpec(prefix=6, image_size=(32, 64), suffix=2, seed=2),
    RowSpec(prefix=2, image_size=(64, 32), suffix=7, seed=3),
]
_FIXED_ROWS = [
    RowSpec(prefix=3, suffix=5, seed=1),
    RowSpec(prefix=9, suffix=2, seed=2),
    RowSpec(prefix=2, suffix=4, seed=3),
]

BATCH_ROWS: dict[str, list[RowSpec]] = {
    "llava": _FIXED_ROWS,
    "llava_next": _ANYRES_ROWS,
    "llava_onevision": _ANYRES_ROWS,
}
