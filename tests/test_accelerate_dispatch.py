"""Patched models dispatched by accelerate (issue #17, part 1): layers spread over a device map with CPU / disk
offload, accelerate's own hooks in place.

On this CPU-only machine every execution device is ``cpu``; the ``"disk"`` entries are real offload: their weights
sit on the meta device and accelerate's ``AlignDevicesHook`` loads them at each forward. That exercises the hook
path: vlm_accel's forward pre-hooks run before accelerate's (torch pre-hooks run before ``module.forward``, which
accelerate wraps), and nothing may read an offloaded parameter directly (final norm, PAINT's tower access, DyVTE's
router fingerprint, SGL's guide device, the visual-token embeddings). Cross-GPU device moves are covered by
``test_accelerate_multi_gpu.py`` when two GPUs are present.

Check: for every registered method, patched-dispatched output equals patched-undispatched output — logits of a
forward and logits + tokens of ``generate``, batch 1 and a left-padded batch of 3 — and so do the per-layer KV
lengths. Families: LLaVA (CLIP tower + projector; every method applies, PAINT and pool only here) and Qwen2-VL
(M-RoPE, flat patches, ``visual.merger``); LLaVA-NeXT / OneVision / InternVL share LLaVA's module structure for
everything the dispatch touches (decoder layers, final norm, embeddings, projector), so they add run time and no
new path.
"""

from __future__ import annotations

import functools

import pytest
import torch
from accelerate import dispatch_model, infer_auto_device_map

from vlm_accel import MethodNotApplicable, list_methods, patch_model
from vlm_accel.methods.dyvte import DyVTEConfig
from vlm_accel.methods.sgl import SGLConfig
from vlm_accel.patches import adapter_for
from vlm_accel.registry import get_method_class
from vlm_accel.runtime.devices import execution_device, onloaded
from vlm_accel.runtime.vision import projector, vision_encoder_layers

from families import BATCH_ROWS
from inputs import batch_inputs, make_row
from test_matrix import patched_run
from tiny_models import tiny_llava, tiny_llava_sized, tiny_qwen2_vl

BUILD = {"llava": tiny_llava, "qwen2_vl": tiny_qwen2_vl}


def alternating_map(model, first: str = "cpu", second: str = "disk") -> dict[str, str]:
    """Every other decoder layer, the final norm, the input embeddings, the projector and the first vision-encoder
    layer on ``second``; the rest on ``first``. Built from the adapter, so it names the family's real modules."""
    adapter = adapter_for(model)
    names = {id(module): name for name, module in model.named_modules()}
    moved = [layer for i, layer in enumerate(adapter.decoder_layers(model)) if i % 2]
    moved += [adapter.final_norm(model), adapter.language_model(model).get_input_embeddings(), projector(model)]
    moved.append(vision_encoder_layers(model)[0])
    blocks = {names[id(m)]: second for m in moved}
    blocks |= {names[id(m)]: first for i, m in enumerate(adapter.decoder_layers(model)) if not i % 2}
    for name, _ in [*model.named_parameters(), *model.named_buffers()]:
        if not any(name.startswith(block + ".") for block in blocks):
            owner = name.rsplit(".", 1)[0]
            blocks.setdefault(owner, first)
    return blocks


