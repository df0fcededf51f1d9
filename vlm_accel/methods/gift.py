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

Deviations, all documented: the saliency map is taken *in the same prefill* (the saliency layer precedes the
enhancement layers, so this equals the paper's extra ``max_new_tokens=1`` pass at no extra cost); the query span is
the text after the last visual token minus ``query_head`` / ``query_tail`` template tokens (the official code uses
LLaVA's +3 / −6 and Qwen2-VL's +2 / −6 offsets — pass those for those templates); every token of the span counts
(the official code keeps only spaCy-tagged informative words; the paper notes that choice matters little).
Layers are depth fractions; LLaVA-1.5-7B defaults: saliency layer 11, enhancement 12–22, ``α = 5``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vlm_accel.config import check_int, check_number, check_ratio
from vlm_accel.methods.base import RowEdit, ScoreRequest
from vlm_accel.methods.reweighting import ReweightConfig, ReweightMethod, check_layer_fractions
from vlm_accel.runtime.scores import RowContext
from vlm_accel.runtime.sequence import relative_positions
from vlm_accel.runtime.state import ForwardState, ScoreTap


@dataclass
class GIFTConfig(ReweightConfig):
    method_name: ClassVar[str] = "gift"
    alpha: float = 5.0
    layers: tuple[float, float] = (12 / 32, 23 / 32)
    saliency_layer: float = 11 / 32
    head_fraction: float = 0.5
    clip_sigma: float = 3.0
    query_head: int = 0
    query_tail: int = 0

    def validate(self) -> None:
        super().validate()
        self.layers = check_layer_fractions("layers", self.layers)
        self.saliency_layer = check_number("saliency_layer", self.saliency_layer)
        if not 0.0 <= self.saliency_layer < 1.0:
            raise ValueError(f"saliency_layer must be a depth fraction in [0, 1), got {self.saliency_layer}")
        check_ratio("head_fraction", self.head_fraction)
        if check_number("clip_sigma", self.clip_sigma) <= 0:
            raise ValueError(f"clip_sigma must be > 0, got {self.clip_sigma}")
        check_int("query_head", self.query_head, low=0)
        check_int("query_tail", self.query_tail, low=0)


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
        super().bind(ctx)
        # floor, so the paper's layer 11 of 32 stays 11 and shallower models keep it before the boosted layers
        self.saliency_index = min(ctx.num_layers - 1, int(self.config.saliency_layer * ctx.num_layers))
        if self.saliency_index >= self.layers.start:
            raise ValueError(
                f"gift: the saliency layer ({self.saliency_index}) must come before the first enhancement layer "
                f"({self.layers.start}) of this {ctx.num_layers}-layer model"
            )

    # ---- (a) saliency, at prefill ------------------------------------------------------------------------

    def score_request(self, layer: int, state: ForwardState) -> ScoreRequest | None:
        if layer != self.saliency_index or not state.is_prefill or self.config.alpha == 0:
            return None
        span = query_span(state, self.config.query_head, self.config.query_tail)
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
        in_span = span.gather(1, rows[:, 1:]) & valid[:, 1:] & (rows[:, 1:] - rows[:, :-1] == 1)
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

    # ---- (b) enhancement, every forward's last row -------------------------------------------------------

    def row_edit(self, layer: int, state: ForwardState) -> RowEdit | None:
        if not self.active(layer):
            return None
        generation = state.generation_state(self)  # empty when this generation's prefill had no saliency
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
