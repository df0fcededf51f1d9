"""MoH's parts: configs and unit geometry, router files (refused with one clear line when they do not fit), the
head-sparse torch path (never reads an inactive KV group), the random-heads control, and router training."""

from __future__ import annotations

import functools

import pytest
import torch

from vlm_accel import patch_model
from vlm_accel.kernels import head_sparse_decode_attention, head_sparse_decode_attention_reference
from vlm_accel.methods.dyvte_routers import model_metadata
from vlm_accel.methods.moh import MoHConfig
from vlm_accel.methods.moh_router import HeadUnits, LearnedRouter, qnorm_gates, resolve_units
from vlm_accel.methods.random_heads import RandomHeads, RandomHeadsConfig

from families import BATCH_ROWS, BUILDERS
from inputs import batch_inputs, make_row


@functools.cache
def model(family: str = "llava"):
    return BUILDERS[family]("sdpa")


@functools.cache
def inputs_for(family: str = "llava") -> dict:
    m = model(family)
    return batch_inputs(m, [make_row(m, spec) for spec in BATCH_ROWS[family]])


# ---- configs and geometry ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("heads", "kv", "active", "shared", "per_group", "expected"),
    [
        (32, 8, 0.75, None, False, HeadUnits(32, 16, 8, 1)),  # the MoH-LLaMA3 release: 16 shared + 8 of 16
        (32, 8, 0.5, None, True, HeadUnits(8, 0, 4, 4)),  # half of the KV groups, all routed
        (4, 4, 0.75, None, False, HeadUnits(4, 2, 1, 1)),  # testbed-l
        (4, 2, 3, 1, False, HeadUnits(4, 1, 2, 1)),  # counts
        (16, 16, 1.0, None, False, HeadUnits(16, 16, 0, 1)),  # all heads: no routing
    ],
)
def test_unit_geometry(heads, kv, active, shared, per_group, expected):
    assert resolve_units(heads, kv, active, shared, per_group) == expected


@pytest.mark.parametrize(
    ("params", "error", "message"),
    [
        ({"router": "norm"}, ValueError, "router must be one of"),
        ({"active_heads": 0.0}, ValueError, "active_heads as a fraction"),
        ({"active_heads": 1.5}, ValueError, "active_heads as a fraction"),
        ({"active_heads": True}, TypeError, "active_heads must be"),
        ({"shared_heads": -1}, ValueError, "shared_heads as a count"),
        ({"router": "learned"}, ValueError, "needs router_file"),
        ({"router_file": "x.safetensors"}, ValueError, "router_file is for router='learned'"),
        ({"per_kv_group": 1}, TypeError, "per_kv_group must be a bool"),
    ],
)
def test_bad_configs(params, error, message):
    with pytest.raises(error, match=message):
        MoHConfig(**params)


def test_geometry_that_does_not_fit_the_model_is_refused_and_leaves_it_unchanged():
    inputs = inputs_for()
    with torch.no_grad():
        before = model()(**inputs).logits
    for config in (MoHConfig(active_heads=9), MoHConfig(active_heads=0.5, shared_heads=0.75)):
        with pytest.raises(ValueError, match="moh: "):
            patch_model(model(), config)
    with torch.no_grad():
        assert torch.equal(model()(**inputs).logits, before)


def test_config_round_trips_through_json():
    config = MoHConfig(active_heads=0.5, per_kv_group=True)
    assert MoHConfig.from_json(config.to_json()) == config
    assert config.label() == "moh-qnorm-50%-kv"


def test_qnorm_gates_pick_the_largest_query_norms():
    # 1 token, 4 heads of dim 2, norms 1, 3, 2, 4: 1 shared (head 0) + top-2 of heads 1..3 = heads 1 and 3
    query = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 0.0], [0.0, -4.0]])[None, :, None, :]
    gates = qnorm_gates(query, HeadUnits(4, 1, 2, 1))
    assert gates.tolist() == [[[True, True, False, True]]]


# ---- router files -------------------------------------------------------------------------------------------


def save_router(path, m, units: HeadUnits, layers: int | None = None, hidden: int | None = None, meta=None):
    router = LearnedRouter(layers or len(m.model.language_model.layers), hidden or m.config.text_config.hidden_size,
                           units)  # fmt: skip
    router.save(path, model_metadata(m) if meta is None else meta)
    return str(path)


