"""GIFT — "Capturing Gaze Shifts for Guidance: Cross-Modal Fusion Enhancement for VLM Hallucination Mitigation"
(arXiv 2510.22067, ICML 2026; code ``amazon-science/GIFT``).

(a) Saliency ("gaze shift", paper §3.2): at the saliency layer, over the user-question rows ``t ∈ T``,
``Δ^h[t, v] = max(A^h[t, v] − A^h[t−1, v], 0)`` on visual keys; keep the ``H/2`` heads with the largest total
``Σ Δ``; ``s[v]`` = mean of ``Δ`` over kept heads and rows; clamp to ``μ ± 3σ``, min-max to ``[0, 1]``; multiplier
``m[v] = exp(α·s[v])``.

(b) Enhancement (paper §3.3, code ``eager_attention_forward``), in the enhancement layers, on the last query row
(last prompt token, then every new token), from its probabilities ``p``: the ``H/2`` heads with most visual mass
get ``p_h[v] · m[v]``; ``r = Σ p'/Σ p`` over those heads and visual keys; the ``H/2`` heads with most query-span
mass get ``p_h[t] · r``; every row renormalised. Multiplying probabilities and renormalising equals adding
``log`` factors to the logits, so it runs as a row edit (``+α·s[v]``, ``+log r``) with SDPA for every other row.

Faithfulness details (official code: ``inference.py``, ``configs/*.yaml``):

- **Query span** from the chat template: with ``processor=`` the template tokens between the image and the user's
  text (``query_head``) and after it up to the end of the generation prompt (``query_tail``) are read off the
  processor's chat template (:func:`~vlm_accel.methods.gift_query.chat_template_offsets`), so tokens such as
  ``" ASSISTANT:"`` never enter the saliency rows or the query boost — the official code's ``+3/−6`` (LLaVA) and
  ``+2/−6`` (Qwen2-VL) offsets, derived instead of hard-coded. Without a processor both default to 0 (the span
  then runs to the end of the prompt: pass ``query_head``/``query_tail`` or a processor).
- **Content words** (``content_words``): the saliency rows are the question's content words — spaCy POS tags when
  spaCy is installed with ``en_core_web_sm`` (the official filter), otherwise a closed-class word list
  (:data:`~vlm_accel.methods.gift_query.CLOSED_CLASS_WORDS`); ``"all"`` keeps every span row. Needs ``processor``.
- **Saliency pass**: when the saliency layer precedes the first enhancement layer (LLaVA-1.5), the map is taken in
  the same prefill — rows other than the last are never edited, so this equals the official extra
  ``max_new_tokens=1`` pass at no cost. When a configuration boosts layers at or before the saliency layer
  (Qwen2-VL: saliency 14, boost 5–18), a separate unedited prefill runs first, as in the official code, and stops
  right after the saliency layer (its later layers are not needed).
- **Layers**: ``layers=None`` / ``saliency_layer=None`` give the official settings for LLaVA-1.5-7B (32 layers:
  saliency 11, boost 12–22), LLaVA-1.5-13B (40 layers: 10, 14–20) and Qwen2-VL-7B (28 layers: 14, 5–18; its
  official ``α`` is 4, pass ``alpha=4``); other depths scale the 7B setting by depth (saliency
  ``⌊11/32·L⌋``, boost ``[round(12/32·L), round(23/32·L))``). Explicit values are depth fractions.
"""

from __future__ import annotations

import contextvars
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vlm_accel.config import check_int, check_number, check_ratio
from vlm_accel.methods.base import Method, RowEdit, ScoreRequest
from vlm_accel.methods.gift_query import chat_template_offsets, content_token_mask, load_spacy
from vlm_accel.methods.reweighting import ReweightConfig, ReweightMethod, check_layer_fractions, layer_range
from vlm_accel.runtime.scores import RowContext
from vlm_accel.runtime.sequence import relative_positions
from vlm_accel.runtime.state import ForwardState, ScoreTap

#: Official layer settings (``configs/*.yaml``): (model_type, decoder layers) → (saliency layer, boosted layers).
OFFICIAL_LAYERS: dict[tuple[str, int], tuple[int, range]] = {
    ("llava", 32): (11, range(12, 23)),  # llava_1.5_7b.yaml
    ("llava", 40): (10, range(14, 21)),  # llava_1.5_13b.yaml
    ("qwen2_vl", 28): (14, range(5, 19)),  # qwen2_vl_7b.yaml (alpha 4.0 there)
}
DEFAULT_LAYERS = (12 / 32, 23 / 32)
DEFAULT_SALIENCY = 11 / 32
CONTENT_WORDS = ("auto", "spacy", "closed_class", "all")

# The separate saliency pass hands its result to the prefill that follows through these call-scoped variables
# (never through the method object): set by the top-level forward pre-hook, cleared by its forward hook.
_IN_PASS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("gift_saliency_pass", default=None)
_PENDING: contextvars.ContextVar[dict | None] = contextvars.ContextVar("gift_pending_saliency", default=None)
class _SaliencyReady(Exception):
    """Ends the separate saliency pass right after the saliency layer (the layers after it are not needed)."""


_VISUAL_INPUTS = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")  # as the runtime reads them


@dataclass
class GIFTConfig(ReweightConfig):
    """``layers`` / ``saliency_layer``: depth fractions, or None for the official per-model setting;
    ``processor``: the model's processor (chat-template query span and content-word filter; not serialised);
    ``query_head`` / ``query_tail``: template-token counts (None: from ``processor``, else 0)."""

    method_name: ClassVar[str] = "gift"
    alpha: float = 5.0
    layers: tuple[float, float] | None = None  # type: ignore[assignment]
    saliency_layer: float | None = None
    head_fraction: float = 0.5
    clip_sigma: float = 3.0
    query_head: int | None = None
    query_tail: int | None = None
    content_words: str = "auto"
    processor: Any = dataclasses.field(default=None, repr=False, compare=False)

    def validate(self) -> None:
        self.alpha = check_number("alpha", self.alpha)
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.layers is not None:
            self.layers = check_layer_fractions("layers", self.layers)
        if self.saliency_layer is not None:
            self.saliency_layer = check_number("saliency_layer", self.saliency_layer)
            if not 0.0 <= self.saliency_layer < 1.0:
                raise ValueError(f"saliency_layer must be a depth fraction in [0, 1), got {self.saliency_layer}")
        check_ratio("head_fraction", self.head_fraction)
        if check_number("clip_sigma", self.clip_sigma) <= 0:
            raise ValueError(f"clip_sigma must be > 0, got {self.clip_sigma}")
        if self.content_words not in CONTENT_WORDS:
            raise ValueError(f"content_words must be one of {CONTENT_WORDS}, got {self.content_words!r}")
        if self.content_words in ("spacy", "closed_class") and self.processor is None:
            raise ValueError(f"content_words={self.content_words!r} needs processor= (its tokenizer maps words)")
        if self.processor is not None and (self.query_head is None or self.query_tail is None):
            head, tail = chat_template_offsets(self.processor)
            self.query_head = head if self.query_head is None else self.query_head
            self.query_tail = tail if self.query_tail is None else self.query_tail
        for name in ("query_head", "query_tail"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), low=0)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "processor"}
        return {"method": self.method_name, **data}


def resolve_layers(config: GIFTConfig, model_type: str, num_layers: int) -> tuple[int, range]:
    """(saliency layer, boosted layers) for a model: the official setting when one exists for it and neither is
    given, else the depth fractions (the 7B ones by default: floor for the saliency layer, so 11 of 32 stays 11)."""
    if config.layers is None and config.saliency_layer is None and (model_type, num_layers) in OFFICIAL_LAYERS:
        return OFFICIAL_LAYERS[(model_type, num_layers)]
    layers = layer_range(config.layers or DEFAULT_LAYERS, num_layers)
    fraction = DEFAULT_SALIENCY if config.saliency_layer is None else config.saliency_layer
    return min(num_layers - 1, int(fraction * num_layers)), layers


def query_span(state: ForwardState, head: int, tail: int) -> torch.Tensor:
    """Bool ``[B, W]``: the user-question rows — text after each row's last visual token, minus template tokens."""
    visual = state.layout.visual
    window = visual.shape[1]
    positions = torch.arange(window, device=visual.device)
    last_visual = torch.where(visual, positions, -1).amax(dim=1)
    start = (last_visual + 1 + head)[:, None]
    span = (positions >= start) & (positions < window - tail)
    return span & (last_visual >= 0)[:, None] & ~state.layout.padding


def saliency(
    delta: torch.Tensor, visual: torch.Tensor, rows: int, head_fraction: float, clip_sigma: float
) -> torch.Tensor:
    """``s[v] ∈ [0, 1]`` of one batch row from ``delta [H, M, N]`` (zero outside its ``rows`` valid query rows and
    outside visual keys)."""
    heads = delta.shape[0]
    keep = delta.sum(dim=(1, 2)).topk(max(1, int(heads * head_fraction))).indices
    s = delta[keep].sum(dim=(0, 1)) / (len(keep) * max(1, rows))
    values = s[visual]
    if values.numel() < 2:
        return torch.zeros_like(s)
    mean, std = values.mean(), values.std()
    values = values.clamp(mean - clip_sigma * std, mean + clip_sigma * std)
    spread = values.max() - values.min()
    out = torch.zeros_like(s)
    out[visual] = (values - values.min()) / spread if spread > 0 else torch.zeros_like(values)
    return out


