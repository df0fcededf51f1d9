"""TTF on the tiled layouts — InternVL (tiles, pixel shuffle) and LLaVA-NeXT / OneVision (anyres crops) — against
hand-written references.

Tiny models: 32 px tiles/crops, patch 8 (a 4×4 patch grid). InternVL's pixel shuffle makes a 2×2 patch block
(16×16 px) one token: 4 units per tile, token = unit. Anyres: a unit is one 8×8 patch of one crop, 16 per crop; a
(20, 64) image is a base crop + a 1×2 crop grid whose packed 4×8 feature grid is cut to its rows 1–2 (the image
covers 20 of 32 px in height) with a newline token after each row. These maps are written out here by hand,
independently of ``vlm_accel.methods.ttf_grids`` (which runs the model's own pixel shuffle / packing on indices).
"""

from __future__ import annotations

import functools

import pytest
import torch

from vlm_accel import patch_model
from vlm_accel.methods.ttf import TTFConfig

from reference import masked_logits
from tiny_models import IMAGE_TOKEN, PAD, tiny_internvl, tiny_llava_next, tiny_llava_onevision

FAMILIES = ["internvl", "llava_next", "llava_onevision"]
SIDE = 32
ATOL = 1e-5
BUILD = {"internvl": tiny_internvl, "llava_next": tiny_llava_next, "llava_onevision": tiny_llava_onevision}


@functools.cache
def model(family: str, attn: str = "sdpa"):
    return BUILD[family](attn)


def block(family: str) -> int:
    """Pixel side of one fusion unit."""
    return 16 if family == "internvl" else 8


def anyres_size(frame: torch.Tensor) -> tuple[int, int]:
    return {2: (32, 32), 3: (20, 64)}[frame.shape[0]]


def few(family: str) -> int:
    """The tile/crop count of a smaller layout: one InternVL tile; anyres base + one crop (a 32×32 image)."""
    return 1 if family == "internvl" else 2


def token_units(family: str, frame: torch.Tensor) -> list[int]:
    """Each LLM token's unit for one frame ``[tiles or crops, 3, 32, 32]`` (−1: a newline token)."""
    if family == "internvl":
        return list(range(4 * frame.shape[0]))
    if frame.shape[0] == 2:  # (32, 32): base, then the 1×1 crop grid's 4 rows, each with a newline
        return [*range(16), *(u for r in range(4) for u in [*(16 + 4 * r + c for c in range(4)), -1])]
    rows = [
        u
        for r in (1, 2)
        for u in [*(16 + 4 * r + c for c in range(4)), *(32 + 4 * r + c for c in range(4)), -1]
    ]
    return [*range(16), *rows]


def prompt(family: str, frames: list[torch.Tensor], prefix: int, suffix: int = 4) -> list[int]:
    ids = [1] + list(range(10, 10 + prefix - 1))
    for frame in frames:
        ids += [IMAGE_TOKEN] * len(token_units(family, frame)) + [7]
    return ids + list(range(40, 40 + suffix))


def batch(family: str, rows: list[list[torch.Tensor]], prefixes: list[int] | None = None) -> dict:
    prefixes = prefixes or [3] * len(rows)
    ids = [prompt(family, frames, prefix) for frames, prefix in zip(rows, prefixes)]
    width = max(map(len, ids))
    input_ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(ids):
        input_ids[b, width - len(row) :] = torch.tensor(row)
        mask[b, width - len(row) :] = 1
    images = [f for frames in rows for f in frames]
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    if family == "internvl":
        return inputs | {"pixel_values": torch.cat(images)}
    most = max(f.shape[0] for f in images)
    pixels = torch.zeros(len(images), most, 3, SIDE, SIDE)
    for i, f in enumerate(images):
        pixels[i, : f.shape[0]] = f
    return inputs | {"pixel_values": pixels, "image_sizes": torch.tensor([anyres_size(f) for f in images])}


