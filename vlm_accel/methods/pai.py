"""PAI — Liu et al., "Paying More Attention to Image: A Training-Free Method for Alleviating Hallucination in
LVLMs" (ECCV 2024).

1. Attention intervention (paper §3.2; code ``attention.py::llama_new_forward``): in layers ``[s, e)``, for every
   head, the last query row's pre-softmax logits on image keys are amplified, ``z ← z + α·|z|``, then softmax.
   Paper / README defaults for LLaVA-1.5-7B: ``α = 0.2``, layers 2–32 (here ``layers=(2/32, 1.0)``).
2. Image-free guidance (paper §3.3; code ``CFG.py::CFGLogits``): the same prompt without the image is decoded in
   parallel; next-token log-probabilities become ``γ·(ℓ_c − ℓ_u) + ℓ_u``, with tokens whose conditional
   log-probability is below ``log(0.1) + max ℓ_c`` removed (adaptive plausibility cutoff). ``γ = 1`` disables it
   (the default here); the README uses ``γ = 1.1``.

The intervention runs as a row edit (the last row is recomputed from post-RoPE q and the full K/V; SDPA keeps every
other row). Image keys follow whatever a composed pruning method kept. The guidance runs its image-free prompt as a
separate forward per step with its own cache (the official code also runs it as a second model call); it needs
``generate()`` and 2-D position ids, so Qwen2-VL's M-RoPE text positions are given as a plain 2-D row.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from vlm_accel.config import check_number
from vlm_accel.methods.base import RowEdit
from vlm_accel.methods.reweighting import ReweightConfig, ReweightMethod
from vlm_accel.runtime.scores import RowContext
from vlm_accel.runtime.state import ForwardState


@dataclass
class PAIConfig(ReweightConfig):
    method_name: ClassVar[str] = "pai"
    alpha: float = 0.2
    layers: tuple[float, float] = (2 / 32, 1.0)
    gamma: float = 1.0
    plausibility: float = 0.1

    def validate(self) -> None:
        super().validate()
        self.gamma = check_number("gamma", self.gamma)
        if self.gamma < 1.0:
            raise ValueError(f"gamma must be >= 1 (1 disables image-free guidance), got {self.gamma}")
        self.plausibility = check_number("plausibility", self.plausibility)
        if not 0.0 < self.plausibility <= 1.0:
            raise ValueError(f"plausibility must be in (0, 1], got {self.plausibility}")


def amplify_visual_logits(alpha: float, logits: torch.Tensor, ctx: RowContext) -> torch.Tensor:
    """``z + α·|z|`` on the allowed visual keys (PAI Eq. 3)."""
    return torch.where(ctx.visual[:, None], logits + alpha * logits.abs(), logits)


class ImageFreeGuidance(LogitsProcessor):
    """PAI's logit refinement: contrast with the same prompt decoded without its image (PAI §3.3, CFG.py)."""

    def __init__(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 visual_ids: tuple[int, ...], gamma: float, plausibility: float) -> None:
        self.model, self.gamma, self.log_cutoff = model, gamma, math.log(plausibility)
        keep = attention_mask.bool()
        for token in visual_ids:
            keep &= input_ids != token
        width = int(keep.sum(1).max())
        pad = model.generation_config.pad_token_id or 0
        self.input_ids = torch.full((input_ids.shape[0], width), pad, dtype=input_ids.dtype, device=input_ids.device)
        self.attention_mask = torch.zeros_like(self.input_ids)
        for row in range(input_ids.shape[0]):
            tokens = input_ids[row][keep[row]]
            self.input_ids[row, width - len(tokens) :] = tokens
            self.attention_mask[row, width - len(tokens) :] = 1
        self.cache: Any = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.cache is None:
            step_ids, mask = self.input_ids, self.attention_mask
        else:
            step_ids = input_ids[:, -1:]
            mask = torch.cat([self.attention_mask, torch.ones_like(step_ids)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
        with torch.no_grad():
            out = self.model(input_ids=step_ids, attention_mask=mask, position_ids=positions,
                             past_key_values=self.cache, use_cache=True, logits_to_keep=1)  # fmt: skip
        self.cache, self.attention_mask = out.past_key_values, mask
        conditional = torch.log_softmax(scores.float(), dim=-1)
        unconditional = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        mixed = self.gamma * (conditional - unconditional) + unconditional
        cutoff = conditional.max(dim=-1, keepdim=True).values + self.log_cutoff
        return mixed.masked_fill(conditional < cutoff, float("-inf")).to(scores.dtype)


class PAI(ReweightMethod):
    config_cls = PAIConfig
    config: PAIConfig

    def row_edit(self, layer: int, state: ForwardState) -> RowEdit | None:
        if not self.active(layer):
            return None
        return RowEdit(edit=functools.partial(amplify_visual_logits, self.config.alpha), rows="last")

    def wrap_generate(self, generate):
        if self.config.gamma == 1.0:
            return generate

        @functools.wraps(generate)
        def guided(*args: Any, **kwargs: Any):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is None:
                raise ValueError("pai with gamma > 1 needs input_ids (image-free guidance rebuilds the prompt)")
            mask = kwargs.get("attention_mask")
            mask = torch.ones_like(input_ids) if mask is None else mask
            guidance = ImageFreeGuidance(self.ctx.model, input_ids, mask, self.ctx.adapter.visual_token_ids(
                self.ctx.model), self.config.gamma, self.config.plausibility)  # fmt: skip
            processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
            processors.append(guidance)
            return generate(*args, logits_processor=processors, **kwargs)

        return guided
