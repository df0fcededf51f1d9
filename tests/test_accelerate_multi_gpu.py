"""Patched models split over two GPUs (plus one CPU-offloaded layer) by accelerate — the GPU suite's two-device
section (issue #17). Skipped unless two CUDA devices are present; run with ``pytest -m gpu tests/``.

The CPU suite (``test_accelerate_dispatch.py``) covers accelerate's hook path and offload; only here do tensors
really cross devices: score taps and keep plans made on one GPU meet hidden states, cos/sin and masks on the other
(runtime/devices.py). Check: patched two-device output equals the patched one-device model, forward and generate,
batch 1 and a left-padded batch of 3, for every method.
"""

from __future__ import annotations

import functools

import pytest
import torch
from accelerate import dispatch_model
from test_accelerate_dispatch import BUILD, config_for, inputs_for, run
from test_accelerate_dispatch import alternating_map as split_map

from vlm_accel import list_methods
from vlm_accel.patches import adapter_for

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]
ATOL = 1e-5  # the same kernels on two devices of one kind; fp32


@functools.cache
def one_device(family: str):
    return BUILD[family]("sdpa").to("cuda:0")


@functools.cache
def two_devices(family: str):
    model = BUILD[family]("sdpa")
    device_map = split_map(model, "cuda:0", "cuda:1")
    layers = adapter_for(model).decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    device_map[names[id(layers[2])]] = "cpu"  # offloaded to CPU, run on the main device (cuda:0)
    dispatch_model(model, device_map=device_map)
    return model


def on(device: str, inputs: dict) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}


@pytest.mark.parametrize("family", list(BUILD))
@pytest.mark.parametrize("method", [*list_methods(), "dyvte-routers"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mode", ["forward", "generate"])
def test_two_devices_equal_one(family, method, batch, mode, tmp_path_factory):
    inputs = on("cuda:0", inputs_for(family, batch))
    expected = run(one_device(family), config_for(method, family, False, tmp_path_factory), inputs, mode)
    got = run(two_devices(family), config_for(method, family, True, tmp_path_factory), inputs, mode)
    valid = inputs["attention_mask"].bool() if mode == "forward" else slice(None)
    torch.testing.assert_close(got[0][valid].to("cuda:0"), expected[0][valid], rtol=0, atol=ATOL)
    if mode == "generate":
        assert torch.equal(got[1].to("cuda:0"), expected[1])
    assert got[2] == expected[2], "per-layer KV lengths differ"
