"""The ``vlm-accel`` lm-eval model: lm-eval's HF multimodal model with a vlm_accel patch applied after loading.

Model args (``--model_args`` on the CLI, or keywords in Python)::

    pretrained=testbed-l | /path/to/checkpoint | org/hub-id     (or a loaded model instance, in Python)
    method=fastv  layer=2  keep_ratio=0.25                      (the method's own config fields, by name)
    method_config={"method": "fastv", "layer": 2, ...}          (or a JSON string / file; a list composes methods)
    processor=/path                                             (optional; a ProcessorMixin in Python)

Every other keyword goes to lm-eval's ``HFMultimodalLM`` (``dtype``, ``device``, ``batch_size``, ``max_length``,
``image_token_id``, ...). ``method=none`` (the default) evaluates the unpatched model through the same code path.

The results JSON records, under ``config.vlm_accel``, the method config(s) and the patch's statistics aggregated
over the run (generate calls, visual tokens seen / kept, KV-cache bytes at the end of each generation vs. the
unpatched size, wall time inside ``generate``). lm-eval adds ``get_model_info()`` to ``results["config"]`` after
evaluation, which is the hook used here. In a data-parallel run (``accelerate launch`` / ``vlm-accel eval
--num-processes N``) the ranks' stats are merged into that block (:mod:`vlm_accel.eval.distributed`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import transformers
from lm_eval.api.registry import register_model
from lm_eval.models.hf_vlms import HFMultimodalLM

import vlm_accel
from vlm_accel.api import Patch, patch_model
from vlm_accel.config import MethodConfig, field_names
from vlm_accel.eval import distributed
from vlm_accel.registry import get_config_class

logger = logging.getLogger(__name__)

MODEL_NAME = "vlm-accel"
NO_METHOD = ("none", "", "unpatched", None)


# ---------------------------------------------------------------------------------------------- arguments


def resolve_pretrained(pretrained: Any) -> Any:
    """A testbed model name (``testbed-s`` / ``testbed-l``) becomes its packaged directory; anything else passes."""
    if not isinstance(pretrained, str):
        return pretrained
    try:
        from vlm_accel.testbed import MODEL_NAMES, model_dir
    except ImportError:  # testbed not installed / not ready: only paths and hub ids
        return pretrained
    if pretrained not in MODEL_NAMES:
        return pretrained
    path = model_dir(pretrained)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"testbed model {pretrained!r} has no weights at {path}; train and package it with "
            f"`vlm-accel testbed train` (see docs/testbed.md)"
        )
    return str(path)


def _load_method_config(value: Any) -> list[MethodConfig]:
    """``method_config``: a MethodConfig, a dict, a list of them, a JSON string, or a path to a JSON file."""
    if isinstance(value, MethodConfig):
        return [value]
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith(("{", "[")):
            path = Path(text)
            if not path.is_file():
                raise ValueError(f"method_config must be JSON or a path to a JSON file; {text!r} is neither")
            text = path.read_text()
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"method_config is not valid JSON: {err}") from None
    items = value if isinstance(value, list) else [value]
    configs = []
    for item in items:
        if isinstance(item, MethodConfig):
            configs.append(item)
        elif isinstance(item, dict):
            if "method" not in item:
                raise ValueError(f"method_config entry needs a 'method' key naming the method, got {item}")
            configs.append(MethodConfig.from_dict(item))
        else:
            raise TypeError(f"method_config entries must be dicts or MethodConfig, got {type(item).__name__}")
    if not configs:
        raise ValueError("method_config is empty")
    return configs


def split_method_args(
    method: str | None, method_config: Any, kwargs: dict[str, Any]
) -> tuple[list[MethodConfig], dict[str, Any]]:
    """Build the method config(s) and return ``(configs, remaining kwargs for HFMultimodalLM)``.

    With ``method=NAME``, keyword arguments named after fields of NAME's config class are the method's parameters
    (``layer=2,keep_ratio=0.25``); the rest belong to lm-eval. ``method=a+b`` composes: a parameter goes to the
    first method that has it (use ``method_config`` for anything finer). ``method_config`` cannot be combined with
    ``method``.
    """
    rest = dict(kwargs)
    if method_config is not None:
        if method not in NO_METHOD:
            raise ValueError("give either method=NAME (with its parameters) or method_config=JSON, not both")
        return _load_method_config(method_config), rest
    if method in NO_METHOD:
        return [], rest
    if not isinstance(method, str):
        raise TypeError(f"method must be a registered method name, got {type(method).__name__}")
    configs: list[MethodConfig] = []
    for name in method.split("+"):
        config_cls = get_config_class(name.strip())  # raises ValueError naming the known methods
        params = {key: rest.pop(key) for key in field_names(config_cls) if key in rest}
        configs.append(config_cls(**params))
    return configs, rest


# ---------------------------------------------------------------------------------------------- statistics


@dataclass
class RunStats:
    """Patch statistics aggregated over every ``generate()`` call of an evaluation."""

    generate_calls: int = 0
    rows: int = 0
    generate_time_s: float = 0.0
    kv_bytes: int = 0
    kv_bytes_unpatched: int = 0
    last_tokens_per_layer: list[int] = field(default_factory=list)

    def add(self, rows: int, seconds: float, patch: Patch | None) -> None:
        self.generate_calls += 1
        self.rows += rows
        self.generate_time_s += seconds
        if patch is not None:
            stats = patch.stats
            self.kv_bytes += stats.kv_bytes
            self.kv_bytes_unpatched += stats.kv_bytes_unpatched
            self.last_tokens_per_layer = list(stats.tokens_per_layer)

    def as_dict(self, patch: Patch | None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "generate_calls": self.generate_calls,
            "rows": self.rows,
            "generate_time_s": round(self.generate_time_s, 4),
        }
        if patch is None:
            return data
        stats = patch.stats
        data.update(
            prefill_calls=stats.prefill_calls,
            decode_calls=stats.decode_calls,
            forward_calls=stats.forward_calls,
            visual_tokens_seen=stats.visual_tokens_seen,
            visual_tokens_kept=stats.visual_tokens_kept,
            visual_keep_fraction=stats.visual_keep_fraction,
            kv_bytes=self.kv_bytes,
            kv_bytes_unpatched=self.kv_bytes_unpatched,
            kv_bytes_fraction=self.kv_bytes / self.kv_bytes_unpatched if self.kv_bytes_unpatched else 1.0,
            tokens_per_layer_last_prefill=self.last_tokens_per_layer,
            time_in_patch_s=round(stats.time_in_patch_s, 4),
            methods=stats.methods,
        )
        return data


# ---------------------------------------------------------------------------------------------- the model


@register_model(MODEL_NAME)
class VLMAccelLM(HFMultimodalLM):
    """lm-eval's ``hf-multimodal`` model, patched by vlm_accel after loading (see the module docstring)."""

    def __init__(
        self,
        pretrained: str | transformers.PreTrainedModel,
        method: str | None = None,
        method_config: Any = None,
        processor: str | transformers.ProcessorMixin | None = None,
        **kwargs: Any,
    ) -> None:
        configs, rest = split_method_args(method, method_config, kwargs)
        if processor is not None and rest.get("tokenizer") is not None:
            raise ValueError("give processor= or tokenizer=, not both (for a VLM they are the same thing)")
        tokenizer = processor if processor is not None else rest.pop("tokenizer", None)
        self.method_configs = configs
        self.run_stats = RunStats()
        self.patch: Patch | None = None
        super().__init__(resolve_pretrained(pretrained), tokenizer=tokenizer, **rest)
        distributed.adopt_accelerator_ranks(self)  # data parallel on CPU / one GPU too
        if configs:
            self.patch = patch_model(self.model, configs[0] if len(configs) == 1 else configs)
            logger.info("vlm_accel: patched %s with %s", type(self.model).__name__, self.patch)

    # lm-eval 0.4.13's HFMultimodalLM._create_tokenizer *returns* the processor when one is passed and never sets
    # self.processor / self.tokenizer (hf_internals §6.2); set both here.
    def _create_tokenizer(
        self,
        pretrained: str | transformers.PreTrainedModel,
        tokenizer: str | transformers.ProcessorMixin | None,
        revision: str | None = "main",
        trust_remote_code: bool | None = False,
        **kwargs: Any,
    ) -> None:
        if tokenizer is None or tokenizer == "":
            super()._create_tokenizer(pretrained, None, revision=revision, trust_remote_code=trust_remote_code)
            return
        if isinstance(tokenizer, str):
            self.processor = transformers.AutoProcessor.from_pretrained(
                tokenizer, revision=revision, trust_remote_code=trust_remote_code, **self.pixels
            )
        elif isinstance(tokenizer, transformers.ProcessorMixin):
            self.processor = tokenizer
        else:
            raise TypeError(
                f"processor must be a path / hub id or a transformers ProcessorMixin, got {type(tokenizer).__name__}"
            )
        if getattr(self.processor, "tokenizer", None) is None:
            raise ValueError(f"{type(self.processor).__name__} has no tokenizer; pass a full multimodal processor")
        self.tokenizer = self.processor.tokenizer

    def _model_multimodal_generate(self, inputs, max_length, stop, **generation_kwargs):
        start = time.perf_counter()
        out = super()._model_multimodal_generate(inputs, max_length, stop, **generation_kwargs)
        self.run_stats.add(int(inputs["input_ids"].shape[0]), time.perf_counter() - start, self.patch)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if self.world_size <= 1:
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        # data parallel: skip lm-eval's padding copies, then merge every rank's stats (eval/distributed.py)
        out = distributed.generate_without_padding(super().generate_until, requests, disable_tqdm)
        self.merged_stats = distributed.merge_stats(distributed.gather_objects(self.run_stats.as_dict(self.patch)))
        return out

    def vlm_accel_info(self) -> dict[str, Any]:
        """The patch config(s) and aggregated stats recorded into the results JSON."""
        return {
            "version": vlm_accel.__version__,
            "method": "+".join(c.method_name for c in self.method_configs) or "none",
            "method_config": [c.to_dict() for c in self.method_configs],
            "stats": getattr(self, "merged_stats", None) or self.run_stats.as_dict(self.patch),
        }

    def get_model_info(self) -> dict:
        """lm-eval's model info plus ``vlm_accel``; skips the hub SHA lookup for local checkpoints and offline."""
        pretrained = self.pretrained
        local = not isinstance(pretrained, str) or Path(pretrained).exists()
        if local or os.environ.get("HF_HUB_OFFLINE") == "1":
            model = self._model
            info = {
                "model_num_parameters": sum(p.numel() for p in model.parameters()),
                "model_dtype": str(model.dtype),
                "model_revision": self.revision,
                "model_sha": "",
            }
        else:
            info = super().get_model_info()
        info["vlm_accel"] = self.vlm_accel_info()
        return info
