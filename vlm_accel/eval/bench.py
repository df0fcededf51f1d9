"""``vlm-accel bench``: unpatched vs patched speed in one run (prefill/TTFT, decode, end to end, memory, KV, FLOPs).

What is measured, per arm (unpatched, then one per ``--method`` spec) and batch size, as medians over
``--repeats`` runs after ``--warmup`` runs, with arms interleaved within each repeat so that load drift hits every
arm alike:

- ``prefill_s`` (TTFT): one forward exactly as ``generate()`` runs its first step — vision tower + projector + LM
  over the whole prompt, a fresh ``DynamicCache``, ``logits_to_keep=1``;
- ``e2e_s``: ``generate(max_new_tokens=N, min_new_tokens=N)``, greedy (a fixed N, whatever the random weights say);
- ``ttft_s``: time to the first token inside that ``generate()`` (the prefill plus generate's own setup, as
  ``vlm-accel compare`` times it);
- ``decode_step_s``: one decode step, timed directly inside ``generate()`` (median over its steps, see
  :class:`StepClock`); ``decode_tok_s = batch / decode_step_s``;
- ``peak_mem_bytes``: on CUDA, ``torch.cuda.max_memory_allocated`` during ``generate`` (weights included) and
  ``peak_mem_above_weights``; on CPU there is no per-run allocator peak, so both are null (KV bytes are exact);
- ``kv_bytes``: bytes of the KV cache after the prefill, summed over layers;
- ``prefill_flops``: analytic LM FLOPs of the prefill (``vlm_accel.eval.flops``) from the per-layer token counts the
  patch actually produced; ``flops_ideal_speedup`` is unpatched / patched, the ceiling a FLOPs-bound device reaches.

``--model`` is a named geometry (random weights, built directly on the device in the chosen dtype, so speed can be
measured where weights cannot be downloaded), a testbed model name, or a checkpoint directory / hub id. Prompts
(``--prompts``): ``synthetic`` — ``--text-tokens`` random text tokens around one image's visual tokens, identical
rows (no padding); ``testbed`` — the first ``batch`` questions of the testbed test split at ``--prompt-seed``, chat
template, left-padded: exactly the batch ``vlm-accel compare`` times (same default seed), so the two tools' speed
columns measure the same tensors. ``auto`` (default) is ``testbed`` for a testbed model, else ``synthetic``.
``--analytic`` skips the run and reports FLOPs / KV bytes / token counts predicted from the config alone (any
geometry, no memory needed).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlm_accel.eval.flops import TextGeometry, decode_step_flops, prefill_flops

# ---------------------------------------------------------------------------------------------- geometries


@dataclass(frozen=True)
class Geometry:
    """A LLaVA-1.5-style model shape: CLIP vision tower + MLP projector + Llama decoder."""

    description: str
    vision: dict[str, Any]
    text: dict[str, Any]
    image_token_id: int


GEOMETRIES: dict[str, Geometry] = {
    "tiny": Geometry(
        "CLIP 32px/8 (16 visual tokens) + 4-layer Llama, hidden 64 (tests)",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                    patch_size=8),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512),
        image_token_id=511,
    ),
    "cpu-mid": Geometry(
        "CLIP 224px/14 (256 visual tokens, 4 layers) + 8-layer Llama, hidden 512, 8 heads, MLP 1376, vocab 32064",
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                    image_size=224, patch_size=14),
        text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=32064),
        image_token_id=32000,
    ),
    "llava-1.5-7b": Geometry(
        "LLaVA-1.5-7B shapes: CLIP ViT-L/14-336 (576 visual tokens) + Llama-2-7B (32 layers, hidden 4096)",
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768),
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096),
        image_token_id=32000,
    ),
    "llava-1.5-13b": Geometry(
        "LLaVA-1.5-13B shapes: CLIP ViT-L/14-336 (576 visual tokens) + Llama-2-13B (40 layers, hidden 5120)",
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768),
        text=dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                  num_key_value_heads=40, vocab_size=32064, max_position_embeddings=4096),
        image_token_id=32000,
    ),
}  # fmt: skip


def geometry_config(name: str):
    """The ``LlavaConfig`` of a named geometry."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if name not in GEOMETRIES:
        raise ValueError(f"unknown geometry {name!r}; known: {', '.join(GEOMETRIES)}")
    geo = GEOMETRIES[name]
    text = LlamaConfig(pad_token_id=0, bos_token_id=1, eos_token_id=2, **{"max_position_embeddings": 2048, **geo.text})
    vision = CLIPVisionConfig(**geo.vision)
    n_visual = (vision.image_size // vision.patch_size) ** 2
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=geo.image_token_id, image_seq_length=n_visual,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )  # fmt: skip


