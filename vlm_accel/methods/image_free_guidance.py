"""Image-free contrastive guidance (PAI §3.3, code ``LALBJ/PAI`` ``CFG.py::CFGLogits``), run in a doubled batch.

Next-token log-probabilities become ``γ·(ℓ_c − ℓ_u) + ℓ_u``, where ``ℓ_c`` is the log-softmax of the prompt with its
image and ``ℓ_u`` of the same prompt with the image tokens removed; tokens with ``ℓ_c < log(p) + max ℓ_c`` are
removed (adaptive plausibility cutoff, ``p = 0.1``). ``γ = 1`` switches it off. PAI's README runs ``γ = 1.1``;
PAINT's released CHAIR runs (``modpai_eval.sh``) use PAI's guidance at the same ``γ``.

The official code decodes the image-free prompt as a second model call with its own cache at every step. Here the
image-free rows are appended to the batch (rows ``B…2B−1``: each prompt minus its visual tokens, left-padded to
the same width), so one forward per step computes both: the guidance processor mixes row ``b`` with row ``B+b``
and gives both the mixed scores, so greedy decoding picks the same token for both halves and the image-free rows
follow the generated text. The attention interventions (PAI, PAINT) find no visual keys in those rows, so the
unconditional pass runs unedited, as in the official code.

Other per-token inputs (Qwen2-VL's ``mm_token_type_ids``) are restricted the same way, 0 (text) as padding. Limits
(each refused with one line): greedy decoding only (independent sampling of the two halves would let them
diverge), one sequence per prompt, ``input_ids`` (not ``inputs_embeds``). The returned ``past_key_values`` is None
(the cache holds both halves); ``sequences``, ``scores`` and ``logits`` hold the first ``B`` rows. PAI and PAINT
composed with the same ``(γ, p)`` share one guidance (different settings are refused).
"""

from __future__ import annotations

import contextvars
import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from vlm_accel.config import check_number

# Set while a guided generate runs, so that a second method asking for the same guidance (PAI with PAINT) does not
# double the batch again: call-scoped, never on a method object.
# It names the doubled input_ids it passes on: only the wrapper called with exactly those is the composed one (a
# generation started from inside this one, e.g. by a logits processor, has its own inputs and its own guidance).
_ACTIVE: contextvars.ContextVar[tuple[torch.Tensor, float, float] | None] = contextvars.ContextVar(
    "image_free_guidance", default=None
)


def check_guidance(gamma: Any, plausibility: Any) -> tuple[float, float]:
    gamma = check_number("gamma", gamma)
    if gamma < 1.0:
        raise ValueError(f"gamma must be >= 1 (1 disables image-free guidance), got {gamma}")
    plausibility = check_number("plausibility", plausibility)
    if not 0.0 < plausibility <= 1.0:
        raise ValueError(f"plausibility must be in (0, 1], got {plausibility}")
    return gamma, plausibility


def mix_log_probs(conditional: torch.Tensor, unconditional: torch.Tensor, gamma: float, plausibility: float):
    """``γ·(ℓ_c − ℓ_u) + ℓ_u`` with the adaptive plausibility cutoff (``CFG.py``), from raw scores ``[B, V]``."""
    cond = torch.log_softmax(conditional.float(), dim=-1)
    uncond = torch.log_softmax(unconditional.float(), dim=-1)
    mixed = gamma * (cond - uncond) + uncond
    cutoff = cond.max(dim=-1, keepdim=True).values + math.log(plausibility)
    return mixed.masked_fill(cond < cutoff, float("-inf"))


class DoubledBatchGuidance(LogitsProcessor):
    """Scores ``[2B, V]``: rows ``:B`` with the image, ``B:`` without; both halves get the mixed scores."""

    def __init__(self, batch: int, gamma: float, plausibility: float) -> None:
        self.batch, self.gamma, self.plausibility = batch, gamma, plausibility

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mixed = mix_log_probs(scores[: self.batch], scores[self.batch :], self.gamma, self.plausibility)
        return torch.cat([mixed, mixed]).to(scores.dtype)


