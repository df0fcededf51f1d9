"""``vlm-accel compare``: every registered method on the testbed, accuracy × speed in one run.

For the unpatched model and each method setting (token-selection methods at several keep ratios, the others at
their example config) it measures per-family accuracy through ``model.generate`` (the testbed's standard chat
flow), the exist-family F1 and the hallucination yes-rate on absent co-occurring objects, the share of visual tokens kept,
the prefill time (one forward as ``generate()`` runs it: vision tower + LM, logits for the last position only) and
the time per decode step, as ratios to the unpatched model measured in the same run (interleaved). Prints a rich
table, writes JSON and a Pareto plot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlm_accel.api import patch_model
from vlm_accel.config import MethodConfig
from vlm_accel.errors import MethodNotApplicable
from vlm_accel.registry import get_method_class, list_methods

DEFAULT_KEEP_RATIOS = (0.5, 0.25, 0.1)


@dataclass
class CompareSettings:
    model: str = "testbed-l"
    n: int = 200
    seed: int = 20261124
    methods: tuple[str, ...] = ()
    keep_ratios: tuple[float, ...] = DEFAULT_KEEP_RATIOS
    batch_size: int = 16
    timing_repeats: int = 5
    out_dir: Path = field(default_factory=lambda: Path("outputs/compare"))
    device: str = "cpu"


def _default_methods() -> tuple[str, ...]:
    """Every registered method (one that cannot act on the model says so with ``MethodNotApplicable``)."""
    return tuple(list_methods())


DECODE_TOKENS = 8


def _timed(fn) -> float:
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _prefill_and_decode(model, inputs: dict) -> tuple[float, float]:
    """Prefill time (one forward, last-position logits, as generate() runs it) and time per decode step
    (an ``DECODE_TOKENS``-token greedy generate minus its prefill, over the remaining steps)."""
    prefill = _timed(lambda: model(**inputs, logits_to_keep=1))
    generate = _timed(lambda: model.generate(**inputs, do_sample=False, max_new_tokens=DECODE_TOKENS,
                                             min_new_tokens=DECODE_TOKENS))  # fmt: skip
    return prefill, max(0.0, generate - prefill) / (DECODE_TOKENS - 1)


def interleaved_timings(
    model, inputs: dict, configs: list[MethodConfig | None], rounds: int
) -> list[tuple[float, float]]:
    """Median (prefill seconds, seconds per decode step) of each setting.

    Settings are timed round-robin — every round patches, times and unpatches each one in turn after a warm-up
    round — so drift in machine load hits every setting alike and the ratios stay honest on a shared machine.
    """
    times: list[list[tuple[float, float]]] = [[] for _ in configs]
    with torch.no_grad():
        for round_index in range(rounds + 1):
            for i, config in enumerate(configs):
                if config is None:
                    elapsed = _prefill_and_decode(model, inputs)
                else:
                    with patch_model(model, config):
                        elapsed = _prefill_and_decode(model, inputs)
                if round_index:  # round 0 is the warm-up
                    times[i].append(elapsed)
    return [(statistics.median(p for p, _ in t), statistics.median(d for _, d in t)) for t in times]


def timing_batch(processor, dataset, batch_size: int, device: str) -> dict:
    from vlm_accel.testbed.evaluate import build_messages

    rows = [dataset[i] for i in range(min(batch_size, len(dataset)))]
    texts = [processor.apply_chat_template(build_messages(r["question"]), add_generation_prompt=True) for r in rows]
    images = [r["image"].convert("RGB") for r in rows]
    return processor(images=images, text=texts, padding=True, return_tensors="pt").to(device)


def _row(
    label: str, config: MethodConfig | None, result, timing: tuple[float, float], keep_fraction: float
) -> dict[str, Any]:
    params = config.to_dict() if config is not None else {"method": "none"}
    return {
        "method": params["method"],
        "label": label,
        "config": params,
        "keep_ratio": params.get("keep_ratio") or keep_fraction,  # e.g. pool: the measured share
        "accuracy": result.mean,
        "per_family": result.accuracy,
        "yes_rate_absent_cooccur": result.yes_rate_absent_cooccur,
        "yes_rate_absent": result.yes_rate_absent,
        "exist_f1": result.exist_f1,
        "visual_kept": keep_fraction,
        "prefill_s": timing[0],
        "decode_step_s": timing[1],
    }


def run_compare(settings: CompareSettings, progress: bool = True) -> dict[str, Any]:
    from rich.progress import Progress

    from vlm_accel.testbed import load_model, make_dataset

    model, processor = load_model(settings.model, device=settings.device)
    dataset = make_dataset(settings.n, seed=settings.seed, split="test")
    timing_inputs = timing_batch(processor, dataset, settings.batch_size, settings.device)
    plans: list[tuple[str, MethodConfig | None]] = [("unpatched", None)]
    skipped: dict[str, str] = {}
    for name in settings.methods or _default_methods():
        try:
            configs = get_method_class(name).sweep_configs(settings.keep_ratios)
            with patch_model(model, configs[0]):
                pass  # binding raises MethodNotApplicable for a method that cannot act on this model
        except MethodNotApplicable as err:
            skipped[name] = str(err)
            continue
        plans.extend((config.label(), config) for config in configs)
    from vlm_accel.testbed import evaluate

    timings = interleaved_timings(model, timing_inputs, [c for _, c in plans], settings.timing_repeats)
    rows = []
    with Progress(disable=not progress) as bar:
        task = bar.add_task("compare", total=len(plans))
        for (label, config), timing in zip(plans, timings):
            bar.update(task, description=f"{label} {getattr(config, 'keep_ratio', '') or ''}")
            if config is None:
                result = evaluate(model, processor, dataset, batch_size=settings.batch_size)
                keep_fraction = 1.0
            else:
                with patch_model(model, config) as patch:
                    result = evaluate(model, processor, dataset, batch_size=settings.batch_size)
                    keep_fraction = patch.stats.visual_keep_fraction
            rows.append(_row(label, config, result, timing, keep_fraction))
            bar.advance(task)
    base = rows[0]
    for row in rows:
        row["prefill_speedup"] = base["prefill_s"] / row["prefill_s"]
        row["decode_step_ratio"] = row["decode_step_s"] / base["decode_step_s"] if base["decode_step_s"] else None
        row["retained"] = row["accuracy"] / base["accuracy"] if base["accuracy"] else None
    return {
        "model": settings.model,
        "n": settings.n,
        "seed": settings.seed,
        "batch_size": settings.batch_size,
        "device": settings.device,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
        "skipped": skipped,
    }


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    families = list(result["rows"][0]["per_family"])
    table = Table(title=f"vlm-accel compare — {result['model']}, n={result['n']}, seed={result['seed']}")
    columns = ["method", "keep", "kept", *families, "mean", "retained", "exist F1", "yes@absent-co", "prefill",
               "decode step"]  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in result["rows"]:
        yes, f1, decode = row["yes_rate_absent_cooccur"], row["exist_f1"], row["decode_step_ratio"]
        table.add_row(
            row["label"], f"{row['keep_ratio']:.2f}", f"{row['visual_kept']:.1%}",
            *(f"{row['per_family'][f]:.3f}" for f in families), f"{row['accuracy']:.3f}",
            f"{row['retained']:.1%}" if row["retained"] is not None else "-", "-" if f1 is None else f"{f1:.3f}",
            "-" if yes is None else f"{yes:.3f}", f"{row['prefill_speedup']:.2f}x",
            "-" if decode is None else f"{decode:.2f}x",
        )  # fmt: skip
    console = Console(width=max(Console().width, 150))
    console.print(table)
    for name, reason in result.get("skipped", {}).items():
        console.print(f"skipped {name}: {reason}")
    console.print(
        "kept: share of visual tokens kept; yes@absent-co: yes-rate on absent co-occurring objects "
        f"(hallucination); prefill: speedup over unpatched; decode step: time per decode step relative to unpatched (overhead > 1); medians of interleaved runs on one batch of {result['batch_size']} on "
        f"{result['device']} ({result['torch_threads']} threads), measured side by side in this run"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare", help="run every method on the testbed: accuracy x speed table and Pareto plot",
        description=__doc__,
    )
    parser.add_argument("--model", default="testbed-l", help="testbed name or a directory of a trained testbed model")
    parser.add_argument("--n", type=int, default=200, help="number of test questions (default 200)")
    parser.add_argument("--seed", type=int, default=CompareSettings.seed, help="dataset seed (never used in training)")
    parser.add_argument("--methods", default="", help="comma-separated method names (default: every registered one)")
    parser.add_argument("--keep", default=",".join(map(str, DEFAULT_KEEP_RATIOS)), help="keep ratios to sweep")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("outputs/compare"), help="directory for JSON and plot")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise ValueError(f"--n must be positive, got {args.n}")
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = tuple(m for m in args.methods.split(",") if m)
    for name in methods:
        get_method_class(name)  # clear error for unknown names before any work
    keep = tuple(float(k) for k in args.keep.split(",") if k)
    settings = CompareSettings(model=args.model, n=args.n, seed=args.seed, methods=methods, keep_ratios=keep,
                               batch_size=args.batch_size, out_dir=args.out, device=args.device)  # fmt: skip
    result = run_compare(settings)
    print_table(result)
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    (settings.out_dir / "compare.json").write_text(json.dumps(result, indent=2))
    from vlm_accel.eval.plots import pareto_plot

    # one series per setting family (e.g. sgl and sgl+exit apart); no per-point annotations
    points = [{"series": row["label"], "prefill_speedup": row["prefill_speedup"], "accuracy": row["accuracy"]}
              for row in result["rows"]]  # fmt: skip
    plot = pareto_plot(points, settings.out_dir / "pareto.png", x="prefill_speedup", y="accuracy", series="series",
                       title=f"{result['model']}: accuracy vs prefill speedup")  # fmt: skip
    print(f"wrote {settings.out_dir / 'compare.json'} and {plot}")
    return 0