def visual_tokens_per_image(config: Any) -> int:
    """Visual tokens one image expands to in a ``llava`` model (a square grid; +1 with the 'full' strategy)."""
    if getattr(config, "model_type", None) != "llava":
        raise ValueError(
            f"bench builds synthetic prompts for model_type 'llava' only (one square grid per image), got "
            f"{getattr(config, 'model_type', None)!r}"
        )
    vision = config.vision_config
    grid = (vision.image_size // vision.patch_size) ** 2
    return grid + (1 if config.vision_feature_select_strategy == "full" else 0)


def parse_dtype(name: str) -> torch.dtype:
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
    if name not in names:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(names)}")
    return names[name]


def load_model(spec: str, device: str, dtype: torch.dtype, attn: str) -> tuple[torch.nn.Module, str]:
    """``(model, source)`` for a geometry name, a testbed name, or a checkpoint directory / hub id."""
    from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

    if spec in GEOMETRIES:
        config = geometry_config(spec)
        config._attn_implementation = attn
        torch.manual_seed(0)
        with torch.device(device):  # allocate (and randomly initialise) directly on the device, in dtype
            model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
        return model.eval(), f"geometry {spec} (random weights)"
    try:
        from vlm_accel.testbed import MODEL_NAMES
    except ImportError:
        MODEL_NAMES = ()
    if spec in MODEL_NAMES:
        from vlm_accel.testbed import load_model as load_testbed

        model, _ = load_testbed(spec, dtype=dtype, device=device)
        model.set_attn_implementation(attn)
        return model.eval(), f"testbed {spec}"
    model = AutoModelForImageTextToText.from_pretrained(spec, dtype=dtype, attn_implementation=attn).to(device)
    return model.eval(), f"checkpoint {spec}"


def synthetic_inputs(config: Any, batch: int, text_tokens: int, device: str, dtype: torch.dtype, seed: int = 0):
    """One image per row: ``<bos>``, half the text tokens, the visual tokens, the other half. Identical rows."""
    n_visual = visual_tokens_per_image(config)
    text_cfg = config.get_text_config()
    image_id = int(config.image_token_id)
    generator = torch.Generator().manual_seed(seed)
    reserved = {image_id, text_cfg.pad_token_id, text_cfg.bos_token_id, text_cfg.eos_token_id}
    words = torch.randint(3, text_cfg.vocab_size, (text_tokens * 2,), generator=generator)
    words = [int(w) for w in words if int(w) not in reserved][:text_tokens]
    half = len(words) // 2
    ids = [text_cfg.bos_token_id or 1, *words[:half], *([image_id] * n_visual), *words[half:]]
    input_ids = torch.tensor([ids] * batch, device=device)
    size = config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=generator).to(device=device, dtype=dtype)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels}


def testbed_inputs(model_name: str, batch: int, device: str, seed: int) -> dict:
    """The first ``batch`` testbed test questions at ``seed`` as ``vlm-accel compare`` batches them for timing
    (:func:`vlm_accel.eval.compare.timing_batch`; the dataset is prefix-stable in ``n``, so this is compare's batch)."""
    from transformers import AutoProcessor

    from vlm_accel.eval.compare import timing_batch
    from vlm_accel.testbed import make_dataset
    from vlm_accel.testbed.models import model_dir

    processor = AutoProcessor.from_pretrained(model_dir(model_name), local_files_only=True)
    return timing_batch(processor, make_dataset(batch, seed=seed, split="test"), batch, device)


def bench_inputs(model: torch.nn.Module, batch: int, settings: BenchSettings) -> dict:
    """The prompts every arm is timed on (see ``--prompts`` in the module docstring)."""
    testbed = settings.resolved_prompts() == "testbed"
    if testbed and settings.model not in _testbed_names():
        raise ValueError(f"--prompts testbed needs a testbed model ({', '.join(_testbed_names())}), "
                         f"got {settings.model!r}")  # fmt: skip
    dtype = parse_dtype(settings.dtype)
    if testbed:
        inputs = testbed_inputs(settings.model, batch, settings.device, settings.prompt_seed)
        return {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in inputs.items()}
    return synthetic_inputs(model.config, batch, settings.text_tokens, settings.device, dtype, settings.seed)


def _testbed_names() -> tuple[str, ...]:
    try:
        from vlm_accel.testbed import MODEL_NAMES
    except ImportError:
        return ()
    return tuple(MODEL_NAMES)


# ---------------------------------------------------------------------------------------------- method specs


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


