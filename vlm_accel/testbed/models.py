"""Offline loading of the shipped testbed models (safetensors + processor files inside the package)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .configs import MODEL_NAMES

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PACKAGE_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "train_log.json",
)


def model_dir(name: str) -> Path:
    """Directory of a shipped testbed model (``testbed-s`` or ``testbed-l``) inside the package."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown testbed model {name!r}; expected one of {list(MODEL_NAMES)}")
    return WEIGHTS_DIR / name


def load_model(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a shipped testbed model and its processor offline: ``(LlavaForConditionalGeneration, LlavaProcessor)``.

    ``name`` may also be a path to a directory written by ``vlm-accel testbed train``.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(name) if name not in MODEL_NAMES and Path(name).is_dir() else model_dir(name)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(
            f"no weights at {path}; train them with `vlm-accel testbed train --model {name} --out DIR` and "
            f"package them with `vlm-accel testbed package DIR --model {name}`"
        )
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                          local_files_only=True).to(device)  # fmt: skip
    model.eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return model, processor


def package(src: str | Path, name: str) -> Path:
    """Copy the final weights + processor files of a training run into the package (``weights/<name>/``)."""
    src = Path(src)
    dst = model_dir(name)
    dst.mkdir(parents=True, exist_ok=True)
    for f in PACKAGE_FILES:
        if (src / f).exists():
            shutil.copy2(src / f, dst / f)
        elif f not in ("generation_config.json", "train_log.json"):
            raise FileNotFoundError(f"{src / f} missing; is {src} a finished training run?")
    return dst
