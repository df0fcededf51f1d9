"""PAI — Liu et al., "Paying More Attention to Image: A Training-Free Method for Alleviating Hallucination in
LVLMs" (ECCV 2024).

1. Attention intervention (paper §3.2; code ``attention.py::llama_new_forward``): in layers ``[s, e)``, for every
   head, the last query row's pre-softmax logits on image keys are amplified, ``z ← z + α·|z|``, then softmax.
   Paper / README defaults for LLaVA-1.5-7B: ``α = 0.2``, layers 2–32 (here ``layers=(2/32, 1.0)``).
2. Image-free guidance (paper §3.3; code ``CFG.py::CFGLogits``): the same prompt without the image is decoded in
   parallel; next-token log-probabilities become ``γ·(ℓ_c − ℓ_u) + ℓ_u``, with tokens whose conditional
   log-probability is below ``log(0.1) + max ℓ_c`` removed (adaptive plausibility cutoff). On by default at the
   README's ``γ = 1.1``; ``γ = 1`` switches it off (the no-op setting is ``alpha=0, gamma=1``). It runs in
   ``generate()`` as a doubled batch — the image-free rows are computed in the same forward as the main rows
   (:mod:`vlm_accel.methods.image_free_guidance`; greedy decoding only).

The intervention runs as a row edit (the last row is recomputed from post-RoPE q and the full K/V; SDPA keeps every
other row). Image keys follow whatever a composed pruning method kept; the image-free rows have none, so they run
unedited, as the official unconditional pass does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from vlm_accel.methods.base import RowEdit
from vlm_accel.methods.image_free_guidance import check_guidance, guided_generate
from vlm_accel.methods.reweighting import ReweightConfig, ReweightMethod
from vlm_accel.runtime.scores import RowContext
from vlm_accel.runtime.state import ForwardState


@dataclass
class PAIConfig(ReweightConfig):
    method_name: ClassVar[str] = "pai"
    alpha: float = 0.2
    layers: tuple[float, float] = (2 / 32, 1.0)
    gamma: float = 1.1
    plausibility: float = 0.1

    def validate(self) -> None:
        super().validate()
        self.gamma, self.plausibility = check_guidance(self.gamma, self.plausibility)


def amplify_visual_logits(alpha: float, logits: torch.Tensor, ctx: RowContext) -> torch.Tensor:
    """``z + α·|z|`` on the allowed visual keys (PAI Eq. 3)."""
    return torch.where(ctx.visual[:, None], logits + alpha * logits.abs(), logits)


class PAI(ReweightMethod):
    config_cls = PAIConfig
    config: PAIConfig
    #: outermost ``generate`` wrapper: the image-free rows join the batch before any other wrapper (SGL's guide)
    #: sees it, so every per-row state downstream is built for the doubled batch
    generate_rank = 20

    def row_edit(self, layer: int, state: ForwardState) -> RowEdit | None:
        if not self.active(layer):
            return None
        return RowEdit(edit=functools.partial(amplify_visual_logits, self.config.alpha), rows="last")

    @classmethod
    def noop_config(cls) -> PAIConfig:
        return PAIConfig(alpha=0.0, gamma=1.0)

    def wrap_generate(self, generate):
        if self.config.gamma == 1.0:
            return generate
        visual_ids = self.ctx.adapter.visual_token_ids(self.ctx.model)
        return guided_generate(generate, self.ctx.model, visual_ids, self.config.gamma, self.config.plausibility, "pai")
