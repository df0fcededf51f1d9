"""SGL's guide pass: the small VLM generates and scores every visual token (Zhao et al., "A Stitch in Time Saves
Nine: Small VLM is a Precise Guidance for Accelerating Large VLMs", CVPR 2025, §3.2 "SGP", §3.3 "SEE").

Score (SGP; official code ``internvl/model/internlm2/modeling_internlm2.py``, ``InternLM2Model.forward`` and the
overridden ``_sample``)::

    A[v] = Σ_l Σ_h Σ_{q ∈ Q_P} A^{l,h}[q, v]  +  Σ_{t ∈ generated} Σ_l Σ_h A^{l,h}[t, v]

with ``Q_P`` the prompt rows from the **last visual token** to the end of the prompt, and each decode step's single
row. Plain sums, no normalisation. The rows are tapped inside the registered attention function from post-RoPE q
and the full K (``vlm_accel.runtime.scores``), never by switching the guide to eager attention.

Early-exit scores (SEE)::

    S_conf = exp( (1/N) Σ_i log p_S(x_i | image, prompt, x_<i) )     (length-normalised confidence)
    S_cons = Π_i p_S'(x_i | ...)                                       (answer re-run with 5 % of visual tokens)

``S_cons`` teacher-forces the guide's own answer through the guide with only the top ``ρ_c`` of its visual tokens
(ranked by ``A``), pruned before layer 0 as in the paper, at their original positions (the paper's
``position_ids = keep_indexs``). The runtime never shortens layer 0 during generation (generate()'s bookkeeping reads
it), but this pass is a single cache-free forward, so a pre-hook on the guide's language model gathers the merged
input embeddings, position ids and mask down to the kept tokens — the same logits as an eager model that hides the
dropped tokens from every layer (tested), at 5 % of the visual cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from vlm_accel.config import MethodConfig
from vlm_accel.methods.base import Method, ScoreRequest
from vlm_accel.runtime.devices import execution_device
from vlm_accel.runtime.plan import KeepPlan, keep_counts_from_ratio, top_visual_keep_mask
from vlm_accel.runtime.state import ForwardState, ScoreTap

# generate() kwargs the guide must not inherit from the large model's call (it is always greedy, one beam, and
# its outputs are read from a dict).
_FORCED_GUIDE_KWARGS = {
    "do_sample": False,
    "num_beams": 1,
    "return_dict_in_generate": True,
    "output_logits": True,
}
_DROPPED_GUIDE_KWARGS = (  # the guide never inherits the caller's logits processors (DESIGN.md, composition)
    "logits_processor",
    "streamer",
    "assistant_model",
    "output_scores",
    "output_attentions",
    "output_hidden_states",
)
# base-model kwargs that belong to one call of the large model and must not be handed to the guide
_CALL_ONLY_KWARGS = ("past_key_values", "cache_position", "use_cache", "logits_to_keep", "output_attentions",
                     "output_hidden_states", "return_dict", "inputs_embeds")  # fmt: skip


@dataclass
class _GuideScorerConfig(MethodConfig):
    method_name: ClassVar[str] = "sgl-guide-scorer"


class GuideScorer(Method):
    """Internal method installed on the guide for one pass: accumulates ``A`` (module docstring) per window position.

    Prefill: rows ``[last visual token, end of prompt]`` of each row (left padding shifts them per row; rows are
    requested as a rectangular ``[B, M]`` block and the rows before a row's last visual token are masked out).
    Decode: the single new row of every step, kept per step until the answer is known
    (:meth:`finalize`): a row that has produced an end-of-sequence token is finished, and the padding generate()
    feeds it afterwards is not scored — the paper's batch-1 loop stops there.
    """

    config_cls = _GuideScorerConfig

    def __init__(self, heads: int) -> None:
        super().__init__(_GuideScorerConfig())
        self.heads = heads
        self.prompt_scores: torch.Tensor | None = None  # fp32 [B, W] over the prompt window
        self.visual: torch.Tensor | None = None  # bool [B, W]
        self.step_scores: list[torch.Tensor] = []  # decode step k: fp32 [B, W] (the row of generated token k)
        self._rows: torch.Tensor | None = None
        self._row_valid: torch.Tensor | None = None
        self._step: torch.Tensor | None = None

    def on_forward_start(self, state: ForwardState, inputs: dict[str, Any]) -> None:
        if state.is_prefill:
            visual = state.layout.visual
            batch, window = visual.shape
            self.visual = visual
            self.prompt_scores = torch.zeros(batch, window, dtype=torch.float32, device=visual.device)
            self.step_scores = []
            positions = torch.arange(window, device=visual.device).expand(batch, window)
            last_visual = torch.where(visual, positions, -1).amax(dim=1)  # -1: no visual token
            first_row = torch.where(last_visual >= 0, last_visual, window)
            span = int((window - first_row).max()) if batch else 0
            rows = torch.arange(window - span, window, device=visual.device).expand(batch, span)
            self._rows = rows
            self._row_valid = rows >= first_row[:, None]
            return
        self._step = torch.zeros_like(self.prompt_scores)
        self.step_scores.append(self._step)

    def score_request(self, layer: int, state: ForwardState) -> ScoreRequest | None:
        if self.prompt_scores is None:
            return None
        if state.is_prefill:
            if self._rows is None or self._rows.shape[1] == 0:
                return None
            # head_mean × H = the sum over heads, without an O(H·M·N) temporary
            return ScoreRequest(rows=self._rows, reduce="head_mean")
        return ScoreRequest(rows="last", reduce="sum")

    def on_scores(self, layer: int, tap: ScoreTap, state: ForwardState) -> None:
        window = self.prompt_scores.shape[1]
        if state.is_prefill:
            probs = tap.probs * self._row_valid[:, :, None]  # [B, M, N]
            start = state.prefix_len
            self.prompt_scores += self.heads * probs.sum(dim=1)[:, start : start + window]
            return
        start = state.continuing.prefix_len
        self._step += tap.probs[:, start : start + window]

    def finalize(self, new_tokens: torch.Tensor | None, eos: Sequence[int]) -> torch.Tensor:
        """``A`` ``[B, W]``: prompt rows plus the decode rows of tokens fed back before each row's first EOS."""
        scores = self.prompt_scores.clone()
        if new_tokens is None or not self.step_scores:
            return scores
        live = answer_mask(new_tokens, eos)  # token k is live iff no EOS strictly before it …
        if eos:  # … and it is not itself an EOS (an EOS ends the answer; it is never fed back in batch 1)
            live &= ~torch.isin(new_tokens, torch.tensor(list(eos), device=new_tokens.device))
        for k, step in enumerate(self.step_scores):  # decode step k feeds generated token k back
            scores += step * live[:, k, None].to(step)
        return scores


@dataclass
class GuideResult:
    """What the guide pass produced for one batch.

    ``scores``: fp32 ``[B, W]`` importance ``A`` over the prompt window (only visual positions are meaningful);
    ``visual``: bool ``[B, W]``; ``sequences``: ``[B, W + T]`` prompt + greedy answer; ``answer_mask``: bool
    ``[B, T]`` — answer tokens up to and including the first end-of-sequence token; ``token_logprobs``: fp32
    ``[B, T]`` ``log p_S(x_i)`` of each generated token (0 outside ``answer_mask``); ``output``: the guide's own
    generate() output (None for a prefill-only pass).
    """

    scores: torch.Tensor
    visual: torch.Tensor
    sequences: torch.Tensor
    answer_mask: torch.Tensor
    token_logprobs: torch.Tensor
    output: Any = None

    @property
    def confidence(self) -> torch.Tensor:
        """``S_conf`` per row: exp of the mean log-probability of the answer tokens (SGL §3.3)."""
        count = self.answer_mask.sum(dim=1).clamp(min=1)
        return torch.exp(self.token_logprobs.sum(dim=1) / count)


def eos_ids(model: nn.Module, kwargs: dict[str, Any]) -> list[int]:
    """The end-of-sequence ids generate() will stop on (call kwargs first, then the model's generation config)."""
    eos = kwargs.get("eos_token_id")
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    if eos is None and config is not None:
        eos = config.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])]


def answer_mask(new_tokens: torch.Tensor, eos: Sequence[int]) -> torch.Tensor:
    """Bool ``[B, T]``: generated tokens up to and including the first end-of-sequence token of each row."""
    if not eos:
        return torch.ones_like(new_tokens, dtype=torch.bool)
    is_eos = torch.isin(new_tokens, torch.tensor(list(eos), device=new_tokens.device))
    before = is_eos.long().cumsum(dim=1) - is_eos.long()  # eos tokens strictly before each position
    return before == 0


def model_inputs(kwargs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The tensors of a generate()/forward call that describe the prompt (for re-running it on the guide)."""
    out = {}
    for name, value in kwargs.items():
        if name in _CALL_ONLY_KWARGS or name in _DROPPED_GUIDE_KWARGS or value is None:
            continue
        out[name] = value.to(device) if torch.is_tensor(value) else value
    return out


def run_guide(
    guide: nn.Module, kwargs: dict[str, Any], generate: bool, output_scores: bool = False
) -> GuideResult:
    """Run the guide on a call's inputs with :class:`GuideScorer` installed for this pass only.

    ``generate=True``: greedy generation with the call's generation settings (SGP's prompt + generated rows);
    ``False``: one prefill forward (a plain ``model(...)`` call has no answer: prompt rows only).
    """
    from vlm_accel.patches import adapter_for
    from vlm_accel.runtime.engine import Runtime

    device = execution_device(guide) or "cpu"  # an offloaded guide's first parameter may be on the meta device
    inputs = model_inputs(kwargs, device)
    adapter = adapter_for(guide)
    heads = int(adapter.text_config(guide).num_attention_heads)
    eos = eos_ids(guide, kwargs)
    scorer = GuideScorer(heads)
    runtime = Runtime(guide, adapter, [scorer])
    runtime.install()
    try:
        with torch.no_grad():
            if generate:
                out = guide.generate(**{**inputs, **_FORCED_GUIDE_KWARGS, "output_scores": output_scores})
                sequences = out.sequences
                logits = torch.stack(out.logits, dim=1).float()  # [B, T, V]
            else:
                kept = {k: v for k, v in inputs.items() if k in _forward_arg_names(guide)}
                guide(**kept, use_cache=True, logits_to_keep=1)
                sequences = inputs["input_ids"]
                logits, out = None, None
    finally:
        runtime.remove()
    window = inputs["input_ids"].shape[1]
    if logits is None:
        empty = sequences[:, :0]
        return GuideResult(scorer.finalize(None, eos), scorer.visual, sequences, empty.bool(), empty.float())
    new = sequences[:, window:]
    mask = answer_mask(new, eos)
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new[..., None]).squeeze(-1)
    scores = scorer.finalize(new, eos)
    return GuideResult(scores, scorer.visual, sequences, mask, logprobs.masked_fill(~mask, 0.0), out)


def _forward_arg_names(model: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def consistency_score(
    guide: nn.Module, kwargs: dict[str, Any], result: GuideResult, ratio: float
) -> torch.Tensor:
    """``S_cons`` per row (SGL §3.3; official ``modeling_internvl_chat.py::generate``, ``torch.prod``): the product of
    the guide's probabilities of its own answer, teacher-forced with only the top ``ratio`` of its visual tokens.

    The dropped visual tokens are removed before layer 0, as in the paper: a pre-hook on the guide's language model
    gathers the merged input embeddings, the position ids generate() derives from the unmodified mask (original
    positions, M-RoPE included) and the mask down to the kept tokens. This one-off teacher-forced pass has no cache,
    so shortening layer 0 is safe here (the runtime never does it during generation).
    """
    device = result.sequences.device
    inputs = model_inputs(kwargs, device)
    window = inputs["input_ids"].shape[1]
    sequences = result.sequences
    steps = sequences.shape[1] - window
    if steps == 0:
        return torch.ones(sequences.shape[0], device=device)
    prompt_mask = inputs.get("attention_mask")
    if prompt_mask is None:
        prompt_mask = torch.ones_like(inputs["input_ids"])
    full_mask = torch.cat([prompt_mask, torch.ones_like(sequences[:, window:])], dim=1)
    visual = result.visual
    counts = keep_counts_from_ratio(visual.sum(dim=1), ratio)
    keep = top_visual_keep_mask(result.scores, visual, torch.ones_like(visual), counts)
    hidden_mask = full_mask.clone()
    hidden_mask[:, :window] = prompt_mask * keep.to(prompt_mask.dtype)
    call = {k: v for k, v in inputs.items() if k in _forward_arg_names(guide)}
    for name in ("mm_token_type_ids", "token_type_ids"):
        if name in call and torch.is_tensor(call[name]) and call[name].shape[1] == window:
            call[name] = torch.cat(
                [call[name], torch.zeros_like(sequences[:, window:]).to(call[name])], dim=1
            )
    call.update(input_ids=sequences, attention_mask=full_mask)
    call["position_ids"] = guide._prepare_position_ids_for_generation(sequences, dict(call))
    language_model = _language_model(guide)
    # Keep plan over the whole teacher-forced sequence: the kept visual tokens and every text token, left-padded
    # per row (-1 = padded slot). The answer tokens and the last prompt token are text, so they stay right-aligned.
    plan = KeepPlan.from_keep_mask(hidden_mask.bool())
    index, valid = plan.safe_index, plan.valid

    def drop_before_layer_0(module: nn.Module, args: tuple, lm_kwargs: dict) -> tuple[tuple, dict]:
        embeds = lm_kwargs["inputs_embeds"]
        lm_kwargs["inputs_embeds"] = embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))
        lm_kwargs["attention_mask"] = valid.long()
        positions = lm_kwargs.get("position_ids")
        if positions is not None:  # original positions ((B, S) or M-RoPE (C, B, S)), gathered
            positions = positions.expand(*positions.shape[:-2], index.shape[0], positions.shape[-1])
            lm_kwargs["position_ids"] = positions.gather(
                -1, index.expand(*positions.shape[:-2], *index.shape)
            )
        lm_kwargs.pop("cache_position", None)
        return args, lm_kwargs

    handle = language_model.register_forward_pre_hook(drop_before_layer_0, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = guide(**call, use_cache=False, logits_to_keep=steps + 1).logits[:, :-1].float()
    finally:
        handle.remove()
    new = sequences[:, window:]
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new[..., None]).squeeze(-1)
    return torch.exp(logprobs.masked_fill(~result.answer_mask, 0.0).sum(dim=1))


def _language_model(model: nn.Module) -> nn.Module:
    from vlm_accel.patches import adapter_for

    return adapter_for(model).language_model(model)
