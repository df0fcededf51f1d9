"""One demo request: the same image and question through the unpatched and the patched model, measured.

A patch mutates its model in place (hooks, attention routing), so two users with different methods must never
share a model at the same time. :class:`SlotPool` holds one model instance per concurrent slot (a slot is checked
out for a whole request and the patch is removed before it is returned); SGL's guide is also loaded per slot,
because running the guide installs a scorer on it for the duration of the call.

What is measured for each arm (wall clock, CUDA synchronised, median of ``repeats`` interleaved runs): prefill (one forward, logits for the
last position only, as ``generate()`` runs it), end to end (``generate``), new tokens per second, peak memory (CUDA
``max_memory_allocated`` during ``generate``: device-wide, so other busy slots count too; not measured on CPU,
which has no per-run allocator peak) and KV-cache bytes after generation. From the patched run's cache record:
visual tokens present at each decoder layer and the kept set of each stage. For methods that edit attention rows
(reweighting), an extra un-timed prefill with an attention probe records the last prompt token's attention over
image patches before and after the edit.
"""

from __future__ import annotations

import functools
import math
import queue
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from vlm_accel.api import get_patch, patch_model, unpatch_model
from vlm_accel.config import MethodConfig
from vlm_accel.methods.base import Method, RowEdit
from vlm_accel.patches import adapter_for
from vlm_accel.registry import get_method_class
from vlm_accel.runtime.engine import Runtime
from vlm_accel.runtime.state import CACHE_ATTRIBUTE, PlanRecord

MAX_QUESTION_CHARS = 500
MIN_IMAGE_SIDE = 16
MAX_IMAGE_SIDE = 4096


def load_any(name: str, device: str) -> tuple[torch.nn.Module, Any]:
    """A bundled testbed model (``testbed-s`` / ``testbed-l`` / a trained testbed directory) or any supported
    Hugging Face image-text-to-text checkpoint, with its processor."""
    from vlm_accel.testbed import MODEL_NAMES, load_model

    if name in MODEL_NAMES or (Path(name) / "train_log.json").is_file():
        return load_model(name, device=device)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype).to(device).eval()
    return model, AutoProcessor.from_pretrained(name)


class ModelSlot:
    """One model instance (and its own SGL guides) that serves one request at a time."""

    def __init__(self, model_name: str, device: str) -> None:
        self.model_name, self.device = model_name, device
        self.model, self.processor = load_any(model_name, device)
        self._guides: dict[str, torch.nn.Module] = {}

    def guide(self, name: str) -> torch.nn.Module:
        if name not in self._guides:
            self._guides[name] = load_any(name, self.device)[0]
        return self._guides[name]


class SlotPool:
    """``slots`` model instances; :meth:`acquire` checks one out for the duration of a request."""

    def __init__(self, model_name: str, slots: int = 2, device: str = "cpu") -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.model_name, self.device, self.size = model_name, device, slots
        self._free: queue.Queue[ModelSlot] = queue.Queue()
        for _ in range(slots):
            self._free.put(ModelSlot(model_name, device))
        self.busy_peak = 0
        self._busy = 0
        self._lock = threading.Lock()

    @contextmanager
    def acquire(self) -> Iterator[ModelSlot]:
        slot = self._free.get()
        with self._lock:
            self._busy += 1
            self.busy_peak = max(self.busy_peak, self._busy)
        try:
            yield slot
        finally:
            unpatch_model(slot.model)  # whatever happened, the next request gets the unpatched model
            with self._lock:
                self._busy -= 1
            self._free.put(slot)


# ---- request and results ----------------------------------------------------------------------------------


@dataclass
class ArmResult:
    """What one arm (unpatched or patched) produced and cost."""

    answer: str
    prefill_s: float
    total_s: float
    new_tokens: int
    peak_mem_bytes: int | None
    kv_bytes: int | None
    visual_per_layer: list[int]
    stages: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (first layer, bool [n_visual] kept)
    attention: np.ndarray | None = None  # [n_visual] last prompt token's attention to each patch
    attention_layers: list[int] = field(default_factory=list)
    method_stats: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0


@dataclass
class DemoResult:
    base: ArmResult
    patched: ArmResult
    label: str
    seen_image: Image.Image  # the pixels the model saw (after resize / crop)
    n_visual: int
    device: str
    repeats: int = 1  # timings are medians of this many interleaved runs per arm

    @property
    def grid(self) -> int | None:
        """Side of the square visual-token grid, or None when the layout is not one square image."""
        side = math.isqrt(self.n_visual)
        return side if side * side == self.n_visual and side > 0 else None


def check_question(question: Any) -> str:
    if not isinstance(question, str) or not question.strip():
        raise ValueError("Please type a question.")
    if len(question) > MAX_QUESTION_CHARS:
        raise ValueError(f"The question is {len(question)} characters long; the limit is {MAX_QUESTION_CHARS}.")
    return question.strip()


def open_image(path: str | Path | None) -> Image.Image:
    """The uploaded file as an RGB image, with a one-line ``ValueError`` for anything the demo cannot use."""
    if path is None or not str(path):
        raise ValueError("Please upload an image or draw a testbed scene.")
    try:
        image = Image.open(path)
        width, height = image.size  # header only: a huge image is refused before it is decoded
    except (Image.UnidentifiedImageError, OSError):
        raise ValueError(f"{Path(path).name} is not an image file this demo can read (PNG, JPEG, WebP, ...).") from None
    if min(width, height) < MIN_IMAGE_SIDE or max(width, height) > MAX_IMAGE_SIDE:
        raise ValueError(
            f"The image is {width}×{height} pixels; each side must be between {MIN_IMAGE_SIDE} and {MAX_IMAGE_SIDE}."
        )
    try:
        return image.convert("RGB")
    except (OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"The image could not be decoded: {err}") from None


def resolve_guides(configs: list[MethodConfig], slot: ModelSlot) -> list[MethodConfig]:
    """Give SGL the slot's own guide instance (a shared guide would be patched by two requests at once)."""
    from vlm_accel.methods.sgl import SGLConfig

    return [c.with_guide(slot.guide(c.guide)) if isinstance(c, SGLConfig) and isinstance(c.guide, str) else c
            for c in configs]  # fmt: skip


# ---- attention probe ----------------------------------------------------------------------------------------


@dataclass
class ProbeConfig(MethodConfig):
    method_name: ClassVar[str] = "demo_attention_probe"


class AttentionProbe(Method):
    """An identity row edit placed after every other method's edits: it sees the last prompt token's logits as
    the model will softmax them (after reweighting), records the attention to each image patch, and changes
    nothing. Never registered: it is installed through a private :class:`Runtime` for one un-timed prefill."""

    config_cls = ProbeConfig

    def __init__(self) -> None:
        super().__init__(ProbeConfig())
        self.maps: dict[int, np.ndarray] = {}

    def row_edit(self, layer, state) -> RowEdit | None:
        if not state.is_prefill:
            return None
        return RowEdit(edit=functools.partial(self._record, layer), rows="last")

    def _record(self, layer: int, logits: torch.Tensor, ctx) -> torch.Tensor:
        probs = torch.softmax(logits[0, :, -1].float(), dim=-1).mean(dim=0)  # [N], row 0, head mean
        visual = ctx.state.layout.visual[:1]
        patch_ids = torch.where(visual, visual.long().cumsum(1) - 1, -1)
        columns = ctx.state.window_to_columns(patch_ids, layer, probs.shape[0], -1)[0]
        out = torch.zeros(int(visual.sum()))
        present = columns >= 0
        out[columns[present].cpu()] = probs[present].cpu()
        self.maps[layer] = out.numpy()
        return logits


def edits_attention(configs: list[MethodConfig]) -> bool:
    """Whether any of the methods edits attention rows (the reweighting methods)."""
    return any(get_method_class(c.method_name).row_edit is not Method.row_edit for c in configs)


def probe_attention(model, inputs: dict, configs: list[MethodConfig]) -> dict[int, np.ndarray]:
    """Per-layer attention of the last prompt token to each image patch, with ``configs`` installed (fresh method
    instances) and the probe last; an un-timed prefill."""
    probe = AttentionProbe()
    methods = [get_method_class(c.method_name)(c) for c in configs] + [probe]
    runtime = Runtime(model, adapter_for(model), methods)
    try:
        runtime.install()
        with torch.no_grad():
            model(**inputs, logits_to_keep=1)
    finally:
        runtime.remove()
    return probe.maps


# ---- running one request ------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(device: str, fn) -> tuple[float, Any]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def _cache_bytes(cache: Any) -> int | None:
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    from vlm_accel.eval.bench import cache_bytes

    return cache_bytes(cache)[0]


def _stages(record: PlanRecord | None, num_layers: int, n_visual: int) -> tuple[list[int], list]:
    """Visual tokens present at each decoder layer, and each stage's kept set (row 0)."""
    if record is None:
        return [n_visual] * num_layers, []
    visual = record.visual[0]
    stages = [(s.layer, s.plan.keep_mask(record.window_len)[0][visual].cpu().numpy()) for s in record.stages]
    per_layer = []
    for layer in range(num_layers):
        stage = record.stage_for_layer(layer)
        per_layer.append(n_visual if stage is None else int((stage.plan.keep_mask(record.window_len)[0] & visual).sum()))
    return per_layer, stages


def prepare_inputs(slot: ModelSlot, image: Image.Image, question: str) -> dict:
    from vlm_accel.testbed.evaluate import build_messages

    text = slot.processor.apply_chat_template(build_messages(question), add_generation_prompt=True)
    return slot.processor(images=[image], text=[text], return_tensors="pt").to(slot.device)