LLAVA_75 = HeadUnits(4, 2, 1, 1)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p, m: str(p / "missing.safetensors"), "does not exist"),
        (lambda p, m: (p / "junk.safetensors").write_bytes(b"\x00" * 64) and str(p / "junk.safetensors"),
         "not a readable safetensors file"),
        (lambda p, m: save_router(p / "r.safetensors", m, LLAVA_75, layers=3), "is for 3 layers"),
        (lambda p, m: save_router(p / "r.safetensors", m, LLAVA_75, hidden=16), "of width 16"),
        (lambda p, m: save_router(p / "r.safetensors", m, HeadUnits(4, 0, 3, 1)), "trained for 0 shared"),
        (lambda p, m: save_router(p / "r.safetensors", m, LLAVA_75, meta={"fingerprint": "0123"}),
         "trained for another model"),
    ],
)  # fmt: skip
def test_router_files_that_do_not_fit_are_refused_in_one_line(tmp_path, make, message):
    m = model()
    path = make(tmp_path, m)
    inputs = inputs_for()
    with torch.no_grad():
        before = m(**inputs).logits
    with pytest.raises(ValueError, match=message) as info:
        patch_model(m, MoHConfig(router="learned", active_heads=0.75, router_file=path))
    assert "\n" not in str(info.value)
    with torch.no_grad():
        assert torch.equal(m(**inputs).logits, before)


def test_dyvte_router_file_is_not_an_moh_router(tmp_path):
    from vlm_accel.methods.dyvte_routers import DyVTERouters

    DyVTERouters(64, 3, 4).save(tmp_path / "d.safetensors", model_metadata(model()))
    with pytest.raises(ValueError, match="not an MoH router file"):
        LearnedRouter.load(tmp_path / "d.safetensors")


def test_fingerprint_check_can_be_waived(tmp_path):
    path = save_router(tmp_path / "r.safetensors", model(), LLAVA_75, meta={"fingerprint": "0123"})
    with patch_model(model(), MoHConfig(router="learned", router_file=path, check_fingerprint=False)) as patch:
        assert patch.methods[0].router is not None


# ---- head-sparse torch path -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("b", "hq", "hkv"), [(1, 8, 8), (3, 8, 2), (4, 12, 4), (2, 4, 1)])
@pytest.mark.parametrize("with_allowed", [False, True])
def test_torch_path_equals_reference_and_never_reads_inactive_groups(b, hq, hkv, with_allowed):
    g = torch.Generator().manual_seed(hq * 10 + b)
    n, d = 37, 16
    query = torch.randn(b, hq, 1, d, generator=g)
    key, value = torch.randn(b, hkv, n, d, generator=g), torch.randn(b, hkv, n, d, generator=g)
    mask = torch.rand(b, hq, generator=g) < 0.5
    mask[0] = False  # a row with no active head
    if b > 2:
        mask[2] = mask[1]  # two rows sharing a pattern
    allowed = (torch.rand(b, n, generator=g) < 0.8) if with_allowed else None
    if allowed is not None and b > 1:
        allowed[-1] = False  # a row with no allowed key
    expected = head_sparse_decode_attention_reference(query, key, value, mask, allowed, d**-0.5)
    groups = mask.view(b, hkv, -1).any(-1)
    poisoned_k, poisoned_v = key.clone(), value.clone()
    poisoned_k[~groups] = float("nan")
    poisoned_v[~groups] = float("nan")
    got = head_sparse_decode_attention(query, poisoned_k, poisoned_v, mask, allowed)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert torch.equal(got[~mask], torch.zeros_like(got[~mask]))


# ---- random heads ---------------------------------------------------------------------------------------------


def test_random_heads_keeps_the_budget_with_a_seeded_choice_per_layer():
    method = RandomHeads(RandomHeadsConfig(active_heads=0.5, seed=3))
    method.units = resolve_units(16, 16, 0.5, None, False)
    layers = [method.layer_units(layer) for layer in range(6)]
    assert all(int(keep.sum()) == 8 for keep in layers)
    assert len({tuple(keep.tolist()) for keep in layers}) > 1  # not the same heads everywhere
    again = RandomHeads(RandomHeadsConfig(active_heads=0.5, seed=3))
    again.units = method.units
    assert all(torch.equal(again.layer_units(i), keep) for i, keep in enumerate(layers))


def test_random_heads_refuses_a_router():
    with pytest.raises(ValueError, match="random_heads has no router"):
        RandomHeadsConfig(router="learned", router_file="x.safetensors")


# ---- training -------------------------------------------------------------------------------------------------


def test_router_training_is_reproducible_and_its_file_patches_the_model(tmp_path):
    from vlm_accel.testbed import load_model
    from vlm_accel.train.moh import MoHTrainConfig, save_router, train_router

    m, _ = load_model("testbed-s")
    config = MoHTrainConfig(active_heads=0.5, steps=2, batch_size=2, qas_per_image=2, warmup=1)
    first, report, _ = train_router(m, config)
    second, _, _ = train_router(m, config)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    assert any(p.abs().sum() > 0 for p in first.parameters()), "two steps of Adam must move the router"
    assert not any(p.requires_grad for p in m.parameters()), "the base model stays frozen"
    path = tmp_path / "router.safetensors"
    save_router(first, m, path, report)
    ids = torch.tensor([[2, 5, 6]])
    with torch.no_grad(), patch_model(m, MoHConfig(router="learned", active_heads=0.5, router_file=str(path))):
        assert torch.isfinite(m(input_ids=ids).logits).all()