def auto_map(model) -> dict[str, str]:
    """accelerate's own planner (what ``device_map="auto"`` runs) with a CPU budget of about half the model: the
    later blocks go to disk."""
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return infer_auto_device_map(model, max_memory={"cpu": size // 2}, no_split_module_classes=model._no_split_modules)


@functools.cache
def reference(family: str):
    return BUILD[family]("sdpa")


@functools.cache
def dispatched(family: str, plan: str = "alternating"):
    model = BUILD[family]("sdpa")  # same seed: the same weights as reference(family)
    device_map = (alternating_map if plan == "alternating" else auto_map)(model)
    import tempfile

    dispatch_model(model, device_map=device_map, offload_dir=tempfile.mkdtemp(prefix="vlm_accel_offload_"))
    layers = adapter_for(model).decoder_layers(model)
    assert any(p.device.type == "meta" for p in layers[-1].parameters()), "the map must really offload"
    return model


@functools.cache
def inputs_for(family: str, batch: int) -> dict:
    rows = [make_row(reference(family), spec) for spec in BATCH_ROWS[family]]
    return batch_inputs(reference(family), rows if batch == 3 else rows[1:2])


@functools.cache
def sgl_guide(dispatch: bool):
    guide = tiny_llava_sized("sdpa", seed=1, num_layers=2, hidden_size=48)
    if dispatch:
        import tempfile

        guide_map = alternating_map(guide)
        dispatch_model(guide, device_map=guide_map, offload_dir=tempfile.mkdtemp(prefix="vlm_accel_guide_"))
    return guide


def config_for(method: str, family: str, dispatch: bool, tmp_path_factory):
    if method == "sgl":
        if family != "llava":
            pytest.skip("sgl: the tiny guide pair of tests/test_sgl.py is LLaVA")
        return SGLConfig(guide=sgl_guide(dispatch), keep_ratio=0.25, layer_fraction=0.25)
    if method == "dyvte-routers":
        return DyVTEConfig(routers=str(router_file(family, tmp_path_factory)))
    try:
        return get_method_class(method).example_config()
    except MethodNotApplicable as err:
        pytest.skip(f"{method}: {err}")


_ROUTERS: dict[str, object] = {}


def router_file(family: str, tmp_path_factory):
    """Routers designed so the rows of the padded batch exit at different layers (tests/test_dyvte.py)."""
    if family not in _ROUTERS:
        from test_dyvte import designed_routers

        path = tmp_path_factory.mktemp("routers") / f"{family}.safetensors"
        designed_routers(reference(family), inputs_for(family, 3), [1, None, 0], path)
        _ROUTERS[family] = path
    return _ROUTERS[family]


def run(model, config, inputs: dict, mode: str):
    """(logits, generated sequences or None, per-layer KV lengths) of one patched call (the matrix's runner)."""
    logits, _, sequences, stats = patched_run(model, config, inputs, mode)
    return logits, sequences, stats.kv_length_per_layer


@pytest.mark.parametrize("family", list(BUILD))
@pytest.mark.parametrize("method", [*list_methods(), "dyvte-routers"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mode", ["forward", "generate"])
def test_patched_dispatched_equals_patched_undispatched(family, method, batch, mode, tmp_path_factory):
    inputs = inputs_for(family, batch)
    expected = run(reference(family), config_for(method, family, False, tmp_path_factory), inputs, mode)
    got = run(dispatched(family), config_for(method, family, True, tmp_path_factory), inputs, mode)
    valid = inputs["attention_mask"].bool() if mode == "forward" else slice(None)
    torch.testing.assert_close(got[0][valid], expected[0][valid], rtol=0, atol=1e-6)
    if mode == "generate":
        assert torch.equal(got[1], expected[1])
    assert got[2] == expected[2], "per-layer KV lengths differ"


@pytest.mark.parametrize("method", ["fastv", "gift", "pool"])
def test_accelerates_auto_planner(method):
    """The map ``device_map="auto"`` would build (accelerate's ``infer_auto_device_map``), forward and generate."""
    inputs = inputs_for("llava", 3)
    config = get_method_class(method).example_config()
    for mode in ("forward", "generate"):
        expected = run(reference("llava"), config, inputs, mode)
        got = run(dispatched("llava", "auto"), config, inputs, mode)
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-6)


def test_patch_before_dispatch_and_unpatch_after():
    """Hooks compose in either order: patch, then dispatch; removing the patch leaves the dispatched model as it
    was (same logits as the undispatched, unpatched reference)."""
    import tempfile

    model = tiny_llava("sdpa")
    inputs = inputs_for("llava", 3)
    patch = patch_model(model, get_method_class("fastv").example_config())
    dispatch_model(model, device_map=alternating_map(model), offload_dir=tempfile.mkdtemp())
    with torch.no_grad():
        got = model(**inputs).logits
        patch.remove()
        plain = model(**inputs).logits
    expected = run(reference("llava"), get_method_class("fastv").example_config(), inputs, "forward")[0]
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expected[valid], rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(plain, reference("llava")(**inputs).logits, rtol=0, atol=0)


def test_offloaded_weights_are_read_through_accelerate():
    """The helpers the runtime uses instead of touching parameters: an offloaded module's execution device comes
    from its hook, and its weights are materialised only inside ``onloaded``."""
    model = dispatched("llava")
    adapter = adapter_for(model)
    norm = adapter.final_norm(model)
    assert norm.weight.device.type == "meta"
    assert execution_device(norm) == torch.device("cpu")
    with onloaded(norm):
        torch.testing.assert_close(norm.weight, adapter.final_norm(reference("llava")).weight, rtol=0, atol=0)
    assert norm.weight.device.type == "meta"
    ours = adapter.visual_token_embeddings(model)
    theirs = adapter.visual_token_embeddings(reference("llava"))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