@dataclass
class Arm:
    """One column of the comparison: a label and the method config(s) (empty = unpatched)."""

    label: str
    configs: list[Any] = field(default_factory=list)

    @property
    def patched(self) -> bool:
        return bool(self.configs)


def parse_method_spec(spec: str) -> Arm:
    """``name:param=value,param=value`` → an :class:`Arm` (validated by the method's config class)."""
    from vlm_accel.registry import get_config_class

    name, _, params_text = spec.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, params_text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"method spec {spec!r}: expected name:param=value,..., got {item!r}")
        params[key.strip()] = _parse_value(value.strip())
    config_cls = get_config_class(name.strip())
    from vlm_accel.config import check_known_params

    check_known_params(config_cls, params)
    return Arm(label=spec, configs=[config_cls(**params)])


def sweep_arms(methods: Sequence[str], layer: int, keep_ratios: Sequence[float], keep_counts: Sequence[int]) -> list[Arm]:
    """``--methods fastv,random --keep-ratios 0.5,0.25 --layer 2`` → one arm per (method, budget)."""
    arms = []
    for budget_key, budgets in (("keep_ratio", keep_ratios), ("keep_count", keep_counts)):
        for budget in budgets:
            for method in methods:
                arms.append(parse_method_spec(f"{method}:layer={layer},{budget_key}={budget}"))
    return arms


# ---------------------------------------------------------------------------------------------- measuring


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cache_bytes(cache: Any) -> tuple[int, list[int]]:
    """Total bytes and per-layer lengths of a ``DynamicCache``."""
    total, lengths = 0, []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not torch.is_tensor(keys) or keys.dim() < 3:
            lengths.append(0)
            continue
        total += keys.numel() * keys.element_size() + values.numel() * values.element_size()
        lengths.append(int(keys.shape[-2]))
    return total, lengths


@contextmanager
def applied(model: torch.nn.Module, arm: Arm) -> Iterator[Any]:
    """The arm's patch on ``model`` for the duration of the block (nothing for the unpatched arm)."""
    if not arm.patched:
        yield None
        return
    from vlm_accel.api import patch_model

    patch = patch_model(model, arm.configs[0] if len(arm.configs) == 1 else arm.configs)
    try:
        yield patch
    finally:
        patch.remove()


@dataclass
class Clock:
    """Wall-clock seconds and this process's CPU seconds of a block (CPU time is robust to other processes
    competing for the cores, and meaningful on CPU only: GPU work is asynchronous)."""

    device: str
    wall: float = 0.0
    cpu: float = 0.0

    def __enter__(self) -> Clock:
        _sync(self.device)
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        _sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu


def time_prefill(model: torch.nn.Module, inputs: dict, device: str) -> tuple[Clock, Any]:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.get_text_config())
    with Clock(device) as clock, torch.inference_mode():
        model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return clock, cache


def time_vision(model: torch.nn.Module, inputs: dict, device: str) -> Clock:
    """The vision tower + projector alone (part of every arm's prefill, unchanged by LM pruning)."""
    with Clock(device) as clock, torch.inference_mode():
        model.model.get_image_features(pixel_values=inputs["pixel_values"])
    return clock


