"""TTF — Liu et al., "Temporal Token Fusion via Pixel-Attention Integration for Vision-Language-Action Models"
(arXiv 2508.19257, AAAI 2026; official code ``PKU-XLab/TTF-VLA``, ``experiments/robot/aptube_manager.py``).

For frame ``t`` of a stream (or of a clip), per patch ``p`` of the vision grid (the released hybrid rule):

- **keyframe** when ``t % keyframe_interval == 0`` (and at the first frame): fresh tokens everywhere;
- **pixel test**: ``Y = 0.299R + 0.587G + 0.114B`` of the processor-normalised frame, ``d_p`` = mean of
  ``|Y_t − Y_{t−1}|`` over the patch; *dynamic* if ``d_p > pixel_threshold``;
- **attention test**: the previous step's attention from the instruction's text rows (every text token after the
  image) to the visual columns at one LLM layer, mean over heads and rows → ``r_p``; *relevant* if
  ``p ∈ TopK(r, top_k)``. Computed as a score tap under SDPA (:mod:`vlm_accel.runtime.scores`), never by switching
  the model to eager. With no previous attention the frame is recomputed in full (the code's fallback);
- **hybrid**: recompute ``p`` if dynamic or relevant, else reuse the cached token — *hard fusion at the vision
  output, before the projector* — and the cache holds the fused tokens until the next keyframe.

Defaults (the config's, for any grid and depth): ``keyframe_interval=3``, ``pixel_threshold=0.03``,
``top_k=70/256`` (a fraction of the patch grid; an int is a count), ``attention_layer=15/32`` (a depth fraction:
layer ``⌊f·L⌋``; an int is a layer index) — the README's LIBERO command for OpenVLA-7B (32 layers, 16×16 grid).
The code's own defaults are ``keyframe_interval=5``, ``patch_diff_threshold=0.1``, ``attention_top_k=120``
(= ``120/256``), ``attention_layer_id=15``. The README also passes ``fusion_mode "attention_guided"``, which the code
rejects; TTF is its ``"hybrid"`` mode, implemented here. Thresholds are on normalised pixels (they depend on the
processor's mean/std).

Two ways to use it (``docs/methods/ttf.md``):

- **stream**: inside ``with patch.stream():`` one frame per call and per batch row (row ``b`` is stream ``b``);
  ``patch.reset()`` starts an episode. Frame ``t`` fuses with frame ``t−1`` of the same row.
- **clip**: outside a stream, a row's images are consecutive frames; frame ``j`` fuses with frame ``j−1``.
  There is no previous step in one prompt, so the attention test is off (pixel test only): a deviation, stated.

``save_compute=True`` (beyond the paper: the released code encodes every full frame and saves nothing): an image
with no patch to recompute skips the vision tower and the projector (stream: the cached tokens are reused; clip: the
previous frame's); in clip mode the reused tokens are also dropped from the language model from layer 1 on (layer 0
is never shortened), kept tokens at their original positions. A reused token equals the token of the frame before
it, so which copy leaves is free: ``clip_keep="latest"`` (default) drops the earlier copies and keeps the one in the
latest frame that still carries that token (the last frame stays complete); ``"reused"`` drops the reused copies in
the later frames (the literal reading; 15 points worse on the testbed, docs/methods/ttf.md). Same count either way.

Families (the fusion unit is what one LLM visual token is made of; :mod:`vlm_accel.methods.ttf_grids`): LLaVA-1.5
(a ViT patch; a ``"full"``-strategy CLS token is always recomputed), Qwen2-VL / Qwen2.5-VL (a merged 2×2 patch
block, fused before the merger), InternVL (a pixel-shuffled 2×2 patch block of one tile), LLaVA-NeXT / OneVision
(a patch of one anyres crop, mapped onto the packed tokens by the model's own packing). The tower skip of
``save_compute`` needs images the runtime can encode apart: LLaVA-1.5 and Qwen-VL; on the tiled layouts every image
is encoded and only the clip drop saves compute. ``keyframe_interval=1`` (the no-op) binds on every family;
fusion on a layout without a grid (LLaVA-NeXT with a CLS per crop) raises
:class:`~vlm_accel.errors.MethodNotApplicable`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from vlm_accel.config import MethodConfig, check_int, check_number
from vlm_accel.errors import MethodNotApplicable
from vlm_accel.methods.base import KIND_SELECTION, Method, ScoreRequest
from vlm_accel.methods.ttf_fusion import fuse, recompute_mask, top_k_mask
from vlm_accel.methods.ttf_grids import FUSING_FAMILIES, FrameGrid, ImageUnits, frame_grid
from vlm_accel.runtime.plan import KeepPlan
from vlm_accel.runtime.sequence import relative_positions
from vlm_accel.runtime.state import ForwardState, ScoreTap
from vlm_accel.runtime.vision import ImageReuse, VisualFeatures


@dataclass
class TTFConfig(MethodConfig):
    """See the module docstring. ``keyframe_interval=1`` makes every frame a keyframe: the unpatched model."""

    method_name: ClassVar[str] = "ttf"
    keyframe_interval: int = 3
    pixel_threshold: float = 0.03
    top_k: int | float = 70 / 256
    attention_layer: int | float = 15 / 32
    save_compute: bool = False
    clip_keep: str = "latest"

    def validate(self) -> None:
        check_int("keyframe_interval", self.keyframe_interval, low=1)
        if check_number("pixel_threshold", self.pixel_threshold) < 0:
            raise ValueError(f"pixel_threshold must be >= 0, got {self.pixel_threshold}")
        if isinstance(self.top_k, int) and not isinstance(self.top_k, bool):
            check_int("top_k", self.top_k, low=0)
        elif not 0.0 <= check_number("top_k", self.top_k) <= 1.0:
            raise ValueError(f"top_k as a fraction of the patch grid must be in [0, 1], got {self.top_k}")
        if isinstance(self.attention_layer, int) and not isinstance(self.attention_layer, bool):
            check_int("attention_layer", self.attention_layer, low=0)
        elif not 0.0 <= check_number("attention_layer", self.attention_layer) < 1.0:
            raise ValueError(
                f"attention_layer as a depth fraction must be in [0, 1), got {self.attention_layer}"
            )
        if not isinstance(self.save_compute, bool):
            raise TypeError(f"save_compute must be a bool, got {self.save_compute!r}")
        if self.clip_keep not in ("reused", "latest"):
            raise ValueError(f"clip_keep must be 'reused' or 'latest', got {self.clip_keep!r}")

    def label(self) -> str:
        return "ttf(save_compute)" if self.save_compute else "ttf"

    def top_k_count(self, patches: int) -> int:
        if isinstance(self.top_k, int):
            return min(self.top_k, patches)
        return min(patches, int(math.floor(self.top_k * patches + 0.5)))


@dataclass
class FramePlan:
    """What TTF decided for the images of one prefill (committed to the stream state at the forward's end)."""

    stream: bool
    row_of_image: list[int]
    keyframe: list[bool]
    recompute: list[torch.Tensor]  # per image: bool [units] (a leading CLS unit is always True)
    layout: list[ImageUnits]  # per image: its units, grayscale and token → unit map
    token_positions: list[torch.Tensor]  # per image: window positions of its LLM visual tokens, in order
    fused: dict[int, torch.Tensor] = field(default_factory=dict)  # image -> fused pre-projector units
    projected: dict[int, torch.Tensor] = field(default_factory=dict)  # image -> post-projector units
    relevance: dict[int, torch.Tensor] = field(default_factory=dict)  # row -> [units − lead] from this call

    def reused_tokens(self, image: int, units: int | None = None) -> torch.Tensor:
        """Bool per LLM token of ``image``: it carries a reused unit (of image ``units``, default ``image``; a frame
        with the same layout). Tokens of no unit (newlines) are never reused."""
        reused = ~self.recompute[image if units is None else units]
        token_unit = self.layout[image].token_map().to(reused.device)
        return (token_unit >= 0) & reused[token_unit.clamp(min=0)]

    def reaching(self, image: int, lead: int) -> torch.Tensor:
        """Bool per LLM token of ``image``: it carries a (non-lead) unit."""
        return self.layout[image].token_map() >= lead


class TTF(Method):
    config_cls = TTFConfig
    config: TTFConfig
    kind_rank = KIND_SELECTION  # it may drop reused tokens (save_compute, clip mode) at layer 1
    visual_features_at = ("pre_projector", "post_projector")

    def __init__(self, config: MethodConfig) -> None:
        super().__init__(config)
        self.changes_length = self.config.save_compute  # only the compute-saving mode shortens the sequence
        self._counts = {
            "frames": 0,
            "keyframes": 0,
            "patches": 0,
            "reused": 0,
            "images_skipped": 0,
            "dropped": 0,
        }

    @classmethod
    def noop_config(cls) -> TTFConfig:
        return TTFConfig(keyframe_interval=1)

    # ------------------------------------------------------------------------------------------------ binding

    def bind(self, ctx) -> None:
        super().bind(ctx)
        grid = frame_grid(ctx.model)
        if grid is None and self.config.keyframe_interval > 1:
            raise MethodNotApplicable(
                f"ttf fuses tokens only on {', '.join(FUSING_FAMILIES)}, not on {ctx.model_type!r} (its image layout "
                "has no fusion grid here); keyframe_interval=1, the no-op, binds on every family"
            )
        self.grid: FrameGrid | None = grid
        layer = self.config.attention_layer
        if isinstance(layer, int):
            if layer >= ctx.num_layers:
                raise ValueError(f"ttf: attention_layer={layer} is out of range for {ctx.num_layers} layers")
            self.layer = layer
        else:
            self.layer = min(ctx.num_layers - 1, int(math.floor(layer * ctx.num_layers)))
        if self.config.save_compute and ctx.num_layers < 2:
            raise ValueError("ttf: save_compute drops tokens from layer 1 on; this model has one layer")

    # ------------------------------------------------------------------------------------------------ planning

    def _plan(self, state: ForwardState) -> FramePlan | None:
        return state.memo.get((id(self), "plan"))

    def on_forward_start(self, state: ForwardState, inputs: dict[str, Any]) -> None:
        if self.config.keyframe_interval == 1 or not state.is_prefill or inputs.get("pixel_values") is None:
            return
        if not state.layout.any_visual:
            return
        grid, lead = self.grid, self.grid.lead
        grid.check(inputs)
        visual = state.layout.visual
        positions = [visual[b].nonzero().flatten() for b in range(state.batch)]
        layout = grid.images(inputs, _runs(positions))
        row_of_image = _rows_of_images([image.tokens for image in layout], visual.sum(dim=1).tolist())
        images_per_row = [row_of_image.count(b) for b in range(state.batch)]
        token_positions, offsets = [], [0] * state.batch
        for image, b in zip(layout, row_of_image):
            token_positions.append(positions[b][offsets[b] : offsets[b] + image.tokens])
            offsets[b] += image.tokens
        recompute = [torch.ones(image.units, dtype=torch.bool, device=image.gray.device) for image in layout]
        keyframe = [True] * len(layout)
        stream = state.stream_state(self)
        if stream is not None:
            if any(n != 1 for n in images_per_row):
                raise ValueError(
                    f"ttf: in a stream each row carries exactly one frame per call, got {images_per_row} images per "
                    "row; for a clip (several frames in one prompt) call outside patch.stream()"
                )
            if stream.setdefault("batch", state.batch) != state.batch:
                raise ValueError(
                    f"ttf: this stream has {stream['batch']} rows, the call has {state.batch}; keep one stream per "
                    "row, or patch.reset() to start new episodes"
                )
            rows = stream.setdefault("rows", {})
            for image, b in enumerate(row_of_image):
                row, current = rows.get(b), layout[image]
                if row is None or row["t"] % self.config.keyframe_interval == 0:
                    continue
                if not current.fusable or not current.same_layout(row["layout"]):
                    continue  # another crop/tile layout (or a mixed token map): nothing to fuse with
                keyframe[image] = False
                difference = grid.difference(row["layout"].gray, current.gray)
                relevance = row.get("relevance")
                mask = recompute_mask(
                    difference[None],
                    None if relevance is None else relevance[None],
                    self.config.pixel_threshold,
                    self.config.top_k_count(int((current.token_map() >= lead).sum())),  # units on a token
                )
                recompute[image][lead:] = mask[0]
        else:
            frame = 0
            for image, b in enumerate(row_of_image):
                current = layout[image]
                same = image > 0 and row_of_image[image - 1] == b and current.same_layout(layout[image - 1])
                # a frame whose layout differs from the one before it is a keyframe (nothing to fuse it with)
                frame = frame + 1 if same and current.fusable else 0
                if frame % self.config.keyframe_interval == 0:
                    continue
                keyframe[image] = False
                difference = grid.difference(layout[image - 1].gray, current.gray)
                recompute[image][lead:] = difference > self.config.pixel_threshold
        plan = FramePlan(stream is not None, row_of_image, keyframe, recompute, layout, token_positions)
        state.memo[(id(self), "plan")] = plan

    def reuse_images(self, state: ForwardState) -> ImageReuse | None:
        plan = self._plan(state)
        if plan is None or not self.config.save_compute or not self.grid.skips_images:
            return None
        rows = state.stream_state(self)["rows"] if plan.stream else None
        sources: list[int | torch.Tensor | None] = []
        for image, b in enumerate(plan.row_of_image):
            if plan.keyframe[image] or bool(plan.recompute[image].any()):
                sources.append(None)
            elif plan.stream:
                sources.append(rows[b]["projected"])
            else:
                sources.append(image - 1)  # a row's first frame is a keyframe, so image-1 is the same row's
        return ImageReuse(sources)

    # ------------------------------------------------------------------------------------------------ fusion

    def on_visual_features(self, features: VisualFeatures, state: ForwardState) -> torch.Tensor | None:
        plan = self._plan(state)
        if plan is None or features.call_index > 0:
            return None
        images = features.images.tolist() if features.images is not None else list(range(len(plan.keyframe)))
        pieces = self.grid.split(features.features, features.where, images, plan.layout, state.pixel_inputs)
        if features.where == "post_projector":
            if self.config.save_compute and plan.stream:
                for piece, image in zip(pieces, images):
                    plan.projected[image] = piece.detach()
            return None
        rows = state.stream_state(self)["rows"] if plan.stream else None
        fused: list[torch.Tensor] = []
        last: dict[
            int, torch.Tensor
        ] = {}  # clip mode: the row's latest fused frame (skipped frames equal it)
        for piece, image in zip(pieces, images):
            b = plan.row_of_image[image]
            if not plan.keyframe[image]:
                cached = rows[b]["tokens"] if plan.stream else last[b]
                piece = fuse(piece, cached, plan.recompute[image])
            last[b] = piece
            plan.fused[image] = piece.detach()
            fused.append(piece)
        if all(plan.keyframe):
            return None
        return self.grid.join(fused, features.where, images, plan.layout, state.pixel_inputs)

    # ------------------------------------------------------------------------------------------------ attention test

    def _text_rows(self, state: ForwardState) -> tuple[torch.Tensor, torch.Tensor]:
        """Window positions ``[B, M]`` of each row's instruction (text after its last image; padded by repeating the
        last one) and their validity ``[B, M]``."""
        padding, visual = state.layout.padding, state.layout.visual
        window = torch.arange(state.window_len, device=visual.device).expand_as(visual)
        last_visual = torch.where(visual, window, -1).amax(dim=1, keepdim=True)
        text = (window > last_visual) & ~padding & (last_visual >= 0)
        if not bool(text.any()):
            zeros = torch.zeros(state.batch, 1, dtype=torch.long, device=visual.device)
            return zeros, zeros.bool()
        index = KeepPlan.from_keep_mask(text).index
        valid = index >= 0
        filler = index.amax(dim=1, keepdim=True).clamp(min=0)
        return torch.where(valid, index, filler), valid

    def score_request(self, layer: int, state: ForwardState) -> ScoreRequest | None:
        plan = self._plan(state)
        if plan is None or not plan.stream or layer != self.layer or not state.is_prefill:
            return None
        rows, valid = self._text_rows(state)
        state.memo[(id(self), "rows_valid")] = valid
        current = relative_positions(rows, state.current_index, state.window_len)
        return ScoreRequest(rows=current, reduce="head_mean")

    def on_scores(self, layer: int, tap: ScoreTap, state: ForwardState) -> None:
        plan = self._plan(state)
        valid = state.memo.get((id(self), "rows_valid"))
        if plan is None or valid is None:
            return
        weights = valid.to(tap.probs.dtype)[..., None]
        mean = (tap.probs * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)  # mean over text rows
        scores = ScoreTap(mean, tap.rows, tap.window_index).window_scores(state.prefix_len, state.window_len)
        for image, b in enumerate(plan.row_of_image):  # a stream row carries one image
            if bool(valid[b].any()):
                per_token = scores[b, plan.token_positions[image].to(scores.device)].float()
                token_unit = plan.layout[image].token_map().to(per_token.device)
                per_unit = torch.full((plan.layout[image].units,), -math.inf, device=per_token.device)
                per_unit[token_unit[token_unit >= 0]] = per_token[
                    token_unit >= 0
                ]  # units on no token: never top-k
                plan.relevance[b] = per_unit[self.grid.lead :].detach()

    # ------------------------------------------------------------------------------------------------ dropping

    def select(self, layer: int, state: ForwardState) -> KeepPlan | None:
        plan = self._plan(state)
        if layer != 1 or plan is None or plan.stream or not self.config.save_compute or not state.is_prefill:
            return None
        reused = torch.zeros_like(state.layout.visual)
        images = plan.row_of_image
        for image, b in enumerate(images):
            if self.config.clip_keep == "reused":
                drop = plan.reused_tokens(image)
            else:  # the same token's earlier copy goes; the copy in the latest frame that still carries it stays
                fused_next = (
                    image + 1 < len(images) and images[image + 1] == b and not plan.keyframe[image + 1]
                )
                drop = plan.reused_tokens(image, units=image + 1) if fused_next else None
            if drop is not None:
                reused[b, plan.token_positions[image].to(reused.device)] = drop.to(reused.device)
        if not bool(reused.any()):
            return None
        self._counts["dropped"] += int(reused.sum())
        return KeepPlan.from_keep_mask(state.present_mask() & ~reused)

    # ------------------------------------------------------------------------------------------------ commit

    def on_forward_end(self, state: ForwardState) -> None:
        plan = self._plan(state)
        if plan is None:
            return
        for image in range(len(plan.keyframe)):
            reaching = plan.reaching(image, self.grid.lead)  # tokens carrying a non-lead unit
            self._counts["frames"] += 1
            self._counts["keyframes"] += int(plan.keyframe[image])
            self._counts["patches"] += int(reaching.sum())
            self._counts["reused"] += int(
                (plan.reused_tokens(image) & reaching.to(plan.recompute[image].device)).sum()
            )
            skipped = self.grid.skips_images and self.config.save_compute and not plan.keyframe[image]
            skipped = skipped and not bool(plan.recompute[image].any())
            self._counts["images_skipped"] += int(skipped)
        if not plan.stream:
            return
        rows = state.stream_state(self)["rows"]
        for image, b in enumerate(plan.row_of_image):
            row = rows.setdefault(b, {"t": 0})
            row["t"] += 1
            row["layout"] = plan.layout[image]
            if image in plan.fused:
                row["tokens"] = plan.fused[image]
            if image in plan.projected:
                row["projected"] = plan.projected[image]
            row["relevance"] = plan.relevance.get(b)

    def stats(self) -> dict[str, Any]:
        counts = dict(self._counts)
        if counts["patches"]:
            counts["reused_share"] = counts["reused"] / counts["patches"]
        return counts


def _runs(positions: list[torch.Tensor]) -> list[int]:
    """Lengths of the contiguous runs of visual tokens, rows in order (InternVL: one run per image)."""
    runs: list[int] = []
    for row in positions:
        if len(row):
            breaks = (row[1:] - row[:-1] != 1).nonzero().flatten().tolist()
            edges = [0, *[i + 1 for i in breaks], len(row)]
            runs += [edges[i + 1] - edges[i] for i in range(len(edges) - 1)]
    return runs


def _rows_of_images(units: list[int], counts: list[int]) -> list[int]:
    """The batch row of each image, images in order filling each row's visual tokens (``counts``) in turn."""
    rows: list[int] = []
    b, filled = 0, 0
    for n in units:
        while b < len(counts) and filled == counts[b]:
            b, filled = b + 1, 0
        if b == len(counts) or filled + n > counts[b]:
            break
        rows.append(b)
        filled += n
    if (
        len(rows) != len(units)
        or [sum(n for n, r in zip(units, rows) if r == c) for c in range(len(counts))] != counts
    ):
        raise ValueError(
            f"ttf: {len(units)} images of {units} tokens do not match the rows' visual-token counts {counts}"
        )
    return rows


__all__ = ["TTF", "TTFConfig", "top_k_mask"]
