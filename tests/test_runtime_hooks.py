"""The runtime's newer hook points, each driven by a small test method: head-output gates, the vision-side hook and
stream state. No-op exactness on every family × {sdpa, eager} × {batch 1, padded batch} × {forward, generate},
plus an independent reference for each hook that changes numbers:

- per-head gates constant over tokens equal scaling that head's input columns of ``o_proj`` (the gate multiplies
  the head's output before the projection), at prefill and at every decode step, dense and head-sparse decode;
- scaling the post-projector features by ``c`` equals scaling the projector's last linear layer (weight and bias).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from vlm_accel import MethodConfig, patch_model
from vlm_accel.methods.base import KIND_GATES, HeadGates, Method
from vlm_accel.registry import _REGISTRY, register_method
from vlm_accel.runtime.vision import projector

from test_matrix import FAMILIES, GENERATE, inputs_for, model_for, unpatched_run


@dataclass
class GateProbeConfig(MethodConfig):
    """``head_weights``: one weight per query head (None: all 1); ``layers``: which layers (None: all)."""

    method_name: ClassVar[str] = "_gate_probe"
    head_weights: tuple[float, ...] | None = None
    layers: tuple[int, ...] | None = None
    boolean: bool = False
    sparse_decode: bool = False

    def validate(self) -> None:
        pass


class GateProbe(Method):
    config_cls = GateProbeConfig
    kind_rank = KIND_GATES

    def head_gates(self, layer, ctx, state):
        if self.config.layers is not None and layer not in self.config.layers:
            return None
        heads = ctx.query.shape[1]
        values = self.config.head_weights or (1.0,) * heads
        weights = torch.tensor(values, device=ctx.query.device)
        weights = weights.bool() if self.config.boolean else weights.to(ctx.query.dtype)
        shape = (ctx.query.shape[0], ctx.query.shape[2], heads)
        return HeadGates(weights.expand(shape), sparse_decode=self.config.sparse_decode)


@dataclass
class VisionProbeConfig(MethodConfig):
    method_name: ClassVar[str] = "_vision_probe"
    where: str = "post_projector"
    scale: float = 1.0

    def validate(self) -> None:
        pass


class VisionProbe(Method):
    config_cls = VisionProbeConfig

    def bind(self, ctx) -> None:
        super().bind(ctx)
        self.visual_features_at = self.config.where  # an instance attribute: the runtime reads it per method

    def on_visual_features(self, features, state):
        state.generation_state(self)["seen"] = features.features.shape
        return features.features * self.config.scale if self.config.scale != 1.0 else features.features.clone()


@dataclass
class StreamProbeConfig(MethodConfig):
    method_name: ClassVar[str] = "_stream_probe"

    def validate(self) -> None:
        pass


class StreamProbe(Method):
    """Records, per prefill, how many prefills its stream had seen before (None outside a stream)."""

    config_cls = StreamProbeConfig
    seen: ClassVar[list] = []

    def on_forward_start(self, state, inputs):
        if not state.is_prefill:
            return
        memory = state.stream_state(self)
        if memory is None:
            StreamProbe.seen.append(None)
            return
        StreamProbe.seen.append(memory.get("prefills", 0))
        memory["prefills"] = memory.get("prefills", 0) + 1


@pytest.fixture(autouse=True)
def probes():
    for cls in (GateProbe, VisionProbe, StreamProbe):
        register_method(cls.config_cls.method_name, cls)
    yield
    for cls in (GateProbe, VisionProbe, StreamProbe):
        _REGISTRY.pop(cls.config_cls.method_name, None)


def run(model, config, inputs, mode):
    with torch.no_grad(), patch_model(model, config):
        if mode == "forward":
            return model(**inputs).logits, None
        out = model.generate(**inputs, **GENERATE)
        return torch.stack(out.logits, dim=1), out.sequences


NOOPS = {
    "gates all 1": GateProbeConfig(),
    "bool gates all on, head-sparse decode": GateProbeConfig(boolean=True, sparse_decode=True),
    "vision features unchanged (post)": VisionProbeConfig(),
    "vision features unchanged (pre)": VisionProbeConfig(where="pre_projector"),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("noop", list(NOOPS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mode", ["forward", "generate"])
def test_hook_noop_reproduces_unpatched(family, noop, attn, batch, mode):
    model = model_for(family, attn)
    inputs = inputs_for(family, batch)
    expected, expected_seq = unpatched_run(model, inputs, mode)
    got, sequences = run(model, NOOPS[noop], inputs, mode)
    valid = inputs["attention_mask"].bool() if mode == "forward" else slice(None)
    torch.testing.assert_close(got[valid], expected[valid], rtol=0, atol=1e-6)
    if mode == "generate":
        assert torch.equal(sequences, expected_seq)


def o_proj_scaled(model: nn.Module, layers: list[int], weights: list[float]) -> nn.Module:
    """A copy of ``model`` whose ``o_proj`` input columns of head h are multiplied by ``weights[h]``."""
    reference = copy.deepcopy(model)
    decoder = reference.model.language_model.layers
    for index in layers:
        o_proj = decoder[index].self_attn.o_proj
        head_dim = o_proj.in_features // len(weights)
        scale = torch.tensor(weights).repeat_interleave(head_dim)
        with torch.no_grad():
            o_proj.weight.mul_(scale[None, :].to(o_proj.weight.dtype))
    return reference


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["float", "bool dense", "bool head-sparse decode"])
def test_head_gates_equal_scaled_o_proj_reference(family, kind):
    model = model_for(family, "sdpa")
    heads = model.config.get_text_config().num_attention_heads
    if kind == "float":
        weights = [0.25 + 0.5 * h for h in range(heads)]
        config = GateProbeConfig(head_weights=tuple(weights), layers=(1, 2))
    else:
        weights = [float(h % 2 == 0) for h in range(heads)]
        config = GateProbeConfig(head_weights=tuple(weights), layers=(1, 2), boolean=True,
                                 sparse_decode=kind.endswith("decode"))  # fmt: skip
    inputs = inputs_for(family, 3)
    reference = o_proj_scaled(model, [1, 2], weights)
    for mode in ("forward", "generate"):
        expected, expected_seq = unpatched_run(reference, inputs, mode)
        got, sequences = run(model, config, inputs, mode)
        valid = inputs["attention_mask"].bool() if mode == "forward" else slice(None)
        torch.testing.assert_close(got[valid], expected[valid], rtol=0, atol=3e-5)
        if mode == "generate":
            assert torch.equal(sequences, expected_seq)


def last_linear(module: nn.Module) -> nn.Linear:
    return [m for m in module.modules() if isinstance(m, nn.Linear)][-1]


@pytest.mark.parametrize("family", FAMILIES)
def test_replaced_visual_features_equal_a_scaled_projector(family):
    model = model_for(family, "sdpa")
    inputs = inputs_for(family, 3)
    reference = copy.deepcopy(model)
    linear = last_linear(projector(reference))
    with torch.no_grad():
        linear.weight.mul_(0.5)
        if linear.bias is not None:
            linear.bias.mul_(0.5)
    # forward: the tower runs inside the base forward; generate: in transformers' encoder pass before the prefill
    for mode in ("forward", "generate"):
        expected, expected_seq = unpatched_run(reference, inputs, mode)
        got, sequences = run(model, VisionProbeConfig(scale=0.5), inputs, mode)
        valid = inputs["attention_mask"].bool() if mode == "forward" else slice(None)
        torch.testing.assert_close(got[valid], expected[valid], rtol=0, atol=3e-5)
        unchanged, _ = unpatched_run(model, inputs, mode)
        assert (got[valid] - unchanged[valid]).abs().max() > 1e-3  # the replacement really reached the LM
        if mode == "generate":
            assert torch.equal(sequences, expected_seq)


def test_vision_hook_refuses_a_replacement_of_another_shape():
    class Bad(VisionProbe):
        def on_visual_features(self, features, state):
            return features.features[..., :1]

    register_method("_bad_vision", Bad)
    try:
        model = model_for("llava", "sdpa")

        @dataclass
        class BadConfig(VisionProbeConfig):
            method_name: ClassVar[str] = "_bad_vision"

        Bad.config_cls = BadConfig
        with pytest.raises(ValueError, match="on_visual_features returned"), patch_model(model, BadConfig()):
            model(**inputs_for("llava", 1))
    finally:
        _REGISTRY.pop("_bad_vision", None)


def test_stream_state_persists_only_inside_a_stream_and_reset_starts_over():
    model = model_for("llava", "sdpa")
    inputs = inputs_for("llava", 1)
    StreamProbe.seen.clear()
    with torch.no_grad(), patch_model(model, StreamProbeConfig()) as patch:
        model(**inputs)
        model(**inputs)
        with patch.stream():
            model(**inputs)
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
            model(**inputs)
            patch.reset()
            model(**inputs)
        model(**inputs)
        with pytest.raises(RuntimeError, match="no stream is open"):
            patch.reset()
        with patch.stream(), pytest.raises(RuntimeError, match="already open"), patch.stream():
            pass
    # decode steps of the generate() call are not prefills; outside a stream nothing is carried
    assert StreamProbe.seen == [None, None, 0, 1, 2, 0, None]
