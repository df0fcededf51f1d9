"""MoH — "MoH: Multi-Head Attention as Mixture-of-Head Attention" (Jin et al., arXiv 2410.11842, ICML 2025; official
code ``SkyworkAI/MoH``).

Attention heads are experts: each token uses the always-on shared heads plus its top-k routed heads, and the
layer's output is the (weighted) sum over its active heads only (paper Eq. 2–6)::

    O = Σ_i g_i · H_i W_O^i,    g_i = 0 for a routed head outside the token's top-k

On the runtime (:meth:`Method.head_gates`): at prefill the gates multiply the per-head attention output before
``o_proj`` (exact; every backend untouched). At a decode step the runtime hands the gates to
:func:`vlm_accel.kernels.head_sparse_decode_attention`, which does not read the K/V of a KV group none of whose heads
is active (``per_kv_group=True`` routes whole groups, the granularity at which reads can be skipped).

Routers (:mod:`vlm_accel.methods.moh_router`):

- ``router="qnorm"`` — the parameter-free router of the released MoH-LLaMA3 inference code (binary gates). That
  code runs on a model continue-tuned with MoH; applying it to a model never trained with MoH is **our own
  deviation** (training-free MoH), whose accuracy cost docs/methods/moh.md measures.
- ``router="learned"`` — the paper's weighted router, trained on the frozen model by ``vlm-accel train moh``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from vlm_accel.config import MethodConfig, check_number
from vlm_accel.methods.base import KIND_GATES, GateContext, HeadGates, Method
from vlm_accel.methods.moh_router import HeadUnits, LearnedRouter, check_router, qnorm_gates, resolve_units
from vlm_accel.runtime.state import ForwardState

ROUTERS = ("qnorm", "learned")


def check_heads(name: str, value: Any, allow_zero: bool) -> None:
    """A head share: a float fraction in (0, 1] ([0, 1] for ``allow_zero``) or an int count."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a fraction (float) or a count (int), got {type(value).__name__} {value!r}")
    low = 0 if allow_zero else (0.0 if isinstance(value, float) else 1)
    if isinstance(value, float):
        value = check_number(name, value)
        if not (low <= value <= 1.0) or (value == 0.0 and not allow_zero):
            raise ValueError(f"{name} as a fraction must be in {'[0' if allow_zero else '(0'}, 1], got {value}")
    elif value < low:
        raise ValueError(f"{name} as a count must be >= {low}, got {value}")


@dataclass
class MoHConfig(MethodConfig):
    """``active_heads``: share of heads each token uses — a float fraction of the heads (or KV groups) or an int
    count; ``shared_heads``: the always-on part of them (None: the MoH-LLaMA3 release's proportion, ``2·active −
    all``, i.e. 16 shared + 8 of 16 routed at 75 %); ``per_kv_group``: route whole KV groups (GQA) instead of query
    heads; ``router_file``: the learned router (``router="learned"``); ``lm_file``: the continue-tuned language model
    trained with that router (``vlm-accel train moh --tune-lm`` writes ``<router>.lm.safetensors``), swapped in for
    the patch's lifetime and swapped back bitwise on removal; ``check_fingerprint``: refuse a router trained on other
    weights; ``sparse_decode``: decode on the head-sparse op (False: gate the dense output)."""

    method_name: ClassVar[str] = "moh"
    router: str = "qnorm"
    active_heads: float | int = 0.75
    shared_heads: float | int | None = None
    per_kv_group: bool = False
    router_file: str | None = None
    lm_file: str | None = None
    check_fingerprint: bool = True
    sparse_decode: bool = True

    def validate(self) -> None:
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")
        check_heads("active_heads", self.active_heads, allow_zero=False)
        if self.shared_heads is not None:
            check_heads("shared_heads", self.shared_heads, allow_zero=True)
        for name in ("per_kv_group", "check_fingerprint", "sparse_decode"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.router_file, Path):
            self.router_file = str(self.router_file)
        if isinstance(self.lm_file, Path):
            self.lm_file = str(self.lm_file)
        if self.lm_file is not None and (self.router != "learned" or not isinstance(self.lm_file, str)):
            raise ValueError("lm_file (a continue-tuned language model, a path) goes with router='learned' only")
        if self.router == "learned" and (not isinstance(self.router_file, str) or not self.router_file):
            raise ValueError(
                "router='learned' needs router_file='router.safetensors' (from `vlm-accel train moh`, or the shipped "
                "testbed-l routers: vlm_accel.methods.moh.shipped_router(active_heads))"
            )
        if self.router == "qnorm" and self.router_file is not None:
            raise ValueError("router_file is for router='learned'; the qnorm router has no weights")

    def label(self) -> str:
        share = f"{self.active_heads:.0%}" if isinstance(self.active_heads, float) else f"{self.active_heads}h"
        return f"moh-{self.router}-{share}{'-kv' if self.per_kv_group else ''}{'+tuned-LM' if self.lm_file else ''}"


