"""PAINT — Arif et al., "Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large
Vision-Language Model" (arXiv 2501.12206; released as "PAINT: Paying Attention to INformed Tokens").

As released (``modPAI/.../clip_encoder.py::update_modpai_alpha``, ``modPAI/attention.py::llama_new_forward``):

- **Local tokens** ``S_L``: the top ``⌊P·ρ_L⌋`` patches by CLS→patch attention of ViT layer 0, summed over heads
  (``ρ_L = 0.25``).
- **Summary tokens** ``S_S``: CLS→patch attention of the penultimate ViT layer, summed over heads; as many of its
  top patches as it has upper outliers (``> Q3 + 1.5·IQR``). ``S_L ← S_L \\ S_S``.
- In LLM layers ``[2, 32)`` of LLaVA-1.5-7B (here ``layers=(2/32, 1.0)``), every head, on the last query row's
  pre-softmax logits: ``z ← z + a·|z|`` on local tokens and ``z ← z + b·|z|`` on summary tokens; released
  defaults ``a = 0.7``, ``b = 0.3``. Here ``alpha`` scales both (``a = alpha·local_boost``,
  ``b = alpha·summary_boost``, ``alpha=1`` is the released setting, ``alpha=0`` the unpatched model).

Image-free guidance (``gamma``, ``plausibility``): PAINT's released CHAIR runs (``modpai_eval.sh``) add PAI's
guidance at ``γ = 1.1``; it is on by default here at that value and runs as PAI's does (a doubled batch in
``generate()``, :mod:`vlm_accel.methods.image_free_guidance`); ``gamma=1`` switches it off, and the no-op setting
is ``alpha=0, gamma=1``.

``head_specific=True`` adds the paper's head-specific modulation, which the released code does not contain, in a
form of our own design: each head's boosts are scaled by its visual sensitivity in that row, ``w_h = m_h / mean(m)``
where ``m_h`` is the head's (unedited) attention mass on visual tokens.

The CLS row of the two ViT layers is recomputed from each layer's input (one query row; SDPA gives no weights), so
the vision tower keeps its backend. Needs a CLIP-style tower with a CLS token whose patches map one-to-one onto the
visual tokens (LLaVA-1.5: ``vision_feature_select_strategy="default"``, one image per visual-token run).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vlm_accel.config import check_int, check_number, check_ratio
from vlm_accel.errors import MethodNotApplicable
from vlm_accel.methods.base import RowEdit
from vlm_accel.methods.image_free_guidance import check_guidance, guided_generate
from vlm_accel.methods.reweighting import ReweightConfig, ReweightMethod
from vlm_accel.runtime.devices import execution_device, onloaded
from vlm_accel.runtime.scores import RowContext
from vlm_accel.runtime.state import ForwardState

NONE, LOCAL, SUMMARY = 0, 1, 2


@dataclass
class PAINTConfig(ReweightConfig):
    method_name: ClassVar[str] = "paint"
    alpha: float = 1.0
    layers: tuple[float, float] = (2 / 32, 1.0)
    local_boost: float = 0.7
    summary_boost: float = 0.3
    local_ratio: float = 0.25
    local_layer: int = 0
    summary_layer: int = -2
    head_specific: bool = False
    gamma: float = 1.1
    plausibility: float = 0.1

    def validate(self) -> None:
        super().validate()
        self.gamma, self.plausibility = check_guidance(self.gamma, self.plausibility)
        for name in ("local_boost", "summary_boost"):
            if check_number(name, getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        check_ratio("local_ratio", self.local_ratio)
        check_int("local_layer", self.local_layer)
        check_int("summary_layer", self.summary_layer)
        if not isinstance(self.head_specific, bool):
            raise TypeError(f"head_specific must be a bool, got {self.head_specific!r}")


def cls_patch_attention(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """CLS→patch attention of one CLIP encoder layer, summed over heads: ``[images, patches]``.

    The layer's weights are read inside accelerate's onload (an offloaded layer keeps them on the meta device
    outside its forward); the result comes back on ``hidden``'s device."""
    with contextlib.ExitStack() as stack:
        for module in layer.modules():
            stack.enter_context(onloaded(module))
        device = execution_device(layer.layer_norm1) or hidden.device
        return _cls_patch_attention(layer, hidden.to(device)).to(hidden.device)