class GIFT(ReweightMethod):
    config_cls = GIFTConfig
    config: GIFTConfig

    def bind(self, ctx) -> None:
        Method.bind(self, ctx)
        self.saliency_index, self.layers = resolve_layers(self.config, ctx.model_type, ctx.num_layers)
        # boosting at or before the saliency layer needs the map before the prefill's last row reaches those
        # layers: a separate, unedited prefill gives it (the official code always runs one)
        self.separate_pass = self.saliency_index >= self.layers.start
        self.query_head = self.config.query_head or 0
        self.query_tail = self.config.query_tail or 0
        self.tokenizer = getattr(self.config.processor, "tokenizer", self.config.processor)
        choice = self.config.content_words
        self.nlp = load_spacy() if choice in ("auto", "spacy") and self.tokenizer is not None else None
        if choice == "spacy" and self.nlp is None:
            raise ValueError("gift: content_words='spacy' needs spaCy with en_core_web_sm installed")
        self.filter_words = self.tokenizer is not None and choice != "all"
        self._handles = []
        if self.separate_pass and self.config.alpha > 0:
            self._handles = [
                ctx.model.register_forward_pre_hook(self._saliency_pass, with_kwargs=True),
                ctx.model.register_forward_hook(self._end_call, always_call=True),
            ]

    def unbind(self) -> None:
        for handle in getattr(self, "_handles", ()):  # bind may not have run (another method's bind failed)
            handle.remove()
        self._handles = []

    # ---- the separate saliency pass (only when a boosted layer is at or before the saliency layer) ------------

    def _saliency_pass(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if _IN_PASS.get() is not None:
            return None
        cache = kwargs.get("past_key_values")
        visual = any(kwargs.get(k) is not None and not (isinstance(kwargs[k], dict) and not kwargs[k])
                     for k in _VISUAL_INPUTS)  # fmt: skip
        if not visual or (cache is not None and cache.get_seq_length() > 0):
            return None
        holder: dict = {}
        token = _IN_PASS.set(holder)
        try:
            skip = ("past_key_values", "use_cache", "logits_to_keep", "labels")
            with torch.no_grad():
                module(*args, **{k: v for k, v in kwargs.items() if k not in skip}, use_cache=False, logits_to_keep=1)
        except _SaliencyReady:
            pass  # stopped at the saliency layer: the pass costs (saliency layer + 1) / depth of a prefill
        finally:
            _IN_PASS.reset(token)
        _PENDING.set(holder)
        return None

    def _end_call(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if _IN_PASS.get() is None:
            _PENDING.set(None)

    # ---- question rows --------------------------------------------------------------------------------------

    def on_forward_start(self, state: ForwardState, inputs: dict[str, Any]) -> None:
        if not (self.filter_words and state.is_prefill and self.config.alpha > 0 and state.layout.any_visual):
            return
        ids = inputs.get("input_ids")
        if ids is None:
            return
        span = query_span(state, self.query_head, self.query_tail)
        content = span.clone()
        for row in range(span.shape[0]):
            where = span[row].nonzero().flatten()
            mask = content_token_mask(ids[row, where].tolist(), self.tokenizer, self.nlp)
            if mask is not None:  # None: the question did not re-tokenize identically; keep all its rows
                content[row, where] = torch.tensor(mask, dtype=torch.bool, device=span.device)
        state.extras["gift_content"] = content

    # ---- (a) saliency, at prefill ------------------------------------------------------------------------

    def score_request(self, layer: int, state: ForwardState) -> ScoreRequest | None:
        if layer != self.saliency_index or not state.is_prefill or self.config.alpha == 0:
            return None
        if self.separate_pass and _IN_PASS.get() is None:
            return None  # the map came from the separate pass (row_edit picks it up)
        span = query_span(state, self.query_head, self.query_tail)
        state.extras["gift_span"] = span
        if not span.any() or not state.layout.any_visual:
            return None
        # rows: each span position and the row before it; pad rows repeat the last position (masked out later)
        rows_with_previous = span | torch.roll(span, -1, dims=1)
        counts = rows_with_previous.sum(dim=1)
        width = int(counts.max())
        positions = torch.arange(span.shape[1], device=span.device).expand_as(span)
        ordered = torch.where(rows_with_previous, positions, span.shape[1]).sort(dim=1).values[:, :width]
        rows = torch.where(ordered < span.shape[1], ordered, ordered.new_full((), span.shape[1] - 1))
        state.extras["gift_rows"] = (rows, ordered < span.shape[1])
        # after a pruning stage the query rows are slots of the kept sequence (text rows are never dropped)
        slots = relative_positions(rows, state.current_index, state.window_len)
        return ScoreRequest(rows=slots, reduce="none")

    def on_scores(self, layer: int, tap: ScoreTap, state: ForwardState) -> None:
        rows, valid = state.extras["gift_rows"]
        span = state.extras["gift_span"]
        probs = tap.probs  # [B, H, M, N]
        visual = state.visual_key_mask(layer, probs.shape[-1])
        delta = (probs[:, :, 1:] - probs[:, :, :-1]).clamp(min=0)  # row m vs row m-1
        saliency_rows = state.extras.get("gift_content", span)  # content words of the span (official filter)
        in_span = saliency_rows.gather(1, rows[:, 1:]) & valid[:, 1:] & (rows[:, 1:] - rows[:, :-1] == 1)
        in_span &= state.present_mask().gather(1, rows[:, :-1])  # the row before must still be in the sequence
        delta = delta * in_span[:, None, :, None] * visual[:, None, None, :]
        per_column = torch.stack([
            saliency(delta[b], visual[b], int(in_span[b].sum()), self.config.head_fraction, self.config.clip_sigma)
            for b in range(probs.shape[0])
        ])  # fmt: skip
        # key columns → prompt positions (following any kept set), as score taps do
        window = ScoreTap(per_column, tap.rows, tap.window_index).window_scores(state.prefix_len, span.shape[1])
        generation = state.generation_state(self)
        generation["log_multiplier"] = self.config.alpha * window.float()
        generation["span"] = span
        holder = _IN_PASS.get()
        if holder is not None:  # the separate pass: hand the map to the prefill that follows, and stop it
            holder[self] = dict(generation)
            raise _SaliencyReady

    # ---- (b) enhancement, every forward's last row -------------------------------------------------------

    def row_edit(self, layer: int, state: ForwardState) -> RowEdit | None:
        if not self.active(layer) or _IN_PASS.get() is not None:
            return None
        generation = state.generation_state(self)  # empty when this generation's prefill had no saliency
        if self.separate_pass and state.is_prefill and "log_multiplier" not in generation:
            pending = (_PENDING.get() or {}).get(self)
            if pending is None and state.layout.any_visual:
                raise RuntimeError(
                    "gift: this configuration boosts layers at or before the saliency layer, so its saliency map "
                    "comes from a separate pass that runs on calls of the top-level model (model(...) / generate)"
                )
            generation.update(pending or {})
        if "log_multiplier" not in generation:
            return None
        log_m, span, fraction = generation["log_multiplier"], generation["span"], self.config.head_fraction

        def edit(logits: torch.Tensor, ctx: RowContext) -> torch.Tensor:
            n = logits.shape[-1]
            log_m_cols = state.window_to_columns(log_m, layer, n, 0.0)[:, None, None, :]
            span_cols = state.window_to_columns(span, layer, n, False)[:, None, None, :] & ctx.allowed[:, None]
            visual = ctx.visual[:, None]
            probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
            k = max(1, int(logits.shape[1] * fraction))
            visual_mass = (probs * visual).sum(-1)  # [B, H, M]
            visual_heads = _top_heads(visual_mass, k)
            boosted = (probs * visual * log_m_cols.exp()).sum(-1)
            ratio = (boosted * visual_heads).sum(1, keepdim=True) / (visual_mass * visual_heads).sum(1, keepdim=True)
            ratio = torch.where(torch.isfinite(ratio) & (ratio > 0), ratio, torch.ones_like(ratio))
            query_heads = _top_heads((probs * span_cols).sum(-1), k)
            bias = visual_heads[..., None] * visual * log_m_cols
            bias = bias + query_heads[..., None] * span_cols * ratio.log()[..., None]
            return logits + bias

        return RowEdit(edit=edit, rows="last")


def _top_heads(mass: torch.Tensor, k: int) -> torch.Tensor:
    """Float 0/1 ``[B, H, M]``: the ``k`` heads with the largest ``mass`` per (row, query)."""
    chosen = torch.zeros_like(mass)
    return chosen.scatter(1, mass.topk(k, dim=1).indices, 1.0)
