"""DyVTE — "Accelerating Multimodal Large Language Models via Dynamic Visual-Token Exit and the Empirical Findings"
(arXiv 2411.19628, NeurIPS 2025; official code ``DoubtedSteam/DyVTE``).

After each decoder layer ``l`` a router (:mod:`vlm_accel.methods.dyvte_routers`) reads
``[mean of the text states after the image, excluding the last token ; the last token's state]`` and votes whether
the visual tokens may exit. At the first layer that votes exit, **all** visual tokens are removed from the hidden
states, positions and masks of layers ``l+1 … L-1`` (survivors keep their original positions); layers ``≤ l`` keep
their visual K/V, deeper layers never hold any, so decode inherits the visual-free cache. Routers act at prefill
only (official code: the exit layer is remembered; with no exit, decode-time evaluation sees an empty span, NaN,
no exit).

On the runtime: the router of layer ``l`` runs in :meth:`DyVTE.select` at layer ``l+1`` on ``state.layer_input`` (the
hidden state after layer ``l``). Batch > 1 (the official code is batch 1 with hard-coded positions 35..610): each row
exits at its own layer — a stage at each layer where some row exits drops that row's visual tokens (rows keeping
different counts are left-padded and masked by the runtime), so every row gives what it gives alone. Visual tokens
are located from the image-token ids, and the text span excludes padding.

``exit_layer`` forces every row to exit after that layer — the paper's static-exit analysis (§3, "visual tokens
stop contributing after a certain layer"), for testing and ablation; it needs no routers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from vlm_accel.config import MethodConfig, check_int, check_number
from vlm_accel.methods.base import KIND_SELECTION, Method
from vlm_accel.methods.dyvte_routers import DyVTERouters, check_routers, router_features, text_span_mask
from vlm_accel.runtime.devices import execution_device
from vlm_accel.runtime.plan import KeepPlan
from vlm_accel.runtime.state import ForwardState


@dataclass
class DyVTEConfig(MethodConfig):
    """``routers``: path of a router file (``vlm-accel train dyvte``); or ``exit_layer``: exit every row's visual
    tokens after this layer (0-based; visual tokens are absent from layer ``exit_layer + 1`` on).
    ``check_fingerprint``: refuse routers trained for other weights (default True). ``exit_probability``: a row
    votes exit when the router's softmax gives exit more than this (0.5 = the paper's ``logit[0] < logit[1]``;
    higher is more conservative — an extension for trading accuracy against speed with imperfect routers)."""

    method_name: ClassVar[str] = "dyvte"
    routers: str | None = None
    exit_layer: int | None = None
    check_fingerprint: bool = True
    exit_probability: float = 0.5

    def validate(self) -> None:
        if (self.routers is None) == (self.exit_layer is None):
            raise ValueError(
                "dyvte needs exactly one of routers='routers.safetensors' (trained routers, the method) or "
                "exit_layer=<int> (a fixed exit layer, the paper's static ablation)"
            )
        if self.routers is not None:
            if isinstance(self.routers, Path):
                self.routers = str(self.routers)
            if not isinstance(self.routers, str) or not self.routers:
                raise TypeError(f"routers must be a path to a .safetensors file, got {self.routers!r}")
        if self.exit_layer is not None:
            check_int("exit_layer", self.exit_layer, low=0)
        probability = check_number("exit_probability", self.exit_probability)
        if not 0.0 < probability < 1.0:
            raise ValueError(f"exit_probability must be in (0, 1), got {probability}")
        if not isinstance(self.check_fingerprint, bool):
            raise TypeError(f"check_fingerprint must be a bool, got {self.check_fingerprint!r}")


class DyVTE(Method):
    """Dynamic visual-token exit; see the module docstring."""

    config_cls = DyVTEConfig
    changes_length = True
    kind_rank = KIND_SELECTION
    config: DyVTEConfig

    def __init__(self, config: DyVTEConfig) -> None:
        super().__init__(config)
        self.routers: DyVTERouters | None = None
        self.metadata: dict[str, str] = {}
        # cumulative statistics (reporting only; per-prefill state lives in state.generation_state(self))
        self._totals = {"prefills": 0, "rows": 0, "exited_rows": 0, "visual_layers": 0.0, "flops": 0.0,
                        "flops_full": 0.0, "batch_flops": 0.0, "batch_flops_full": 0.0}  # fmt: skip
        self._last: list[int | None] = []

    @classmethod
    def example_config(cls) -> DyVTEConfig:
        """A forced exit after layer 1 (runs without trained routers; the matrix's tiny models have 4 layers)."""
        return DyVTEConfig(exit_layer=1)

    @classmethod
    def sweep_configs(cls, keep_ratios) -> list[MethodConfig]:
        """``vlm-accel compare``: the shipped testbed routers if present, else the forced-exit example."""
        from vlm_accel.testbed.models import model_dir

        path = model_dir("testbed-l") / "dyvte_routers.safetensors"
        return [DyVTEConfig(routers=str(path))] if path.is_file() else [cls.example_config()]

    def bind(self, ctx) -> None:
        super().bind(ctx)
        last = ctx.num_layers - 2
        if self.config.exit_layer is not None and not 0 <= self.config.exit_layer <= last:
            raise ValueError(
                f"dyvte: exit_layer must be in [0, {last}] for this {ctx.num_layers}-layer model (an exit after the "
                f"last layer drops nothing), got {self.config.exit_layer}"
            )
        if self.config.routers is not None:
            self.routers, self.metadata = DyVTERouters.load(self.config.routers)
            check_routers(self.routers, self.metadata, ctx.model, self.config.check_fingerprint)
            self.routers.to(execution_device(ctx.model) or "cpu")  # never read an offloaded parameter's device

    # ------------------------------------------------------------------------------------------ prefill

    def on_forward_start(self, state: ForwardState, inputs: dict[str, Any]) -> None:
        if state.is_prefill:
            device = state.layout.visual.device
            generation = state.generation_state(self)
            generation["exited"] = torch.zeros(state.batch, dtype=torch.bool, device=device)  # bool [B]
            generation["exit_layer"] = torch.full((state.batch,), -1, dtype=torch.long, device=device)
            # bool [B, W]: text after the image, excluding the last token
            generation["span"] = text_span_mask(state.layout.visual, ~state.layout.padding)

    def on_forward_end(self, state: ForwardState) -> None:
        if state.is_prefill and state.layout.any_visual:
            self._account(state)

    def votes(self, layer: int, state: ForwardState) -> torch.Tensor:
        """Bool ``[B]``: rows whose router after layer ``layer`` votes exit (``logit[0] < logit[1]``; NaN features
        from an empty text span compare False: no exit)."""
        if self.routers is None:
            return torch.full(
                (state.batch,), layer == self.config.exit_layer, device=state.layout.visual.device
            )
        span = state.generation_state(self)["span"]  # text is never dropped: fixed for the whole prefill
        index = state.current_index
        if index is not None:  # the sequence is a kept subset: move the window mask to its slots
            span = span.gather(1, index.clamp(min=0)) & (index >= 0)
        hidden = state.layer_input  # on this layer's device; span and the routers on the home device
        with torch.no_grad():
            features = router_features(hidden, span.to(hidden.device)).to(self.routers.w1.device)
            logits = self.routers(layer, features).to(state.layout.visual.device)
        if self.config.exit_probability == 0.5:
            return logits[:, 0] < logits[:, 1]  # the official rule, bit for bit
        return torch.softmax(logits.float(), dim=-1)[:, 1] > self.config.exit_probability

    def select(self, layer: int, state: ForwardState) -> KeepPlan | None:
        generation = state.generation_state(self)
        if not state.is_prefill or not state.layout.any_visual or "exited" not in generation:
            return None
        exited, exit_layer = generation["exited"], generation["exit_layer"]
        after = layer - 1  # the router of layer l decides before layer l+1 runs
        if self.routers is not None and after >= self.routers.num_routers:
            return None
        if self.routers is None and after != self.config.exit_layer:
            return None
        visual = state.layout.visual
        has_visual = visual.any(dim=1)
        new = self.votes(after, state) & ~exited & has_visual
        if not bool(new.any()):
            return None
        exited |= new
        exit_layer[new] = after
        present = state.present_mask()
        return KeepPlan.from_keep_mask(present & ~(visual & exited[:, None]))

    def _account(self, state: ForwardState) -> None:
        """Per-row exit layers and analytic prefill FLOPs (LM only, routers included) of the finished prefill.

        Two savings are kept apart: what each row would save run alone (``prefill_flops_saved_alone``), and what
        the padded batch really skipped (``prefill_flops_saved``): a layer processes the batch's widest row, so
        until every row has exited, the exited rows' visual slots are masked, not skipped.
        """
        from vlm_accel.eval.flops import TextGeometry, layer_flops

        geometry = TextGeometry.from_config(self.ctx.text_config)
        layers = self.ctx.num_layers
        lengths = (~state.layout.padding).sum(dim=1).tolist()
        visual = state.layout.visual.sum(dim=1).tolist()
        router_cost = (
            0 if self.routers is None else 2 * (2 * geometry.hidden + 2) * self.routers.router_hidden
        )
        exit_layers = state.generation_state(self)["exit_layer"]
        self._last = []
        for row, exit_layer in enumerate(exit_layers.tolist()):
            n, v = int(lengths[row]), int(visual[row])
            seen = layers if exit_layer < 0 else exit_layer + 1  # layers that process the visual tokens
            full = sum(layer_flops(geometry, n) for _ in range(layers))
            evaluated = min(seen, layers - 1) if self.routers is not None and v else 0
            cost = sum(layer_flops(geometry, n) for _ in range(seen))
            cost += sum(layer_flops(geometry, n - v) for _ in range(layers - seen)) + evaluated * router_cost
            self._totals["flops"] += cost
            self._totals["flops_full"] += full
            self._totals["visual_layers"] += seen
            self._last.append(None if exit_layer < 0 else exit_layer)
        # the batch as run: each layer's padded width (its stage's plan width) for every row
        widths = [state.window_len] * layers
        for stage in state.stages:
            for index in range(stage.layer, layers):
                widths[index] = int(stage.plan.index.shape[1])
        self._totals["batch_flops"] += len(lengths) * sum(layer_flops(geometry, w) for w in widths)
        self._totals["batch_flops_full"] += len(lengths) * layers * layer_flops(geometry, state.window_len)
        self._totals["prefills"] += 1
        self._totals["rows"] += len(lengths)
        self._totals["exited_rows"] += int((exit_layers >= 0).sum())

    def stats(self) -> dict[str, Any]:
        rows = self._totals["rows"]
        full = self._totals["flops_full"]
        batch_full = self._totals["batch_flops_full"]
        return {
            "last_exit_layers": list(self._last),
            "rows": rows,
            "exit_rate": self._totals["exited_rows"] / rows if rows else 0.0,
            "mean_visual_layers": self._totals["visual_layers"] / rows
            if rows
            else float(self.ctx.num_layers),
            "prefill_flops_saved_alone": 1 - self._totals["flops"] / full if full else 0.0,
            "prefill_flops_saved": 1 - self._totals["batch_flops"] / batch_full if batch_full else 0.0,
        }