def _cls_patch_attention(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    attention = layer.self_attn
    x = layer.layer_norm1(hidden)
    heads, dim = attention.num_heads, attention.head_dim
    query = attention.q_proj(x[:, :1]).view(x.shape[0], 1, heads, dim).transpose(1, 2)
    key = attention.k_proj(x).view(x.shape[0], -1, heads, dim).transpose(1, 2)
    probs = torch.softmax((query.float() @ key.float().transpose(2, 3)) * attention.scale, dim=-1)
    return probs[:, :, 0, 1:].sum(dim=1)


def select_tokens(local_scores: torch.Tensor, summary_scores: torch.Tensor, local_ratio: float) -> torch.Tensor:
    """Per-patch category (NONE / LOCAL / SUMMARY) of one image, as the released code selects them."""
    patches = local_scores.shape[0]
    category = torch.zeros(patches, dtype=torch.long, device=local_scores.device)
    local = local_scores.topk(int(patches * local_ratio)).indices
    category[local] = LOCAL
    q1, q3 = torch.quantile(summary_scores.float(), torch.tensor([0.25, 0.75], device=summary_scores.device))
    outliers = int((summary_scores > q3 + 1.5 * (q3 - q1)).sum())
    if outliers:
        category[summary_scores.topk(outliers).indices] = SUMMARY  # S_L ← S_L \ S_S
    return category


def boost_logits(config: PAINTConfig, categories: torch.Tensor, logits: torch.Tensor, ctx: RowContext):
    """``z + a·|z|`` on local and ``z + b·|z|`` on summary keys (optionally scaled per head)."""
    cats = categories[:, None, None, : logits.shape[-1]]
    boost = torch.zeros_like(logits)
    boost = torch.where(cats == LOCAL, config.alpha * config.local_boost, boost)
    boost = torch.where(cats == SUMMARY, config.alpha * config.summary_boost, boost)
    boost = torch.where(ctx.visual[:, None], boost, torch.zeros_like(boost))
    if config.head_specific:
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        mass = (probs * ctx.visual[:, None]).sum(-1, keepdim=True)  # [B, H, M, 1]
        boost = boost * mass / mass.mean(dim=1, keepdim=True).clamp(min=1e-12)
    return torch.where(boost > 0, logits + boost * logits.abs(), logits)


class PAINT(ReweightMethod):
    config_cls = PAINTConfig
    config: PAINTConfig
    #: outermost ``generate`` wrapper: the image-free rows join the batch before any other wrapper (SGL's guide)
    #: sees it, so every per-row state downstream is built for the doubled batch
    generate_rank = 20

    def bind(self, ctx) -> None:
        super().bind(ctx)
        model = ctx.model
        tower = getattr(model.model, "vision_tower", None)
        vision_model = getattr(tower, "vision_model", tower)  # CLIPVisionModel, or a wrapper around it
        encoder_layers = getattr(getattr(vision_model, "encoder", None), "layers", None)
        strategy = getattr(model.config, "vision_feature_select_strategy", None)
        if ctx.model_type != "llava" or encoder_layers is None or strategy != "default":
            raise MethodNotApplicable(
                f"paint needs a CLIP vision tower with a CLS token whose patches map one-to-one onto the visual "
                f"tokens (LLaVA-1.5, vision_feature_select_strategy='default'); got model_type {ctx.model_type!r}"
            )
        for name in ("local_layer", "summary_layer"):
            index = getattr(self.config, name)
            if not -len(encoder_layers) <= index < len(encoder_layers):
                raise MethodNotApplicable(
                    f"paint: {name}={index} is out of range for this {len(encoder_layers)}-layer vision tower"
                )
        self._encoder_layers = encoder_layers
        self._stats: dict[str, Any] = {}

    @classmethod
    def noop_config(cls) -> PAINTConfig:
        return PAINTConfig(alpha=0.0, gamma=1.0)

    def wrap_generate(self, generate):
        if self.config.gamma == 1.0:
            return generate
        visual_ids = self.ctx.adapter.visual_token_ids(self.ctx.model)
        return guided_generate(generate, self.ctx.model, visual_ids, self.config.gamma, self.config.plausibility,
                               "paint")  # fmt: skip

    def vision_tap_layers(self) -> tuple[int, ...]:
        """The two ViT layers whose inputs give the CLS rows (captured by the runtime's vision-side hook)."""
        return (self.config.local_layer, self.config.summary_layer) if self.config.alpha > 0 else ()

    def _categories_for(self, state: ForwardState) -> torch.Tensor:
        """Per-window-position categories from this forward's vision-tower run."""
        taps = state.vision_taps
        if self.config.local_layer not in taps or self.config.summary_layer not in taps:
            raise RuntimeError("paint: the vision tower did not run before this prefill (no CLS attention captured)")
        with torch.no_grad():
            local = cls_patch_attention(self._encoder_layers[self.config.local_layer], taps[self.config.local_layer])
            summary = cls_patch_attention(
                self._encoder_layers[self.config.summary_layer], taps[self.config.summary_layer]
            )
        per_image = [select_tokens(local[i], summary[i], self.config.local_ratio) for i in range(local.shape[0])]
        flat = torch.cat(per_image)
        visual = state.layout.visual
        if int(visual.sum()) != flat.numel():
            raise ValueError(
                f"paint: {flat.numel()} vision patches for {int(visual.sum())} visual tokens; it needs one visual "
                "token per patch"
            )
        categories = torch.zeros(visual.shape, dtype=torch.long, device=visual.device)
        categories[visual] = flat.to(visual.device)  # row-major, the order masked_scatter fills placeholders
        return categories

    def row_edit(self, layer: int, state: ForwardState) -> RowEdit | None:
        if not self.active(layer):
            return None
        generation = state.generation_state(self)  # categories live with the generation, not on the method
        if state.is_prefill and "categories" not in generation:
            categories = self._categories_for(state) if state.layout.any_visual else None
            generation["categories"] = categories
            if categories is not None:
                self._stats = {
                    "local_tokens": int((categories == LOCAL).sum()),
                    "summary_tokens": int((categories == SUMMARY).sum()),
                }
        categories = generation.get("categories")
        if categories is None:
            return None

        def edit(logits: torch.Tensor, ctx: RowContext) -> torch.Tensor:
            columns = state.window_to_columns(categories, layer, logits.shape[-1], NONE)
            return boost_logits(self.config, columns, logits, ctx)

        return RowEdit(edit=edit, rows="last")

    def stats(self) -> dict[str, Any]:
        return dict(self._stats)  # the last prefill's token counts (reporting only)