def seen_image(slot: ModelSlot, inputs: dict, fallback: Image.Image) -> Image.Image:
    """The processed pixels (de-normalised): exactly the crop the visual tokens cover."""
    pixels = inputs.get("pixel_values")
    image_processor = getattr(slot.processor, "image_processor", None)
    mean, std = getattr(image_processor, "image_mean", None), getattr(image_processor, "image_std", None)
    if pixels is None or pixels.dim() != 4 or mean is None or std is None:
        return fallback
    array = pixels[0].float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return Image.fromarray((array.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def run_arm(slot: ModelSlot, inputs: dict, configs: list[MethodConfig], max_new_tokens: int) -> ArmResult:
    """Measure one arm on ``slot``: unpatched when ``configs`` is empty."""
    model, device = slot.model, slot.device
    if get_patch(model) is not None:
        raise RuntimeError("a demo slot was handed out while still patched")  # the pool's invariant
    n_visual = int(_visual_count(model, inputs))
    num_layers = len(adapter_for(model).decoder_layers(model))
    generate_kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, return_dict_in_generate=True)
    with torch.no_grad(), (patch_model(model, configs) if configs else _nothing()) as patch:
        prefill_s, _ = _timed(device, lambda: model(**inputs, logits_to_keep=1))
        if patch is not None:
            patch.reset_stats()
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        total_s, out = _timed(device, lambda: model.generate(**inputs, **generate_kwargs))
        peak = torch.cuda.max_memory_allocated() if cuda else None
        method_stats = dict(patch.stats.methods) if patch is not None else {}
    sequences = out.sequences if hasattr(out, "sequences") else out
    cache = getattr(out, "past_key_values", None)
    new = sequences[0, inputs["input_ids"].shape[1]:]
    answer = slot.processor.batch_decode(new[None], skip_special_tokens=True)[0].strip()
    per_layer, stages = _stages(getattr(cache, CACHE_ATTRIBUTE, None), num_layers, n_visual)
    return ArmResult(answer, prefill_s, total_s, int(new.numel()), peak, _cache_bytes(cache), per_layer, stages,
                     method_stats=method_stats)  # fmt: skip


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def _visual_count(model, inputs: dict) -> int:
    ids = adapter_for(model).visual_token_ids(model)
    input_ids = inputs["input_ids"][0]
    return int(sum((input_ids == i).sum() for i in ids))


def changed_layers(base: dict[int, np.ndarray], patched: dict[int, np.ndarray]) -> list[int]:
    return [k for k in patched if k in base and not np.allclose(base[k], patched[k], atol=1e-7)]


def run_request(pool: SlotPool, image: Image.Image, question: str, configs: list[MethodConfig],
                max_new_tokens: int = 8, repeats: int = 3) -> DemoResult:  # fmt: skip
    """The whole request on one checked-out slot: the patched and the unpatched arm, interleaved ``repeats`` times
    (medians of the timings; a configuration that cannot bind fails on the first, patched, run), then the
    attention maps of reweighting methods."""
    if not configs:
        raise ValueError("Pick a method.")
    question = check_question(question)
    if not 1 <= int(max_new_tokens) <= 64:
        raise ValueError(f"max new tokens must be in [1, 64], got {max_new_tokens}")
    if not 1 <= int(repeats) <= 10:
        raise ValueError(f"repeats must be in [1, 10], got {repeats}")
    with pool.acquire() as slot:
        configs = resolve_guides(configs, slot)
        inputs = prepare_inputs(slot, image, question)
        runs: dict[str, list[ArmResult]] = {"patched": [], "base": []}
        for _ in range(int(repeats)):
            runs["patched"].append(run_arm(slot, inputs, configs, int(max_new_tokens)))
            runs["base"].append(run_arm(slot, inputs, [], int(max_new_tokens)))
        base, patched = (_median_timings(runs[k]) for k in ("base", "patched"))
        if edits_attention(configs):
            _attention_pair(slot.model, inputs, configs, base, patched)
        label = " + ".join(c.label() for c in configs)
        return DemoResult(base, patched, label, seen_image(slot, inputs, image), _visual_count(slot.model, inputs),
                          slot.device, int(repeats))  # fmt: skip


def _median_timings(runs: list[ArmResult]) -> ArmResult:
    """The last run, with the median prefill and end-to-end times of all runs (greedy: the answers agree)."""
    last = runs[-1]
    last.prefill_s = statistics.median(r.prefill_s for r in runs)
    last.total_s = statistics.median(r.total_s for r in runs)
    return last


def _attention_pair(model, inputs: dict, configs: list[MethodConfig], base: ArmResult, patched: ArmResult) -> None:
    """Attention maps before/after, averaged over the layers where the methods changed them (all if none)."""
    try:
        before = probe_attention(model, inputs, [])
        after = probe_attention(model, inputs, configs)
    except ValueError as err:  # e.g. a future method editing other rows than the last one
        patched.method_stats.setdefault("demo", {})["attention"] = f"not shown: {err}"
        return
    layers = changed_layers(before, after) or sorted(after)
    base.attention_layers = patched.attention_layers = layers
    base.attention = np.mean([before[k] for k in layers], axis=0)
    patched.attention = np.mean([after[k] for k in layers], axis=0)
