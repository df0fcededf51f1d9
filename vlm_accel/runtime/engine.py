"""The runtime engine: installs the hooks and owns per-forward state; the jobs live in their own modules.

Hooks (all removable, no forked modeling code; hf_internals §4.2, §7):

- the top-level model's forward pre-hook records ``logits_to_keep``;
- the base VLM model's forward pre-hook captures the visual-token layout (the text model never sees
  ``input_ids``) and starts a :class:`ForwardState`; its forward hook records stats and ends the state;
- the projector / vision-encoder hooks of :mod:`vlm_accel.runtime.vision` (only when a method asks);
- every decoder layer's forward pre-hook asks methods for keep plans and, once there is one, hands the layer the
  gathered inputs of :mod:`vlm_accel.runtime.sequence` and a mask from :mod:`vlm_accel.runtime.masks`; at decode it
  remaps the mask's key columns to what that layer keeps;
- the language model's forward hook gives plain forwards logits for every input position;
- the attention modules carry the runtime, so the registered attention function runs
  :class:`~vlm_accel.runtime.attend.AttentionDispatch` (score taps, row edits, head gates).

Methods run in a fixed order by kind (``Method.kind_rank``, then name): composition never depends on the order of
the user's list. Invariants: layer 0 is never shortened, so ``generate()``'s own bookkeeping stays correct with no
cache surgery; kept tokens keep their original positions; rows with different kept counts are left-padded.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from vlm_accel.methods.base import Method
from vlm_accel.patches.base import FamilyAdapter
from vlm_accel.runtime.attend import REPLAY_KWARG, AttentionDispatch
from vlm_accel.runtime.attention import RUNTIME_ATTRIBUTE, register_attention_functions
from vlm_accel.runtime.backend import check_backend, route_attention, unroute_attention
from vlm_accel.runtime.beams import follow_beam_reorder
from vlm_accel.runtime.checks import (
    CUSTOM_MASK,
    CUSTOM_MASK_ERROR,
    HAS_VISUAL,
    PACKED,
    RUNTIME_FLAGS,
    check_drop_allowed,
    check_tensor_inputs,
    is_identity,
    is_packed,
)
from vlm_accel.runtime.flash_route import pruned_layer_position_ids
from vlm_accel.runtime.generation import guarded_generate, nest_generate_wrappers
from vlm_accel.runtime.layout import VisualLayout
from vlm_accel.runtime.masks import LayerMasks
from vlm_accel.runtime.sequence import full_length_output, gather_layer_inputs, push_stage
from vlm_accel.runtime.state import CACHE_ATTRIBUTE, ForwardState, PlanRecord, StreamState
from vlm_accel.runtime.stats import PatchStats
from vlm_accel.runtime.vision import PIXEL_INPUT_NAMES, VisionHooks

_VISUAL_INPUTS = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")


@dataclass
class ModelContext:
    """What methods may know about the model they are bound to."""

    model: nn.Module
    adapter: FamilyAdapter
    num_layers: int
    text_config: Any

    @property
    def model_type(self) -> str:
        return self.model.config.model_type


def _has_visual_inputs(kwargs: dict) -> bool:
    """Whether a base-model call carries images or videos (raw pixels or precomputed encoder outputs)."""
    for name in _VISUAL_INPUTS:
        value = kwargs.get(name)
        if value is not None and not (isinstance(value, dict) and not value):
            return True
    return False


def composition_order(methods: list[Method]) -> list[Method]:
    """The order every hook loop runs methods in: by kind, then by name (never the user's list order)."""
    return sorted(methods, key=lambda m: (m.kind_rank, m.name))


class Runtime:
    """One installed patch on one model: hooks, attention routing, state and stats."""

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, methods: list[Method]) -> None:
        self.model = model
        self.adapter = adapter
        self.methods = composition_order(methods)
        self.layers = adapter.decoder_layers(model)
        self.text_config = adapter.text_config(model)
        self.ctx = ModelContext(model, adapter, len(self.layers), self.text_config)
        self.state: ForwardState | None = None
        self.stream: StreamState | None = None
        self.stats = PatchStats()
        self.masks = LayerMasks(self.text_config)
        self.attend = AttentionDispatch(self)
        self.vision = VisionHooks(self)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._attention_modules: list[nn.Module] = []
        self._logits_to_keep: Any = 0
        self._changes_length = any(m.changes_length for m in methods)
        self._visual_ids = adapter.visual_token_ids(model)

    # ------------------------------------------------------------------------------------------------ install

    def install(self) -> None:
        for method in self.methods:
            method.bind(self.ctx)
        check_backend(self.text_config._attn_implementation)
        register_attention_functions()
        for layer in self.layers:
            attention = layer.self_attn
            setattr(attention, RUNTIME_ATTRIBUTE, self)
            self._attention_modules.append(attention)
        route_attention(self._attention_modules)  # the model keeps reporting (and switching) its stock backend
        for attention in self._attention_modules:
            if self.attend.gating:
                self._handles.append(attention.register_forward_pre_hook(self.attend.capture_input, with_kwargs=True))
        base = self.adapter.base_model(self.model)
        language_model = self.adapter.language_model(self.model)
        self._handles += [
            self.model.register_forward_pre_hook(self._on_top_forward, with_kwargs=True),
            base.register_forward_pre_hook(self._on_base_forward, with_kwargs=True),
            base.register_forward_hook(self._on_base_output, with_kwargs=True, always_call=True),
            language_model.register_forward_hook(self._on_language_model_output, with_kwargs=True),
        ]
        for index, layer in enumerate(self.layers):
            hook = functools.partial(self._on_layer, index)
            self._handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        self.vision.install()
        wraps_generate = any(type(m).wrap_generate is not Method.wrap_generate for m in self.methods)
        if (self._changes_length or wraps_generate) and hasattr(self.model, "generate"):
            generate = nest_generate_wrappers(self.model, self.methods)
            self.model.generate = guarded_generate(self.model, generate, self._changes_length)

    def remove(self) -> None:
        for method in self.methods:
            method.unbind()
        self.vision.remove()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        unroute_attention(self._attention_modules)
        for attention in self._attention_modules:
            if getattr(attention, RUNTIME_ATTRIBUTE, None) is self:
                delattr(attention, RUNTIME_ATTRIBUTE)
        self._attention_modules.clear()
        if "generate" in vars(self.model):
            del self.model.generate
        self.state = None
        self.stream = None

    # ------------------------------------------------------------------------------------------------ timing

    @contextmanager
    def timed(self) -> Iterator[None]:
        if torch.compiler.is_compiling():  # a clock read cannot be traced (torch.compile fullgraph=True)
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stats.time_in_patch_s += time.perf_counter() - start

    # ------------------------------------------------------------------------------------------------ hooks

    def _on_top_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._logits_to_keep = kwargs.get("logits_to_keep", 0)

    def _on_base_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        with self.timed():
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            inputs_embeds = kwargs.get("inputs_embeds")
            check_backend(self.text_config._attn_implementation)  # switched after patching: refuse, never ignore
            check_tensor_inputs(kwargs)
            mask_2d = kwargs.get("attention_mask")
            # a custom 4-D mask (or the per-layer-type dict generate() prepares for a static cache) passes through
            # untouched: only a keep plan that actually drops tokens needs a 2-D one (refused then, at the drop)
            custom_mask = mask_2d is not None and not (torch.is_tensor(mask_2d) and mask_2d.dim() == 2)
            if custom_mask:
                mask_2d = None
            cache = kwargs.get("past_key_values")
            record: PlanRecord | None = getattr(cache, CACHE_ATTRIBUTE, None)
            if self._changes_length and cache is not None and not isinstance(cache, DynamicCache):
                raise ValueError(
                    f"{type(cache).__name__} is not supported with token-pruning methods; use a DynamicCache"
                )
            if input_ids is not None:
                # Placeholder ids only mark visual tokens when visual inputs come with them: a decode step may
                # feed back a generated token that happens to equal the placeholder id, which is then plain text.
                visual_ids = self._visual_ids if _has_visual_inputs(kwargs) else ()
                layout = VisualLayout.from_input_ids(input_ids, visual_ids, mask_2d)
                batch, window = input_ids.shape
                new_visual = bool(visual_ids) and layout.any_visual  # no tensor read without visual inputs (compile)
            else:
                embeddings = self.adapter.visual_token_embeddings(self.model)
                layout = VisualLayout.from_embeddings(inputs_embeds, embeddings, mask_2d)
                batch, window = inputs_embeds.shape[:2]
                new_visual = record is not None and layout.any_visual
            if record is not None and new_visual:
                if record.stages:
                    raise ValueError(
                        "new visual tokens cannot be appended to a cache pruned by vlm_accel; start a new cache"
                    )
                record = None  # a new multimodal turn on an unpruned cache: a fresh prefill after a prefix
            prefix_len = cache.get_seq_length() if cache is not None else 0
            self.state = ForwardState(
                layout=layout,
                batch=batch,
                window_len=window,
                prefix_len=prefix_len,
                attention_mask_2d=mask_2d,
                continuing=record,
                pixel_inputs={k: kwargs[k] for k in PIXEL_INPUT_NAMES if kwargs.get(k) is not None},
                stream=self.stream,
            )
            self.state.extras[CUSTOM_MASK] = custom_mask
            flags = self.state.generation_state(RUNTIME_FLAGS)
            if record is None:  # read once per generation, at prefill (decode steps may be compiled)
                flags[HAS_VISUAL] = layout.any_visual
            self.state.extras[PACKED] = is_packed(kwargs, bool(getattr(self.text_config, "use_cache", True)))
            if record is None and self.stream is not None:
                self.stream.calls += 1
            inputs = kwargs if input_ids is None or "input_ids" in kwargs else {**kwargs, "input_ids": input_ids}
            for method in self.methods:
                method.on_forward_start(self.state, inputs)
            self.stats.forward_calls += 1
            if record is None:
                self.stats.prefill_calls += 1
                self.stats.visual_tokens_seen += int(layout.counts.sum())
                self.stats.tokens_per_layer = []
            else:
                self.stats.decode_calls += 1

    def _on_base_output(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        state, self.state = self.state, None
        if state is None:
            return
        with self.timed():
            for method in self.methods:
                method.on_forward_end(state)
            if state.is_prefill:
                present = state.present_mask() & state.layout.visual
                self.stats.visual_tokens_kept += int(present.sum())
            cache = getattr(output, "past_key_values", None)
            if isinstance(cache, DynamicCache):
                self._record_cache_stats(cache)
            for method in self.methods:
                self.stats.methods[method.name] = method.stats()

    def _record_cache_stats(self, cache: DynamicCache) -> None:
        lengths, sizes = [], []
        for layer in cache.layers:
            keys = getattr(layer, "keys", None)
            values = getattr(layer, "values", None)
            if keys is None or not torch.is_tensor(keys) or keys.dim() < 3:
                lengths.append(0)
                sizes.append(0)
                continue
            lengths.append(int(keys.shape[-2]))
            sizes.append(keys.numel() * keys.element_size() + values.numel() * values.element_size())
        self.stats.kv_length_per_layer = lengths
        self.stats.kv_bytes_per_layer = sizes
        self.stats.kv_bytes_unpatched = sizes[0] * len(sizes) if sizes else 0

    def _on_layer(self, index: int, layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = self.state
        if state is None:
            return None
        with self.timed():
            result = self._layer_inputs(index, args, kwargs, state)
            if layer.training and torch.is_grad_enabled() and getattr(layer, "gradient_checkpointing", False):
                # a checkpointed layer recomputes its attention in backward, after this forward's state is gone:
                # hand it the state as of this layer through the layer's kwargs (the checkpoint keeps them)
                args, kwargs = result if result is not None else (args, kwargs)
                kwargs[REPLAY_KWARG] = (state, len(state.stages))
                return args, kwargs
            return result

    def _layer_inputs(self, index: int, args: tuple, kwargs: dict, state: ForwardState) -> tuple[tuple, dict] | None:
        hidden = args[0] if args else kwargs["hidden_states"]
        state.layer_input = hidden
        if state.is_prefill:
            cache = kwargs.get("past_key_values")
            if index == 0 and cache is not None:
                # later calls on this cache (decode steps) learn from it where the prompt's visual tokens
                # were, what each layer kept (the live ``stages`` list) and each method's generation state
                setattr(cache, CACHE_ATTRIBUTE, state.new_record())
            follow_beam_reorder(cache)  # beam search permutes the cache's rows: the record's rows follow
            result = self._prefill_layer_inputs(index, hidden, args, kwargs, state)
            if result is not None:
                new_args, new_kwargs = result
                hidden = new_args[0] if new_args else new_kwargs["hidden_states"]
            self.stats.tokens_per_layer.append(int(hidden.shape[1]))
            return result
        stage = state.continuing.stage_for_layer(index)
        if stage is None:
            return None
        if state.extras.get(CUSTOM_MASK):
            raise ValueError(CUSTOM_MASK_ERROR)
        kwargs["attention_mask"] = self.masks.continuation(index, stage, hidden, kwargs, state)
        return args, kwargs

    def _on_language_model_output(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        state = self.state
        if state is None or not state.is_prefill or not state.stages:
            return None
        with self.timed():
            keep = self._logits_to_keep
            if isinstance(keep, int) and keep > 0 and bool(state.present_mask()[:, -keep:].all()):
                return None  # the positions logits are computed for are all still in the sequence
            norm = self.adapter.final_norm(self.model)
            output.last_hidden_state = full_length_output(state, output.last_hidden_state, norm)
            return output

    # ------------------------------------------------------------------------------------------------ prefill

    def _prefill_layer_inputs(
        self, index: int, hidden: torch.Tensor, args: tuple, kwargs: dict, state: ForwardState
    ) -> tuple[tuple, dict] | None:
        if index > 0:  # layer 0 is never shortened (generate()'s bookkeeping reads it)
            for method in self.methods:
                plan = method.select(index, state)
                if plan is not None and not is_identity(plan, state):
                    check_drop_allowed(state)
                    hidden = push_stage(index, plan, hidden, state)
                    state.layer_input = hidden
        if not state.stages:
            return None
        stage_number = len(state.stages) - 1
        stage = state.stages[-1]
        inputs = state.memo.get(("inputs", stage_number))
        if inputs is None:
            inputs = gather_layer_inputs(stage, kwargs, state)
            state.memo[("inputs", stage_number)] = inputs
        cos_sin, position_ids = inputs
        kwargs["position_embeddings"] = cos_sin
        # flash would read gapped kept positions as packed sequences (runtime/flash_route.py)
        backend = self.text_config._attn_implementation  # the stock name (runtime/backend.py)
        kwargs["position_ids"] = pruned_layer_position_ids(backend, position_ids)
        kwargs["attention_mask"] = self.masks.prefill(index, stage_number, stage, hidden, kwargs, state)
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs
