"""Training DyVTE's routers on a frozen VLM (methods.md §2.2; official ``DoubtedSteam/DyVTE``,
``scripts/v1_5/finetune_visual_gate.sh``, ``llava/model/language_model/modeling_llama.py``).

Labelling rule (official code): for an exit after layer ``e``, copy **A** runs the model normally and copy **B**
runs layers ``> e`` with the image keys hidden from every query (the exit simulation). The sample is labelled 1
("exit is safe") iff the argmax predictions of A and B agree on more than 99 % of the answer tokens **and**
``loss_B < 1.03 · loss_A`` (per-sample mean cross-entropy over the answer tokens); the router of layer ``e`` is trained
with 2-class cross-entropy (class weights 1, 1) on its input ``[mean text state after the image ; last token state]``
taken after layer ``e`` (detached; the LLM is frozen).

Deviations, each because the LLM is frozen and the testbed is tiny:

- Every exit layer is labelled for every sample (one batched forward: A plus one B copy per layer) instead of one
  ``e ~ U{0..L-1}`` per batch — the same distribution, all of it, at the cost of ``L`` copies; labels and router
  inputs are computed once and the routers trained on the cached pairs for several epochs.
- Router inputs are taken on the prompt (text after the image up to, excluding, the last *prompt* token; plus the
  last prompt token), exactly what the routers see at inference; causal attention makes those states identical
  in the teacher-forced sequence.
- Routers for layers ``0 … L-2`` only (an exit after the last layer drops nothing); router width ``r`` defaults to
  256 instead of 2048 (the testbed's ``testbed-l`` is 128 wide; a 2048-wide router would dwarf it); Adam, lr 1e-3,
  several epochs over a few thousand samples instead of one epoch at lr 6e-5 over a 1 % LLaVA-665k subset.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from vlm_accel.methods.dyvte_routers import DyVTERouters, model_metadata, router_features, text_span_mask


@dataclass
class DyVTETrainConfig:
    """Router training settings (defaults sized for the testbed on a CPU)."""

    router_hidden: int = 256
    epochs: int = 40
    lr: float = 1e-3
    batch_size: int = 64
    label_batch_size: int = 8
    agreement: float = 0.99
    loss_ratio: float = 1.03
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("router_hidden", "epochs", "batch_size", "label_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class RouterExamples:
    """Cached router inputs ``features`` ``[N, R, 2d]`` and labels ``labels`` ``[N, R]`` (1 = exit is safe)."""

    features: torch.Tensor
    labels: torch.Tensor


def teacher_forced_batch(
    processor, rows: Sequence[dict], device: torch.device
) -> tuple[dict, torch.Tensor, int]:
    """Inputs of prompt + answer (+ EOS) for ``rows`` (dicts with image, question, answer), left-padded prompts and
    right-padded answers; returns ``(inputs, answer_ids [B, T] with -100 padding, prompt window W)``."""
    from vlm_accel.testbed.evaluate import build_messages

    texts = [
        processor.apply_chat_template(build_messages(r["question"]), add_generation_prompt=True) for r in rows
    ]
    images = [r["image"].convert("RGB") for r in rows]
    prompt = processor(images=images, text=texts, padding=True, return_tensors="pt")
    tokenizer = processor.tokenizer
    answers = [tokenizer(str(r["answer"]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for r in rows]  # fmt: skip
    steps = max(len(a) for a in answers)
    answer_ids = torch.full((len(rows), steps), -100, dtype=torch.long)
    for i, ids in enumerate(answers):
        answer_ids[i, : len(ids)] = torch.tensor(ids)
    window = prompt["input_ids"].shape[1]
    fill = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.cat(
        [prompt["input_ids"], answer_ids.clamp(min=0).masked_fill(answer_ids < 0, fill)], dim=1
    )
    mask = torch.cat([prompt["attention_mask"], (answer_ids >= 0).long()], dim=1)
    inputs = dict(prompt, input_ids=input_ids, attention_mask=mask)
    inputs["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return (
        {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()},
        answer_ids.to(device),
        window,
    )


@torch.no_grad()
def label_batch(
    model: nn.Module, inputs: dict, answer_ids: torch.Tensor, window: int, config: DyVTETrainConfig
):
    """Router features ``[B, L-1, 2d]`` and labels ``[B, L-1]`` for one teacher-forced batch.

    One eager forward over ``L`` stacked copies: copy 0 is A, copy ``1 + e`` hides the image keys from every query
    in layers ``> e`` (B for an exit after layer ``e``) by masking them in that layer's 4-D mask.
    """
    from vlm_accel.patches import adapter_for

    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    num_layers = len(layers)
    copies = num_layers  # A + one B per exit layer 0 .. L-2
    batch = answer_ids.shape[0]
    visual_ids = adapter.visual_token_ids(model)
    visual = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    for token in visual_ids:
        visual |= inputs["input_ids"] == token
    visual &= inputs["attention_mask"].bool()
    stacked = {}
    for name, value in inputs.items():
        if torch.is_tensor(value) and name != "pixel_values" and value.shape[0] == batch:
            stacked[name] = value.repeat(copies, *([1] * (value.dim() - 1)))
        elif name == "pixel_values":
            stacked[name] = value.repeat(copies, *([1] * (value.dim() - 1)))
        else:
            stacked[name] = value
    exit_after = torch.arange(-1, num_layers - 1, device=visual.device).repeat_interleave(batch)  # -1: copy A
    hidden_image = visual.repeat(copies, 1)

    def hide(index: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        rows = (exit_after >= 0) & (exit_after < index)
        if bool(rows.any()):
            mask = kwargs["attention_mask"]
            columns = hidden_image & rows[:, None]
            kwargs["attention_mask"] = mask.masked_fill(
                columns[:, None, None, :], torch.finfo(mask.dtype).min
            )
        return args, kwargs

    handles = [
        layer.register_forward_pre_hook(functools.partial(hide, i), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    try:
        out = model(**stacked, use_cache=False, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    steps = answer_ids.shape[1]
    logits = out.logits[:, window - 1 : window - 1 + steps].float().view(copies, batch, steps, -1)
    valid = answer_ids >= 0
    target = answer_ids.clamp(min=0)
    losses = F.cross_entropy(logits.flatten(0, 2), target.repeat(copies, 1).flatten(), reduction="none")
    losses = (losses.view(copies, batch, steps) * valid).sum(-1) / valid.sum(-1).clamp(min=1)
    predictions = logits.argmax(-1)
    agree = ((predictions[1:] == predictions[:1]) & valid).sum(-1) / valid.sum(-1).clamp(min=1)
    labels = (agree > config.agreement) & (losses[1:] < config.loss_ratio * losses[:1])  # [L-1, B]
    prompt_visual = visual[:, :window]
    span = text_span_mask(prompt_visual, inputs["attention_mask"][:, :window].bool())
    features = torch.stack(
        [router_features(out.hidden_states[e + 1][:batch, :window], span) for e in range(num_layers - 1)],
        dim=1,
    )
    return features, labels.T.long()


def collect_examples(
    model: nn.Module, processor, dataset, config: DyVTETrainConfig, progress: bool = False
) -> RouterExamples:
    """Label every exit layer of every sample of ``dataset`` (rows with image, question, answer)."""
    device = next(model.parameters()).device
    original = model.config.text_config._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})  # the exit simulation edits 4-D masks
    feats, labels = [], []
    start = time.perf_counter()
    try:
        for first in range(0, len(dataset), config.label_batch_size):
            rows = [dataset[i] for i in range(first, min(len(dataset), first + config.label_batch_size))]
            inputs, answers, window = teacher_forced_batch(processor, rows, device)
            f, y = label_batch(model, inputs, answers, window, config)
            feats.append(f.cpu())
            labels.append(y.cpu())
            if progress and (first // config.label_batch_size) % 20 == 0:
                print(
                    f"labelled {first + len(rows)}/{len(dataset)} ({time.perf_counter() - start:.0f}s)",
                    flush=True,
                )
    finally:
        model.set_attn_implementation({"text_config": original})
    return RouterExamples(torch.cat(feats), torch.cat(labels))


def fit_routers(
    examples: RouterExamples, hidden_size: int, config: DyVTETrainConfig
) -> tuple[DyVTERouters, dict]:
    """Train one router per layer on the cached examples; returns the routers and a report (per-layer positive
    rate and train/validation accuracy)."""
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    n, num_routers = examples.labels.shape
    order = torch.randperm(n, generator=generator)
    n_val = int(math.floor(n * config.val_fraction))
    val, train = order[:n_val], order[n_val:]
    routers = DyVTERouters(hidden_size, num_routers, config.router_hidden)
    optimizer = torch.optim.Adam(routers.parameters(), lr=config.lr)
    features = torch.nan_to_num(examples.features.float())  # empty text spans (NaN mean) train as zeros
    labels = examples.labels
    for _ in range(config.epochs):
        perm = train[torch.randperm(len(train), generator=generator)]
        for first in range(0, len(perm), config.batch_size):
            idx = perm[first : first + config.batch_size]
            logits = routers.all_layers(features[idx])  # [b, R, 2]
            loss = F.cross_entropy(logits.flatten(0, 1), labels[idx].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    routers.eval()

    def accuracy(idx: torch.Tensor) -> list[float]:
        if len(idx) == 0:
            return []
        with torch.no_grad():
            pred = routers.all_layers(features[idx]).argmax(-1)
        return ((pred == labels[idx]).float().mean(0)).tolist()

    report = {
        "examples": n,
        "positive_rate_per_layer": labels.float().mean(0).tolist(),
        "train_accuracy_per_layer": accuracy(train),
        "val_accuracy_per_layer": accuracy(val),
    }
    return routers, report


def train_routers(
    model: nn.Module, processor, dataset, config: DyVTETrainConfig | None = None, progress: bool = False
) -> tuple[DyVTERouters, dict[str, Any]]:
    """Label ``dataset`` with the frozen ``model`` and train its routers (see the module docstring)."""
    config = config or DyVTETrainConfig()
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    start = time.perf_counter()
    examples = collect_examples(model, processor, dataset, config, progress)
    label_s = time.perf_counter() - start
    from vlm_accel.patches import adapter_for

    hidden = int(adapter_for(model).text_config(model).hidden_size)
    routers, report = fit_routers(examples, hidden, config)
    report.update(
        label_seconds=label_s, fit_seconds=time.perf_counter() - start - label_s, config=asdict(config)
    )
    return routers, report


def save_routers(routers: DyVTERouters, model: nn.Module, path, report: dict[str, Any]) -> None:
    """Write routers with the model's metadata (shape + fingerprint checks at load) and the training report."""
    meta = model_metadata(model)
    meta["training"] = {k: report[k] for k in ("examples", "positive_rate_per_layer", "val_accuracy_per_layer",
                                               "config") if k in report}  # fmt: skip
    routers.save(path, meta)
