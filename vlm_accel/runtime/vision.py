"""The vision-side hook: methods see (and may replace) the visual features between the vision tower and the
language model, with the call's pixel inputs and any tapped vision-encoder layer inputs at hand.

Where: the family's projector module (LLaVA / NeXT / OneVision / InternVL ``multi_modal_projector``, Qwen2-VL /
Qwen2.5-VL ``visual.merger``). ``"pre_projector"`` hooks its input (the tower's selected features — LLaVA-1.5:
``[images, patches, d_vision]``; Qwen2-VL: ``[patches, d_vision]`` flat over images, before the 2×2 merge);
``"post_projector"`` its output (the tokens that replace the placeholders). Both run inside the base model's forward,
so the current :class:`~vlm_accel.runtime.state.ForwardState` is open. ``call_index`` counts projector calls in this
forward (Qwen2-VL runs images, then videos).

Skipping the tower (opt-in, :meth:`Method.reuse_images`): forward hooks cannot skip a forward, so when a method
overrides ``reuse_images`` the runtime shadows the base model's ``get_image_features`` with an instance attribute
(deleted again on removal, so the class method is back untouched). Per call, the method names for each image either
"encode it", "reuse image ``j``'s features of this call" or "use these post-projector features"; the tower and the
projector then run only on the images to encode (``pixel_values[encode]``), and the hooks above see only those
(``VisualFeatures.images``). Supported where the images are independent rows of ``pixel_values`` with no
``image_sizes`` (LLaVA-1.5) and for flattened patches with ``image_grid_thw`` (Qwen2-VL / Qwen2.5-VL, each image's
rows); elsewhere every image is encoded.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

if TYPE_CHECKING:
    from vlm_accel.runtime.engine import Runtime

_PRE_ENCODE = "_prepare_multimodal_encoder_kwargs_for_generation"

PIXEL_INPUT_NAMES = (
    "pixel_values",
    "pixel_values_videos",
    "image_grid_thw",
    "video_grid_thw",
    "image_sizes",
    "image_sizes_videos",
    "vision_feature_layer",
    "vision_feature_select_strategy",
)


@dataclass
class VisualFeatures:
    """Visual features at one point of the vision path of one forward."""

    features: torch.Tensor
    where: str  # "pre_projector" | "post_projector"
    call_index: int
    pixel_inputs: dict[str, Any]
    vision_taps: dict[int, torch.Tensor]
    images: torch.Tensor | None = None  # indices of the call's images these features belong to (None: all)


@dataclass
class ImageReuse:
    """Per image of a call (in ``pixel_values`` order): ``None`` = encode it; an int ``j < i`` = reuse image ``j``'s
    post-projector features of this call; a tensor ``[tokens, d_text]`` = use it as image ``i``'s post-projector
    features. Images that are not encoded never reach the vision tower or the projector."""

    sources: list[int | torch.Tensor | None]

    @property
    def encoded(self) -> list[int]:
        return [i for i, source in enumerate(self.sources) if source is None]


def _wants(method: object, where: str) -> bool:
    at = getattr(method, "visual_features_at", None)
    return at == where or (isinstance(at, tuple) and where in at)


def projector(model: nn.Module) -> nn.Module | None:
    base = model.model
    if hasattr(base, "multi_modal_projector"):
        return base.multi_modal_projector
    visual = getattr(base, "visual", None)
    return getattr(visual, "merger", None)


def vision_encoder_layers(model: nn.Module) -> nn.ModuleList | None:
    base = model.model
    visual = getattr(base, "visual", None)
    if visual is not None and hasattr(visual, "blocks"):
        return visual.blocks
    tower = getattr(base, "vision_tower", None)
    tower = getattr(tower, "vision_model", tower)
    encoder = getattr(tower, "encoder", None)
    return getattr(encoder, "layers", None) or getattr(encoder, "layer", None)


def _image_subset(pixel_values: Any, args: tuple, kwargs: dict) -> tuple[int, Any] | None:
    """``(images in the call, take)`` where ``take(indices)`` gives ``get_image_features``' arguments for those
    images alone, or None when the images cannot be encoded apart.

    LLaVA-1.5: one row of ``pixel_values [images, 3, H, W]`` per image (no ``image_sizes``). Qwen2-VL / Qwen2.5-VL:
    flattened patches ``[Σ t·h·w, d]`` with ``image_grid_thw`` (the second argument), each image's ``t·h·w`` rows in
    order; the tower attends within an image (and within windows of it), so a subset encodes each image as the full
    call does.
    """
    if not torch.is_tensor(pixel_values) or kwargs.get("image_sizes") is not None:
        return None
    if pixel_values.dim() == 4:
        return pixel_values.shape[0], lambda indices: (pixel_values[indices], args, kwargs)
    grid = args[0] if args else kwargs.get("image_grid_thw")
    if (
        pixel_values.dim() != 2
        or not torch.is_tensor(grid)
        or int(grid.prod(-1).sum()) != pixel_values.shape[0]
    ):
        return None
    starts = torch.cumsum(grid.prod(-1), 0) - grid.prod(-1)

    def take(indices: list[int]) -> tuple[torch.Tensor, tuple, dict]:
        rows = torch.cat([torch.arange(int(starts[i]), int(starts[i] + grid[i].prod())) for i in indices])
        sub_grid = grid[indices]
        if args:
            return pixel_values[rows.to(pixel_values.device)], (sub_grid, *args[1:]), kwargs
        return pixel_values[rows.to(pixel_values.device)], args, {**kwargs, "image_grid_thw": sub_grid}

    return grid.shape[0], take


class VisionHooks:
    """Installs the projector and vision-layer hooks that the runtime's methods ask for."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def install(self) -> None:
        methods = self.runtime.methods
        model = self.runtime.model
        wanted = set()
        for method in methods:
            at = method.visual_features_at
            wanted |= set(at) if isinstance(at, tuple) else {at}
        wanted -= {None}
        bad = wanted - {"pre_projector", "post_projector"}
        if bad:
            raise ValueError(
                f"visual_features_at must be 'pre_projector' or 'post_projector', got {sorted(bad)}"
            )
        taps = sorted({i for m in methods for i in m.vision_tap_layers()})
        reusing = self._install_image_reuse()
        if wanted or taps or reusing:
            self._encode_inside_forward()
        if not wanted and not taps:
            return
        module = projector(model)
        if wanted and module is None:
            raise ValueError(f"{model.config.model_type}: no projector module found for the vision-side hook")
        if "pre_projector" in wanted:
            self.handles.append(module.register_forward_pre_hook(self._pre_projector, with_kwargs=True))
        if "post_projector" in wanted:
            self.handles.append(module.register_forward_hook(self._post_projector))
        if taps:
            layers = vision_encoder_layers(model)
            if layers is None:
                raise ValueError(f"{model.config.model_type}: no vision-encoder layers found to tap")
            for index in taps:
                if not -len(layers) <= index < len(layers):
                    raise ValueError(
                        f"vision layer {index} is out of range for this {len(layers)}-layer tower"
                    )
                hook = functools.partial(self._tap, index)
                self.handles.append(layers[index].register_forward_pre_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        base = getattr(self.runtime.model, "model", None)
        if getattr(
            vars(base).get("get_image_features") if base is not None else None, "_vlm_accel_reuse", False
        ):
            del base.get_image_features  # the class method is visible again
        model = self.runtime.model
        if getattr(model.__dict__.get(_PRE_ENCODE), "_vlm_accel_defer", False):
            delattr(model, _PRE_ENCODE)

    def _encode_inside_forward(self) -> None:
        """Make ``generate()`` encode images inside the prefill forward, where the runtime's state is open.

        transformers 5 ``generate()`` runs ``get_image_features`` *before* the prefill
        (``_prepare_multimodal_encoder_kwargs_for_generation``) and hands the forward ``mm_encoder_outputs``; the
        vision-side hooks would then fire with no forward state and no layout. Shadowing that step with a no-op
        (an instance attribute, deleted on removal) leaves ``pixel_values`` in the prefill's kwargs, which the base
        model then encodes itself — the same features, computed one call later.
        """
        model = self.runtime.model
        if not hasattr(model, _PRE_ENCODE) or _PRE_ENCODE in model.__dict__:
            return

        def keep_pixels(model_kwargs: dict[str, Any]) -> dict[str, Any]:
            return model_kwargs

        keep_pixels._vlm_accel_defer = True
        setattr(model, _PRE_ENCODE, keep_pixels)

    # ------------------------------------------------------------------------------------------------ reuse

    def _install_image_reuse(self) -> bool:
        from vlm_accel.methods.base import Method

        reusing = [m for m in self.runtime.methods if type(m).reuse_images is not Method.reuse_images]
        if not reusing:
            return False
        base = self.runtime.model.model
        if len(reusing) > 1:
            raise ValueError(f"only one method may skip vision-tower images, got {[m.name for m in reusing]}")
        if not hasattr(base, "get_image_features"):
            raise ValueError(
                f"{self.runtime.model.config.model_type}: no get_image_features to skip images in"
            )
        original = base.get_image_features  # bound class method
        method = reusing[0]

        @functools.wraps(original)
        def get_image_features(pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            state = self.runtime.state
            reuse = method.reuse_images(state) if state is not None else None
            subset = _image_subset(pixel_values, args, kwargs)
            if reuse is None or subset is None or len(reuse.encoded) == len(reuse.sources):
                return original(pixel_values, *args, **kwargs)
            count, take = subset
            if len(reuse.sources) != count:
                raise ValueError(f"{method.name}: reuse_images named {len(reuse.sources)} images for {count}")
            encoded = reuse.encoded
            state.memo["vision_images"] = torch.tensor(encoded, dtype=torch.long)
            if encoded:
                sub_pixels, sub_args, sub_kwargs = take(encoded)
                output = original(sub_pixels, *sub_args, **sub_kwargs)
                fresh = list(output.pooler_output)
            else:
                output, fresh = BaseModelOutputWithPooling(), []
            features: list[torch.Tensor] = []
            for i, source in enumerate(reuse.sources):
                if source is None:
                    features.append(fresh.pop(0))
                elif isinstance(source, int):
                    if not 0 <= source < i:
                        raise ValueError(
                            f"{method.name}: image {i} may reuse only an earlier image, got {source}"
                        )
                    features.append(features[source])
                else:
                    features.append(source.to(device=pixel_values.device))
            output.pooler_output = features
            return output

        get_image_features._vlm_accel_reuse = True
        base.get_image_features = get_image_features
        return True

    # ------------------------------------------------------------------------------------------------ hooks

    def _tap(self, index: int, layer: nn.Module, args: tuple, kwargs: dict) -> None:
        state = self.runtime.state
        if state is not None:
            state.vision_taps[index] = args[0] if args else kwargs["hidden_states"]

    def _run(self, features: torch.Tensor, where: str) -> torch.Tensor | None:
        state = self.runtime.state
        if state is None:
            return None
        key = ("vision_calls", where)
        call_index = state.memo.get(key, 0)
        state.memo[key] = call_index + 1
        replaced = None
        images = state.memo.get("vision_images")
        for method in self.runtime.methods:
            if not _wants(method, where):
                continue
            view = VisualFeatures(features, where, call_index, state.pixel_inputs, state.vision_taps, images)
            new = method.on_visual_features(view, state)
            if new is not None:
                if new.shape != features.shape:
                    raise ValueError(
                        f"{method.name}: on_visual_features returned {tuple(new.shape)} for features of shape "
                        f"{tuple(features.shape)}"
                    )
                features = replaced = new
        return replaced

    def _pre_projector(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        with self.runtime.timed():
            features = args[0] if args else next(iter(kwargs.values()))
            new = self._run(features, "pre_projector")
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            name = next(iter(kwargs))
            return args, {**kwargs, name: new}

    def _post_projector(self, module: nn.Module, args: tuple, output: Any) -> Any:
        with self.runtime.timed():
            if not torch.is_tensor(output):  # e.g. a ModelOutput; methods see its first tensor
                return None
            return self._run(output, "post_projector")
