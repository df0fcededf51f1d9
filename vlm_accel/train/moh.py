"""Training MoH's learned router on a frozen VLM (methods.md §3; paper Eq. 5–7, official ``MoH-DiT/models.py``).

Loss = answer cross-entropy + β · Σ_layers L_b (β = 0.01, the paper's and official code's coefficient;
``L_b = E² · mean_i(P_i f_i)``), on the testbed's packed training batches (:func:`vlm_accel.testbed.packing.make_batch`:
several question–answer turns per image, loss on answer tokens only; batches are a pure function of the seed and the
step, so a run is reproducible). The forward is the patched model itself (``patch_model`` with the router being
trained), so training sees exactly the gates inference uses.

Deviations, because the base is frozen and the budget is minutes on a CPU:

- The paper trains the router jointly with the model (MoH-LLaMA3: 400B tokens of continue-tuning); here the base
  is frozen and only the router learns (``tune_lm=True`` adds a short continue-tune of the language model, saved as
  its own safetensors file next to the router).
- The top-k mask passes gradients straight through (:class:`~vlm_accel.methods.moh_router.LearnedRouter`), so a
  routed-out head's usefulness reaches the router.
- Router weights start at zero (every active gate exactly 1, ties broken by index), Adam, a few hundred steps.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class MoHTrainConfig:
    """Router training settings (defaults sized for testbed-l on one CPU thread)."""

    active_heads: float | int = 0.75
    shared_heads: float | int | None = None
    per_kv_group: bool = False
    steps: int = 300
    batch_size: int = 8
    qas_per_image: int = 8
    lr: float = 5e-3
    warmup: int = 20
    balance_coef: float = 0.01
    seed: int = 0
    tune_lm: bool = False
    lm_lr: float = 1e-4

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "qas_per_image"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("lr", "lm_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.balance_coef >= 0:
            raise ValueError(f"balance_coef must be >= 0, got {self.balance_coef}")


def _lr_scale(step: int, config: MoHTrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10 %."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def answer_loss(model: nn.Module, batch) -> torch.Tensor:
    """Mean cross-entropy of the answer (and end-of-answer) tokens of a packed testbed batch, full model forward."""
    logits = model(
        input_ids=batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask, use_cache=False
    ).logits
    predicted = logits[batch.target_rows, batch.target_pos - 1].float()
    return F.cross_entropy(predicted, batch.input_ids[batch.target_rows, batch.target_pos])


def train_router(model: nn.Module, config: MoHTrainConfig | None = None, progress: bool = False):
    """Train a :class:`~vlm_accel.methods.moh_router.LearnedRouter` on the frozen ``model`` (a testbed model: the
    batches are testbed conversations). Returns ``(router, report, lm_state or None)``."""
    from vlm_accel import patch_model
    from vlm_accel.methods.dyvte_routers import model_metadata
    from vlm_accel.methods.moh import MoHConfig
    from vlm_accel.methods.moh_router import LearnedRouter, resolve_units
    from vlm_accel.patches import adapter_for
    from vlm_accel.testbed.packing import make_batch

    config = config or MoHTrainConfig()
    torch.manual_seed(config.seed)
    adapter = adapter_for(model)
    text = adapter.text_config(model)
    heads = int(text.num_attention_heads)
    units = resolve_units(heads, int(getattr(text, "num_key_value_heads", None) or heads), config.active_heads,
                          config.shared_heads, config.per_kv_group)  # fmt: skip
    device = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    language_model = adapter.language_model(model)
    lm_params = [p for p in language_model.parameters()] if config.tune_lm else []
    for p in lm_params:
        p.requires_grad_(True)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        start_file = Path(tmp) / "router.safetensors"
        LearnedRouter(int(text.num_hidden_layers), int(text.hidden_size), units).save(
            start_file, model_metadata(model)
        )
        moh = MoHConfig(router="learned", active_heads=config.active_heads, shared_heads=config.shared_heads,
                        per_kv_group=config.per_kv_group, router_file=str(start_file))  # fmt: skip
        patch = patch_model(model, moh)
    router = patch.methods[0].router
    router.train()
    groups = [{"params": list(router.parameters()), "lr": config.lr}]
    if lm_params:
        groups.append({"params": lm_params, "lr": config.lm_lr})
    optimizer = torch.optim.Adam(groups)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    try:
        for step in range(config.steps):
            for group, lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = lr * _lr_scale(step, config)
            batch = make_batch(config.seed, step, config.batch_size, config.qas_per_image).to(device)
            router.balance_losses.clear()
            task = answer_loss(model, batch)
            balance = torch.stack(router.balance_losses).sum() if router.balance_losses else task.new_zeros(())
            loss = task + config.balance_coef * balance
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append({"step": step, "task": task.item(), "balance": balance.item()})
            if progress and (step % 20 == 0 or step == config.steps - 1):
                recent = history[-20:]
                print(f"step {step}: task {sum(h['task'] for h in recent) / len(recent):.4f} balance "
                      f"{balance.item():.3f} ({time.perf_counter() - start:.0f}s)", flush=True)  # fmt: skip
    finally:
        router.balance_losses.clear()
        router.eval()
        patch.remove()
        for p in model.parameters():
            p.requires_grad_(False)
    report: dict[str, Any] = {
        "config": asdict(config),
        "units": asdict(units),
        "seconds": time.perf_counter() - start,
        "first_task_loss": sum(h["task"] for h in history[:20]) / min(20, len(history)),
        "last_task_loss": sum(h["task"] for h in history[-20:]) / min(20, len(history)),
    }
    lm_state = {k: v.detach().clone() for k, v in language_model.state_dict().items()} if config.tune_lm else None
    return router, report, lm_state


def save_router(router, model: nn.Module, path, report: dict[str, Any], lm_state: dict | None = None) -> None:
    """Write the router with the model's metadata (shape + fingerprint checks at load) and the training summary; a
    continue-tuned language model goes to ``<path stem>.lm.safetensors`` (load it into the model's language model
    with ``load_state_dict`` before patching; the router then records the tuned model's fingerprint)."""
    from vlm_accel.methods.dyvte_routers import model_metadata

    meta = model_metadata(model)
    meta["training"] = {k: report[k] for k in ("config", "first_task_loss", "last_task_loss", "seconds") if k in report}
    router.save(path, meta)
    if lm_state is not None:
        from safetensors.torch import save_file

        path = Path(path)
        save_file({k: v.contiguous() for k, v in lm_state.items()}, str(path.with_name(path.stem + ".lm.safetensors")))
