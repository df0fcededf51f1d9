"""Noisy frame sequences for temporal methods (TTF): the testbed's moving-object sequences
(:func:`~vlm_accel.testbed.dataset.make_frame_dataset`: a static scene, one object moving one cell per frame, a
question about the last frame) with controllable, seeded per-frame camera noise:

- **sensor noise**: i.i.d. Gaussian per pixel and channel, standard deviation ``sensor`` in 0–255 units;
- **flicker**: a global brightness gain per frame, uniform in ``[1 − flicker, 1 + flicker]``;
- **jitter**: a global shift per frame of up to ``jitter`` pixels on each axis (edges replicated).

Each frame draws its own noise (independent across frames and items, deterministic given the seed), so a static
patch changes from frame to frame only by noise — what TTF's pixel test must tell apart from real motion.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import numpy as np
from PIL import Image

from .dataset import make_frame_dataset


@dataclass(frozen=True)
class FrameNoise:
    """Per-frame noise: Gaussian ``sensor`` std (0–255 units), ``flicker`` gain amplitude, ``jitter`` pixels."""

    sensor: float = 0.0
    flicker: float = 0.0
    jitter: int = 0

    def __post_init__(self) -> None:
        if self.sensor < 0 or self.flicker < 0 or self.jitter < 0:
            raise ValueError(f"noise amplitudes must be >= 0, got {self}")

    @property
    def is_clean(self) -> bool:
        return self.sensor == 0 and self.flicker == 0 and self.jitter == 0


#: Noise levels used by ``benchmarks/ttf_testbed.py`` (level 0 = clean frames).
NOISE_LEVELS: dict[int, FrameNoise] = {
    0: FrameNoise(),
    1: FrameNoise(sensor=4.0, flicker=0.02),
    2: FrameNoise(sensor=8.0, flicker=0.04, jitter=1),
    3: FrameNoise(sensor=16.0, flicker=0.08, jitter=1),
    4: FrameNoise(sensor=32.0, flicker=0.12, jitter=2),
}


def _shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``image`` moved by (dy, dx) pixels, edges replicated (no wrap-around)."""
    if dy == 0 and dx == 0:
        return image
    h, w = image.shape[:2]
    pad = max(abs(dy), abs(dx))
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    return padded[pad - dy : pad - dy + h, pad - dx : pad - dx + w]


def noisy_frame(image: Image.Image, noise: FrameNoise, rng: np.random.Generator) -> Image.Image:
    """One frame with one draw of ``noise``."""
    if noise.is_clean:
        return image.copy()
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    if noise.jitter:
        dy, dx = (int(v) for v in rng.integers(-noise.jitter, noise.jitter + 1, size=2))
        pixels = _shift(pixels, dy, dx)
    if noise.flicker:
        pixels = pixels * float(rng.uniform(1.0 - noise.flicker, 1.0 + noise.flicker))
    if noise.sensor:
        pixels = pixels + rng.normal(0.0, noise.sensor, size=pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")


def noisy_frames(frames: Sequence[Image.Image], noise: FrameNoise, seed: int | Sequence[int]) -> list[Image.Image]:
    """Every frame with its own independent draw of ``noise`` (deterministic given ``seed``)."""
    rng = np.random.default_rng(seed)
    return [noisy_frame(frame, noise, rng) for frame in frames]


def make_noisy_frame_dataset(
    n: int, seed: int, noise: FrameNoise, frames: int = 6, split: str = "test"
) -> datasets.Dataset:
    """:func:`make_frame_dataset` (same scenes and questions for a given ``n, seed, frames, split``) with per-frame
    ``noise``; the noise stream depends on ``seed``, the item and the split, not on the noise level, so levels
    differ only in amplitude."""
    clean = make_frame_dataset(n, seed, frames=frames, split=split)
    salt = zlib.crc32(f"frame-noise/{split}".encode())

    def add_noise(row: dict, index: int) -> dict:
        return {"frames": noisy_frames(row["frames"], noise, (seed, salt, index))}

    return clean.map(add_noise, with_indices=True, features=clean.features, load_from_cache_file=False)


__all__ = ["NOISE_LEVELS", "FrameNoise", "make_noisy_frame_dataset", "noisy_frame", "noisy_frames"]
