"""Training with a patch attached (issue #16, defect 2): gradient checkpointing recomputes each layer's attention
in backward, after the forward's state is gone; the runtime hands the layer its state through the checkpointed
kwargs, so the recomputation makes the same edits and saves the same tensors. Gradients must equal those of the
same patched model trained without checkpointing."""

from __future__ import annotations

import pytest
import torch

from vlm_accel import patch_model

from families import BATCH_ROWS, BUILDERS
from inputs import batch_inputs, make_row


def _gradients(model, inputs: dict, checkpointing: dict | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    try:
        model.zero_grad(set_to_none=True)
        out = model(**inputs, labels=inputs["input_ids"], use_cache=False)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.loss.detach(), grads
    finally:
        if checkpointing is not None:
            model.gradient_checkpointing_disable()
        model.eval()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize(
    ("method", "params"),
    [("fastv", {"keep_ratio": 0.5}), ("fastv", {"keep_ratio": 1.0}), ("pai", {"alpha": 0.5})],
    ids=["fastv-0.5", "fastv-noop", "pai"],
)
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_gradients_of_plain_training(family, method, params, reentrant):
    torch.manual_seed(0)
    model = BUILDERS[family]("sdpa")
    inputs = batch_inputs(model, [make_row(model, spec) for spec in BATCH_ROWS[family][:2]])
    with patch_model(model, method, **params):
        loss, grads = _gradients(model, inputs, None)
        ckpt_loss, ckpt_grads = _gradients(model, inputs, {"use_reentrant": reentrant})
    assert torch.equal(loss, ckpt_loss)
    assert grads.keys() == ckpt_grads.keys() and grads
    for name, grad in grads.items():
        assert torch.allclose(grad, ckpt_grads[name], atol=1e-6, rtol=1e-5), name
