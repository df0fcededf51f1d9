"""The demo's pictures: kept visual tokens, early exit and attention to image patches drawn on the image the model
saw, and small plots of the per-layer visual-token count and the speed/memory figures (matplotlib, Agg)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from vlm_accel.demo.runner import ArmResult, DemoResult  # noqa: E402

PANEL = 256  # pixels per image panel
BASE_COLOR, PATCHED_COLOR = "#7f7f7f", "#d62728"


def _figure_image(fig) -> Image.Image:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def kept_panel(image: Image.Image, kept: np.ndarray, grid: int) -> Image.Image:
    """``image`` with dropped patches darkened and kept ones outlined."""
    base = image.convert("RGB").resize((PANEL, PANEL))
    cell = PANEL / grid
    shade = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    for index, keep in enumerate(kept.tolist()):
        row, col = divmod(index, grid)
        box = (col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1)
        if keep:
            draw.rectangle(box, outline=(255, 215, 0, 230), width=1)
        else:
            draw.rectangle(box, fill=(10, 10, 30, 190))
    return Image.alpha_composite(base.convert("RGBA"), shade).convert("RGB")


def token_overlay(result: DemoResult) -> Image.Image | None:
    """Kept tokens of each stage (pruning, exit), or None when the patched run dropped nothing."""
    grid, patched = result.grid, result.patched
    exited = _sgl_exit(patched)
    if exited is not None:
        return _titled([_dim(result.seen_image)], [exited], result.label)
    if not patched.stages or grid is None:
        return None
    panels, titles = [], []
    for layer, kept in patched.stages:
        panels.append(kept_panel(result.seen_image, kept, grid))
        count = int(kept.sum())
        titles.append(f"layer {layer}+: {count}/{kept.size} kept" if count else f"layer {layer}+: visual tokens exit")
    return _titled(panels, titles, f"{result.label}: visual tokens the patched model keeps")


def _sgl_exit(arm: ArmResult) -> str | None:
    sgl = arm.method_stats.get("sgl", {})
    if any(sgl.get("last_exited", [])):
        return "early exit: the guide answered, the large model did not run"
    return None


def _dim(image: Image.Image) -> Image.Image:
    base = image.convert("RGB").resize((PANEL, PANEL))
    return Image.blend(base, Image.new("RGB", base.size, (10, 10, 30)), 0.6)


def _titled(panels: list[Image.Image], titles: list[str], heading: str) -> Image.Image:
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, panel, title in zip(axes[0], panels, titles):
        ax.imshow(panel)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.suptitle(heading, fontsize=11)
    return _figure_image(fig)


def attention_overlay(result: DemoResult) -> Image.Image | None:
    """The last prompt token's attention over image patches, unpatched vs patched on one (square-root) colour
    scale, and the change (patched − unpatched) on a diverging scale."""
    from matplotlib.colors import PowerNorm, TwoSlopeNorm

    base, patched, grid = result.base.attention, result.patched.attention, result.grid
    if base is None or patched is None or grid is None:
        return None
    image = np.asarray(result.seen_image.convert("RGB").resize((PANEL, PANEL)))
    vmax = float(max(base.max(), patched.max())) or 1.0
    change = patched - base
    span = float(np.abs(change).max()) or 1.0
    fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.8))
    extent = (0, PANEL, PANEL, 0)
    for ax, values, name in ((axes[0], base, "unpatched"), (axes[1], patched, result.label)):
        ax.imshow(image)
        ax.imshow(values.reshape(grid, grid), cmap="inferno", alpha=0.65, norm=PowerNorm(0.5, 0, vmax), extent=extent,
                  interpolation="nearest")  # fmt: skip
        ax.set_title(f"{name}: {values.sum():.0%} on the image", fontsize=9)
    axes[2].imshow(image)
    axes[2].imshow(change.reshape(grid, grid), cmap="RdBu_r", alpha=0.75, extent=extent, interpolation="nearest",
                   norm=TwoSlopeNorm(0.0, -span, span))  # fmt: skip
    axes[2].set_title("change (red: more, blue: less)", fontsize=9)
    for ax in axes:
        ax.axis("off")
    layers = result.patched.attention_layers
    fig.suptitle(f"attention of the last prompt token to image patches (layers {_span(layers)}, head mean)",
                 fontsize=10)  # fmt: skip
    return _figure_image(fig)


def _span(layers: list[int]) -> str:
    if not layers:
        return "-"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}–{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ", ".join(map(str, layers))


def overlay(result: DemoResult) -> Image.Image:
    """The main picture: kept tokens and/or attention before/after, stacked; the seen image if neither applies."""
    parts = [p for p in (token_overlay(result), attention_overlay(result)) if p is not None]
    if not parts:
        exits = any(k.startswith("last_exit") for stats in result.patched.method_stats.values() for k in stats)
        title = f"all {result.n_visual} visual tokens kept in every layer" + (" (no early exit)" if exits else "")
        return _titled([result.seen_image.resize((PANEL, PANEL))], [title], result.label)
    if len(parts) == 1:
        return parts[0]
    width = max(p.width for p in parts)
    canvas = Image.new("RGB", (width, sum(p.height for p in parts)), "white")
    top = 0
    for part in parts:
        canvas.paste(part, ((width - part.width) // 2, top))
        top += part.height
    return canvas


def layers_plot(result: DemoResult) -> Image.Image:
    """Visual tokens present at each decoder layer, unpatched vs patched."""
    fig, ax = plt.subplots(figsize=(4.6, 2.8))
    layers = np.arange(len(result.base.visual_per_layer))
    ax.step(layers, result.base.visual_per_layer, where="mid", color=BASE_COLOR, label="unpatched", linewidth=2)
    patched = [0] * len(layers) if _sgl_exit(result.patched) else result.patched.visual_per_layer
    ax.step(layers, patched, where="mid", color=PATCHED_COLOR, label=result.label, linewidth=2)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("visual tokens")
    ax.set_ylim(0, max(result.base.visual_per_layer + [1]) * 1.08)
    ax.set_xticks(layers)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("visual tokens per layer (prefill)", fontsize=10)
    ax.grid(alpha=0.3)
    return _figure_image(fig)


def speed_plot(result: DemoResult) -> Image.Image:
    """Prefill, end to end, tokens/s and KV (and peak memory where measured) as paired bars."""
    base, patched = result.base, result.patched
    panels = [("prefill (ms)", base.prefill_s * 1e3, patched.prefill_s * 1e3),
              ("end to end (ms)", base.total_s * 1e3, patched.total_s * 1e3),
              ("tokens / s", base.tokens_per_s, patched.tokens_per_s)]  # fmt: skip
    if base.kv_bytes is not None and patched.kv_bytes is not None:
        panels.append(("KV cache (KiB)", base.kv_bytes / 1024, patched.kv_bytes / 1024))
    if base.peak_mem_bytes is not None and patched.peak_mem_bytes is not None:
        panels.append(("peak memory (MiB)", base.peak_mem_bytes / 2**20, patched.peak_mem_bytes / 2**20))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.0 * len(panels), 2.4))
    for ax, (title, b, p) in zip(np.atleast_1d(axes), panels):
        bars = ax.bar([0, 1], [b, p], color=[BASE_COLOR, PATCHED_COLOR], width=0.6)
        ax.bar_label(bars, labels=[f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}" for v in (b, p)], fontsize=7)
        ax.set_xticks([0, 1], ["unpatched", "patched"], fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.margins(y=0.2)
    runs = "one run" if result.repeats == 1 else f"median of {result.repeats} interleaved runs"
    fig.suptitle(f"{runs} per arm on {result.device} (wall clock)", fontsize=9)
    fig.tight_layout()
    return _figure_image(fig)
