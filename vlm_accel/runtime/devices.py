"""Devices of a model dispatched by accelerate (``device_map="auto"``, an explicit map, CPU / disk offload).

accelerate moves a module's inputs to its execution device inside ``module.forward`` (``AlignDevicesHook``), and
an offloaded module's parameters live on the meta device outside its forward. vlm_accel's forward pre-hooks run
*before* that alignment, so the runtime follows one rule:

- per-call state (the visual layout, score taps, keep plans, the 2-D mask) lives on the **home device**, the device
  of the ``input_ids`` the base model receives (accelerate's main device);
- a tensor crosses to a layer's device only where it meets that layer's tensors (gathers, masks, row edits), with
  ``.to(device)``, which is free when the devices already agree (one device: no copy at all);
- nothing reads an offloaded module's parameters directly: weights are read inside :func:`onloaded`, and a module's
  device is asked of its hook first (:func:`execution_device`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate.utils import align_module_device
from torch import nn


def _hooks(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", [hook]))  # a SequentialHook holds several


def execution_device(module: nn.Module) -> torch.device | None:
    """Where ``module`` runs: its accelerate hook's execution device, else the device of its first parameter or
    buffer that is not on the meta device; None when it has neither."""
    for hook in _hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device)
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return None


@contextmanager
def onloaded(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with its own (non-recursive) parameters materialised, offloaded or not (accelerate's
    ``align_module_device``: a no-op for a module that is not offloaded)."""
    with align_module_device(module):
        yield module