class StepClock:
    """Wall and process-CPU timestamps after every step of ``generate()``, measured directly.

    Passed as a stopping criterion: transformers calls every criterion once per generated token, right after the
    step's forward, logits processing and token choice, so consecutive stamps bracket exactly one decode step and
    the first stamp ends the prefill (time to first token). This replaces deriving a decode step from
    ``(generate − a separately timed prefill) / steps``, where prefill noise spills into the decode figure.

    A method may run other ``generate()`` calls inside the patched one (SGL's guide model, which receives the same
    criteria); a call is recognised by its sequence length starting over, and only the last one — the model's own
    generation, which runs last — is kept. ``ttft`` still spans everything since :meth:`start`.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.start()

    def start(self) -> None:
        _sync(self.device)
        self.stamps: list[tuple[float, float]] = []
        self._length: int | None = None
        self._start = (time.perf_counter(), time.process_time())

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        _sync(self.device)
        now = (time.perf_counter(), time.process_time())
        length = int(input_ids.shape[-1])
        if self._length is not None and length <= self._length:  # a new generate() began: keep the last one
            self.stamps = []
        self._length = length
        self.stamps.append(now)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    @property
    def ttft(self) -> tuple[float, float]:
        """(wall, CPU) seconds from :meth:`start` to the end of the first step of the last generate()."""
        if not self.stamps:
            raise RuntimeError("StepClock saw no generation step (was it passed as a stopping criterion?)")
        return self.stamps[0][0] - self._start[0], self.stamps[0][1] - self._start[1]

    @property
    def steps(self) -> list[tuple[float, float]]:
        """(wall, CPU) seconds of each decode step of the last generate() (one fewer than its new tokens)."""
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(self.stamps, self.stamps[1:])]

    def median_step(self) -> tuple[float, float] | None:
        steps = self.steps
        if not steps:
            return None
        return statistics.median(w for w, _ in steps), statistics.median(c for _, c in steps)


def time_generate(
    model: torch.nn.Module, inputs: dict, device: str, new_tokens: int, steps: StepClock | None = None
) -> tuple[Clock, int | None]:
    """End-to-end ``generate()`` (greedy, exactly ``new_tokens``); ``steps`` (a :class:`StepClock`) also times each
    step. Returns the clock and, on CUDA, the peak allocated memory."""
    from transformers import StoppingCriteriaList

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    extra = {"stopping_criteria": StoppingCriteriaList([steps])} if steps is not None else {}
    with Clock(device) as clock, torch.inference_mode():
        if steps is not None:
            steps.start()
        out = model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            pad_token_id=model.config.get_text_config().pad_token_id or 0, **extra,
        )  # fmt: skip
    out = out if torch.is_tensor(out) else out.sequences
    if out.shape[1] != inputs["input_ids"].shape[1] + new_tokens:
        raise RuntimeError(f"generate produced {out.shape[1] - inputs['input_ids'].shape[1]} tokens, not {new_tokens}")
    return clock, (torch.cuda.max_memory_allocated() if cuda else None)


@dataclass
class BenchSettings:
    model: str
    device: str = "cpu"
    dtype: str = "float32"
    attn: str = "sdpa"
    batch_sizes: tuple[int, ...] = (1, 4)
    warmup: int = 1
    repeats: int = 5
    new_tokens: int = 16
    text_tokens: int = 64
    threads: int | None = None
    seed: int = 0
    prompts: str = "auto"
    prompt_seed: int = 20261124  # vlm-accel compare's default test-split seed

    def resolved_prompts(self) -> str:
        """``testbed`` or ``synthetic`` (``auto``: testbed questions for a testbed model)."""
        if self.prompts not in ("auto", "synthetic", "testbed"):
            raise ValueError(f"--prompts must be auto, synthetic or testbed, got {self.prompts!r}")
        if self.prompts != "auto":
            return self.prompts
        return "testbed" if self.model in _testbed_names() else "synthetic"


def _static_row(model: torch.nn.Module, arm: Arm, batch: int, inputs: dict, settings: BenchSettings) -> dict:
    """Token counts, KV bytes and FLOPs of one arm (one untimed prefill)."""
    geometry = TextGeometry.from_config(model.config)
    with applied(model, arm) as patch:
        _, cache = time_prefill(model, inputs, settings.device)
        kv_bytes, kv_lengths = cache_bytes(cache)
        seq = int(inputs["input_ids"].shape[1])
        tokens = list(patch.stats.tokens_per_layer) if patch is not None else [seq] * geometry.layers
        kept = patch.stats.visual_tokens_kept if patch is not None else None
        in_patch = patch.stats.time_in_patch_s if patch is not None else 0.0
    n_visual = visual_tokens_per_image(model.config) * batch
    return {
        "arm": arm.label,
        "method_config": [c.to_dict() for c in arm.configs],
        "batch": batch,
        "seq_len": seq,
        "visual_tokens": n_visual,
        "visual_tokens_kept": n_visual if kept is None else kept,
        "tokens_per_layer": tokens,
        "kv_length_per_layer": kv_lengths,
        "kv_bytes": kv_bytes,
        "prefill_flops": prefill_flops(geometry, tokens, batch),
        "decode_step_flops": decode_step_flops(geometry, [n + 1 for n in kv_lengths], batch),
        "time_in_patch_s": in_patch,  # the runtime's own hooks during one (untimed) prefill
    }


def _measure_batch(model, all_arms: list[Arm], batch: int, settings: BenchSettings, bar, task) -> list[dict]:
    """Interleaved timings of every arm at one batch size (warm-up rounds discarded), then one row per arm.

    Each repeat is a round in the order of :func:`vlm_accel.eval.timing.round_schedule` (the unpatched arm first,
    again after every few arms and last; rounds alternate direction) — the schedule ``vlm-accel compare`` uses — and
    each run's CPU-time ratios are taken against the unpatched runs right around it."""
    from vlm_accel.eval.timing import bracket_references, round_schedule

    inputs = bench_inputs(model, batch, settings)
    timings: dict[str, dict[str, list]] = {a.label: defaultdict(list) for a in all_arms}
    vision: list[float] = []
    keys = ("prefill", "e2e", "prefill_cpu", "e2e_cpu", "ttft", "ttft_cpu", "step", "step_cpu", "mem")
    for rep in range(settings.warmup + settings.repeats):
        measured = rep >= settings.warmup
        clock = time_vision(model, inputs, settings.device)
        if measured:
            vision.append(clock.wall)
        order = round_schedule(len(all_arms), rep)
        runs: list[dict[str, Any]] = []
        for index in order:
            arm = all_arms[index]
            bar.update(task, description=f"batch {batch} · {arm.label} · {'run' if measured else 'warm-up'}")
            steps = StepClock(settings.device)
            with applied(model, arm):
                # generate() first, right after patching, exactly as `vlm-accel compare` times it (patch, one timed
                # generate, unpatch), so the two tools' TTFT and decode columns measure the same thing
                e2e, mem = time_generate(model, inputs, settings.device, settings.new_tokens, steps)
                prefill, _ = time_prefill(model, inputs, settings.device)
            step_wall, step_cpu = steps.median_step()
            runs.append({"prefill": prefill.wall, "e2e": e2e.wall, "prefill_cpu": prefill.cpu, "e2e_cpu": e2e.cpu,
                         "ttft": steps.ttft[0], "ttft_cpu": steps.ttft[1], "step": step_wall, "step_cpu": step_cpu,
                         "mem": mem})  # fmt: skip
            bar.advance(task)
        if not measured:
            continue
        for key in ("prefill_cpu", "ttft_cpu", "step_cpu"):  # each run's reference: the unpatched runs around it
            refs = bracket_references(order, [r[key] for r in runs], statistics.fmean)
            for run, ref in zip(runs, refs):
                run["reference_" + key] = ref
        for index, arm in enumerate(all_arms):
            mine = [r for i, r in zip(order, runs) if i == index]
            t = timings[arm.label]
            for key in keys:  # the unpatched arm runs several times per round: its median stands for the round
                values = [r[key] for r in mine if r[key] is not None]
                t[key].append(statistics.median(values) if values else None)
            for key in ("prefill_cpu", "ttft_cpu", "step_cpu"):
                t["reference_" + key].append(t[key][-1] if index == 0 else mine[0]["reference_" + key])
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    for arm in all_arms:
        row = _static_row(model, arm, batch, inputs, settings)
        t = timings[arm.label]
        prefill, e2e, step = (statistics.median(t[k]) for k in ("prefill", "e2e", "step"))
        mems = [m for m in t["mem"] if m is not None]
        row.update(
            prefill_s=prefill, e2e_s=e2e, vision_s=statistics.median(vision),
            decode_step_s=step, decode_tok_s=batch / step if step > 0 else None,  # timed step by step
            ttft_s=statistics.median(t["ttft"]), ttft_s_runs=t["ttft"],
            prefill_s_runs=t["prefill"], e2e_s_runs=t["e2e"], decode_step_s_runs=t["step"],
            peak_mem_bytes=max(mems) if mems else None,
            peak_mem_above_weights=(max(mems) - weights) if mems else None,
        )  # fmt: skip
        if not settings.device.startswith("cuda"):  # CPU time means nothing for asynchronous GPU work
            row.update(
                prefill_cpu_s=statistics.median(t["prefill_cpu"]), e2e_cpu_s=statistics.median(t["e2e_cpu"]),
                decode_step_cpu_s=statistics.median(t["step_cpu"]), ttft_cpu_s=statistics.median(t["ttft_cpu"]),
                ttft_cpu_s_runs=t["ttft_cpu"],
                prefill_cpu_s_runs=t["prefill_cpu"], e2e_cpu_s_runs=t["e2e_cpu"], decode_step_cpu_s_runs=t["step_cpu"],
                reference_cpu_s_runs={"prefill_cpu_s_runs": t["reference_prefill_cpu"],
                                      "ttft_cpu_s_runs": t["reference_ttft_cpu"],
                                      "decode_step_cpu_s_runs": t["reference_step_cpu"]},
            )  # fmt: skip
        rows.append(row)
    return rows