def test_continue_tuning_the_language_model_writes_its_own_file(tmp_path):
    from safetensors.torch import load_file

    from vlm_accel.testbed import load_model
    from vlm_accel.train.moh import MoHTrainConfig, save_router, train_router

    m, _ = load_model("testbed-s")
    before = {k: v.clone() for k, v in m.model.language_model.state_dict().items()}
    config = MoHTrainConfig(active_heads=0.5, steps=1, batch_size=2, qas_per_image=2, warmup=1, tune_lm=True)
    router, report, lm_state = train_router(m, config)
    save_router(router, m, tmp_path / "r.safetensors", report, lm_state)
    saved = load_file(str(tmp_path / "r.lm.safetensors"))
    assert set(saved) == set(before)
    assert any(not torch.equal(saved[k], before[k]) for k in before)


def test_shipped_testbed_router_fits_testbed_l():
    from vlm_accel.methods.moh import shipped_router
    from vlm_accel.testbed import load_model

    m, _ = load_model("testbed-l")
    path = shipped_router(0.75)
    assert path.is_file(), "the testbed-l router at 75 % is shipped in the package"
    with torch.no_grad(), patch_model(m, MoHConfig(router="learned", active_heads=0.75, router_file=str(path))) as p:
        logits = m(input_ids=torch.tensor([[2, 5, 6, 7]])).logits
        stats = p.stats.methods["moh"]
    assert torch.isfinite(logits).all() and stats["active_head_fraction"] == 0.75


def test_tuned_language_model_is_swapped_in_for_the_patch_and_restored_bitwise(tmp_path):
    """``lm_file``: the continue-tuned language model a ``--tune-lm`` router was trained with is swapped in while the
    patch lives (the router's fingerprint check passes only then) and the original weights come back bit for bit."""
    from vlm_accel.testbed import load_model
    from vlm_accel.train.moh import MoHTrainConfig, save_router, train_router

    m, _ = load_model("testbed-s")
    original = {k: v.clone() for k, v in m.model.language_model.state_dict().items()}
    config = MoHTrainConfig(active_heads=0.5, steps=1, batch_size=2, qas_per_image=2, warmup=1, tune_lm=True)
    router, report, lm_state = train_router(m, config)
    save_router(router, m, tmp_path / "r.safetensors", report, lm_state)
    m.model.language_model.load_state_dict(original)  # back to the shipped weights
    ids = torch.tensor([[2, 5, 6, 7]])
    with torch.no_grad():
        plain = m(input_ids=ids).logits
    learned = {"router": "learned", "active_heads": 0.5, "router_file": str(tmp_path / "r.safetensors")}
    with pytest.raises(ValueError, match="continue-tuned language model: pass lm_file"):
        patch_model(m, MoHConfig(**learned))
    lm_file = str(tmp_path / "r.lm.safetensors")
    with torch.no_grad(), patch_model(m, MoHConfig(**learned, lm_file=lm_file)):
        swapped = m.model.language_model.state_dict()
        assert all(torch.equal(swapped[k], v) for k, v in lm_state.items()), "the tuned weights are in place"
        assert torch.isfinite(m(input_ids=ids).logits).all()
    after = m.model.language_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in original.items()), "removal restores the weights bitwise"
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, plain)


def test_an_lm_file_that_does_not_fit_is_refused_and_leaves_the_model_unchanged(tmp_path):
    from safetensors.torch import save_file

    from vlm_accel.testbed import load_model

    m, _ = load_model("testbed-s")
    original = {k: v.clone() for k, v in m.model.language_model.state_dict().items()}
    state = {k: v.clone() for k, v in original.items()}
    key = next(iter(state))
    state[key] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    router = tmp_path / "r.safetensors"
    LearnedRouter(3, m.config.text_config.hidden_size, resolve_units(4, 4, 0.5, None, False)).save(router, model_metadata(m))
    for bad, message in (("bad.safetensors", "has other shapes"), ("junk.safetensors", "is not a safetensors file"),
                         ("none.safetensors", "does not exist")):  # fmt: skip
        config = MoHConfig(router="learned", active_heads=0.5, router_file=str(router), lm_file=str(tmp_path / bad))
        with pytest.raises(ValueError, match=message):
            patch_model(m, config)
        now = m.model.language_model.state_dict()
        assert all(torch.equal(now[k], v) for k, v in original.items())
    with pytest.raises(ValueError, match="goes with router='learned' only"):
        MoHConfig(lm_file="x.safetensors")


def test_shipped_tuned_router_runs_with_its_language_model_and_removal_restores_testbed_l():
    from vlm_accel.methods.moh import shipped_config
    from vlm_accel.testbed import load_model

    m, _ = load_model("testbed-l")
    original = {k: v.clone() for k, v in m.model.language_model.state_dict().items()}
    config = shipped_config(0.75, tuned=True)
    assert config.lm_file is not None
    ids = torch.tensor([[2, 5, 6, 7]])
    with torch.no_grad(), patch_model(m, config) as p:
        assert torch.isfinite(m(input_ids=ids).logits).all()
        assert p.stats.methods["moh"]["active_head_fraction"] == 0.75
    now = m.model.language_model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in original.items())
