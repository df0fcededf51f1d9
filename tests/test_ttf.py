"""TTF (temporal token fusion): no-op exactness, the hand-written fusion reference, the compute-saving mode and the
runtime's opt-in image reuse. Tiny LLaVA-1.5: 32×32 images, patch 8 → a 4×4 grid of 16 visual tokens."""

from __future__ import annotations

import functools

import pytest
import torch

from vlm_accel import MethodNotApplicable, patch_model
from vlm_accel.methods.base import Method
from vlm_accel.methods.ttf import TTFConfig
from vlm_accel.runtime.vision import ImageReuse
from vlm_accel.testbed.frames import FrameNoise, noisy_frames

from families import BUILDERS
from inputs import Row, RowSpec, batch_inputs, clip_inputs, make_row
from reference import masked_logits
from tiny_models import IMAGE_TOKEN, PAD, VIDEO_TOKEN, tiny_llava

GRID, PATCH, TOKENS = 4, 8, 16
ATOL = 1e-5


@functools.cache
def model(attn: str = "sdpa"):
    return tiny_llava(attn)


def prompt(frames: list[torch.Tensor], prefix: int = 3, suffix: int = 4) -> list[int]:
    ids = [1] + list(range(10, 10 + prefix - 1))
    for _ in frames:
        ids += [IMAGE_TOKEN] * TOKENS + [7]
    return ids + list(range(40, 40 + suffix))


