"""Pre-generate the lm-eval task data (``vlm-accel testbed tasks``) and locate the task directory."""

from __future__ import annotations

from pathlib import Path

from ..questions import FAMILIES
from .utils import load_testbed, task_data_path

TASK_DIR = Path(__file__).resolve().parent
TASK_SEED = 20261124


def prepare(n_per_family: int = 200, seed: int = TASK_SEED, force: bool = False) -> list[Path]:
    """Generate (or reuse) the cached data of every family; returns the data directories."""
    out = []
    for fam in FAMILIES:
        load_testbed(testbed_family=fam, testbed_n=n_per_family, testbed_seed=seed, testbed_force=force)
        out.append(task_data_path(fam, n_per_family, seed))
    return out
