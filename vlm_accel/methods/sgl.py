"""SGL — Zhao et al., "A Stitch in Time Saves Nine: Small VLM is a Precise Guidance for Accelerating Large VLMs"
(CVPR 2025, arXiv 2412.03324; official code ``NUS-HPC-AI-Lab/SGL``).

Two parts (methods.md §1):

- **SGP** (§3.2): a small *guide* VLM answers the question first (greedy) and scores every visual token by the
  attention it received, summed over all its layers, heads, the prompt rows from the last visual token on and every
  generated row (:mod:`vlm_accel.methods.sgl_guide`). The large model keeps, from layer ``K = int(L · λ)`` on,
  the top ``ceil(ρ · N_V)`` visual tokens by that score, at their original positions (official ``if idx == K``
  block: ``position_ids = keep_indexs``); decode runs over the pruned KV of layers ≥ K.
- **SEE** (§3.3): ``S = ½ (S_conf + S_cons)``; rows with ``S ≥ τ`` return the guide's answer and never run in the
  large model. τ has no default in the paper (swept to reach target exit ratios); ``exit_threshold=None`` never
  exits. The released code only logs both scores; the branch is implemented here as the paper describes it.

Defaults are the official argparse defaults (``large_model_prune_layer`` λ = 0.3, ``large_model_prune_ratio``
ρ = 0.3, ``consistency_token_ratio`` = 0.05); the paper's 9 % operating point on InternVL2-26B is λ ≈ 0.04, ρ = 0.05.

Deviations (docs/methods/sgl.md): batch > 1 with left padding (the official code asserts batch 1); ``S_cons``'s
pruning before layer 0 is done in a separate cache-free forward of the guide (the runtime itself never shortens
layer 0); a plain ``model(...)`` forward (no generation) scores with the
guide's prompt rows only, since there is no answer to generate; ``K`` must be ≥ 1.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import DynamicCache

from vlm_accel.config import MethodConfig, check_number, check_ratio
from vlm_accel.errors import MethodNotApplicable
from vlm_accel.methods.base import KIND_SELECTION, Method
from vlm_accel.methods.batch_rows import merge_sequences, merge_step_tensors, slice_rows
from vlm_accel.methods.sgl_guide import GuideResult, consistency_score, eos_ids, run_guide
from vlm_accel.runtime.plan import KeepPlan, keep_counts_from_ratio, top_visual_keep_mask
from vlm_accel.runtime.state import ForwardState

GUIDE_SCORES_ATTRIBUTE = "_vlm_accel_sgl_guide_scores"

# Config attributes that decide how many visual tokens an image becomes and where they go: guide and large model
# must agree on all of them (SGL §3.1 "same visual-token layout"; the official code asserts equal token counts).
_GEOMETRY_KEYS = ("image_token_id", "video_token_id", "image_token_index", "vision_feature_select_strategy",
                  "image_grid_pinpoints", "image_seq_length", "downsample_ratio", "vision_aspect_ratio",
                  "mm_tokens_per_image")  # fmt: skip
_VISION_GEOMETRY_KEYS = ("image_size", "patch_size", "spatial_merge_size", "temporal_patch_size")


@dataclass
class SGLConfig(MethodConfig):
    """``guide``: the small VLM (a model object; or, e.g. after a JSON round-trip, a testbed name or a local model
    directory, loaded at patch time). ``keep_ratio`` ρ ∈ (0, 1]: share of visual tokens kept from layer
    ``int(L × layer_fraction)`` on. ``exit_threshold`` τ ∈ [0, 1] or None (never exit). ``consistency_ratio`` ρ_c:
    share of visual tokens the consistency pass keeps.

    JSON: the guide is written as its ``name_or_path`` (a model object cannot be serialised); a config read back
    holds that string, so pass the model again (``config.with_guide(model)``) unless it names a testbed model or a
    local directory.
    """

    method_name: ClassVar[str] = "sgl"
    guide: Any = field(default=None, repr=False)
    keep_ratio: float = 0.3
    layer_fraction: float = 0.3
    exit_threshold: float | None = None
    consistency_ratio: float = 0.05

    def validate(self) -> None:
        if self.guide is None:
            raise ValueError("sgl needs a guide model: patch_model(large, 'sgl', guide=small_model, ...)")
        if not isinstance(self.guide, nn.Module | str):
            raise TypeError(
                f"guide must be a model (or a model name / directory), got {type(self.guide).__name__}"
            )
        check_ratio("keep_ratio", self.keep_ratio)
        fraction = check_number("layer_fraction", self.layer_fraction)
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"layer_fraction must be in (0, 1), got {fraction}")
        if self.exit_threshold is not None:
            tau = check_number("exit_threshold", self.exit_threshold)
            if not 0.0 <= tau <= 1.0:
                raise ValueError(
                    f"exit_threshold must be in [0, 1] (S is an average of probabilities) or None, got {tau}"
                )
        check_ratio("consistency_ratio", self.consistency_ratio)

    def label(self) -> str:
        return "sgl" if self.exit_threshold is None else f"sgl+exit(τ={self.exit_threshold:g})"

    @property
    def guide_name(self) -> str:
        if isinstance(self.guide, str):
            return self.guide
        return str(getattr(self.guide.config, "_name_or_path", "") or type(self.guide).__name__)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["guide"] = self.guide_name
        return {"method": self.method_name, **data}

    def with_guide(self, guide: nn.Module) -> SGLConfig:
        """This config with ``guide`` set to a model object (after reading it back from JSON)."""
        return dataclasses.replace(self, guide=guide)

    def __repr__(self) -> str:
        return (f"SGLConfig(guide={self.guide_name!r}, keep_ratio={self.keep_ratio}, layer_fraction="
                f"{self.layer_fraction}, exit_threshold={self.exit_threshold}, consistency_ratio="
                f"{self.consistency_ratio})")  # fmt: skip


def resolve_guide(guide: nn.Module | str) -> nn.Module:
    """A guide model object from a config value: a model, a testbed model name, or a local model directory."""
    if isinstance(guide, nn.Module):
        return guide
    from vlm_accel.testbed import MODEL_NAMES

    if guide in MODEL_NAMES:
        return _load_testbed(guide)
    if Path(guide).is_dir():
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText.from_pretrained(guide, local_files_only=True).eval()
    raise ValueError(
        f"sgl: guide {guide!r} is neither a model, a testbed model name nor a local model directory; pass the guide "
        "model object (e.g. config.with_guide(model) after reading a config from JSON)"
    )


@functools.lru_cache(maxsize=2)
def _load_testbed(name: str) -> nn.Module:
    from vlm_accel.testbed import load_model

    return load_model(name)[0]


def check_guide(large: nn.Module, guide: nn.Module) -> None:
    """Raise ``MethodNotApplicable`` (a ``ValueError``) unless ``guide`` turns the same inputs into the same visual-token layout as ``large``."""
    from vlm_accel.api import get_patch
    from vlm_accel.patches import adapter_for

    if guide is large:
        raise ValueError("sgl: the guide must be a different (smaller) model than the one being patched")
    if get_patch(guide) is not None:
        raise ValueError("sgl: the guide model is itself patched by vlm_accel; unpatch it first")
    adapter_for(guide)
    if guide.config.model_type != large.config.model_type:
        raise MethodNotApplicable(
            f"sgl: guide is a {guide.config.model_type!r} model but the large model is {large.config.model_type!r}; "
            "SGL needs both to produce the same visual-token layout (same family, vision geometry and processor)"
        )
    diffs = []
    for key in _GEOMETRY_KEYS:
        a, b = getattr(large.config, key, None), getattr(guide.config, key, None)
        if a != b:
            diffs.append(f"{key}: large {a!r} vs guide {b!r}")
    large_vision, guide_vision = (
        getattr(large.config, "vision_config", None),
        getattr(guide.config, "vision_config", None),
    )
    for key in _VISION_GEOMETRY_KEYS:
        a, b = getattr(large_vision, key, None), getattr(guide_vision, key, None)
        if a != b:
            diffs.append(f"vision_config.{key}: large {a!r} vs guide {b!r}")
    large_vocab = large.get_output_embeddings().weight.shape[0]
    guide_vocab = guide.get_output_embeddings().weight.shape[0]
    if large_vocab != guide_vocab:
        diffs.append(f"vocabulary size: large {large_vocab} vs guide {guide_vocab}")
    if diffs:
        raise MethodNotApplicable(
            "sgl: the guide's visual-token layout does not match the large model's (SGL transfers token indices, "
            "so both must tile and tokenize images identically and share a tokenizer): " + "; ".join(diffs)
        )


#: SEE threshold used by ``vlm-accel compare`` on the testbed (measured: see docs/methods/sgl.md)
TESTBED_EXIT_THRESHOLD = 0.9997


def _testbed_guide() -> str:
    """The testbed guide's name, or ``MethodNotApplicable`` when its weights are not installed."""
    from vlm_accel.testbed import model_dir

    if not (model_dir("testbed-s") / "model.safetensors").is_file():
        raise MethodNotApplicable(
            "sgl needs a guide model: patch_model(large, 'sgl', guide=small, ...); the testbed guide testbed-s is "
            "not installed"
        )
    return "testbed-s"