def batch(rows: list[list[torch.Tensor]], prefixes: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Left-padded inputs; each row is a list of frames [3, 32, 32] (one frame: stream mode; several: a clip)."""
    prefixes = prefixes or [3] * len(rows)
    ids = [prompt(frames, prefix) for frames, prefix in zip(rows, prefixes)]
    width = max(map(len, ids))
    input_ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(ids):
        input_ids[b, width - len(row) :] = torch.tensor(row)
        mask[b, width - len(row) :] = 1
    pixels = torch.stack([f for frames in rows for f in frames])
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixels}


def frames(
    seed: int, count: int, changed: tuple[int, ...] = (0, 5), jitter: float = 0.01
) -> list[torch.Tensor]:
    """Frame 0 random; each next one = the previous + small noise everywhere (below the threshold) + a large change
    on ``changed`` patches, so fresh and cached tokens differ at every patch."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(3, 32, 32, generator=g)]
    for _ in range(count - 1):
        nxt = out[-1] + jitter * torch.rand(3, 32, 32, generator=g)
        for p in changed:
            r, c = divmod(p, GRID)
            nxt[:, r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] += 1.0
        out.append(nxt)
    return out


def logits(m, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return m(**inputs).logits


# ------------------------------------------------------------------------------------------------ no-op


@pytest.mark.parametrize("save_compute", [False, True])
@pytest.mark.parametrize("rows", [1, 2])
def test_keyframe_every_frame_reproduces_unpatched_stream_and_clip(save_compute, rows):
    m = model()
    streams = [frames(seed, 3) for seed in range(rows)]
    prefixes = [3, 6][:rows]
    expected = [logits(m, batch([s[t : t + 1] for s in streams], prefixes)) for t in range(3)]
    clip_inputs = batch(streams, prefixes)
    expected_clip = logits(m, clip_inputs)
    with torch.no_grad():
        expected_gen = m.generate(**clip_inputs, max_new_tokens=3, do_sample=False)
    with patch_model(m, TTFConfig(keyframe_interval=1, save_compute=save_compute)) as patch:
        with patch.stream():
            got = [logits(m, batch([s[t : t + 1] for s in streams], prefixes)) for t in range(3)]
        got_clip = logits(m, clip_inputs)
        with torch.no_grad():
            got_gen = m.generate(**clip_inputs, max_new_tokens=3, do_sample=False)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_clip, expected_clip, rtol=0, atol=1e-6)
    assert torch.equal(got_gen, expected_gen)


GENERATE = {"max_new_tokens": 3, "do_sample": False, "suppress_tokens": [IMAGE_TOKEN, VIDEO_TOKEN]}
SIZES = [(32, 32), (32, 64)]  # row b's image size (different visual-token counts except for LLaVA-1.5)


@functools.cache
def family_model(family: str):
    return BUILDERS[family]("sdpa")


def family_frame(family: str, b: int, t: int, prefix: int = 3) -> Row:
    """Row ``b``'s frame ``t`` as a single-image row of the family (random pixels, seeded by ``b`` and ``t``)."""
    return make_row(
        family_model(family), RowSpec(prefix=prefix + 3 * b, image_size=SIZES[b], suffix=4, seed=10 * b + t)
    )


def valid_logits(m, inputs: dict) -> torch.Tensor:
    return logits(m, inputs)[inputs["attention_mask"].bool()]


def generated(m, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return m.generate(**inputs, **GENERATE)


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("save_compute", [False, True])
@pytest.mark.parametrize("rows", [1, 2])
def test_noop_reproduces_unpatched_on_every_family_stream_and_clip(family, save_compute, rows):
    """keyframe_interval=1 on every family: three stream calls (forward, and generate on the last) and a clip of three
    images per row (forward and generate), batch 1 and a left-padded batch of 2, equal the unpatched model exactly —
    generate() included, whose pre-prefill encoder step is shadowed while ttf is installed."""
    m = family_model(family)
    calls = [batch_inputs(m, [family_frame(family, b, t) for b in range(rows)]) for t in range(3)]
    clip = clip_inputs(m, [[family_frame(family, b, t, prefix=1) for t in range(3)] for b in range(rows)])
    expected = [valid_logits(m, x) for x in calls] + [valid_logits(m, clip)]
    expected_gen = [generated(m, calls[-1]), generated(m, clip)]
    with patch_model(m, TTFConfig(keyframe_interval=1, save_compute=save_compute)) as patch:
        with patch.stream():
            got = [valid_logits(m, x) for x in calls]
            got_gen = [generated(m, calls[-1])]
        got.append(valid_logits(m, clip))
        got_gen.append(generated(m, clip))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(got_gen, expected_gen):
        assert torch.equal(a, b)
    assert "_prepare_multimodal_encoder_kwargs_for_generation" not in m.__dict__


def test_fusion_without_a_grid_is_not_applicable_but_the_noop_binds():
    """LLaVA-NeXT with the CLS-keeping "full" feature strategy: no fusion grid (one CLS per crop is not mapped)."""
    from tiny_models import tiny_llava_next

    m = tiny_llava_next()
    m.config.vision_feature_select_strategy = "full"
    with pytest.raises(MethodNotApplicable, match="llava_next") as err:
        patch_model(m, "ttf")
    assert "\n" not in str(err.value)
    assert (
        "get_image_features" not in m.model.__dict__
        and "_prepare_multimodal_encoder_kwargs_for_generation" not in m.__dict__
    )
    patch_model(m, "ttf", keyframe_interval=1).remove()


def test_single_image_outside_a_stream_is_a_keyframe():
    m = model()
    inputs = batch([frames(3, 1)], [4])
    with patch_model(m, "ttf", pixel_threshold=10.0, top_k=0):
        got = logits(m, inputs)
    torch.testing.assert_close(got, logits(m, inputs), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ reference


def ref_gray(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]


def ref_patch_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (ref_gray(b) - ref_gray(a)).abs()
    return torch.tensor([float(d[r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH].mean())
                         for r in range(GRID) for c in range(GRID)])  # fmt: skip


def ref_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))[:k]
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[order] = True
    return mask


def pre_projector_features(m, inputs: dict, replace: torch.Tensor | None = None, attentions: bool = False):
    """The projector's input of an unpatched forward (optionally replaced by ``replace``), its logits and, with
    ``attentions``, the eager attention maps."""
    seen = {}

    def hook(module, args):
        seen["features"] = args[0].detach().clone()
        if replace is not None:
            return (replace.to(args[0].dtype),)

    handle = m.model.multi_modal_projector.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            out = m(**inputs, output_attentions=attentions)
    finally:
        handle.remove()
    return seen["features"], out


def ref_relevance(attn_maps, layer: int, input_ids: torch.Tensor) -> torch.Tensor:
    """Head mean, mean over the text rows after the image, at the visual columns (the released code's rule)."""
    ids = input_ids[0]
    visual = (ids == IMAGE_TOKEN).nonzero().flatten()
    rows = torch.arange(int(visual.max()) + 1, len(ids))
    return attn_maps[layer][0].mean(0)[rows][:, visual].mean(0)


def test_stream_fusion_matches_hand_written_reference():
    """Three frames, keyframe at t=0: the recomputed sets and fused features of t=1 and t=2 (whose cache holds the
    fused tokens of t=1) equal the paper's rule computed by hand, and so do the logits."""
    m, eager = model(), model("eager")
    tau, k, layer = 0.05, 3, 2  # 4 layers: attention_layer=0.5 → layer 2
    seq = frames(11, 3)
    inputs = [batch([[f]]) for f in seq]
    fresh = [pre_projector_features(m, x)[0] for x in inputs]
    # t=0: keyframe; its attention (over fresh tokens) drives t=1
    _, out0 = pre_projector_features(eager, inputs[0], attentions=True)
    rel0 = ref_relevance(out0.attentions, layer, inputs[0]["input_ids"])
    recompute1 = (ref_patch_diff(seq[0], seq[1]) > tau) | ref_top_k(rel0, k)
    fused1 = torch.where(recompute1[:, None], fresh[1][0], fresh[0][0])[None]
    _, out1 = pre_projector_features(eager, inputs[1], replace=fused1, attentions=True)
    rel1 = ref_relevance(out1.attentions, layer, inputs[1]["input_ids"])
    recompute2 = (ref_patch_diff(seq[1], seq[2]) > tau) | ref_top_k(rel1, k)
    fused2 = torch.where(recompute2[:, None], fresh[2][0], fused1[0])[None]
    expected_logits = [logits(m, inputs[0]), pre_projector_features(m, inputs[1], fused1)[1].logits,
                       pre_projector_features(m, inputs[2], fused2)[1].logits]  # fmt: skip
    assert 0 < int(recompute1.sum()) < TOKENS and 0 < int(recompute2.sum()) < TOKENS

    patch = patch_model(m, TTFConfig(keyframe_interval=3, pixel_threshold=tau, top_k=k, attention_layer=0.5))
    captured = []
    handle = m.model.multi_modal_projector.register_forward_pre_hook(
        lambda module, args: captured.append(args[0].detach().clone())
    )
    try:
        with patch.stream():
            got = [logits(m, x) for x in inputs]
    finally:
        handle.remove()
        patch.remove()
    torch.testing.assert_close(captured[1], fused1, rtol=0, atol=0)
    torch.testing.assert_close(captured[2], fused2, rtol=0, atol=0)
    for a, b in zip(got, expected_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
    stats = patch.stats.methods["ttf"]
    assert stats["reused"] == 2 * TOKENS - int(recompute1.sum()) - int(recompute2.sum())


def test_clip_fusion_matches_reference_pixel_test_only():
    """Clip mode: frame j fuses with frame j−1 of the same row (pixel test; no previous attention in one prompt)."""
    m = model()
    tau = 0.05
    seq = frames(5, 3)
    inputs = batch([seq])
    fresh = pre_projector_features(m, inputs)[0]
    r1 = ref_patch_diff(seq[0], seq[1]) > tau
    r2 = ref_patch_diff(seq[1], seq[2]) > tau
    f1 = torch.where(r1[:, None], fresh[1], fresh[0])
    f2 = torch.where(r2[:, None], fresh[2], f1)
    expected_features = torch.stack([fresh[0], f1, f2])
    expected = pre_projector_features(m, inputs, expected_features)[1].logits
    captured = []
    with patch_model(m, TTFConfig(keyframe_interval=3, pixel_threshold=tau)):
        handle = m.model.multi_modal_projector.register_forward_pre_hook(
            lambda module, args: captured.append(args[0].detach().clone())
        )
        got = logits(m, inputs)
        handle.remove()
    torch.testing.assert_close(captured[0], expected_features, rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


def test_padded_batch_of_streams_equals_each_stream_alone():
    m = model()
    streams = [frames(21, 3), frames(22, 3, changed=(3,))]
    config = TTFConfig(keyframe_interval=3, pixel_threshold=0.05, top_k=4, attention_layer=0.25)
    with patch_model(m, config) as patch, patch.stream():
        together = [logits(m, batch([s[t : t + 1] for s in streams], [3, 7])) for t in range(3)]
    for b, (stream, prefix) in enumerate(zip(streams, [3, 7])):
        with patch_model(m, config) as patch, patch.stream():
            alone = [logits(m, batch([stream[t : t + 1]], [prefix])) for t in range(3)]
        for t in range(3):
            n = alone[t].shape[1]
            torch.testing.assert_close(together[t][b, -n:], alone[t][0], rtol=0, atol=ATOL)


def test_reset_starts_a_new_episode_with_a_keyframe():
    m = model()
    seq = frames(31, 2)
    with (
        patch_model(m, TTFConfig(keyframe_interval=3, pixel_threshold=0.05, top_k=2)) as patch,
        patch.stream(),
    ):
        logits(m, batch([seq[:1]]))
        fused = logits(m, batch([seq[1:]]))
        patch.reset()
        fresh = logits(m, batch([seq[1:]]))
    torch.testing.assert_close(fresh, logits(m, batch([seq[1:]])), rtol=0, atol=1e-6)
    assert not torch.allclose(fused, fresh)


# ------------------------------------------------------------------------------------------------ save_compute


def tower_batches(m) -> tuple[list[int], object]:
    sizes: list[int] = []
    handle = m.model.vision_tower.register_forward_pre_hook(lambda module, args, kwargs: sizes.append(
        int((args[0] if args else kwargs["pixel_values"]).shape[0])), with_kwargs=True)  # fmt: skip
    return sizes, handle


@pytest.mark.parametrize("clip_keep", ["reused", "latest"])
def test_save_compute_clip_drops_reused_tokens_and_skips_static_frames(clip_keep):
    """A clip whose third frame repeats the second: frame 2 is never encoded, one copy of every reused token leaves
    the LLM from layer 1 on (the reused copy, or with "latest" the earlier one), and the logits equal the reference
    (fused features, dropped copies hidden from layer 1)."""
    m, eager = model(), model("eager")
    tau = 0.05
    seq = frames(41, 2, changed=(2,), jitter=0.0)
    seq.append(seq[1].clone())
    inputs = batch([seq])
    fresh = pre_projector_features(m, inputs)[0]
    r1 = ref_patch_diff(seq[0], seq[1]) > tau
    assert int(r1.sum()) == 1
    features = torch.stack([fresh[0], torch.where(r1[:, None], fresh[1], fresh[0]), fresh[0]])
    features[2] = features[1]
    none, every = torch.zeros(TOKENS, dtype=torch.bool), torch.ones(TOKENS, dtype=torch.bool)
    if clip_keep == "reused":
        reused = torch.cat([none, ~r1, every])
    else:  # frame 0's copies of what frame 1 reuses, frame 1's copies of what frame 2 reuses (all of it)
        reused = torch.cat([~r1, every, none])
    keep = torch.ones_like(inputs["input_ids"], dtype=torch.bool)
    keep[0, (inputs["input_ids"][0] == IMAGE_TOKEN).nonzero().flatten()[reused]] = False
    handle = eager.model.multi_modal_projector.register_forward_pre_hook(lambda module, args: (features,))
    try:
        expected = masked_logits(eager, inputs, [(1, keep)])
    finally:
        handle.remove()
    sizes, tower = tower_batches(m)
    try:
        config = TTFConfig(keyframe_interval=3, pixel_threshold=tau, save_compute=True, clip_keep=clip_keep)
        with patch_model(m, config) as patch:
            got = logits(m, inputs)
            stats = patch.stats
    finally:
        tower.remove()
    assert sizes == [2]  # frames 0 and 1 encoded, frame 2 skipped
    assert stats.methods["ttf"]["images_skipped"] == 1
    assert stats.visual_tokens_kept == 3 * TOKENS - int(reused.sum())
    assert stats.tokens_per_layer[1] == inputs["input_ids"].shape[1] - int(reused.sum())
    torch.testing.assert_close(got[keep], expected[keep], rtol=0, atol=ATOL)
    assert "get_image_features" not in m.model.__dict__


def test_save_compute_stream_skips_the_tower_and_equals_plain_ttf():
    """top_k=0 (pixel test only): a frame with no changed patch skips the tower and projector; the output equals
    ttf without save_compute (the cached projected tokens are the projector of the cached fused tokens)."""
    m = model()
    seq = frames(51, 2, changed=(1,), jitter=0.0)
    seq.append(seq[1].clone())
    results = {}
    for save in (False, True):
        sizes, tower = tower_batches(m)
        try:
            config = TTFConfig(keyframe_interval=3, pixel_threshold=0.05, top_k=0, save_compute=save)
            with patch_model(m, config) as patch, patch.stream():
                results[save] = ([logits(m, batch([f[None]])) for f in seq], list(sizes))
        finally:
            tower.remove()
    assert results[False][1] == [1, 1, 1] and results[True][1] == [1, 1]
    for a, b in zip(results[True][0], results[False][0]):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------------------------ runtime reuse


class _ReuseFirst(Method):
    """Test-only method: every image after the first reuses image 0's features."""

    config_cls = TTFConfig

    def reuse_images(self, state):
        n = int(state.pixel_inputs["pixel_values"].shape[0])
        return ImageReuse([None] + [0] * (n - 1))


def test_runtime_image_reuse_skips_the_tower_and_restores():
    from vlm_accel.registry import _REGISTRY

    m = model()
    f = frames(61, 1)[0]
    inputs = batch([[f, f + 5.0]])  # the second image's own features would differ
    expected = logits(m, batch([[f, f]]))
    _REGISTRY["ttf"], saved = _ReuseFirst, _REGISTRY.get("ttf")
    sizes, tower = tower_batches(m)
    try:
        with patch_model(m, TTFConfig()):
            assert "get_image_features" in m.model.__dict__
            got = logits(m, inputs)
    finally:
        tower.remove()
        if saved is not None:
            _REGISTRY["ttf"] = saved
        else:
            _REGISTRY.pop("ttf")
    assert sizes == [1]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert "get_image_features" not in m.model.__dict__
    torch.testing.assert_close(logits(m, inputs), logits(m, inputs))


# ------------------------------------------------------------------------------------------------ errors / config


def test_bad_calls_raise_clear_errors_and_leave_the_model_intact():
    m = model()
    seq = frames(71, 2)
    reference = logits(m, batch([seq]))
    with patch_model(m, "ttf") as patch, patch.stream():
        with pytest.raises(ValueError, match="one frame per call"):
            logits(m, batch([seq]))
        patch.reset()
        logits(m, batch([seq[:1]]))
        with pytest.raises(ValueError, match="rows"):
            logits(m, batch([seq[:1], seq[1:]]))
    torch.testing.assert_close(logits(m, batch([seq])), reference, rtol=0, atol=0)
    for bad in ({"keyframe_interval": 0}, {"top_k": 1.5}, {"attention_layer": 1.0}, {"pixel_threshold": -1}):
        with pytest.raises(ValueError):
            TTFConfig(**bad)
    with pytest.raises(TypeError):
        TTFConfig(save_compute=1)
    with pytest.raises(ValueError, match="out of range"):
        patch_model(m, "ttf", attention_layer=9)
    assert TTFConfig().top_k_count(256) == 70 and TTFConfig(top_k=120).top_k_count(16) == 16


def test_noisy_frames_are_seeded_and_independent_per_frame():
    import numpy as np
    from PIL import Image

    base = [Image.new("RGB", (32, 32), (120, 130, 140)) for _ in range(3)]
    arrays = lambda images: [np.asarray(im) for im in images]  # noqa: E731
    clean = arrays(noisy_frames(base, FrameNoise(0.0, 0.0, 0), seed=1))
    assert all(np.array_equal(a, b) for a, b in zip(clean, arrays(base)))
    a = arrays(noisy_frames(base, FrameNoise(8.0, 0.1, 1), seed=1))
    b = arrays(noisy_frames(base, FrameNoise(8.0, 0.1, 1), seed=1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], a[1])
    spread = float(np.abs(a[0].astype(float) - 130).mean())
    assert 3.0 < spread < 30.0


def test_generate_encodes_images_inside_the_prefill_so_ttf_acts():
    """transformers 5 generate() pre-encodes images before the prefill; the vision hooks make it encode them inside
    the prefill instead, so the first generated step's logits equal the patched forward's last logits."""
    m = model()
    seq = frames(81, 3, changed=(4,))
    inputs = batch([seq])
    config = TTFConfig(keyframe_interval=3, pixel_threshold=0.05, save_compute=True)
    with patch_model(m, config) as patch:
        forward = logits(m, inputs)[:, -1]
        dropped = patch.stats.methods["ttf"]["dropped"]
        with torch.no_grad():
            out = m.generate(**inputs, max_new_tokens=2, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)  # fmt: skip
        assert patch.stats.methods["ttf"]["dropped"] == 2 * dropped > 0
    torch.testing.assert_close(out.logits[0], forward, rtol=0, atol=ATOL)
    assert "_prepare_multimodal_encoder_kwargs_for_generation" not in m.__dict__


def test_noisy_frame_dataset_keeps_scenes_and_questions():
    import numpy as np

    from vlm_accel.testbed import make_frame_dataset
    from vlm_accel.testbed.frames import NOISE_LEVELS, make_noisy_frame_dataset

    clean = make_frame_dataset(2, 5, frames=2)
    noisy = make_noisy_frame_dataset(2, 5, NOISE_LEVELS[2], frames=2)
    assert noisy["question"] == clean["question"] and noisy["answer"] == clean["answer"]
    a, b = np.asarray(clean[0]["frames"][1], dtype=float), np.asarray(noisy[0]["frames"][1], dtype=float)
    assert a.shape == b.shape and 2.0 < float(np.abs(a - b).mean()) < 20.0
