"""The runtime engine: installs the hooks, owns per-call state, and shortens the sequence after a keep plan.

Hooks (all removable, no forked modeling code; hf_internals §4.2, §7):

- the top-level model's forward pre-hook records ``logits_to_keep``;
- the base VLM model's forward pre-hook captures the visual-token layout (the text model never sees
  ``input_ids``) and starts a :class:`ForwardState`; its forward hook records stats and ends the state;
- every decoder layer's forward pre-hook asks methods for a keep plan and, once there is one, hands the layer the
  gathered hidden states, cos/sin, position ids and a mask rebuilt for its own cache length; at decode it remaps
  the mask's key columns to what that layer keeps;
- the language model's forward hook gives plain forwards logits for every input position (a dropped token keeps
  the hidden state it had when it was dropped);
- the attention modules carry the runtime, so the registered attention function can tap score rows.

Invariants: layer 0 is never shortened, so ``generate()``'s own bookkeeping (``get_seq_length()``, positions,
2-D mask growth) stays correct with no cache surgery; kept tokens keep their original positions (cos/sin are
gathered, never recomputed); rows with different kept counts are left-padded with masked slots.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from vlm_accel.methods.base import Method, ScoreRequest
from vlm_accel.patches.base import FamilyAdapter
from vlm_accel.runtime.attention import (
    RUNTIME_ATTRIBUTE,
    SUPPORTED_BACKENDS,
    base_backend,
    register_attention_functions,
    wrapped_name,
)
from vlm_accel.runtime.flash_route import pruned_layer_position_ids
from vlm_accel.runtime.layout import VisualLayout
from vlm_accel.runtime.plan import KeepPlan
from vlm_accel.runtime.scores import edited_rows_attention, row_attention_probs
from vlm_accel.runtime.state import CACHE_ATTRIBUTE, ForwardState, PlanRecord, ScoreTap, Stage
from vlm_accel.runtime.stats import PatchStats

_VISUAL_INPUTS = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")
_UNSUPPORTED_CACHE_MODES = ("static", "offloaded_static", "sliding_window", "hybrid", "mamba", "quantized")


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


def _relative_positions(positions: torch.Tensor, current: torch.Tensor | None, window_len: int) -> torch.Tensor:
    """Where window ``positions`` ``[B, K]`` sit in the current sequence, whose slots hold window positions
    ``current`` ``[B, W']`` (-1 = padded slot; None = the whole window, in order)."""
    if current is None:
        return positions
    inverse = torch.zeros(current.shape[0], window_len + 1, dtype=torch.long, device=current.device)
    target = torch.where(current >= 0, current, window_len)
    inverse.scatter_(1, target, torch.arange(current.shape[1], device=current.device).expand_as(current))
    return inverse.gather(1, positions)


class Runtime:
    """One installed patch on one model: hooks, attention routing, state and stats."""

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, methods: list[Method]) -> None:
        self.model = model
        self.adapter = adapter
        self.methods = methods
        self.layers = adapter.decoder_layers(model)
        self.text_config = adapter.text_config(model)
        self.ctx = ModelContext(model, adapter, len(self.layers), self.text_config)
        self.state: ForwardState | None = None
        self.stats = PatchStats()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._attention_modules: list[nn.Module] = []
        self._original_attn: str | None = None
        self._logits_to_keep: Any = 0
        self._changes_length = any(m.changes_length for m in methods)
        self._visual_ids = adapter.visual_token_ids(model)

    # ------------------------------------------------------------------------------------------------ install

    def install(self) -> None:
        for method in self.methods:
            method.bind(self.ctx)
        current = self.text_config._attn_implementation
        backend = base_backend(current)
        if backend not in SUPPORTED_BACKENDS:
            raise ValueError(
                f"attention implementation {current!r} is not supported by vlm_accel; "
                f"use one of {', '.join(SUPPORTED_BACKENDS)}"
            )
        register_attention_functions()
        self._original_attn = current
        self.model.set_attn_implementation({"text_config": wrapped_name(backend)})
        for layer in self.layers:
            attention = layer.self_attn
            setattr(attention, RUNTIME_ATTRIBUTE, self)
            self._attention_modules.append(attention)
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
        wraps_generate = any(type(m).wrap_generate is not Method.wrap_generate for m in self.methods)
        if (self._changes_length or wraps_generate) and hasattr(self.model, "generate"):
            generate = type(self.model).generate.__get__(self.model)
            for method in self.methods:
                generate = method.wrap_generate(generate)
            self.model.generate = self._guarded_generate(generate)

    def remove(self) -> None:
        for method in self.methods:
            method.unbind()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for attention in self._attention_modules:
            if getattr(attention, RUNTIME_ATTRIBUTE, None) is self:
                delattr(attention, RUNTIME_ATTRIBUTE)
        self._attention_modules.clear()
        if "generate" in vars(self.model):
            del self.model.generate
        if self._original_attn is not None:
            self.model.set_attn_implementation({"text_config": self._original_attn})
            self._original_attn = None
        self.state = None

    # ------------------------------------------------------------------------------------------------ timing

    @contextmanager
    def _timed(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stats.time_in_patch_s += time.perf_counter() - start

    # ------------------------------------------------------------------------------------------------ generate

    def _guarded_generate(self, generate: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(generate)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            config = kwargs.get("generation_config") or self.model.generation_config
            num_beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
            if num_beams > 1 and self._changes_length:
                raise ValueError(
                    "beam search (num_beams > 1) is not supported with token-pruning methods: beam reordering "
                    "does not follow per-layer kept tokens; use greedy or sampling"
                )
            cache_mode = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
            if cache_mode in _UNSUPPORTED_CACHE_MODES and self._changes_length:
                raise ValueError(
                    f"cache_implementation={cache_mode!r} is not supported with token-pruning methods "
                    "(layers hold different numbers of tokens); use the default dynamic cache"
                )
            if self._changes_length and (kwargs.get("assistant_model") or kwargs.get("prompt_lookup_num_tokens")):
                raise ValueError("assisted / speculative decoding is not supported with token-pruning methods")
            cache = kwargs.get("past_key_values")
            if self._changes_length and cache is not None and not isinstance(cache, DynamicCache):
                raise ValueError(
                    f"{type(cache).__name__} is not supported with token-pruning methods; pass a DynamicCache"
                )
            return generate(*args, **kwargs)

        return guarded

    # ------------------------------------------------------------------------------------------------ hooks

    def _on_top_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._logits_to_keep = kwargs.get("logits_to_keep", 0)

    def _on_base_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        with self._timed():
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            inputs_embeds = kwargs.get("inputs_embeds")
            mask_2d = kwargs.get("attention_mask")
            if mask_2d is not None and mask_2d.dim() != 2:
                raise ValueError("vlm_accel needs a 2-D attention_mask (or None); got a prepared 4-D mask")
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
            else:
                embeddings = self.adapter.visual_token_embeddings(self.model)
                layout = VisualLayout.from_embeddings(inputs_embeds, embeddings, mask_2d)
                batch, window = inputs_embeds.shape[:2]
            if record is not None and layout.any_visual:
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
            )
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
        with self._timed():
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
        with self._timed():
            hidden = args[0] if args else kwargs["hidden_states"]
            state.layer_input = hidden
            if state.is_prefill:
                cache = kwargs.get("past_key_values")
                if index == 0 and cache is not None:
                    # later calls on this cache (decode steps) learn from it where the prompt's visual tokens
                    # were and what each layer kept; ``stages`` is the live list, so later drops appear in it
                    record = PlanRecord(state.stages, state.prefix_len, state.window_len, state.layout.visual)
                    setattr(cache, CACHE_ATTRIBUTE, record)
                result = self._prefill_layer_inputs(index, hidden, args, kwargs, state)
                if result is not None:
                    new_args, new_kwargs = result
                    hidden = new_args[0] if new_args else new_kwargs["hidden_states"]
                self.stats.tokens_per_layer.append(int(hidden.shape[1]))
                return result
            stage = state.continuing.stage_for_layer(index)
            if stage is None:
                return None
            kwargs["attention_mask"] = self._continuation_mask(index, stage, hidden, kwargs, state)
            return args, kwargs

    def _on_language_model_output(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        state = self.state
        if state is None or not state.is_prefill or not state.stages:
            return None
        with self._timed():
            index = state.current_index
            hidden = output.last_hidden_state
            keep = self._logits_to_keep
            if isinstance(keep, int) and keep > 0 and bool(state.present_mask()[:, -keep:].all()):
                return None  # the positions logits are computed for are all still in the sequence
            norm = self.adapter.final_norm(self.model)
            full = torch.cat([norm(state.full_hidden), hidden.new_zeros(hidden.shape[0], 1, hidden.shape[2])], 1)
            target = torch.where(index >= 0, index, state.window_len)
            full.scatter_(1, target[..., None].expand(-1, -1, hidden.shape[-1]), hidden)
            output.last_hidden_state = full[:, : state.window_len]
            return output

    # ------------------------------------------------------------------------------------------------ attention

    def attend(self, stock: Callable, module: nn.Module, query, key, value, attention_mask, **kwargs):
        """Called by the registered attention function for every LM attention layer.

        Taps the score rows methods asked for, runs the stock attention, and recomputes the rows whose logits a
        method edits (reweighting) from post-RoPE q and the full K/V — the rest of the layer stays on SDPA/flash.
        """
        state = self.state
        if state is None:
            return stock(module, query, key, value, attention_mask, **kwargs)
        layer = module.layer_idx
        with self._timed():
            for method in self.methods:
                request = method.score_request(layer, state)
                if request is not None:
                    self._tap_scores(method, request, module, query, key, attention_mask, kwargs, state)
            edits = [e for e in (m.row_edit(layer, state) for m in self.methods) if e is not None]
        if not edits:
            return stock(module, query, key, value, attention_mask, **kwargs)
        batch, heads, q_len, _ = query.shape
        rows = self._resolve_rows(edits[0].rows, batch, q_len, query.device)
        if any(not (isinstance(e.rows, str) and e.rows == edits[0].rows) for e in edits[1:]):
            raise ValueError("composed row edits must act on the same query rows")
        every_row = rows.shape[1] == q_len
        output, weights = (None, None) if every_row else stock(module, query, key, value, attention_mask, **kwargs)
        with self._timed():
            scaling = kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)
            visual = state.visual_key_mask(layer, key.shape[2])
            edited = edited_rows_attention(
                query, key, value, attention_mask, rows, scaling, visual, [e.edit for e in edits], layer, state
            )
            if every_row:
                order = rows[0].argsort()
                return edited[:, order].contiguous(), None
            output = output.scatter(1, rows[:, :, None, None].expand(-1, -1, heads, output.shape[-1]), edited)
        return output, weights

    @staticmethod
    def _resolve_rows(rows: str | torch.Tensor, batch: int, q_len: int, device: torch.device) -> torch.Tensor:
        if isinstance(rows, torch.Tensor):
            return rows.to(device)
        if rows == "last":
            return torch.full((batch, 1), q_len - 1, device=device)
        if rows == "all":
            return torch.arange(q_len, device=device).expand(batch, q_len)
        raise ValueError(f"unknown rows {rows!r}; use 'last', 'all' or a [B, M] tensor")

    def _tap_scores(
        self,
        method: Method,
        request: ScoreRequest,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        kwargs: dict,
        state: ForwardState,
    ) -> None:
        rows = self._resolve_rows(request.rows, query.shape[0], query.shape[2], query.device)
        scaling = kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)
        probs = row_attention_probs(query, key, attention_mask, rows, scaling, request.reduce)
        tap = ScoreTap(probs, rows, state.current_index)
        state.taps[(id(method), module.layer_idx)] = tap
        method.on_scores(module.layer_idx, tap, state)

    # ------------------------------------------------------------------------------------------------ prefill

    def _prefill_layer_inputs(
        self, index: int, hidden: torch.Tensor, args: tuple, kwargs: dict, state: ForwardState
    ) -> tuple[tuple, dict] | None:
        if index > 0:  # layer 0 is never shortened (generate()'s bookkeeping reads it)
            for method in self.methods:
                plan = method.select(index, state)
                if plan is not None:
                    hidden = self._push_stage(index, plan, hidden, kwargs, state)
        if not state.stages:
            return None
        stage_number = len(state.stages) - 1
        stage = state.stages[-1]
        inputs = state.memo.get(("inputs", stage_number))
        if inputs is None:
            inputs = self._gather_layer_inputs(stage, kwargs, state)
            state.memo[("inputs", stage_number)] = inputs
        cos_sin, position_ids = inputs
        kwargs["position_embeddings"] = cos_sin
        # flash would read gapped kept positions as packed sequences (runtime/flash_route.py)
        backend = base_backend(self.text_config._attn_implementation)
        kwargs["position_ids"] = pruned_layer_position_ids(backend, position_ids)
        kwargs["attention_mask"] = self._stage_mask(index, stage_number, stage, hidden, kwargs, state)
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _push_stage(
        self, index: int, plan: KeepPlan, hidden: torch.Tensor, kwargs: dict, state: ForwardState
    ) -> torch.Tensor:
        """Start a new stage at layer ``index``: remember the states being dropped and gather the kept ones."""
        if plan.index.shape[0] != state.batch:
            raise RuntimeError(f"keep plan has {plan.index.shape[0]} rows for a batch of {state.batch}")
        current = state.current_index
        dim = hidden.shape[-1]
        if current is None:
            state.full_hidden = hidden.clone()
        else:
            target = torch.where(current >= 0, current, state.window_len)
            buffer = torch.cat([state.full_hidden, hidden.new_zeros(state.batch, 1, dim)], dim=1)
            buffer.scatter_(1, target[..., None].expand(-1, -1, dim), hidden)
            state.full_hidden = buffer[:, : state.window_len]
        state.stages.append(Stage(index, plan))
        if plan.groups is None:
            relative = _relative_positions(plan.safe_index, current, state.window_len)
            return hidden.gather(1, relative[..., None].expand(-1, -1, dim))
        # token merging: each kept slot becomes the mean hidden state of its group of window positions
        batch, width, size = plan.groups.shape
        relative = _relative_positions(plan.groups.clamp(min=0).view(batch, -1), current, state.window_len)
        members = hidden.gather(1, relative[..., None].expand(-1, -1, dim)).view(batch, width, size, dim)
        weights = (plan.groups >= 0).to(hidden.dtype)[..., None]
        return (members * weights).sum(2) / weights.sum(2).clamp(min=1)

    def _gather_layer_inputs(self, stage: Stage, kwargs: dict, state: ForwardState) -> tuple[tuple, torch.Tensor]:
        """cos/sin and position ids of the kept tokens: original positions, gathered (never recomputed)."""
        index = stage.plan.safe_index
        cos, sin = kwargs["position_embeddings"]

        def gather_rows(t: torch.Tensor) -> torch.Tensor:
            t = t.expand(state.batch, *t.shape[1:])
            return t.gather(1, index.view(*index.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))

        position_ids = kwargs.get("position_ids")
        if position_ids is not None:
            position_ids = gather_rows(position_ids)
        return (gather_rows(cos), gather_rows(sin)), position_ids

    def _stage_mask(
        self, index: int, stage_number: int, stage: Stage, hidden: torch.Tensor, kwargs: dict, state: ForwardState
    ) -> Any:
        layer_type = self._layer_type(index)
        key = ("mask", stage_number, layer_type)
        if key not in state.memo:
            mask_2d = state.attention_mask_2d
            if mask_2d is None:
                mask_2d = torch.ones(state.batch, state.prefix_len + state.window_len, device=hidden.device)
            window = mask_2d[:, state.prefix_len :].gather(1, stage.plan.safe_index).bool() & stage.plan.valid
            stage_2d = torch.cat([mask_2d[:, : state.prefix_len].bool(), window], dim=1)
            state.memo[key] = self._build_mask(layer_type, hidden, stage_2d, kwargs, index)
        return state.memo[key]

    # ------------------------------------------------------------------------------------------------ decode

    def _continuation_mask(
        self, index: int, stage: Stage, hidden: torch.Tensor, kwargs: dict, state: ForwardState
    ) -> Any:
        """Mask for a layer that kept fewer prompt tokens: the 2-D mask's columns remapped to what it holds."""
        record = state.continuing
        layer_type = self._layer_type(index)
        key = ("continue", id(stage), layer_type)
        if key not in state.memo:
            total = state.prefix_len + state.window_len
            mask_2d = state.attention_mask_2d
            if mask_2d is None:
                mask_2d = torch.ones(state.batch, total, dtype=torch.bool, device=hidden.device)
            start, end = record.prefix_len, record.prefix_len + record.window_len
            window = mask_2d[:, start:end].gather(1, stage.plan.safe_index).bool() & stage.plan.valid
            stage_2d = torch.cat([mask_2d[:, :start].bool(), window, mask_2d[:, end:].bool()], dim=1)
            state.memo[key] = self._build_mask(layer_type, hidden, stage_2d, kwargs, index)
        return state.memo[key]

    # ------------------------------------------------------------------------------------------------ masks

    def _layer_type(self, index: int) -> str:
        layer_types = getattr(self.text_config, "layer_types", None)
        return layer_types[index] if layer_types else "full_attention"

    def _build_mask(self, layer_type: str, hidden: torch.Tensor, mask_2d: torch.Tensor, kwargs: dict, index: int):
        """Rebuild the layer's mask with transformers' own mask factory, sized by that layer's cache length."""
        build = create_sliding_window_causal_mask if layer_type == "sliding_attention" else create_causal_mask
        return build(
            config=self.text_config,
            inputs_embeds=hidden,
            attention_mask=mask_2d,
            past_key_values=kwargs.get("past_key_values"),
            position_ids=None,  # gapped original positions must not be read as packed sequences
            layer_idx=index,
        )