def run_bench(settings: BenchSettings, arms: Sequence[Arm], progress: bool = True) -> dict[str, Any]:
    """Measure every arm at every batch size; returns the JSON-ready result (``meta`` + ``rows``)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if settings.threads:
        torch.set_num_threads(settings.threads)
    model, source = load_model(settings.model, settings.device, parse_dtype(settings.dtype), settings.attn)
    all_arms = [Arm("unpatched"), *arms]
    for arm in arms:  # fail before measuring anything if an arm cannot patch this model
        with applied(model, arm):
            pass
    rows: list[dict[str, Any]] = []
    from vlm_accel.eval.timing import round_schedule

    per_round = len(round_schedule(len(all_arms), 0))
    runs = len(settings.batch_sizes) * per_round * (settings.warmup + settings.repeats)
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        disable=not progress, transient=False,
    ) as bar:  # fmt: skip
        task = bar.add_task("bench", total=runs)
        for batch in settings.batch_sizes:
            rows += _measure_batch(model, all_arms, batch, settings, bar, task)
    add_ratios(rows)
    return {"meta": _meta(settings, source, model), "rows": rows}


def paired_speedups(reference: Sequence[float], measured: Sequence[float]) -> tuple[float, float, float]:
    """Median, min and max of ``reference[i] / measured[i]``: speed-ups of runs taken in the same interleaved
    round, so the spread shows how much the load changed between rounds (the noise a reader must discount)."""
    if len(reference) != len(measured) or not reference:
        raise ValueError(f"paired_speedups needs two equally long non-empty run lists, got {len(reference)} and "
                         f"{len(measured)}")  # fmt: skip
    ratios = [r / m for r, m in zip(reference, measured) if m > 0]
    if not ratios:
        raise ValueError("paired_speedups: every measured run took 0 s")
    return statistics.median(ratios), min(ratios), max(ratios)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Speedups of each row over the unpatched row of the same batch size (measured and FLOPs-ideal)."""
    base = {r["batch"]: r for r in rows if r["arm"] == "unpatched"}
    for row in rows:
        ref = base.get(row["batch"])
        if ref is None:
            continue
        row["flops_ideal_speedup"] = ref["prefill_flops"] / row["prefill_flops"]
        row["kv_fraction"] = row["kv_bytes"] / ref["kv_bytes"] if ref["kv_bytes"] else None
        if row.get("prefill_s") is not None:
            row["prefill_speedup"] = ref["prefill_s"] / row["prefill_s"]
            row["e2e_speedup"] = ref["e2e_s"] / row["e2e_s"]
            if row.get("decode_step_s"):
                row["decode_speedup"] = ref["decode_step_s"] / row["decode_step_s"]
            if row.get("prefill_cpu_s") is not None:
                row["prefill_cpu_speedup"] = ref["prefill_cpu_s"] / row["prefill_cpu_s"]
                row["e2e_cpu_speedup"] = ref["e2e_cpu_s"] / row["e2e_cpu_s"]
            for key, runs in (("prefill_cpu_speedup", "prefill_cpu_s_runs"), ("ttft_cpu_speedup", "ttft_cpu_s_runs"),
                              ("decode_cpu_speedup", "decode_step_cpu_s_runs")):  # fmt: skip
                if row.get(runs) and ref.get(runs):
                    # arms are interleaved: pair each run with the unpatched runs around it in the same round
                    reference = row.get("reference_cpu_s_runs", {}).get(runs) or ref[runs]
                    pairs = [(r, m) for r, m in zip(reference, row[runs]) if r is not None and m is not None]
                    if pairs:
                        row[key], *row[key + "_range"] = paired_speedups(*zip(*pairs))
            vision = row.get("vision_s")
            if vision is not None and row["prefill_s"] > vision:
                # the LM's share of the prefill (prefill minus the vision tower), the part FLOPs-ideal describes
                row["lm_prefill_speedup"] = (ref["prefill_s"] - vision) / (row["prefill_s"] - vision)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _meta(settings: BenchSettings, source: str, model: torch.nn.Module | None) -> dict[str, Any]:
    import transformers

    import vlm_accel

    device_name = _cpu_name()
    if settings.device.startswith("cuda") and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name()
    config = model.config if model is not None else geometry_config(settings.model)
    return {
        "settings": dataclasses.asdict(settings),
        "source": source,
        "prompts": settings.resolved_prompts() if model is not None else "synthetic",
        "device_name": device_name,
        "torch_threads": torch.get_num_threads(),
        "visual_tokens_per_image": visual_tokens_per_image(config),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "vlm_accel": vlm_accel.__version__},  # fmt: skip
        "peak_memory": ("torch.cuda.max_memory_allocated during generate" if settings.device.startswith("cuda")
                        else "not measured on CPU (no per-run allocator peak); see kv_bytes"),  # fmt: skip
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["vlm-accel", *sys.argv[1:]]) if sys.argv else "",
    }


# ---------------------------------------------------------------------------------------------- analytic mode


def predicted_kept_visual(config: Any, n_visual: int) -> int:
    """Visual tokens a single-stage method keeps per image, from its config alone."""
    if hasattr(config, "factor"):  # pool: ceil(side / f)² groups
        side = math.isqrt(n_visual)
        return math.ceil(side / config.factor) ** 2
    if getattr(config, "keep_count", None) is not None:
        return min(config.keep_count, n_visual)
    ratio = getattr(config, "keep_ratio", None)
    if ratio is None:
        raise ValueError(f"cannot predict the kept tokens of {type(config).__name__} analytically")
    return max(1, min(n_visual, math.ceil(n_visual * ratio)))


def analytic_bench(settings: BenchSettings, arms: Sequence[Arm]) -> dict[str, Any]:
    """FLOPs, token counts and KV bytes predicted from a geometry's config, without building the model."""
    from vlm_accel.eval.flops import planned_tokens_per_layer

    config = geometry_config(settings.model)
    geometry = TextGeometry.from_config(config)
    n_visual = visual_tokens_per_image(config)
    seq = 1 + settings.text_tokens + n_visual
    element = torch.finfo(parse_dtype(settings.dtype)).bits // 8
    kv_per_token = 2 * geometry.kv_heads * geometry.head_dim * element
    rows = []
    for batch in settings.batch_sizes:
        for arm in [Arm("unpatched"), *arms]:
            if arm.patched:
                cfg = arm.configs[0]
                kept = predicted_kept_visual(cfg, n_visual)
                tokens = planned_tokens_per_layer(geometry.layers, seq, n_visual, cfg.layer, kept)
            else:
                kept, tokens = n_visual, [seq] * geometry.layers
            rows.append({
                "arm": arm.label, "method_config": [c.to_dict() for c in arm.configs], "batch": batch,
                "seq_len": seq, "visual_tokens": n_visual * batch, "visual_tokens_kept": kept * batch,
                "tokens_per_layer": tokens, "kv_length_per_layer": tokens,
                "kv_bytes": batch * kv_per_token * sum(tokens),
                "prefill_flops": prefill_flops(geometry, tokens, batch),
                "decode_step_flops": decode_step_flops(geometry, [n + 1 for n in tokens], batch),
            })  # fmt: skip
    add_ratios(rows)
    meta = _meta(settings, f"geometry {settings.model} (analytic, not run)", None)
    return {"meta": meta, "rows": rows}


