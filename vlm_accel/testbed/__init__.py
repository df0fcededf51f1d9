"""The embedded testbed: a procedural visual-QA benchmark and small trained LLaVA models shipped in the package.

Public API::

    from vlm_accel.testbed import make_dataset, load_model, evaluate
    model, processor = load_model("testbed-l")          # offline, safetensors inside the package
    ds = make_dataset(200, seed=1234)                   # datasets.Dataset: image, question, answer, family, spec, ...
    print(evaluate(model, processor, ds).summary())     # standard chat-template → generate() flow

See ``docs/testbed.md``.
"""

from __future__ import annotations

from .configs import MODEL_NAMES, make_config
from .dataset import make_dataset, make_frame_dataset
from .evaluate import EvalResult, evaluate
from .models import load_model, model_dir
from .processor import build_processor
from .questions import FAMILIES
from .validity import ValidityReport, keep_fn, run_validity

__all__ = [
    "FAMILIES",
    "MODEL_NAMES",
    "EvalResult",
    "ValidityReport",
    "build_processor",
    "evaluate",
    "keep_fn",
    "load_model",
    "make_config",
    "make_dataset",
    "make_frame_dataset",
    "model_dir",
    "run_validity",
]