class SGL(Method):
    """Small-VLM-guided pruning (SGP) with small-VLM early exit (SEE); see the module docstring."""

    config_cls = SGLConfig
    changes_length = True
    kind_rank = KIND_SELECTION
    generate_rank = 10  # outside every wrapper but the image-free guidance (rank 20)
    config: SGLConfig

    def __init__(self, config: SGLConfig) -> None:
        super().__init__(config)
        self.guide: nn.Module | None = None
        self.layer = 0
        self._stats: dict[str, Any] = {"calls": 0, "rows": 0, "exited_rows": 0, "guide_time_s": 0.0}

    # ------------------------------------------------------------------------------------------ registry hooks

    @classmethod
    def example_config(cls) -> SGLConfig:
        """``testbed-s`` guiding (the testbed pair; on any other model patching raises ``MethodNotApplicable``)."""
        return SGLConfig(guide=_testbed_guide(), keep_ratio=0.25, layer_fraction=0.25)

    @classmethod
    def noop_config(cls) -> SGLConfig | None:
        return None  # a no-op needs a matching guide too: SGLConfig(guide=small, keep_ratio=1.0) (tests/test_sgl.py)

    @classmethod
    def sweep_configs(cls, keep_ratios) -> list[MethodConfig]:
        """``vlm-accel compare`` on the testbed: ``testbed-s`` guiding, each keep ratio without and with early exit
        (τ = ``TESTBED_EXIT_THRESHOLD``: about half of the testbed questions exit with the shipped pair)."""
        return cls.sweep_with_guide(
            _testbed_guide(), keep_ratios, (None, TESTBED_EXIT_THRESHOLD), layer_fraction=0.25
        )

    @classmethod
    def sweep_with_guide(
        cls,
        guide: nn.Module | str,
        keep_ratios,
        exit_thresholds: tuple[float | None, ...] = (None,),
        **params: Any,
    ) -> list[SGLConfig]:
        """``vlm-accel compare`` settings once a guide is known: every keep ratio × exit threshold."""
        return [SGLConfig(guide=guide, keep_ratio=r, exit_threshold=t, **params) for r in keep_ratios
                for t in exit_thresholds]  # fmt: skip

    # ------------------------------------------------------------------------------------------ binding

    def bind(self, ctx) -> None:
        super().bind(ctx)
        self.guide = resolve_guide(self.config.guide)
        check_guide(ctx.model, self.guide)
        self.layer = int(ctx.num_layers * self.config.layer_fraction)
        if not 1 <= self.layer <= ctx.num_layers - 1:
            lowest = 1 / ctx.num_layers
            raise ValueError(
                f"sgl: layer_fraction {self.config.layer_fraction} gives prune layer {self.layer} for this "
                f"{ctx.num_layers}-layer model; it must be in [1, {ctx.num_layers - 1}] (layer_fraction ≥ {lowest:.3g})"
            )

    # ------------------------------------------------------------------------------------------ guide pass

    def _run_guide(self, kwargs: dict[str, Any], generate: bool) -> GuideResult:
        start = time.perf_counter()
        try:
            result = run_guide(self.guide, kwargs, generate, output_scores=bool(kwargs.get("output_scores")))
        except ValueError as err:
            raise ValueError(
                f"sgl: the guide could not run on the large model's inputs ({err}); guide and large model must "
                "produce the same visual-token layout"
            ) from err
        self._stats["guide_time_s"] += time.perf_counter() - start
        return result

    def exit_scores(self, kwargs: dict[str, Any], result: GuideResult) -> dict[str, torch.Tensor]:
        """SEE's ``S_conf``, ``S_cons`` and ``S`` per row (SGL §3.3)."""
        conf = result.confidence
        cons = consistency_score(self.guide, kwargs, result, self.config.consistency_ratio)
        return {"S_conf": conf, "S_cons": cons, "S": 0.5 * (conf + cons.to(conf))}

    def on_forward_start(self, state: ForwardState, inputs: dict[str, Any]) -> None:
        if not state.is_prefill or not state.layout.any_visual:
            return
        cache = inputs.get("past_key_values")
        scores = getattr(cache, GUIDE_SCORES_ATTRIBUTE, None)
        if scores is not None:  # this generation's guide pass left its scores on the cache (see _with_scores)
            delattr(cache, GUIDE_SCORES_ATTRIBUTE)
        else:  # a plain forward: no answer to generate, prompt rows only
            if inputs.get("input_ids") is None:
                raise ValueError(
                    "sgl: the guide re-runs the same prompt and needs input_ids, which this forward did not hand to "
                    "the base model by keyword (inputs_embeds only, or a family passing input_ids positionally); "
                    "use model.generate(...), which SGL wraps"
                )
            scores = self._run_guide(inputs, generate=False).scores
        if scores.shape != state.layout.visual.shape:
            raise ValueError(
                f"sgl: guide scores cover {tuple(scores.shape)} positions but the large model's prompt is "
                f"{tuple(state.layout.visual.shape)}"
            )
        state.generation_state(self)["scores"] = scores.to(state.layout.visual.device)

    def _check_layout(self, result: GuideResult, kwargs: dict[str, Any]) -> None:
        from vlm_accel.patches import adapter_for
        from vlm_accel.runtime.layout import VisualLayout

        ids = adapter_for(self.ctx.model).visual_token_ids(self.ctx.model)
        layout = VisualLayout.from_input_ids(kwargs["input_ids"], ids, kwargs.get("attention_mask"))
        if not torch.equal(layout.visual.cpu(), result.visual.cpu()):
            raise ValueError(
                "sgl: the guide sees visual tokens at other positions than the large model "
                f"(per-row counts {result.visual.sum(1).tolist()} vs {layout.visual.sum(1).tolist()})"
            )

    # ------------------------------------------------------------------------------------------ pruning

    def select(self, layer: int, state: ForwardState) -> KeepPlan | None:
        scores = state.generation_state(self).get("scores")
        if layer != self.layer or not state.is_prefill or scores is None:
            return None
        visual = state.layout.visual
        counts = keep_counts_from_ratio(visual.sum(dim=1), self.config.keep_ratio)
        present = state.present_mask()
        keep = top_visual_keep_mask(scores, visual & present, present, counts)
        if bool((keep == present).all()):
            return None  # nothing to drop (ρ = 1): leave the sequence as it is
        return KeepPlan.from_keep_mask(keep)

    # ------------------------------------------------------------------------------------------ generate

    def wrap_generate(self, generate: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(generate)
        def sgl_generate(*args: Any, **kwargs: Any) -> Any:
            if len(args) > 1:
                raise TypeError("sgl: pass generate() arguments other than input_ids by keyword")
            if args:
                kwargs["input_ids"] = args[0]
            if kwargs.get("inputs") is not None:
                kwargs["input_ids"] = kwargs.pop("inputs")
            input_ids = kwargs.get("input_ids")
            ids = self.ctx.adapter.visual_token_ids(self.ctx.model)
            if input_ids is None or not any(bool((input_ids == i).any()) for i in ids):
                return generate(**kwargs)
            return self._generate(generate, kwargs)

        return sgl_generate

    def _generate(self, generate: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        result = self._run_guide(kwargs, generate=True)
        self._check_layout(result, kwargs)
        batch = kwargs["input_ids"].shape[0]
        exits = torch.zeros(batch, dtype=torch.bool)
        record: dict[str, Any] = {}
        if self.config.exit_threshold is not None:
            scores = self.exit_scores(kwargs, result)
            exits = (scores["S"] >= self.config.exit_threshold).cpu()
            record = {k: v.tolist() for k, v in scores.items()}
        self._stats["calls"] += 1
        self._stats["rows"] += batch
        self._stats["exited_rows"] += int(exits.sum())
        self._stats["last_exited"] = exits.tolist()
        self._stats["last_scores"] = record
        try:
            if not exits.any():
                out = generate(**self._with_scores(kwargs, result.scores))
                self._stats["large_rows_run"] = self._stats.get("large_rows_run", 0) + batch
                return out
            return self._generate_with_exits(generate, kwargs, result, exits)
        finally:
            self._publish_stats()

    def _with_scores(self, kwargs: dict[str, Any], scores: torch.Tensor) -> dict[str, Any]:
        """The large model's generate() arguments with the guide's scores attached to its KV cache, so they live
        with this generation alone (a generation run in between, e.g. PAI's image-free guidance, has its own)."""
        if kwargs.get("use_cache") is False:
            raise ValueError("sgl needs generate(use_cache=True): the guide's scores travel with the KV cache")
        cache = kwargs.get("past_key_values")
        if cache is None:
            config = kwargs.get("generation_config") or self.ctx.model.generation_config
            mode = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
            cache = DynamicCache(
                config=self.ctx.model.config.get_text_config(decoder=True), offloading=mode == "offloaded"
            )
            kwargs = {k: v for k, v in kwargs.items() if k != "cache_implementation"}
            if mode is not None and "generation_config" in kwargs:
                kwargs["generation_config"] = copy.copy(config)
                kwargs["generation_config"].cache_implementation = None
            elif mode is not None:
                kwargs["cache_implementation"] = None
        setattr(cache, GUIDE_SCORES_ATTRIBUTE, scores)
        return {**kwargs, "past_key_values": cache}

    def _generate_with_exits(
        self, generate: Callable[..., Any], kwargs: dict[str, Any], result: GuideResult, exits: torch.Tensor
    ) -> Any:
        batch = exits.shape[0]
        stay = (~exits).nonzero().flatten()
        large_out, large_rows = None, stay
        if stay.numel():
            sub = slice_rows(kwargs, stay, batch)
            if sub is None:  # visual inputs not splittable per row: run every row, keep the stayers' answers
                sub, large_rows = kwargs, torch.arange(batch)
            large_out = generate(**self._with_scores(sub, result.scores[large_rows.to(result.scores.device)]))
            self._stats["large_rows_run"] = self._stats.get("large_rows_run", 0) + int(large_rows.numel())
        pad = self._pad_id(kwargs)
        large_seq = (
            None if large_out is None else (large_out if torch.is_tensor(large_out) else large_out.sequences)
        )
        if large_seq is not None and large_rows.numel() == batch:  # every row ran: keep the stayers' answers
            large_seq, large_rows = large_seq[stay.to(large_seq.device)], stay
        sequences = merge_sequences(large_seq, large_rows, result.sequences, pad)
        wants_dict = kwargs.get("return_dict_in_generate")
        if wants_dict is None:
            config = kwargs.get("generation_config") or self.ctx.model.generation_config
            wants_dict = bool(getattr(config, "return_dict_in_generate", False))
        if not wants_dict:
            return sequences
        base = large_out if large_out is not None else result.output
        guide_rows = exits.nonzero().flatten()
        updates: dict[str, Any] = {"sequences": sequences}
        for name in ("scores", "logits"):
            large_steps = getattr(large_out, name, None) if large_out is not None else None
            if large_steps is not None and large_steps[0].shape[0] != large_rows.numel():
                large_steps = tuple(s[stay.to(s.device)] for s in large_steps)
            updates[name] = merge_step_tensors(
                large_steps, stay, getattr(result.output, name, None), guide_rows
            )
        for name in ("past_key_values", "attentions", "hidden_states"):
            if hasattr(base, name):
                updates[name] = None  # these belong to one model's subset of rows: not meaningful merged
        for name, value in updates.items():
            if hasattr(base, name):
                setattr(base, name, value)
        return base

    def _pad_id(self, kwargs: dict[str, Any]) -> int:
        config = kwargs.get("generation_config") or self.ctx.model.generation_config
        pad = kwargs.get("pad_token_id", getattr(config, "pad_token_id", None))
        if pad is None:
            eos = eos_ids(self.ctx.model, kwargs)
            pad = eos[0] if eos else 0
        return int(pad)

    def _publish_stats(self) -> None:
        from vlm_accel.api import get_patch

        patch = get_patch(self.ctx.model)
        if (
            patch is not None
        ):  # rows that exit never reach the large model's forward hook, which records stats
            patch.stats.methods[self.name] = self.stats()

    def stats(self) -> dict[str, Any]:
        rows = self._stats["rows"]
        out = dict(self._stats)
        out["exit_rate"] = self._stats["exited_rows"] / rows if rows else 0.0
        out["prune_layer"] = self.layer
        return out


__all__ = ["SGL", "SGLConfig", "check_guide", "resolve_guide"]
