"""Plots: the speed plot of ``vlm-accel bench`` and the accuracy-vs-speed Pareto plot of ``vlm-accel compare``.

matplotlib with the non-interactive Agg backend; both functions write a file (format from the suffix) and return
its path.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def speed_plot(result: dict[str, Any], path: str | Path) -> Path:
    """Grouped bars per batch size: measured prefill and end-to-end speedup of each arm over unpatched, with the
    FLOPs-ideal prefill speedup as a marker, and the KV-cache fraction. An analytic result (no timings) plots the
    FLOPs-ideal speedup and KV fraction only."""
    rows = [r for r in result.get("rows", []) if r.get("arm") != "unpatched"]
    if not rows:
        raise ValueError("speed_plot needs at least one patched arm in result['rows']")
    measured = all(r.get("prefill_speedup") is not None for r in rows)
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    by_key = {(r["arm"], r["batch"]): r for r in rows}
    panels = [("prefill_speedup", "prefill (TTFT) speedup ×"), ("e2e_speedup", "end-to-end speedup ×")] if measured \
        else [("flops_ideal_speedup", "FLOPs-ideal prefill speedup ×")]  # fmt: skip
    panels.append(("kv_fraction", "KV cache vs unpatched"))
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2 + 0.25 * math.ceil((len(arms) + 1) / 4)), squeeze=False)
    width = 0.8 / len(arms)
    for ax, (key, label) in zip(axes[0], panels):
        for i, arm in enumerate(arms):
            xs = [b + (i - (len(arms) - 1) / 2) * width for b in range(len(batches))]
            values = [by_key.get((arm, b), {}).get(key) or 0.0 for b in batches]
            ax.bar(xs, values, width, label=arm)
            if key == "prefill_speedup":
                ideal = [by_key.get((arm, b), {}).get("flops_ideal_speedup") or 0.0 for b in batches]
                ax.scatter(xs, ideal, marker="_", s=300, color="black", linewidths=2, zorder=3,
                           label="FLOPs ideal" if i == 0 else None)  # fmt: skip
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_title(label)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(4, len(labels)), frameon=False)
    meta = result.get("meta", {})
    settings = meta.get("settings", {})
    fig.suptitle(
        f"{settings.get('model', '?')} · {settings.get('device', '?')} ({meta.get('device_name', '')}) · "
        f"{settings.get('dtype', '')} · {settings.get('attn', '')}",
        fontsize=9,
    )
    rows_of_legend = math.ceil((len(arms) + 1) / 4)
    fig.tight_layout(rect=(0, 0.06 * rows_of_legend, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (higher x and higher y are better)."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def pareto_plot(
    rows: Sequence[dict[str, Any]],
    path: str | Path,
    x: str = "speedup",
    y: str = "accuracy",
    series: str = "method",
    title: str | None = None,
    x_range: str | None = None,
    y_err: str | None = None,
) -> Path:
    """Accuracy vs speed (or keep ratio), one series per method, with the overall Pareto front dashed.

    ``rows``: dicts with at least ``rows[i][x]``, ``rows[i][y]`` and ``rows[i][series]`` (e.g. ``{"method":
    "fastv", "keep_ratio": 0.25, "speedup": 1.8, "accuracy": 0.71}``). Optional per row: ``label`` annotates the
    point (e.g. its keep ratio); ``rows[i][x_range]`` = ``(low, high)`` and ``rows[i][y_err]`` (a half-width) draw
    error bars. Each series' line joins its points in x order. The front joins the points no other point beats on
    both axes (medians; the error bars show which of its points are within noise of the others).
    For ``x="keep_ratio"`` the axis is reversed (less kept = further right), so up-and-right is better either way.
    """
    if not rows:
        raise ValueError("pareto_plot needs at least one row")
    for i, row in enumerate(rows):
        missing = [k for k in (x, y, series) if row.get(k) is None]
        if missing:
            raise ValueError(f"pareto_plot row {i} lacks {missing}: {row}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.0, 5.6))
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[str(row[series])].append(row)
    palette = plt.get_cmap("tab20" if len(groups) > 10 else "tab10")  # one distinct colour per series
    for index, (name, items) in enumerate(groups.items()):
        items = sorted(items, key=lambda r: float(r[x]))
        xs, ys = [float(r[x]) for r in items], [float(r[y]) for r in items]
        xerr = None
        if x_range and all(r.get(x_range) for r in items):
            xerr = [[max(0.0, v - float(r[x_range][0])) for v, r in zip(xs, items)],
                    [max(0.0, float(r[x_range][1]) - v) for v, r in zip(xs, items)]]  # fmt: skip
        yerr = [float(r[y_err]) for r in items] if y_err and all(r.get(y_err) is not None for r in items) else None
        line = ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", markersize=4, capsize=2, elinewidth=0.8,
                           label=name, color=palette(index % palette.N))  # fmt: skip
        color = line[0].get_color()
        for r, px, py in zip(items, xs, ys):
            if r.get("label"):
                ax.annotate(str(r["label"]), (px, py), fontsize=6.5, xytext=(4, 3), textcoords="offset points",
                            color=color)  # fmt: skip
    sign = -1.0 if x == "keep_ratio" else 1.0
    points = [(sign * float(r[x]), float(r[y])) for r in rows]
    front = pareto_front(points)
    ax.plot([sign * points[i][0] for i in front], [points[i][1] for i in front], linestyle="--", color="black",
            linewidth=0.8, label="Pareto front")  # fmt: skip
    if x == "keep_ratio":
        ax.invert_xaxis()
    ax.set_xlabel(x.replace("_", " ").replace("speedup", "speed-up (×, > 1 faster)"))
    ax.set_ylabel(y.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