# ---------------------------------------------------------------------------------------------- output


def _fmt(value: Any, spec: str, scale: float = 1.0, spread: Sequence[float] | None = None) -> str:
    if value is None:
        return "—"
    text = format(value * scale, spec)
    return text if not spread else f"{text} ({format(spread[0] * scale, spec)}–{format(spread[1] * scale, spec)})"


def _table_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, str, float]]:
    """(header, row key, format, scale) of the table columns that ``rows`` have data for."""
    measured = any("prefill_s" in r for r in rows)
    cpu_time = any("prefill_cpu_speedup" in r for r in rows)
    columns = []
    if measured:
        columns += [("prefill ms", "prefill_s", ".1f", 1e3), ("prefill ×", "prefill_speedup", ".2f", 1.0)]
        if cpu_time:
            columns += [("prefill × cpu-t", "prefill_cpu_speedup", ".2f", 1.0),
                        ("TTFT × cpu-t", "ttft_cpu_speedup", ".2f", 1.0)]  # fmt: skip
        columns += [("LM-only ×", "lm_prefill_speedup", ".2f", 1.0)]
    else:
        columns.append(("prefill GFLOPs", "prefill_flops", ".1f", 1e-9))
    columns.append(("FLOPs-ideal ×", "flops_ideal_speedup", ".2f", 1.0))
    if measured:
        columns.append(("decode tok/s", "decode_tok_s", ".1f", 1.0))
        if cpu_time:
            columns.append(("decode × cpu-t", "decode_cpu_speedup", ".2f", 1.0))
        columns += [("e2e ms", "e2e_s", ".1f", 1e3), ("e2e ×", "e2e_speedup", ".2f", 1.0)]
        if cpu_time:
            columns.append(("e2e × cpu-t", "e2e_cpu_speedup", ".2f", 1.0))
        columns.append(("peak MiB", "peak_mem_bytes", ".0f", 2**-20))
    columns += [("KV MiB", "kv_bytes", ".2f", 2**-20), ("KV frac", "kv_fraction", ".3f", 1.0)]
    return columns


