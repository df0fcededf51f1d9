"""MoH (Mixture-of-Head attention) against an independent dense eager reference that computes every head's attention
output by hand and gates it before ``o_proj`` — with gates recomputed here from the paper's / official code's
formulas (qnorm: pre-RoPE query norms from ``q_proj``; learned: Eq. 5–6 with the official scalings, read from the
router file). Prefill, every decode step (on the head-sparse op), batches, composition with FastV and PAI, router
files and bad configs. The all-heads no-op and batch invariance run for every family in test_matrix.py.
"""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import load_file

from vlm_accel import patch_model
from vlm_accel.methods.dyvte_routers import model_metadata
from vlm_accel.methods.moh import MoHConfig
from vlm_accel.methods.moh_router import HeadUnits, LearnedRouter
from vlm_accel.runtime import attend
from vlm_accel.runtime.state import CACHE_ATTRIBUTE

from families import BATCH_ROWS, BUILDERS
from inputs import batch_inputs, extend_inputs, make_row, reference_position_kwargs
from reference import hide_from_layers
from tiny_models import IMAGE_TOKEN, VIDEO_TOKEN

ATOL = 3e-5
NEW = 3
PLACEHOLDERS = [IMAGE_TOKEN, VIDEO_TOKEN]
GENERATE = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, output_logits=True,
                suppress_tokens=PLACEHOLDERS, return_dict_in_generate=True)  # fmt: skip


@functools.cache
def model(family: str = "llava", attn: str = "sdpa"):
    return BUILDERS[family](attn)


@functools.cache
def inputs_for(family: str = "llava", batch: int = 3) -> dict:
    m = model(family)
    rows = [make_row(m, spec) for spec in BATCH_ROWS[family]]
    return batch_inputs(m, rows if batch == 3 else rows[1:2])


# ---- the reference: hand-written eager attention with hand-computed gates ------------------------------------

_REF: dict = {}


