"""MoH routers (Jin et al., "MoH: Multi-Head Attention as Mixture-of-Head Attention", arXiv 2410.11842, ICML 2025;
official code ``SkyworkAI/MoH``) and the head geometry they act on.

A *unit* is what a router turns on or off: one query head, or one KV group (the ``G = Hq / Hkv`` query heads
that read the same K/V — the granularity at which a decode step can skip reading K/V). Units ``0 … h_s-1`` are the
always-on **shared** units, units ``h_s … U-1`` are **routed**: each token turns on the top ``k`` of them.

- :func:`qnorm_gates` — the parameter-free router of the released MoH-LLaMA3 inference code
  (``MoH-LLaMA3/Inference_code/modeling_llama.py``): routing logit of unit ``i`` = ``‖q_i‖₂``, divided by the
  (unbiased) std of those logits across the routed units, softmax, top-k; binary gates.
- :class:`LearnedRouter` — the paper's Eq. 5–6 with the official ViT/DiT code's scalings (``MoH-DiT/models.py``)::

      routed:  p = softmax(W_r x);  g_r = k · p ⊙ m / Σ(p ⊙ m)          (m: top-k mask; renormalised, ×k)
      shared:  g_s = h_s · softmax(W_s x)
      balance: [α1, α2] = 2 · softmax(W_h x);  g = [α1 · g_s ; α2 · g_r]
      load balance (training): L_b = E² · mean_i(P_i f_i),  β = 0.01   (P: mean p, f: mean m over tokens)

  With zero weights every active gate is exactly 1 (plain summation), which is where training starts.

File format of learned routers (safetensors): per layer ``layers.{l}.routed`` ``[E, d]``, ``layers.{l}.shared``
``[h_s, d]`` and ``layers.{l}.balance`` ``[2, d]`` (each present only when its part exists); metadata
``format = vlm_accel.moh.router``, the unit geometry (``units``, ``shared_units``, ``top_k``, ``per_kv_group``) and
the model's (:func:`~vlm_accel.methods.dyvte_routers.model_metadata`: type, layers, hidden size, fingerprint).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

FORMAT = "vlm_accel.moh.router"


@dataclass(frozen=True)
class HeadUnits:
    """Routing geometry on one model: ``units`` (heads or KV groups), ``shared`` always-on units, ``top_k`` routed
    units per token, ``heads_per_unit`` query heads per unit."""

    units: int
    shared: int
    top_k: int
    heads_per_unit: int

    @property
    def routed(self) -> int:
        return self.units - self.shared

    @property
    def active(self) -> int:
        return self.shared + self.top_k

    @property
    def all_active(self) -> bool:
        return self.active == self.units

    def to_heads(self, unit_gates: torch.Tensor) -> torch.Tensor:
        """``[..., U]`` → ``[..., Hq]`` (each unit's gate on each of its query heads)."""
        if self.heads_per_unit == 1:
            return unit_gates
        return unit_gates.repeat_interleave(self.heads_per_unit, dim=-1)


def count_of(name: str, value: float | int, total: int) -> int:
    """A fraction in (0, 1] (of ``total``, rounded) or an int count, as a count in [0, total]."""
    if isinstance(value, float):
        count = round(value * total)
    else:
        count = int(value)
    if not 0 <= count <= total:
        raise ValueError(f"moh: {name}={value!r} gives {count} of {total} units; it must be within [0, {total}]")
    return count


def resolve_units(
    num_heads: int,
    num_kv_heads: int,
    active: float | int,
    shared: float | int | None,
    per_kv_group: bool,
) -> HeadUnits:
    """The unit geometry of a config on a model (``ValueError`` when it does not fit).

    ``shared=None`` follows the MoH-LLaMA3 release's proportion (16 shared + 8 of 16 routed = 24 of 32 active): the
    routed pool is twice the routed count, i.e. ``h_s = 2·active − U`` (clamped at 0).
    """
    units = num_kv_heads if per_kv_group else num_heads
    if num_heads % units:
        raise ValueError(f"moh: {num_heads} query heads do not split into {units} KV groups")
    n_active = count_of("active_heads", active, units)
    if n_active < 1:
        raise ValueError(f"moh: active_heads={active!r} leaves no active unit of {units}")
    n_shared = max(0, 2 * n_active - units) if shared is None else count_of("shared_heads", shared, units)
    if n_shared > n_active:
        raise ValueError(f"moh: shared_heads ({n_shared}) exceeds active_heads ({n_active}) of {units} units")
    return HeadUnits(units, n_shared, n_active - n_shared, num_heads // units)


def unit_query_norms(query: torch.Tensor, units: HeadUnits) -> torch.Tensor:
    """``‖q_unit‖₂`` ``[B, q, U]`` (fp32) from queries ``[B, Hq, q, D]``; a KV group's norm is over all its heads.

    The runtime hands post-RoPE queries; RoPE rotates pairs of channels, so the norms are the pre-RoPE ones (the
    official router reads ``q`` before RoPE) up to rounding."""
    squares = query.float().square().sum(dim=-1).transpose(1, 2)  # [B, q, Hq]
    if units.heads_per_unit > 1:
        squares = squares.unflatten(-1, (units.units, units.heads_per_unit)).sum(dim=-1)
    return squares.sqrt()


def qnorm_gates(query: torch.Tensor, units: HeadUnits) -> torch.Tensor:
    """Binary unit gates ``[B, q, U]`` (bool) of the parameter-free MoH-LLaMA3 router (see the module docstring)."""
    batch, _, q_len, _ = query.shape
    gates = torch.zeros(batch, q_len, units.units, dtype=torch.bool, device=query.device)
    gates[..., : units.shared] = True
    if units.top_k == units.routed:
        gates[..., units.shared :] = True
        return gates
    if units.top_k == 0:
        return gates
    logits = unit_query_norms(query, units)[..., units.shared :]
    std = logits.std(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    scores = torch.softmax(logits / std, dim=-1)
    chosen = scores.topk(units.top_k, dim=-1).indices
    gates[..., units.shared :] = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, chosen, True)
    return gates


class LearnedRouter(nn.Module):
    """The paper's router for every layer (stacked weights; see the module docstring for the gate formula)."""

    def __init__(self, num_layers: int, hidden_size: int, units: HeadUnits) -> None:
        super().__init__()
        self.units = units
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        e, s = units.routed, units.shared
        self.routed = nn.Parameter(torch.zeros(num_layers, e, hidden_size)) if e and units.top_k else None
        self.shared = nn.Parameter(torch.zeros(num_layers, s, hidden_size)) if s else None
        self.balance = (
            nn.Parameter(torch.zeros(num_layers, 2, hidden_size)) if self.routed is not None and s else None
        )
        #: training only: the load-balance term of every routed layer of the current forward (read by the trainer)
        self.balance_losses: list[torch.Tensor] = []

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Unit gates ``[B, q, U]`` (fp32) for the attention input ``hidden`` ``[B, q, d]`` at ``layer``.

        In training mode the top-k mask passes gradients straight through to the routing probabilities
        (``m + p − sg(p)``), so a routed-out unit's usefulness reaches the router — without it a top-1 router gets
        no gradient at all through its renormalised gate (our deviation; the forward is unchanged).
        """
        x = hidden.float()
        u = self.units
        parts = []
        if self.shared is not None:
            parts.append(u.shared * torch.softmax(F.linear(x, self.shared[layer]), dim=-1))
        if u.routed:
            if self.routed is None:  # no routed unit is active (top_k = 0)
                parts.append(x.new_zeros(*x.shape[:-1], u.routed))
            else:
                probs = torch.softmax(F.linear(x, self.routed[layer]), dim=-1)
                chosen = probs.topk(u.top_k, dim=-1).indices
                mask = torch.zeros_like(probs).scatter(-1, chosen, 1.0)
                if self.training:
                    self.balance_losses.append(
                        (probs.flatten(0, -2).mean(0) * mask.flatten(0, -2).mean(0)).mean() * u.routed**2
                    )
                    mask = mask + probs - probs.detach()
                picked = probs * mask
                picked = picked / picked.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(picked.dtype).eps)
                parts.append(u.top_k * picked)
        if self.balance is not None:
            alpha = 2 * torch.softmax(F.linear(x, self.balance[layer]), dim=-1)
            parts = [alpha[..., :1] * parts[0], alpha[..., 1:] * parts[1]]
        return torch.cat(parts, dim=-1)

    # ------------------------------------------------------------------------------------------ files

    def save(self, path: str | Path, metadata: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for name in ("routed", "shared", "balance"):
            weights = getattr(self, name)
            if weights is not None:
                for layer in range(self.num_layers):
                    tensors[f"layers.{layer}.{name}"] = weights[layer].detach().float().contiguous()
        u = self.units
        meta = {"format": FORMAT, "units": str(u.units), "shared_units": str(u.shared), "top_k": str(u.top_k),
                "heads_per_unit": str(u.heads_per_unit), "hidden_size": str(self.hidden_size),
                "router_layers": str(self.num_layers),
                **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}  # fmt: skip
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> tuple[LearnedRouter, dict[str, str]]:
        """Read a router file; ``ValueError`` (one line) for a missing, corrupt, foreign or inconsistent file."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"moh: router file {path} does not exist (train one with `vlm-accel train moh`)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        except Exception as err:  # safetensors raises its own error types for a damaged header
            raise ValueError(f"moh: {path} is not a readable safetensors file ({type(err).__name__}: {err})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"moh: {path} is not an MoH router file (metadata format {meta.get('format')!r})")
        try:
            units = HeadUnits(int(meta["units"]), int(meta["shared_units"]), int(meta["top_k"]),
                              int(meta["heads_per_unit"]))  # fmt: skip
            hidden, layers = int(meta["hidden_size"]), int(meta["router_layers"])
        except (KeyError, ValueError) as err:
            raise ValueError(f"moh: {path} lacks router geometry metadata ({err})") from None
        router = cls(layers, hidden, units)
        expected = {f"layers.{layer}.{name}" for layer in range(layers) for name in ("routed", "shared", "balance")
                    if getattr(router, name) is not None}  # fmt: skip
        if set(tensors) != expected:
            raise ValueError(f"moh: {path} holds tensors {sorted(tensors)[:4]}…, expected {sorted(expected)[:4]}…")
        for name in ("routed", "shared", "balance"):
            weights = getattr(router, name)
            if weights is None:
                continue
            stacked = torch.stack([tensors[f"layers.{layer}.{name}"] for layer in range(layers)])
            if stacked.shape != weights.shape:
                raise ValueError(
                    f"moh: {name} weights in {path} have shape {tuple(stacked.shape)}, expected {tuple(weights.shape)}"
                )
            weights.data.copy_(stacked)
        return router.eval(), meta


def check_router(
    router: LearnedRouter, meta: dict[str, str], model: nn.Module, units: HeadUnits, check_fingerprint: bool
) -> None:
    """``ValueError`` unless ``router`` fits ``model`` and the config's unit geometry (and, optionally, was trained
    on these weights)."""
    from vlm_accel.methods.dyvte_routers import model_fingerprint
    from vlm_accel.patches import adapter_for

    text = adapter_for(model).text_config(model)
    hidden, layers = int(text.hidden_size), int(text.num_hidden_layers)
    if router.hidden_size != hidden or router.num_layers != layers:
        raise ValueError(
            f"moh: the router file is for {router.num_layers} layers of width {router.hidden_size}, but this model has "
            f"{layers} layers of width {hidden}"
        )
    if router.units != units:
        r = router.units
        raise ValueError(
            f"moh: the router was trained for {r.shared} shared + top-{r.top_k} of {r.routed} routed units "
            f"({r.heads_per_unit} head(s) per unit), but the config asks for {units.shared} shared + top-{units.top_k} "
            f"of {units.routed} ({units.heads_per_unit} per unit); set active_heads/shared_heads/per_kv_group to match"
        )
    if check_fingerprint and meta.get("fingerprint") != model_fingerprint(model):
        tuned = '"tune_lm": true' in meta.get("training", "")
        hint = ("it was trained with a continue-tuned language model: pass lm_file='<router>.lm.safetensors'"
                if tuned else "retrain with `vlm-accel train moh`, or pass check_fingerprint=False")  # fmt: skip
        raise ValueError(
            f"moh: this router was trained for another model ({meta.get('model_name') or 'unnamed'}, fingerprint "
            f"{meta.get('fingerprint')}) than this one (fingerprint {model_fingerprint(model)}); {hint}"
        )
