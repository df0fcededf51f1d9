"""Helpers of the lm-eval testbed tasks: on-demand offline data (cached with ``save_to_disk``) and images."""

from __future__ import annotations

import os
from pathlib import Path

import datasets


def cache_dir() -> Path:
    """Where generated task data is cached (``$VLM_ACCEL_CACHE`` or ``~/.cache/vlm_accel``)/testbed_tasks."""
    root = os.environ.get("VLM_ACCEL_CACHE") or Path.home() / ".cache" / "vlm_accel"
    return Path(root) / "testbed_tasks"


def task_data_path(family: str, n: int, seed: int) -> Path:
    from vlm_accel.testbed.scenes import GENERATOR_VERSION

    return cache_dir() / f"{family}_n{n}_seed{seed}_v{GENERATOR_VERSION}"


def load_testbed(testbed_family: str = "color", testbed_n: int = 200, testbed_seed: int = 20261124,
                 testbed_force: bool = False, **kwargs) -> datasets.DatasetDict:  # fmt: skip
    """``custom_dataset`` of the testbed tasks: ``testbed_n`` questions of one family, generated once and cached.

    lm-eval calls it as ``custom_dataset(**metadata, **dataset_kwargs)``, and the metadata includes every model
    argument (e.g. ``seed`` of the ``random`` method) — hence the ``testbed_`` prefix and the ``**kwargs``.
    """
    family, n, seed, force = testbed_family, testbed_n, testbed_seed, testbed_force
    from vlm_accel.testbed.dataset import make_dataset

    path = task_data_path(family, int(n), int(seed))
    if path.exists() and not force:
        return datasets.load_from_disk(str(path))
    dd = datasets.DatasetDict({"test": make_dataset(int(n), int(seed), families=[family])})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    dd.save_to_disk(str(tmp))
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)
    return datasets.load_from_disk(str(path))


def doc_to_image(doc: dict) -> list:
    return [doc["image"].convert("RGB")]