def frames(
    family: str, seed: int, count: int, tiles: int = 3, changed=((0, 0), (2, 1)), jitter: float = 0.01
):
    """Frame 0 random ``[tiles, 3, 32, 32]``; each next one = the previous + small noise (below the threshold) + a
    large change on the (tile, unit) blocks ``changed``."""
    g = torch.Generator().manual_seed(seed)
    size = block(family)
    per_side = SIDE // size
    out = [torch.randn(tiles, 3, SIDE, SIDE, generator=g)]
    for _ in range(count - 1):
        nxt = out[-1] + jitter * torch.rand(tiles, 3, SIDE, SIDE, generator=g)
        for tile, unit in changed:
            r, c = divmod(unit, per_side)
            nxt[tile, :, r * size : (r + 1) * size, c * size : (c + 1) * size] += 1.0
        out.append(nxt)
    return out


def ref_unit_diff(family: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Block means of |ΔY| per unit, tile-major, units row-major within a tile."""
    size = block(family)
    y = lambda x: 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # noqa: E731
    d = (y(b) - y(a)).abs()
    return torch.tensor([float(d[t, r * size : (r + 1) * size, c * size : (c + 1) * size].mean())
                         for t in range(a.shape[0]) for r in range(SIDE // size) for c in range(SIDE // size)])  # fmt: skip


def ref_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))[:k]
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[order] = True
    return mask


def run(m, inputs: dict, replace: torch.Tensor | None = None, attentions: bool = False):
    """An unpatched forward: the projector's input as ``[units, d]`` (optionally replaced), and the output."""
    seen = {}

    def hook(module, args):
        seen["units"] = args[0].detach().reshape(-1, args[0].shape[-1]).clone()
        if replace is not None:
            return (replace.reshape(args[0].shape).to(args[0].dtype),)

    handle = m.model.multi_modal_projector.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            out = m(**inputs, output_attentions=attentions)
    finally:
        handle.remove()
    return seen["units"], out


def capture(m) -> tuple[list[torch.Tensor], object]:
    captured: list[torch.Tensor] = []
    handle = m.model.multi_modal_projector.register_forward_pre_hook(
        lambda module, args: captured.append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())
    )
    return captured, handle