def shipped_router(active_heads: float, model: str = "testbed-l", tuned: bool = False) -> Path:
    """A shipped learned router of a testbed model for an active fraction: ``moh_router_75.safetensors`` (trained on
    the frozen model) or, with ``tuned=True``, ``moh_router_75_tuned.safetensors`` (trained with a short continue-tune
    of the language model, shipped next to it as ``moh_router_75_tuned.lm.safetensors``)."""
    from vlm_accel.testbed.models import model_dir

    return model_dir(model) / f"moh_router_{round(active_heads * 100)}{'_tuned' if tuned else ''}.safetensors"


def shipped_lm(active_heads: float, model: str = "testbed-l") -> Path:
    """The continue-tuned language model shipped with the ``tuned`` router (``moh_router_75_tuned.lm.safetensors``)."""
    router = shipped_router(active_heads, model, tuned=True)
    return router.with_name(router.stem + ".lm.safetensors")


def shipped_config(active_heads: float, model: str = "testbed-l", tuned: bool = False) -> MoHConfig:
    """The learned-router config of a shipped testbed router (``tuned``: with its continue-tuned language model)."""
    return MoHConfig(router="learned", active_heads=active_heads,
                     router_file=str(shipped_router(active_heads, model, tuned)),
                     lm_file=str(shipped_lm(active_heads, model)) if tuned else None)  # fmt: skip


class LanguageModelSwap:
    """Swaps a continue-tuned language model's weights in for a patch's lifetime and restores the originals exactly.

    The file must hold exactly the language model's state-dict keys with the same shapes (else a one-line
    ``ValueError`` and nothing is touched); values are cast to each parameter's dtype and device on copy."""

    def __init__(self, path: str) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not Path(path).is_file():
            raise ValueError(f"moh: lm_file {path} does not exist")
        try:
            self.state = load_file(path)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"moh: lm_file {path} is not a safetensors file ({err})") from None
        self.path = path
        self.saved: dict[str, torch.Tensor] | None = None
        self.module: torch.nn.Module | None = None

    def apply(self, language_model: torch.nn.Module) -> None:
        own = language_model.state_dict()
        missing, extra = sorted(set(own) - set(self.state)), sorted(set(self.state) - set(own))
        if missing or extra:
            raise ValueError(f"moh: lm_file {self.path} does not fit this language model (missing {missing[:3]}, "
                             f"unexpected {extra[:3]})")  # fmt: skip
        wrong = [k for k, v in self.state.items() if tuple(v.shape) != tuple(own[k].shape)]
        if wrong:
            raise ValueError(f"moh: lm_file {self.path} has other shapes than this language model ({wrong[0]}: "
                             f"{tuple(self.state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)})")  # fmt: skip
        self.saved = {k: v.detach().clone() for k, v in own.items()}
        self.module = language_model
        with torch.no_grad():
            for key, value in own.items():
                value.copy_(self.state[key])

    def restore(self) -> None:
        if self.saved is None or self.module is None:
            return
        with torch.no_grad():
            for key, value in self.module.state_dict().items():
                value.copy_(self.saved[key])
        self.saved = self.module = None


