"""The vision-side hook: methods see (and may replace) the visual features between the vision tower and the
language model, with the call's pixel inputs and any tapped vision-encoder layer inputs at hand.

When: inside the base model's forward (a plain ``model(...)`` call), or — in ``generate()`` — in the encoder pass
that transformers 5 runs *before* the prefill (``get_image_features`` / ``get_video_features``, whose outputs reach
the prefill as ``mm_encoder_outputs`` while the pixel kwargs are dropped). For that pass the hooks open a
:class:`VisionPass` (the same ``generation_state`` / ``stream_state`` / ``pixel_inputs`` / ``vision_taps`` a method
sees in a forward) and attach it to the encoder output; the prefill that receives the output adopts it, so state a
method keeps in ``on_visual_features`` reaches its own generation and no other.

Where: the family's projector module (LLaVA / NeXT / OneVision / InternVL ``multi_modal_projector``, Qwen2-VL /
Qwen2.5-VL ``visual.merger``). ``"pre_projector"`` hooks its input (the tower's selected features — LLaVA-1.5:
``[images, patches, d_vision]``; Qwen2-VL: ``[patches, d_vision]`` flat over images, before the 2×2 merge);
``"post_projector"`` its output (the tokens that replace the placeholders). Both run inside the base model's forward,
so the current :class:`~vlm_accel.runtime.state.ForwardState` is open. ``call_index`` counts projector calls in this
forward (Qwen2-VL runs images, then videos).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from vlm_accel.runtime.engine import Runtime

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


VISION_PASS_ATTRIBUTE = "_vlm_accel_vision_pass"
ENCODER_FUNCTIONS = ("get_image_features", "get_video_features")


@dataclass
class VisionPass:
    """What the vision hooks record when the encoder runs outside a base-model forward (generate's encoder pass).

    Offers the part of :class:`~vlm_accel.runtime.state.ForwardState` a vision-side method uses."""

    pixel_inputs: dict[str, Any]
    stream: Any = None
    vision_taps: dict[int, torch.Tensor] = field(default_factory=dict)
    memo: dict[Any, Any] = field(default_factory=dict)
    generation: dict[Any, dict[str, Any]] = field(default_factory=dict)
    is_prefill: bool = True

    def generation_state(self, method: object) -> dict[str, Any]:
        return self.generation.setdefault(method, {})

    def stream_state(self, method: object) -> dict[str, Any] | None:
        return None if self.stream is None else self.stream.for_method(method)


@dataclass
class VisualFeatures:
    """Visual features at one point of the vision path of one forward."""

    features: torch.Tensor
    where: str  # "pre_projector" | "post_projector"
    call_index: int
    pixel_inputs: dict[str, Any]
    vision_taps: dict[int, torch.Tensor]


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


class VisionHooks:
    """Installs the projector and vision-layer hooks that the runtime's methods ask for."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.wrapped: list[str] = []  # encoder functions wrapped on the base model (instance attributes)
        self.current_pass: VisionPass | None = None
        # generate() runs its encoder pass right before its own prefill; when the encoder output is rebuilt on the
        # way (accelerate's device alignment copies containers), the prefill takes the pass from here instead
        self.last_pass: VisionPass | None = None

    def install(self) -> None:
        methods = self.runtime.methods
        model = self.runtime.model
        wanted = {m.visual_features_at for m in methods} - {None}
        bad = wanted - {"pre_projector", "post_projector"}
        if bad:
            raise ValueError(f"visual_features_at must be 'pre_projector' or 'post_projector', got {sorted(bad)}")
        taps = sorted({i for m in methods for i in m.vision_tap_layers()})
        if not wanted and not taps:
            return
        base = self.runtime.adapter.base_model(model)
        for name in ENCODER_FUNCTIONS:
            if hasattr(base, name) and name not in vars(base):
                setattr(base, name, self._encoder_wrapper(getattr(base, name)))
                self.wrapped.append(name)
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
                    raise ValueError(f"vision layer {index} is out of range for this {len(layers)}-layer tower")
                hook = functools.partial(self._tap, index)
                self.handles.append(layers[index].register_forward_pre_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        base = self.runtime.adapter.base_model(self.runtime.model)
        for name in self.wrapped:
            vars(base).pop(name, None)
        self.wrapped.clear()
        self.current_pass = self.last_pass = None

    def _encoder_wrapper(self, encode):
        @functools.wraps(encode)
        def encode_with_state(*args: Any, **kwargs: Any) -> Any:
            pixel_inputs = {k: v for k, v in kwargs.items() if k in PIXEL_INPUT_NAMES and v is not None}
            if args and "pixel_values" not in pixel_inputs:
                pixel_inputs[("pixel_values_videos" if encode.__name__ == "get_video_features" else "pixel_values")] = (
                    args[0]
                )
            state = self.runtime.state
            if state is not None:  # inside a base-model forward: record into its state
                state.pixel_inputs.update(pixel_inputs)
                return encode(*args, **kwargs)
            self.current_pass = VisionPass(pixel_inputs, stream=self.runtime.stream)
            try:
                output = encode(*args, **kwargs)
            finally:
                vision_pass, self.current_pass = self.current_pass, None
            self.last_pass = vision_pass
            try:
                setattr(output, VISION_PASS_ATTRIBUTE, vision_pass)
            except AttributeError:  # an output type that takes no attributes: the prefill uses last_pass
                pass
            return output

        return encode_with_state

    def take_pass(self, encoder_outputs: Any) -> VisionPass | None:
        """The encoder pass whose outputs a prefill received (``mm_encoder_outputs``), if the hooks recorded one."""
        if not encoder_outputs:
            return None
        found = None
        for output in encoder_outputs.values() if isinstance(encoder_outputs, dict) else ():
            found = getattr(output, VISION_PASS_ATTRIBUTE, None) or found
        found, self.last_pass = found or self.last_pass, None
        return found

    def _target(self) -> Any:
        """Where hooks record: the open forward's state, or generate's encoder pass."""
        return self.runtime.state if self.runtime.state is not None else self.current_pass

    # ------------------------------------------------------------------------------------------------ hooks

    def _tap(self, index: int, layer: nn.Module, args: tuple, kwargs: dict) -> None:
        state = self._target()
        if state is not None:
            state.vision_taps[index] = args[0] if args else kwargs["hidden_states"]

    def _run(self, features: torch.Tensor, where: str) -> torch.Tensor | None:
        state = self._target()
        if state is None:
            return None
        key = ("vision_calls", where)
        call_index = state.memo.get(key, 0)
        state.memo[key] = call_index + 1
        replaced = None
        for method in self.runtime.methods:
            if method.visual_features_at != where:
                continue
            view = VisualFeatures(features, where, call_index, state.pixel_inputs, state.vision_taps)
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