def qnorm_reference_gates(module, hidden: torch.Tensor, shared: int, top_k: int, group: int) -> torch.Tensor:
    """MoH-LLaMA3's router by hand: ‖q_i‖ of q_proj(x) (before RoPE) per unit, /std over the routed units, softmax,
    top-k; 1 for shared units and the chosen ones. Returns per-head gates [B, q, Hq]."""
    heads = module.config.num_attention_heads
    q = module.q_proj(hidden).float().view(*hidden.shape[:2], heads // group, group * module.head_dim)
    logits = q.norm(dim=-1)[..., shared:]
    scores = torch.softmax(logits / logits.std(dim=-1, keepdim=True), dim=-1)
    order = torch.argsort(scores, dim=-1, descending=True)[..., :top_k]
    routed = torch.zeros_like(scores).scatter(-1, order, 1.0)
    units = torch.cat([torch.ones(*scores.shape[:-1], shared), routed], dim=-1)
    return units.repeat_interleave(group, dim=-1)


def learned_reference_gates(weights: dict, layer: int, hidden: torch.Tensor, units: HeadUnits) -> torch.Tensor:
    """Paper Eq. 5–6 with the official scalings, from the raw tensors of the router file."""
    x = hidden.float()
    w_s, w_r, w_h = (weights.get(f"layers.{layer}.{n}") for n in ("shared", "routed", "balance"))
    shared = units.shared * torch.softmax(x @ w_s.T, dim=-1)
    p = torch.softmax(x @ w_r.T, dim=-1)
    chosen = torch.argsort(p, dim=-1, descending=True)[..., : units.top_k]
    picked = torch.zeros_like(p).scatter(-1, chosen, p.gather(-1, chosen))
    routed = units.top_k * picked / picked.sum(-1, keepdim=True)
    alpha = 2 * torch.softmax(x @ w_h.T, dim=-1)
    gates = torch.cat([alpha[..., :1] * shared, alpha[..., 1:] * routed], dim=-1)
    return gates.repeat_interleave(units.heads_per_unit, dim=-1)


def reference_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Dense eager attention in fp32, an optional PAI edit of rows ``first_row:``, then per-head gates."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1).float()
    value = value.repeat_interleave(groups, dim=1).float()
    logits = torch.matmul(query.float(), key.transpose(2, 3)) * (scaling or query.shape[-1] ** -0.5)
    if attention_mask is not None:
        logits = logits + attention_mask[:, :, :, : key.shape[-2]].float()
    edit = _REF.get("edit")
    if edit is not None and module.layer_idx in _REF["edit_layers"]:
        first = _REF["first_row"]
        logits[:, :, first:, :] = edit(logits[:, :, first:, :].clone())
    heads = torch.matmul(torch.softmax(logits, dim=-1), value).transpose(1, 2)  # [B, q, H, D]
    gates = _REF["gates"](module, module._moh_test_hidden, module.layer_idx)
    return (heads * gates[..., None]).to(query.dtype).contiguous(), None


def reference_logits(family: str, inputs: dict, gates, edit=None, edit_layers=(), first_row=-1, stages=None):
    """Full-sequence, no-cache logits of the eager model with every token's heads gated by ``gates(module, hidden,
    layer)`` (routing is per token, so this equals a cached generation step by step)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    m = model(family, "eager")
    name = "vlm_accel_test_moh_reference"
    AttentionInterface.register(name, reference_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    m.set_attn_implementation({"text_config": name})
    _REF.update(gates=gates, edit=edit, edit_layers=set(edit_layers), first_row=first_row)

    def keep_input(module, args, kwargs):
        module._moh_test_hidden = args[0] if args else kwargs["hidden_states"]

    handles = [layer.self_attn.register_forward_pre_hook(keep_input, with_kwargs=True)
               for layer in m.model.language_model.layers]  # fmt: skip
    if stages is not None:
        handles += hide_from_layers(m, stages, inputs["input_ids"].shape[1])
    try:
        with torch.no_grad():
            return m(**inputs, **reference_position_kwargs(m, inputs), use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
        _REF.clear()
        m.set_attn_implementation({"text_config": "eager"})


def qnorm_gates_fn(shared: int, top_k: int, group: int = 1):
    return lambda module, hidden, layer: qnorm_reference_gates(module, hidden, shared, top_k, group)


def assert_valid_close(got, expected, inputs):
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expected[valid], rtol=0, atol=ATOL)


class SparseCalls:
    """Counts the runtime's calls of the head-sparse decode op (proves decode steps took that path)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = attend.head_sparse_decode_attention

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(attend, "head_sparse_decode_attention", counted)


# ---- prefill and decode against the reference ---------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_qnorm_prefill_equals_hand_gated_reference(family, attn):
    inputs = inputs_for(family)
    with torch.no_grad(), patch_model(model(family, attn), MoHConfig(active_heads=0.75)) as patch:
        got = model(family, attn)(**inputs).logits
        stats = patch.stats.methods["moh"]
    # 4 heads: 2 shared + top-1 of 2 routed (the release's proportion)
    assert (stats["shared_units"], stats["top_k"]) == (2, 1) and stats["active_head_fraction"] == 0.75
    assert_valid_close(got, reference_logits(family, inputs, qnorm_gates_fn(2, 1)), inputs)
    with torch.no_grad():
        unpatched = model(family, attn)(**inputs).logits
    assert (got - unpatched).abs().max() > 1e-3, "gating a quarter of the heads should change the logits"


@pytest.mark.parametrize("per_kv_group", [False, True])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_qnorm_generate_equals_reference_at_every_step_on_the_sparse_op(family, per_kv_group, monkeypatch):
    inputs = inputs_for(family)
    config = MoHConfig(active_heads=0.5, per_kv_group=per_kv_group)
    counter = SparseCalls(monkeypatch)
    with torch.no_grad(), patch_model(model(family), config) as patch:
        out = model(family).generate(**inputs, **GENERATE)
        stats = patch.stats.methods["moh"]
    layers = len(model(family).model.language_model.layers)
    assert counter.calls == (NEW - 1) * layers  # every decode step of every layer
    if per_kv_group:  # 2 KV groups, top-1: each decode step reads half of them
        assert stats["decode_kv_groups_read"] == 0.5
    gates = qnorm_gates_fn(0, 1, 2) if per_kv_group else qnorm_gates_fn(0, 2)
    window = inputs["input_ids"].shape[1]
    for step in range(NEW):
        reference = reference_logits(family, extend_inputs(inputs, out.sequences[:, : window + step]), gates)
        torch.testing.assert_close(out.logits[step], reference[:, -1], rtol=0, atol=ATOL)


def test_dense_decode_path_gives_the_same_tokens(monkeypatch):
    inputs = inputs_for()
    counter = SparseCalls(monkeypatch)
    runs = {}
    for sparse in (True, False):
        with torch.no_grad(), patch_model(model(), MoHConfig(active_heads=0.5, sparse_decode=sparse)):
            runs[sparse] = model().generate(**inputs, **GENERATE)
    assert counter.calls == (NEW - 1) * 4
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    for a, b in zip(runs[True].logits, runs[False].logits):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


def random_router_file(m, path, units: HeadUnits, seed: int = 0, scale: float = 0.3):
    router = LearnedRouter(len(m.model.language_model.layers), m.config.text_config.hidden_size, units)
    generator = torch.Generator().manual_seed(seed)
    for weights in router.parameters():
        weights.data = torch.randn(weights.shape, generator=generator) * scale
    router.save(path, model_metadata(m))
    return path


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_learned_router_prefill_and_decode_equal_the_paper_formula(attn, tmp_path, monkeypatch):
    m, inputs = model("llava", attn), inputs_for()
    units = HeadUnits(units=4, shared=2, top_k=1, heads_per_unit=1)
    path = random_router_file(m, tmp_path / "router.safetensors", units)
    weights = load_file(str(path))
    config = MoHConfig(router="learned", active_heads=0.75, router_file=str(path))
    counter = SparseCalls(monkeypatch)
    with torch.no_grad(), patch_model(m, config):
        got = m(**inputs).logits
        out = m.generate(**inputs, **GENERATE)
    assert counter.calls == (NEW - 1) * 4  # weighted gates decode on the sparse op too

    def gates(module, hidden, layer):
        return learned_reference_gates(weights, layer, hidden, units)

    assert_valid_close(got, reference_logits("llava", inputs, gates), inputs)
    window = inputs["input_ids"].shape[1]
    for step in range(NEW):
        reference = reference_logits("llava", extend_inputs(inputs, out.sequences[:, : window + step]), gates)
        torch.testing.assert_close(out.logits[step], reference[:, -1], rtol=0, atol=ATOL)


def test_zero_learned_router_gives_unit_gates():
    """Zero weights: shared gates h_s·(1/h_s) = 1, α = 1, routed top-1 renormalised ×1 = 1 (training's start)."""
    router = LearnedRouter(2, 8, HeadUnits(units=4, shared=2, top_k=1, heads_per_unit=1))
    gates = router(0, torch.randn(2, 3, 8))
    assert torch.equal(gates, torch.tensor([1.0, 1.0, 1.0, 0.0]).expand(2, 3, 4))


# ---- composition ------------------------------------------------------------------------------------------------


def test_fastv_then_moh_equals_masked_gated_reference():
    inputs = inputs_for()
    with torch.no_grad(), patch_model(model(), ["fastv", MoHConfig(active_heads=0.5)]):
        out = model().generate(**inputs, **GENERATE)
    record = getattr(out.past_key_values, CACHE_ATTRIBUTE)
    window = inputs["input_ids"].shape[1]
    stages = [(stage.layer, stage.plan.keep_mask(window)) for stage in record.stages]
    assert stages, "fastv should have pruned"
    for step in range(NEW):
        step_inputs = extend_inputs(inputs, out.sequences[:, : window + step])
        reference = reference_logits("llava", step_inputs, qnorm_gates_fn(0, 2), stages=stages)
        torch.testing.assert_close(out.logits[step], reference[:, -1], rtol=0, atol=ATOL)


def test_moh_with_pai_gates_the_edited_rows(monkeypatch):
    from vlm_accel.methods.reweighting import layer_range

    inputs = inputs_for()
    counter = SparseCalls(monkeypatch)
    with torch.no_grad(), patch_model(model(), [MoHConfig(active_heads=0.5), "pai"]) as patch:
        out = model().generate(**inputs, **GENERATE)
        pai = next(c for c in patch.configs if c.method_name == "pai")
    assert counter.calls == 0  # a row edit at a layer turns the sparse op off there; gates apply to the edited rows
    layers = layer_range(pai.layers, 4)
    window = inputs["input_ids"].shape[1]
    for step in range(NEW):
        seq = window + step
        visual = torch.zeros(3, seq, dtype=torch.bool)
        visual[:, :window] = (inputs["input_ids"] == IMAGE_TOKEN) & inputs["attention_mask"].bool()

        def edit(logits, visual=visual):
            cols = visual[:, None, None, : logits.shape[-1]]
            return torch.where(cols, logits + pai.alpha * logits.abs(), logits)

        reference = reference_logits("llava", extend_inputs(inputs, out.sequences[:, :seq]), qnorm_gates_fn(0, 2),
                                     edit=edit, edit_layers=layers, first_row=window - 1)  # fmt: skip
        torch.testing.assert_close(out.logits[step], reference[:, -1], rtol=0, atol=ATOL)
