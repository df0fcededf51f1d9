"""TTF on Qwen2-VL / Qwen2.5-VL against hand-written references.

Tiny Qwen models: patch 14, temporal patch 2, 2×2 spatial merge. A 112×112 frame is an 8×8 patch grid = a 4×4 grid
of 16 merged LLM tokens (28×28 px each), the fusion unit. The processor's patch layout, the pixel test's block means
and Qwen2.5-VL's window order (window 56 px = 2×2 merged tokens) are written out here by hand, independently of
``vlm_accel.methods.ttf_grids``.
"""

from __future__ import annotations

import functools

import pytest
import torch

from vlm_accel import patch_model
from vlm_accel.methods.ttf import TTFConfig

from reference import masked_logits
from tiny_models import IMAGE_TOKEN, PAD, tiny_qwen2_5_vl, tiny_qwen2_vl

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
PATCH, UNIT, SIDE = 14, 28, 112
GRID = SIDE // UNIT  # merged tokens per side
TOKENS = GRID * GRID
ATOL = 1e-5


@functools.cache
def model(family: str, attn: str = "sdpa"):
    return {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl}[family](attn)


def patchify(frame: torch.Tensor) -> torch.Tensor:
    """The Qwen2-VL processor's layout of one image ``[3, H, W]``: the image repeated over the 2 temporal slots,
    patches ordered merged block by merged block (row-major), the 2×2 patches of a block row-major, each patch
    flattened as (channel, time, row, column)."""
    rows = []
    for block_r in range(frame.shape[1] // UNIT):
        for block_c in range(frame.shape[2] // UNIT):
            for i in range(2):
                for j in range(2):
                    r, c = 2 * block_r + i, 2 * block_c + j
                    patch = frame[:, r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH]
                    rows.append(torch.stack([patch, patch], dim=1).reshape(-1))
    return torch.stack(rows)


def window_order(frames: list[torch.Tensor], window: int = 2) -> torch.Tensor:
    """Qwen2.5-VL: the merged token (in token order, over the call's images) at each slot of the tower's window
    order — windows of ``window × window`` merged tokens row-major, tokens row-major inside a window."""
    order, offset = [], 0
    for frame in frames:
        rows, cols = frame.shape[1] // UNIT, frame.shape[2] // UNIT
        for wr in range(0, rows, window):
            for wc in range(0, cols, window):
                for i in range(wr, min(wr + window, rows)):
                    for j in range(wc, min(wc + window, cols)):
                        order.append(offset + i * cols + j)
        offset += rows * cols
    return torch.tensor(order)


def prompt(frames: list[torch.Tensor], prefix: int, suffix: int = 4) -> list[int]:
    ids = [1] + list(range(10, 10 + prefix - 1))
    for frame in frames:
        ids += [IMAGE_TOKEN] * ((frame.shape[1] // UNIT) * (frame.shape[2] // UNIT)) + [7]
    return ids + list(range(40, 40 + suffix))


def batch(rows: list[list[torch.Tensor]], prefixes: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Left-padded inputs; each row is a list of frames ``[3, H, W]`` (one: stream mode; several: a clip)."""
    prefixes = prefixes or [3] * len(rows)
    ids = [prompt(frames, prefix) for frames, prefix in zip(rows, prefixes)]
    width = max(map(len, ids))
    input_ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(ids):
        input_ids[b, width - len(row) :] = torch.tensor(row)
        mask[b, width - len(row) :] = 1
    images = [f for frames in rows for f in frames]
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "mm_token_type_ids": (input_ids == IMAGE_TOKEN).int(),
        "pixel_values": torch.cat([patchify(f) for f in images]),
        "image_grid_thw": torch.tensor([[1, f.shape[1] // PATCH, f.shape[2] // PATCH] for f in images]),
    }


def frames(
    seed: int,
    count: int,
    changed: tuple[int, ...] = (0, 5),
    jitter: float = 0.01,
    size: tuple[int, int] = (SIDE, SIDE),
) -> list[torch.Tensor]:
    """Frame 0 random; each next one = the previous + small noise everywhere (below the threshold) + a large change
    on the merged tokens ``changed``, so fresh and cached tokens differ everywhere."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(3, *size, generator=g)]
    cols = size[1] // UNIT
    for _ in range(count - 1):
        nxt = out[-1] + jitter * torch.rand(3, *size, generator=g)
        for u in changed:
            r, c = divmod(u, cols)
            nxt[:, r * UNIT : (r + 1) * UNIT, c * UNIT : (c + 1) * UNIT] += 1.0
        out.append(nxt)
    return out


def ref_gray(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]


def ref_unit_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (ref_gray(b) - ref_gray(a)).abs()
    rows, cols = a.shape[1] // UNIT, a.shape[2] // UNIT
    return torch.tensor([float(d[r * UNIT : (r + 1) * UNIT, c * UNIT : (c + 1) * UNIT].mean())
                         for r in range(rows) for c in range(cols)])  # fmt: skip


def ref_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))[:k]
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[order] = True
    return mask


def to_tokens(merger_input: torch.Tensor, family: str, images: list[torch.Tensor]) -> torch.Tensor:
    """The merger's input ``[patches, d]`` as ``[merged tokens, 4, d]`` in token order."""
    units = merger_input.reshape(-1, 4, merger_input.shape[-1])
    if family == "qwen2_vl":
        return units
    tokens = torch.empty_like(units)
    tokens[window_order(images)] = units
    return tokens


def from_tokens(tokens: torch.Tensor, family: str, images: list[torch.Tensor]) -> torch.Tensor:
    units = tokens if family == "qwen2_vl" else tokens[window_order(images)]
    return units.reshape(-1, units.shape[-1])


def run(m, inputs: dict, family: str, images, replace: torch.Tensor | None = None, attentions: bool = False):
    """An unpatched forward: the merger's input in token order (optionally replaced by ``replace`` in token order),
    and the output."""
    seen = {}

    def hook(module, args):
        seen["tokens"] = to_tokens(args[0].detach().clone(), family, images)
        if replace is not None:
            return (from_tokens(replace, family, images).to(args[0].dtype),)

    handle = m.model.visual.merger.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            out = m(**inputs, output_attentions=attentions)
    finally:
        handle.remove()
    return seen["tokens"], out


def capture_merger(m, family: str, per_call_images: list[list[torch.Tensor]]):
    """A hook recording the merger's input of each call, in token order."""
    captured: list[torch.Tensor] = []

    def hook(module, args):
        captured.append(to_tokens(args[0].detach().clone(), family, per_call_images[len(captured)]))

    return captured, m.model.visual.merger.register_forward_pre_hook(hook)


def logits(m, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return m(**inputs).logits


def ref_relevance(attn_maps, layer: int, input_ids: torch.Tensor) -> torch.Tensor:
    """Head mean, mean over the text rows after the image, at the visual columns (the released code's rule)."""
    ids = input_ids[0]
    visual = (ids == IMAGE_TOKEN).nonzero().flatten()
    rows = torch.arange(int(visual.max()) + 1, len(ids))
    return attn_maps[layer][0].mean(0)[rows][:, visual].mean(0)


def where(recompute: torch.Tensor, fresh: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    return torch.where(recompute[:, None, None], fresh, cached)


@pytest.mark.parametrize("family", FAMILIES)
def test_pixel_test_units_are_merged_tokens(family):
    """The grid's per-token difference equals the 28×28 block means of |ΔY| on the frames themselves."""
    from vlm_accel.methods.ttf_grids import frame_grid

    m = model(family)
    grid = frame_grid(m)
    a, b = frames(3, 2, size=(56, 112))
    layout = grid.images(batch([[a, b]]), runs=[])
    assert [image.units for image in layout] == [8, 8]
    gray = [image.gray for image in layout]
    torch.testing.assert_close(grid.difference(gray[0], gray[1]), ref_unit_diff(a, b), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_stream_fusion_matches_hand_written_reference(family):
    """Three frames, keyframe at t=0: the recomputed sets and fused pre-merger features (whole 2×2 patch blocks) of
    t=1 and t=2 equal the paper's rule computed by hand on merged tokens, and so do the logits."""
    m, eager = model(family), model(family, "eager")
    tau, k, layer = 0.05, 3, 2
    seq = frames(11, 3)
    inputs = [batch([[f]]) for f in seq]
    fresh = [run(m, x, family, [f])[0] for x, f in zip(inputs, seq)]
    _, out0 = run(eager, inputs[0], family, seq[:1], attentions=True)
    rel0 = ref_relevance(out0.attentions, layer, inputs[0]["input_ids"])
    recompute1 = (ref_unit_diff(seq[0], seq[1]) > tau) | ref_top_k(rel0, k)
    fused1 = where(recompute1, fresh[1], fresh[0])
    _, out1 = run(eager, inputs[1], family, seq[1:2], replace=fused1, attentions=True)
    rel1 = ref_relevance(out1.attentions, layer, inputs[1]["input_ids"])
    recompute2 = (ref_unit_diff(seq[1], seq[2]) > tau) | ref_top_k(rel1, k)
    fused2 = where(recompute2, fresh[2], fused1)
    expected = [logits(m, inputs[0]), run(m, inputs[1], family, seq[1:2], fused1)[1].logits,
                run(m, inputs[2], family, seq[2:], fused2)[1].logits]  # fmt: skip
    assert 0 < int(recompute1.sum()) < TOKENS and 0 < int(recompute2.sum()) < TOKENS

    patch = patch_model(m, TTFConfig(keyframe_interval=3, pixel_threshold=tau, top_k=k, attention_layer=0.5))
    captured, handle = capture_merger(m, family, [[f] for f in seq])
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
    assert patch.stats.methods["ttf"]["reused"] == 2 * TOKENS - int(recompute1.sum()) - int(recompute2.sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_clip_fusion_matches_reference_pixel_test_only(family):
    """Clip mode, a padded batch of two clips of different frame sizes: frame j fuses with frame j−1 of its row.
    (A 2×6 merged grid makes Qwen2.5-VL's window order a permutation that is not its own inverse.)"""
    m = model(family)
    tau = 0.05
    clips = [frames(5, 3), frames(6, 2, changed=(1,), size=(56, 168))]
    images = [f for clip in clips for f in clip]
    inputs = batch(clips, [3, 6])
    fresh = run(m, inputs, family, images)[0]
    starts = [0, 16, 32, 48, 60, 72]  # token offsets of the five images (16, 16, 16, 12, 12 tokens)
    per_image = [fresh[starts[i] : starts[i + 1]] for i in range(5)]
    expected = []
    for first, clip in ((0, clips[0]), (3, clips[1])):
        expected.append(per_image[first])
        for j in range(1, len(clip)):
            recompute = ref_unit_diff(clip[j - 1], clip[j]) > tau
            assert 0 < int(recompute.sum()) < len(recompute)
            expected.append(where(recompute, per_image[first + j], expected[-1]))
    expected = torch.cat(expected)
    reference = run(m, inputs, family, images, replace=expected)[1].logits
    with patch_model(m, TTFConfig(keyframe_interval=3, pixel_threshold=tau)):
        captured, handle = capture_merger(m, family, [images])  # after ttf's hook: sees the fused input
        try:
            got = logits(m, inputs)
        finally:
            handle.remove()
    torch.testing.assert_close(captured[0], expected, rtol=0, atol=0)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], reference[valid], rtol=0, atol=ATOL)


def tower_images(m) -> tuple[list[int], object]:
    """A hook recording how many images each vision-tower call encodes."""
    sizes: list[int] = []
    handle = m.model.visual.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(int((kwargs.get("grid_thw", args[1] if len(args) > 1 else None)).shape[0])),
        with_kwargs=True,
    )  # fmt: skip
    return sizes, handle


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("clip_keep", ["reused", "latest"])
def test_save_compute_clip_drops_reused_tokens_at_their_mrope_positions(family, clip_keep):
    """A clip whose third frame repeats the second: frame 2 never reaches the tower, one copy of every reused token
    leaves the LLM from layer 1 on, and the logits equal the reference — the eager model on the full sequence with
    its own 3-D M-RoPE positions, fused features, and the dropped copies hidden from layer 1."""
    m, eager = model(family), model(family, "eager")
    tau = 0.05
    seq = frames(41, 2, changed=(2,), jitter=0.0)
    seq.append(seq[1].clone())
    inputs = batch([seq])
    fresh = run(m, inputs, family, seq)[0]
    r1 = ref_unit_diff(seq[0], seq[1]) > tau
    assert int(r1.sum()) == 1
    f1 = where(r1, fresh[TOKENS : 2 * TOKENS], fresh[:TOKENS])
    features = torch.cat([fresh[:TOKENS], f1, f1])
    none, every = torch.zeros(TOKENS, dtype=torch.bool), torch.ones(TOKENS, dtype=torch.bool)
    reused = torch.cat([none, ~r1, every]) if clip_keep == "reused" else torch.cat([~r1, every, none])
    keep = torch.ones_like(inputs["input_ids"], dtype=torch.bool)
    keep[0, (inputs["input_ids"][0] == IMAGE_TOKEN).nonzero().flatten()[reused]] = False
    handle = eager.model.visual.merger.register_forward_pre_hook(
        lambda module, args: (from_tokens(features, family, seq).to(args[0].dtype),)
    )
    try:
        expected = masked_logits(eager, inputs, [(1, keep)])
    finally:
        handle.remove()
    sizes, tower = tower_images(m)
    try:
        config = TTFConfig(keyframe_interval=3, pixel_threshold=tau, save_compute=True, clip_keep=clip_keep)
        with patch_model(m, config) as patch:
            got = logits(m, inputs)
            stats = patch.stats
    finally:
        tower.remove()
    assert sizes == [2]  # frames 0 and 1 encoded, frame 2 skipped
    assert stats.methods["ttf"]["images_skipped"] == 1
    assert stats.tokens_per_layer[1] == inputs["input_ids"].shape[1] - int(reused.sum())
    torch.testing.assert_close(got[keep], expected[keep], rtol=0, atol=ATOL)
    assert "get_image_features" not in m.model.__dict__


@pytest.mark.parametrize("family", FAMILIES)
def test_save_compute_stream_skips_the_tower_and_equals_plain_ttf(family):
    """Pixel test only (top_k=0): a frame with nothing changed skips the tower and the merger; same logits."""
    m = model(family)
    seq = frames(51, 2, changed=(1,), jitter=0.0)
    seq.append(seq[1].clone())
    results = {}
    for save in (False, True):
        sizes, tower = tower_images(m)
        try:
            config = TTFConfig(keyframe_interval=3, pixel_threshold=0.05, top_k=0, save_compute=save)
            with patch_model(m, config) as patch, patch.stream():
                results[save] = ([logits(m, batch([[f]])) for f in seq], list(sizes))
        finally:
            tower.remove()
    assert results[False][1] == [1, 1, 1] and results[True][1] == [1, 1]
    for a, b in zip(results[True][0], results[False][0]):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_of_streams_equals_each_stream_alone(family):
    """Two streams of different frame sizes (16 and 12 merged tokens) in one left-padded batch."""
    m = model(family)
    streams = [frames(21, 3), frames(22, 3, changed=(3,), size=(56, 168))]
    config = TTFConfig(keyframe_interval=3, pixel_threshold=0.05, top_k=4, attention_layer=0.25)
    with patch_model(m, config) as patch, patch.stream():
        together = [logits(m, batch([s[t : t + 1] for s in streams], [3, 7])) for t in range(3)]
        reused = patch.stats.methods["ttf"]["reused"]
    assert reused > 0
    for b, (stream, prefix) in enumerate(zip(streams, [3, 7])):
        with patch_model(m, config) as patch, patch.stream():
            alone = [logits(m, batch([stream[t : t + 1]], [prefix])) for t in range(3)]
        for t in range(3):
            n = alone[t].shape[1]
            torch.testing.assert_close(together[t][b, -n:], alone[t][0], rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_fuses_inside_the_prefill(family):
    """generate() with save_compute on a clip: its first step equals the patched forward's last logits."""
    m = model(family)
    inputs = batch([frames(81, 3, changed=(4,))])
    config = TTFConfig(keyframe_interval=3, pixel_threshold=0.05, save_compute=True)
    with patch_model(m, config) as patch:
        forward = logits(m, inputs)[:, -1]
        dropped = patch.stats.methods["ttf"]["dropped"]
        with torch.no_grad():
            out = m.generate(**inputs, max_new_tokens=2, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)  # fmt: skip
        assert patch.stats.methods["ttf"]["dropped"] == 2 * dropped > 0
    torch.testing.assert_close(out.logits[0], forward, rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_video_input_is_refused_with_fusion(family):
    m = model(family)
    inputs = batch([frames(91, 2)])
    inputs["pixel_values_videos"] = inputs["pixel_values"]
    inputs["video_grid_thw"] = inputs["image_grid_thw"]
    with patch_model(m, "ttf"), pytest.raises(ValueError, match="video"):
        logits(m, inputs)