def logits(m, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return m(**inputs).logits


def ref_unit_relevance(family: str, attn_maps, layer: int, input_ids: torch.Tensor, frame: torch.Tensor):
    """Head mean, mean over the text rows after the image, at its visual columns, moved onto units (units on no
    token: −inf)."""
    ids = input_ids[0]
    visual = (ids == IMAGE_TOKEN).nonzero().flatten()
    rows = torch.arange(int(visual.max()) + 1, len(ids))
    per_token = attn_maps[layer][0].mean(0)[rows][:, visual].mean(0)
    units = frame.shape[0] * (4 if family == "internvl" else 16)
    per_unit = torch.full((units,), -torch.inf)
    for t, u in enumerate(token_units(family, frame)):
        if u >= 0:
            per_unit[u] = per_token[t]
    return per_unit


@pytest.mark.parametrize("family", FAMILIES)
def test_stream_fusion_matches_hand_written_reference(family):
    """Three frames of three tiles/crops, keyframe at t=0: the recomputed units and the fused projector input of t=1
    and t=2 equal the rule computed by hand (block means, attention moved onto units by the hand-written map)."""
    m, eager = model(family), model(family, "eager")
    tau, k, layer = 0.05, 3, 2
    seq = frames(family, 11, 3)
    inputs = [batch(family, [[f]]) for f in seq]
    fresh = [run(m, x)[0] for x in inputs]
    _, out0 = run(eager, inputs[0], attentions=True)
    rel0 = ref_unit_relevance(family, out0.attentions, layer, inputs[0]["input_ids"], seq[0])
    recompute1 = (ref_unit_diff(family, seq[0], seq[1]) > tau) | ref_top_k(rel0, k)
    fused1 = torch.where(recompute1[:, None], fresh[1], fresh[0])
    _, out1 = run(eager, inputs[1], replace=fused1, attentions=True)
    rel1 = ref_unit_relevance(family, out1.attentions, layer, inputs[1]["input_ids"], seq[1])
    recompute2 = (ref_unit_diff(family, seq[1], seq[2]) > tau) | ref_top_k(rel1, k)
    fused2 = torch.where(recompute2[:, None], fresh[2], fused1)
    expected = [
        logits(m, inputs[0]),
        run(m, inputs[1], fused1)[1].logits,
        run(m, inputs[2], fused2)[1].logits,
    ]
    units = len(recompute1)
    assert 0 < int(recompute1.sum()) < units and 0 < int(recompute2.sum()) < units

    patch = patch_model(m, TTFConfig(keyframe_interval=3, pixel_threshold=tau, top_k=k, attention_layer=0.5))
    captured, handle = capture(m)
    try:
        with patch.stream():
            got = [logits(m, x) for x in inputs]
    finally:
        handle.remove()
        patch.remove()
    torch.testing.assert_close(captured[1], fused1, rtol=0, atol=0)
    torch.testing.assert_close(captured[2], fused2, rtol=0, atol=0)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
    on_tokens = torch.tensor([u for u in token_units(family, seq[0]) if u >= 0])
    reused = int((~recompute1[on_tokens]).sum() + (~recompute2[on_tokens]).sum())
    assert patch.stats.methods["ttf"]["reused"] == reused


@pytest.mark.parametrize("family", FAMILIES)
def test_clip_fusion_matches_reference_and_a_new_layout_is_a_keyframe(family):
    """Clip mode, a padded batch: row 0 = three frames of three tiles/crops (pixel test); row 1 = a frame of fewer
    tiles/crops then a three-tile/crop frame, whose layout differs: a keyframe, fresh."""
    m = model(family)
    tau = 0.05
    clip0 = frames(family, 5, 3)
    clip1 = [frames(family, 6, 1, tiles=few(family))[0], frames(family, 7, 1)[0]]
    inputs = batch(family, [clip0, clip1], [3, 6])
    fresh = run(m, inputs)[0]
    per_frame = 3 * (4 if family == "internvl" else 16)
    f = [fresh[i * per_frame : (i + 1) * per_frame] for i in range(3)]
    r1 = ref_unit_diff(family, clip0[0], clip0[1]) > tau
    r2 = ref_unit_diff(family, clip0[1], clip0[2]) > tau
    assert 0 < int(r1.sum()) < per_frame
    fused1 = torch.where(r1[:, None], f[1], f[0])
    expected = torch.cat([f[0], fused1, torch.where(r2[:, None], f[2], fused1), fresh[3 * per_frame :]])
    reference = run(m, inputs, replace=expected)[1].logits
    with patch_model(m, TTFConfig(keyframe_interval=3, pixel_threshold=tau)) as patch:
        captured, handle = capture(m)  # after ttf's hook: sees the fused input
        try:
            got = logits(m, inputs)
        finally:
            handle.remove()
        assert patch.stats.methods["ttf"]["keyframes"] == 3
    torch.testing.assert_close(captured[0], expected, rtol=0, atol=0)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], reference[valid], rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_compute_clip_drops_the_tokens_of_reused_units(family):
    """A clip of three frames whose last repeats the second (clip_keep="latest"): the tokens of frame j carrying a
    unit that frame j+1 reuses leave the LLM from layer 1 on (newline tokens stay); every tile/crop is still
    encoded (these layouts cannot skip images). Reference: the eager model, fused features, those tokens hidden."""
    m, eager = model(family), model(family, "eager")
    tau = 0.05
    seq = frames(family, 41, 2, changed=((1, 2),), jitter=0.0)
    seq.append(seq[1].clone())
    inputs = batch(family, [seq])
    fresh = run(m, inputs)[0]
    per_frame = len(fresh) // 3
    r1 = ref_unit_diff(family, seq[0], seq[1]) > tau
    assert int(r1.sum()) == 1
    fused1 = torch.where(r1[:, None], fresh[per_frame : 2 * per_frame], fresh[:per_frame])
    features = torch.cat([fresh[:per_frame], fused1, fused1])
    drop_units = [~r1, torch.ones_like(r1), torch.zeros_like(r1)]  # frame j drops what frame j+1 reuses
    drop_tokens = torch.cat(
        [torch.tensor([u >= 0 and bool(d[u]) for u in token_units(family, seq[0])]) for d in drop_units]
    )
    keep = torch.ones_like(inputs["input_ids"], dtype=torch.bool)
    keep[0, (inputs["input_ids"][0] == IMAGE_TOKEN).nonzero().flatten()[drop_tokens]] = False
    handle = eager.model.multi_modal_projector.register_forward_pre_hook(
        lambda module, args: (features.reshape(args[0].shape).to(args[0].dtype),)
    )
    try:
        expected = masked_logits(eager, inputs, [(1, keep)])
    finally:
        handle.remove()
    config = TTFConfig(keyframe_interval=3, pixel_threshold=tau, save_compute=True)
    with patch_model(m, config) as patch:
        got = logits(m, inputs)
        stats = patch.stats
    assert stats.methods["ttf"]["images_skipped"] == 0
    assert stats.tokens_per_layer[1] == inputs["input_ids"].shape[1] - int(drop_tokens.sum())
    torch.testing.assert_close(got[keep], expected[keep], rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_of_streams_equals_each_stream_alone(family):
    m = model(family)
    streams = [frames(family, 21, 3), frames(family, 22, 3, tiles=few(family), changed=((0, 3),))]
    config = TTFConfig(keyframe_interval=3, pixel_threshold=0.05, top_k=2, attention_layer=0.25)
    with patch_model(m, config) as patch, patch.stream():
        together = [logits(m, batch(family, [s[t : t + 1] for s in streams], [3, 7])) for t in range(3)]
        assert patch.stats.methods["ttf"]["reused"] > 0
    for b, (stream, prefix) in enumerate(zip(streams, [3, 7])):
        with patch_model(m, config) as patch, patch.stream():
            alone = [logits(m, batch(family, [stream[t : t + 1]], [prefix])) for t in range(3)]
        for t in range(3):
            n = alone[t].shape[1]
            torch.testing.assert_close(together[t][b, -n:], alone[t][0], rtol=0, atol=ATOL)


def test_onevision_downsampled_grid_mixes_units_so_frames_are_keyframes():
    """OneVision's anyres_max downsampling interpolates the packed grid (tokens mix units): such frames are
    keyframes, so the clip equals the unpatched model."""
    m = tiny_llava_onevision()
    m.config.vision_aspect_ratio = "anyres_max_1"
    seq = frames("llava_onevision", 3, 3)
    sizes = torch.tensor([(32, 64)] * 3)  # base + 1×2 crops, a 4×8 grid after packing: 32 tokens > 1.1 × 16
    with torch.no_grad():
        tokens = int(m.model.get_image_features(seq[0][None], sizes[:1]).pooler_output[0].shape[0])
    assert tokens < 16 + 32  # downsampled
    clip_ids = torch.tensor([[1, 10, 11] + ([IMAGE_TOKEN] * tokens + [7]) * 3 + [40, 41]])
    clip = {"input_ids": clip_ids, "attention_mask": torch.ones_like(clip_ids),
            "pixel_values": torch.stack(seq), "image_sizes": sizes}  # fmt: skip
    expected = logits(m, clip)
    with patch_model(m, TTFConfig(keyframe_interval=3, pixel_threshold=10.0)) as patch:
        got = logits(m, clip)
        assert patch.stats.methods["ttf"]["keyframes"] == 3
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