def print_table(result: dict[str, Any]) -> None:
    """The rich table of a bench result (speedups are over the unpatched arm of the same batch size)."""
    from rich.console import Console
    from rich.table import Table

    meta = result["meta"]
    s = meta["settings"]
    title = (f"{s['model']} · {meta['source']} · {s['device']} ({meta['device_name']}) · {s['dtype']} · {s['attn']} · "
             f"{meta['torch_threads']} thread(s) · {meta['visual_tokens_per_image']} visual tokens/image")  # fmt: skip
    table = Table(title=title, title_justify="left")
    columns = _table_columns(result["rows"])
    for header in ["arm", "batch", "vis kept", *(c[0] for c in columns)]:
        table.add_column(header, justify="left" if header == "arm" else "right")
    for r in result["rows"]:
        cells = [r["arm"], str(r["batch"]), f"{r['visual_tokens_kept']}/{r['visual_tokens']}"]
        cells += [_fmt(r.get(key), spec, scale, r.get(key + "_range")) for _, key, spec, scale in columns]
        table.add_row(*cells)
    console = Console()
    if not console.is_terminal:  # files / pipes: do not squeeze the table into 80 columns
        console = Console(width=220)
    console.print(table)
    if any("prefill_cpu_speedup" in r for r in result["rows"]):
        console.print("every × is a speed-up over unpatched (> 1: faster). cpu-t: ratio of this process's CPU time "
                      "(robust to other processes sharing the cores), median (min–max) of the per-repeat ratios; "
                      "TTFT: time to first token inside generate() (as `vlm-accel compare` times its prefill); "
                      "decode: one decode step timed directly inside generate(); LM-only: prefill minus the vision "
                      "tower; peak memory is not measured on CPU")  # fmt: skip


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``vlm-accel bench``."""
    p = subparsers.add_parser(
        "bench", help="speed: unpatched vs patched (prefill, decode, end to end, memory, KV, FLOPs)",
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="geometries: " + "; ".join(f"{k}: {g.description}" for k, g in GEOMETRIES.items()),
    )  # fmt: skip
    p.add_argument("--model", default="tiny", help="geometry name, testbed name, or checkpoint dir / hub id")
    p.add_argument("--method", action="append", default=[], metavar="NAME:K=V,...",
                   help="an arm, e.g. fastv:layer=2,keep_count=64 (repeatable)")
    p.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m], default=[],
                   help="sweep: methods crossed with --keep-ratios / --keep-counts at --layer, e.g. fastv,random")
    p.add_argument("--layer", type=int, default=2, help="pruning layer K for --methods (default 2)")
    p.add_argument("--keep-ratios", type=_float_list, default=(), help="sweep budgets, e.g. 0.5,0.25,0.1")
    p.add_argument("--keep-counts", type=_int_list, default=(), help="sweep budgets in tokens, e.g. 64")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--attn", default="sdpa", help="attention implementation: sdpa, eager, flash_attention_2")
    p.add_argument("--batch-sizes", type=_int_list, default=None, help="default 1,8,32 on cuda; 1,4 on cpu")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="measured runs per arm and batch size (median reported)")
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens for e2e (default 32 cuda, 16 cpu)")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens around the image in the prompt")
    p.add_argument("--prompts", default="auto", choices=("auto", "synthetic", "testbed"),
                   help="timed prompts: testbed questions (compare's timing batch) or synthetic; auto: testbed "
                        "for a testbed model")  # fmt: skip
    p.add_argument("--prompt-seed", type=int, default=20261124, help="testbed test-split seed (compare's default)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--analytic", action="store_true", help="FLOPs/KV/token counts from a geometry, no run")
    p.add_argument("--json", type=Path, default=None, help="write the full result JSON here")
    p.add_argument("--plot", type=Path, default=None, help="write the speed plot (PNG/PDF/SVG) here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    if args.warmup < 0 or args.repeats < 1:
        raise ValueError("--warmup must be >= 0 and --repeats >= 1")
    return BenchSettings(
        model=args.model, device=device, dtype=args.dtype or ("bfloat16" if cuda else "float32"), attn=args.attn,
        batch_sizes=args.batch_sizes or ((1, 8, 32) if cuda else (1, 4)), warmup=args.warmup,
        repeats=args.repeats, new_tokens=args.new_tokens or (32 if cuda else 16), text_tokens=args.text_tokens,
        threads=args.threads, prompts=args.prompts, prompt_seed=args.prompt_seed,
    )  # fmt: skip


def main(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    parse_dtype(settings.dtype)
    if settings.new_tokens < 2:
        raise ValueError("--new-tokens must be >= 2 (decode throughput needs at least one decode step)")
    arms = [parse_method_spec(s) for s in args.method]
    arms += sweep_arms(args.methods, args.layer, args.keep_ratios, args.keep_counts)
    if args.analytic:
        result = analytic_bench(settings, arms)
    else:
        result = run_bench(settings, arms, progress=not args.no_progress)
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        from vlm_accel.eval.plots import speed_plot

        speed_plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0
