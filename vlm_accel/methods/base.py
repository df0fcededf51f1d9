"""The method contract: a small class over the runtime's hooks (the kvpress "press" idiom).

A method implements only the hooks it needs; the runtime (``vlm_accel.runtime``) does all the plumbing — finding
layers, hooks, masks, positions, cache, batch and padding. Hooks:

- :meth:`Method.score_request` — which query rows' attention probabilities it needs at a layer;
- :meth:`Method.select` — a keep plan (:class:`~vlm_accel.runtime.plan.KeepPlan`) at a layer, or None; the
  layer's input hidden states are ``state.layer_input``;
- :meth:`Method.row_edit` — edit the pre-softmax logits of some query rows at a layer (reweighting);
- :meth:`Method.on_forward_start` — see the base model's inputs before the forward (e.g. run a guide model);
- :meth:`Method.on_scores` — receive each score tap as it is computed (e.g. accumulate across layers / steps);
- :meth:`Method.head_gates` — per token × head weights (or a boolean mask) on the per-head attention output
  before ``o_proj`` (MoH), at prefill and decode, on every backend;
- :meth:`Method.on_visual_features` — see and replace the visual features between the vision tower and the
  language model (before or after the projector, ``visual_features_at``), with the pixel inputs and any tapped
  vision-encoder layer inputs (``vision_tap_layers``) at hand (TTF, PAINT);
- :meth:`Method.reuse_images` — let the vision tower skip some images of a call and reuse features instead
  (another image's of the same call, or ones the method kept), opt-in (TTF's compute-saving mode);
- :meth:`Method.wrap_generate` — wrap ``model.generate`` (e.g. logits processors, early exit).

State: per-call state lives with the generation (``state.generation_state(self)``) or, across calls on purpose,
with a stream (``state.stream_state(self)`` inside ``patch.stream()``) — never on the method object. Composition is
order-free: the runtime orders hooks by kind (``Method.kind_rank`` then name), not by the user's list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from vlm_accel.config import MethodConfig, field_names

if TYPE_CHECKING:
    from vlm_accel.runtime.engine import ModelContext
    from vlm_accel.runtime.plan import KeepPlan
    from vlm_accel.runtime.state import ForwardState, ScoreTap
    from vlm_accel.runtime.vision import ImageReuse, VisualFeatures


@dataclass
class ScoreRequest:
    """Rows whose attention probabilities a method needs at one layer.

    ``rows`` is ``"last"`` (the last query row: the last prompt token at prefill, the new token at decode) or a
    long tensor ``[B, M]`` of query indices. ``reduce`` is ``"head_mean"`` (``[B, M, N]``), ``"sum"`` (over heads and
    rows, ``[B, N]``) or ``"none"`` (``[B, H, M, N]``).
    """

    rows: str | torch.Tensor = "last"
    reduce: str = "head_mean"


@dataclass
class RowEdit:
    """Edit the pre-softmax logits of some query rows at one layer (attention reweighting).

    ``edit(logits [B, H, M, N] fp32, ctx: RowContext) -> logits``; the runtime recomputes those rows'
    ``softmax(edited) · V`` and leaves every other row to the stock attention (see
    :func:`vlm_accel.runtime.scores.edited_rows_attention`). ``rows`` as in :class:`ScoreRequest`.
    """

    edit: Callable[..., torch.Tensor]
    rows: str | torch.Tensor = "last"


@dataclass
class GateContext:
    """What :meth:`Method.head_gates` may read at one attention layer.

    ``hidden``: the attention module's input ``[B, q, d]`` (after the layer's input norm: the token representation
    a router reads); ``query``: post-RoPE queries ``[B, Hq, q, D]`` (RoPE is a rotation per pair of channels, so
    per-head norms equal the pre-RoPE ones up to rounding); ``num_kv_heads``; ``is_decode``: one new token per row on a
    cache.
    """

    layer: int
    hidden: torch.Tensor
    query: torch.Tensor
    num_kv_heads: int
    is_decode: bool


@dataclass
class HeadGates:
    """Weights ``[B, q, Hq]`` (float, or bool for a hard mask) multiplying each head's attention output before
    ``o_proj``. ``sparse_decode``: at a decode step, let the runtime route to the head-sparse op
    (:func:`vlm_accel.kernels.head_sparse_decode_attention`; float weights: on their non-zero pattern, then scaled)
    so that KV groups with no active head are not read — the same numbers as gating the dense output."""

    weights: torch.Tensor
    sparse_decode: bool = False


#: Composition order of hook kinds (lower runs first in every hook loop).
KIND_SELECTION, KIND_GATES, KIND_REWEIGHT, KIND_OTHER = 0, 1, 2, 3


class Method:
    """Base class of every method. Subclasses set ``config_cls`` and implement the hooks they need."""

    config_cls: ClassVar[type[MethodConfig]]
    #: True when the method shortens the sequence (pruning / exit); the runtime then refuses generation modes
    #: whose cache bookkeeping cannot follow per-layer lengths (beam search, static caches, assisted decoding).
    changes_length: ClassVar[bool] = False
    #: True when kept slots carry merged (e.g. averaged) hidden states rather than a plain subset of tokens.
    merges_tokens: ClassVar[bool] = False
    #: Where composition puts this method's hooks (``KIND_*``); ties break by method name, so the result never
    #: depends on the order of the user's list.
    kind_rank: ClassVar[int] = KIND_OTHER
    #: ``generate`` wrappers nest by this rank: the highest is outermost and sees the caller's arguments untouched
    #: (SGL's guide runs there, before any wrapper adds logits processors for the large model).
    generate_rank: ClassVar[int] = 0
    #: ``"pre_projector"`` / ``"post_projector"`` (or a tuple of both): where :meth:`on_visual_features` sees the
    #: visual features.
    visual_features_at: ClassVar[str | tuple[str, ...] | None] = None

    def __init__(self, config: MethodConfig) -> None:
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}")
        self.config = config
        self.ctx: ModelContext | None = None

    @property
    def name(self) -> str:
        return self.config.method_name

    @classmethod
    def example_config(cls) -> MethodConfig:
        """A typical active setting (the config's defaults); the test matrix runs every method with it."""
        return cls.config_cls()

    @classmethod
    def noop_config(cls) -> MethodConfig | None:
        """A setting under which the method must reproduce the unpatched model exactly (None if it has none)."""
        return None

    @classmethod
    def sweep_configs(cls, keep_ratios: Sequence[float]) -> list[MethodConfig]:
        """The settings ``vlm-accel compare`` runs: one per keep ratio for methods with a ``keep_ratio``
        parameter (other parameters at their defaults), otherwise the example config."""
        if "keep_ratio" in field_names(cls.config_cls):
            return [cls.config_cls(keep_ratio=ratio) for ratio in keep_ratios]
        return [cls.example_config()]

    def bind(self, ctx: ModelContext) -> None:
        """Attach to a model; raise ``ValueError`` if this method cannot act on it (e.g. a layer out of range)."""
        self.ctx = ctx

    def unbind(self) -> None:
        """Detach from the model (remove any hooks the method added in :meth:`bind`)."""

    def score_request(self, layer: int, state: ForwardState) -> ScoreRequest | None:
        return None

    def select(self, layer: int, state: ForwardState) -> KeepPlan | None:
        return None

    def row_edit(self, layer: int, state: ForwardState) -> RowEdit | None:
        return None

    def on_forward_start(self, state: ForwardState, inputs: dict[str, Any]) -> None:
        """Called once per base-model forward, after the visual layout is known, with the base model's kwargs."""

    def on_forward_end(self, state: ForwardState) -> None:
        """Called once per base-model forward, after the language model ran (e.g. to account what it saved)."""

    def on_scores(self, layer: int, tap: ScoreTap, state: ForwardState) -> None:
        """Called right after a requested score tap is computed (it is also kept in ``state.taps``)."""

    def head_gates(self, layer: int, ctx: GateContext, state: ForwardState) -> HeadGates | None:
        """Per-head output gates at ``layer`` for the current tokens (None: all heads, unchanged)."""
        return None

    def vision_tap_layers(self) -> tuple[int, ...]:
        """Vision-encoder layers whose *inputs* the runtime should capture into ``state.vision_taps``."""
        return ()

    def on_visual_features(self, features: VisualFeatures, state: ForwardState) -> torch.Tensor | None:
        """See the visual features at ``visual_features_at``; return replacement features (same shape) or None."""
        return None

    def reuse_images(self, state: ForwardState) -> ImageReuse | None:
        """Before the vision tower runs on a call's images: which images it may skip, and what replaces their
        post-projector features (:class:`~vlm_accel.runtime.vision.ImageReuse`); None encodes every image. The
        runtime installs this path only for methods that override it."""
        return None

    def wrap_generate(self, generate: Callable[..., Any]) -> Callable[..., Any]:
        """Return a replacement for ``model.generate`` (the default keeps it)."""
        return generate

    def stats(self) -> dict[str, Any]:
        return {}