class MoH(Method):
    """Mixture-of-Head attention routing; see the module docstring."""

    config_cls = MoHConfig
    kind_rank = KIND_GATES
    config: MoHConfig

    def __init__(self, config: MoHConfig) -> None:
        super().__init__(config)
        self.units: HeadUnits | None = None
        self.router: LearnedRouter | None = None
        self.metadata: dict[str, str] = {}
        self._num_kv_heads = 0
        self._totals: dict[str, torch.Tensor | float] = {}
        self._lm_swap: LanguageModelSwap | None = None

    @classmethod
    def example_config(cls) -> MoHConfig:
        return MoHConfig()

    @classmethod
    def noop_config(cls) -> MoHConfig:
        """Every head active: no gate at all (bitwise the unpatched model)."""
        return MoHConfig(active_heads=1.0)

    @classmethod
    def sweep_configs(cls, keep_ratios) -> list[MethodConfig]:
        """``vlm-accel compare``: the qnorm router at 75 % and 50 % of heads, and the shipped testbed-l learned router
        at 75 % with its continue-tuned language model when present (on another model compare skips it: the router's
        fingerprint check refuses it). ``benchmarks/moh_testbed.py`` evaluates every shipped router."""
        configs: list[MethodConfig] = [MoHConfig(active_heads=0.75), MoHConfig(active_heads=0.5)]
        tuned = shipped_config(0.75, tuned=True)
        if Path(tuned.router_file).is_file() and Path(tuned.lm_file).is_file():
            configs.append(tuned)
        return configs

    def bind(self, ctx) -> None:
        super().bind(ctx)
        text = ctx.text_config
        heads = int(text.num_attention_heads)
        self._num_kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        c = self.config
        self.units = resolve_units(heads, self._num_kv_heads, c.active_heads, c.shared_heads, c.per_kv_group)
        if c.router == "learned":
            self.router, self.metadata = LearnedRouter.load(c.router_file)
            if c.lm_file is not None:  # the router's fingerprint is the tuned model's: swap it in before the check
                self._lm_swap = LanguageModelSwap(c.lm_file)
                self._lm_swap.apply(ctx.adapter.language_model(ctx.model))
            check_router(self.router, self.metadata, ctx.model, self.units, c.check_fingerprint)
            self.router.to(next(ctx.model.parameters()).device)
        self._totals = {"tokens": 0.0, "active_heads": 0.0, "decode_groups": 0.0, "decode_groups_read": 0.0}

    def unbind(self) -> None:
        if self._lm_swap is not None:
            self._lm_swap.restore()
            self._lm_swap = None

    @property
    def is_noop(self) -> bool:
        return self.config.router == "qnorm" and self.units is not None and self.units.all_active

    def unit_gates(self, layer: int, ctx: GateContext) -> torch.Tensor:
        """Gates per unit ``[B, q, U]``: bool (qnorm) or fp32 weights (learned)."""
        if self.router is None:
            return qnorm_gates(ctx.query, self.units)
        if ctx.hidden is None:
            raise RuntimeError("moh: the learned router needs the attention input; the runtime did not capture it")
        return self.router(layer, ctx.hidden)

    def head_gates(self, layer: int, ctx: GateContext, state: ForwardState) -> HeadGates | None:
        if self.is_noop:
            return None
        weights = self.units.to_heads(self.unit_gates(layer, ctx))
        self._account(weights, ctx)
        return HeadGates(weights, sparse_decode=self.config.sparse_decode)

    def _account(self, weights: torch.Tensor, ctx: GateContext) -> None:
        """Running totals (kept as tensors: no device sync per layer) of active heads and, at decode, of the KV
        groups the step reads."""
        with torch.no_grad():
            active = weights != 0
            t = self._totals
            t["tokens"] += active.shape[0] * active.shape[1]
            t["active_heads"] = t["active_heads"] + active.float().mean(-1).sum()
            if ctx.is_decode:
                groups = active.unflatten(-1, (ctx.num_kv_heads, -1)).any(-1)
                t["decode_groups"] += groups.numel()
                t["decode_groups_read"] = t["decode_groups_read"] + groups.float().sum()

    def stats(self) -> dict[str, Any]:
        t = self._totals
        if not t:
            return {}
        u = self.units
        tokens, groups = float(t["tokens"]), float(t["decode_groups"])
        return {
            "units": u.units,
            "shared_units": u.shared,
            "top_k": u.top_k,
            "active_head_fraction": float(t["active_heads"]) / tokens if tokens else 1.0,
            "decode_kv_groups_read": float(t["decode_groups_read"]) / groups if groups else 1.0,
        }