def image_free_keep(input_ids: torch.Tensor, attention_mask: torch.Tensor, visual_ids: tuple[int, ...]) -> torch.Tensor:
    """Bool ``[B, W]``: the prompt tokens the image-free rows keep (every real token but the visual ones)."""
    return attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(visual_ids, device=input_ids.device))


def image_free_rows(value: torch.Tensor, keep: torch.Tensor, fill: int) -> torch.Tensor:
    """A per-token input ``[B, W, ...]`` restricted to ``keep`` and left-padded with ``fill`` to the width ``W``."""
    out = torch.full_like(value, fill)
    width = value.shape[1]
    for row in range(value.shape[0]):
        kept = value[row][keep[row]]
        out[row, width - len(kept) :] = kept
    return out


def _first_rows(output: Any, batch: int) -> Any:
    if torch.is_tensor(output):
        return output[:batch]
    output.sequences = output.sequences[:batch]
    for name in ("scores", "logits"):
        steps = getattr(output, name, None)
        if steps is not None:
            setattr(output, name, tuple(step[:batch] for step in steps))
    if getattr(output, "past_key_values", None) is not None:
        output.past_key_values = None  # it holds both halves of the doubled batch
    return output


def guided_generate(generate: Callable[..., Any], model: torch.nn.Module, visual_ids: tuple[int, ...],
                    gamma: float, plausibility: float, name: str) -> Callable[..., Any]:  # fmt: skip
    """``generate`` with image-free guidance in a doubled batch (see the module docstring)."""

    @functools.wraps(generate)
    def guided(*args: Any, **kwargs: Any) -> Any:
        active = _ACTIVE.get()
        if active is not None and kwargs.get("input_ids") is active[0]:  # a composed method's wrapper runs it
            if active[1:] != (gamma, plausibility):
                raise ValueError(
                    f"{name}: two composed methods ask for image-free guidance with different settings "
                    f"(gamma, plausibility) {active[1:]} and {(gamma, plausibility)}; give them the same, or gamma=1 "
                    "to one"
                )
            return generate(*args, **kwargs)
        input_ids = kwargs.pop("input_ids", args[0] if args else None)
        args = args[1:]
        if input_ids is None or kwargs.get("inputs_embeds") is not None:
            raise ValueError(f"{name} with gamma > 1 needs input_ids (image-free guidance removes the image tokens)")
        config = kwargs.get("generation_config") or model.generation_config
        setting = {k: kwargs.get(k, getattr(config, k, None)) for k in ("do_sample", "num_beams", "num_return_sequences")}
        if setting["do_sample"] or (setting["num_beams"] or 1) > 1 or (setting["num_return_sequences"] or 1) > 1:
            raise ValueError(
                f"{name} image-free guidance (gamma > 1) runs in a doubled batch and supports greedy decoding "
                "only (do_sample=False, num_beams=1, num_return_sequences=1); or set gamma=1"
            )
        mask = kwargs.pop("attention_mask", None)
        mask = torch.ones_like(input_ids) if mask is None else mask
        keep = image_free_keep(input_ids, mask, visual_ids)
        pad = model.generation_config.pad_token_id
        free_ids = image_free_rows(input_ids, keep, 0 if pad is None else int(pad))
        free_mask = image_free_rows(mask, keep, 0)
        for key, value in list(kwargs.items()):  # other per-token inputs (Qwen2-VL's mm_token_type_ids): 0 = text
            if torch.is_tensor(value) and value.dim() >= 2 and tuple(value.shape[:2]) == tuple(input_ids.shape):
                kwargs[key] = torch.cat([value, image_free_rows(value, keep, 0)])
        batch = input_ids.shape[0]
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        processors.append(DoubledBatchGuidance(batch, gamma, plausibility))
        doubled = torch.cat([input_ids, free_ids])
        token = _ACTIVE.set((doubled, gamma, plausibility))
        try:
            output = generate(*args, input_ids=doubled,
                              attention_mask=torch.cat([mask, free_mask]),
                              logits_processor=processors, **kwargs)  # fmt: skip
        finally:
            _ACTIVE.reset(token)
        return _first_rows(output, batch)

    return guided
