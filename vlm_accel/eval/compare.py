"""``vlm-accel compare``: every registered method on the testbed, accuracy × speed in one run.

For the unpatched model and each method setting (the method's ``sweep_configs``: token-selection methods at
several keep ratios, the others at their example config; a method that cannot act on the model is skipped with its
``MethodNotApplicable`` reason) it measures per-family accuracy through ``model.generate`` (the testbed's standard
chat flow) with a 95 % interval, the exist-family F1, the hallucination yes-rate on absent co-occurring objects and
the share of visual tokens kept. Then it times every setting on one batch, interleaved round by round:

- prefill: time to first token inside ``generate()`` (vision tower + LM prompt pass, and whatever a method runs
  before it, e.g. SGL's guide generation);
- decode: one decode step, timed directly inside the same ``generate()`` (:class:`~vlm_accel.eval.bench.StepClock`);

both as speed-ups over the unpatched model of the same round (> 1: faster), median and min–max over the rounds;
the unpatched model runs again after every few settings and each run is compared with the unpatched runs right
around it (:mod:`vlm_accel.eval.timing`, the schedule ``vlm-accel bench`` uses too). On CPU the clock is this
process's CPU time on one thread, which other processes move much less than wall time.
Prints a rich table, writes JSON and a Pareto plot. Defaults fit a first run (n=60, 3 rounds, under 3 min on one
free core); ``--full`` is the README table's run (n=200, 5 rounds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlm_accel.config import MethodConfig
from vlm_accel.eval.bench import StepClock, paired_speedups, time_generate
from vlm_accel.eval.timing import REFERENCE_EVERY

DEFAULT_KEEP_RATIOS = (0.5, 0.25, 0.1)
DECODE_TOKENS = 16  # one prefill + 15 directly timed decode steps (cheap next to the prefill) per generate()
QUICK = {"n": 60, "rounds": 3}  # 1 min 54 s wall with 23 settings, the other core busy (2026-12-02)
FULL = {"n": 200, "rounds": 5, "chair": 100}


@dataclass
class CompareSettings:
    model: str = "testbed-l"
    n: int = QUICK["n"]
    seed: int = 20261124
    methods: tuple[str, ...] = ()
    keep_ratios: tuple[float, ...] = DEFAULT_KEEP_RATIOS
    batch_size: int = 16
    timing_rounds: int = QUICK["rounds"]
    out_dir: Path = field(default_factory=lambda: Path("outputs/compare"))
    device: str = "cpu"
    chair_n: int = 0  # describe questions for the CHAIR phase (0: no phase; --full: FULL["chair"])
    chair_model: str = "testbed-describe"


def _default_methods() -> tuple[str, ...]:
    """Every registered method (one that cannot act on the model says so with ``MethodNotApplicable``)."""
    from vlm_accel.registry import list_methods

    return tuple(list_methods())


# ---------------------------------------------------------------------------------------------- timing


@dataclass
class SettingTimes:
    """Per-round timings of one setting: (wall, process-CPU) seconds of the prefill (TTFT) and of one decode step
    (median of the directly timed steps of that round's ``generate()``), and the matching unpatched reference of
    each round (the mean of the unpatched runs around it, :func:`vlm_accel.eval.timing.bracket_references`; for the
    unpatched setting itself, the median of its runs in the round)."""

    ttft: list[tuple[float, float]] = field(default_factory=list)
    step: list[tuple[float, float] | None] = field(default_factory=list)
    reference_ttft: list[tuple[float, float]] = field(default_factory=list)
    reference_step: list[tuple[float, float] | None] = field(default_factory=list)


def _timed_generate(model, inputs: dict, device: str) -> tuple[tuple[float, float], tuple[float, float] | None]:
    clock = StepClock(device)
    time_generate(model, inputs, device, DECODE_TOKENS, steps=clock)
    return clock.ttft, clock.median_step()


def _median_pair(values: list) -> tuple[float, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)


def interleaved_rounds(
    model,
    inputs: dict,
    configs: Sequence[MethodConfig | None],
    rounds: int,
    device: str = "cpu",
    on_run: Callable[[int, int], None] | None = None,
) -> list[SettingTimes]:
    """Time every setting once per round (patch, one ``generate()``, unpatch) after one unpatched warm-up run, in the
    order of :func:`vlm_accel.eval.timing.round_schedule` (``configs[0]`` is the reference: it runs first, after
    every few settings and last; rounds alternate direction). Ratios are then taken against each run's bracketing
    reference runs (:func:`paired_speedups` over the rounds). ``on_run(round, setting)`` is called after each timed
    run (progress)."""
    from vlm_accel.api import patch_model
    from vlm_accel.eval.timing import bracket_references, mean_pair, round_schedule

    times = [SettingTimes() for _ in configs]
    _timed_generate(model, inputs, device)  # warm-up: allocator, first-call costs
    for round_index in range(rounds):
        order = round_schedule(len(configs), round_index)
        ttfts, steps = [], []
        for i in order:
            config = configs[i]
            if config is None:
                ttft, step = _timed_generate(model, inputs, device)
            else:
                with patch_model(model, config):
                    ttft, step = _timed_generate(model, inputs, device)
            ttfts.append(ttft)
            steps.append(step)
            if on_run is not None:
                on_run(round_index, i)
        ref_ttft = bracket_references(order, ttfts, mean_pair)
        ref_step = bracket_references(order, steps, mean_pair)
        own_ttft = _median_pair([t for i, t in zip(order, ttfts) if i == 0])
        own_step = _median_pair([t for i, t in zip(order, steps) if i == 0])
        times[0].ttft.append(own_ttft)
        times[0].step.append(own_step)
        times[0].reference_ttft.append(own_ttft)
        times[0].reference_step.append(own_step)
        for position, i in enumerate(order):
            if i != 0:
                times[i].ttft.append(ttfts[position])
                times[i].step.append(steps[position])
                times[i].reference_ttft.append(ref_ttft[position])
                times[i].reference_step.append(ref_step[position])
    return times


def runs_per_round(settings: int) -> int:
    """Timed runs in one round of :func:`interleaved_rounds` (settings plus the extra reference runs)."""
    from vlm_accel.eval.timing import round_schedule

    return len(round_schedule(settings, 0))


def interleaved_timings(
    model, inputs: dict, configs: list[MethodConfig | None], rounds: int, device: str = "cpu"
) -> list[tuple[float, float]]:
    """Median (prefill seconds, seconds per decode step) of each setting, interleaved (see
    :func:`interleaved_rounds`); process CPU time on CPU, wall time on CUDA."""
    which = 0 if device.startswith("cuda") else 1
    out = []
    for t in interleaved_rounds(model, inputs, configs, rounds, device):
        steps = [s[which] for s in t.step if s is not None]
        out.append((statistics.median(x[which] for x in t.ttft), statistics.median(steps) if steps else math.nan))
    return out


def timing_batch(processor, dataset, batch_size: int, device: str) -> dict:
    from vlm_accel.testbed.evaluate import build_messages

    rows = [dataset[i] for i in range(min(batch_size, len(dataset)))]
    texts = [processor.apply_chat_template(build_messages(r["question"]), add_generation_prompt=True) for r in rows]
    images = [r["image"].convert("RGB") for r in rows]
    return processor(images=images, text=texts, padding=True, return_tensors="pt").to(device)


# ---------------------------------------------------------------------------------------------- rows


def wilson_halfwidth(p: float, n: int, z: float = 1.96) -> float:
    """Half the width of the Wilson score interval of a proportion ``p`` over ``n`` questions (95 % at z=1.96)."""
    if n <= 0:
        return math.nan
    return z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)


_HIDDEN_PARAMS = ("layer", "seed", "guide", "check_fingerprint")


def setting_text(config: MethodConfig | None) -> str:
    """What distinguishes a setting in the table: its keep ratio, else its first scalar parameter (a file: its
    name), so methods registered later show up without a change here."""
    if config is None:
        return "—"
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    if "keep_ratio" in values:
        return f"keep {values['keep_ratio']:g}"
    for name, value in values.items():
        if name in _HIDDEN_PARAMS or value is None or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            return f"{name}={value:g}"
        if isinstance(value, str):
            return f"{name}={Path(value).stem}"
    return "defaults"


def _row(label: str, config: MethodConfig | None, result, keep_fraction: float) -> dict[str, Any]:
    params = config.to_dict() if config is not None else {"method": "none"}
    params = {k: v if isinstance(v, (int, float, str, bool, list, tuple, type(None))) else str(v)
              for k, v in params.items()}  # fmt: skip
    n = sum(result.n.values())
    return {
        "method": params["method"],
        "label": label,
        "setting": setting_text(config),
        "config": params,
        "keep_ratio": params.get("keep_ratio") or keep_fraction,  # e.g. pool: the measured share
        "accuracy": result.mean,
        "accuracy_ci95": wilson_halfwidth(result.mean, n),
        "n": n,
        "per_family": result.accuracy,
        "yes_rate_absent_cooccur": result.yes_rate_absent_cooccur,
        "yes_rate_absent": result.yes_rate_absent,
        "exist_f1": result.exist_f1,
        "visual_kept": keep_fraction,
    }


def add_speed(rows: list[dict[str, Any]], times: Sequence[SettingTimes], clock: str) -> None:
    """Per-round speed-ups over each run's bracketing unpatched reference runs: median and (min, max)."""
    which = 0 if clock == "wall" else 1
    for row, t in zip(rows, times):
        ttft = [x[which] for x in t.ttft]
        row["prefill_s_runs"] = ttft
        row["prefill_s"] = statistics.median(ttft)
        row["reference_prefill_s_runs"] = [x[which] for x in t.reference_ttft]
        row["prefill_speedup"], *row["prefill_speedup_range"] = paired_speedups(row["reference_prefill_s_runs"], ttft)
        pairs = [(b[which], s[which]) for b, s in zip(t.reference_step, t.step) if b is not None and s is not None]
        row["decode_step_s_runs"] = [s[which] if s is not None else None for s in t.step]
        if pairs:
            row["decode_step_s"] = statistics.median(s for _, s in pairs)
            row["decode_speedup"], *row["decode_speedup_range"] = paired_speedups(*zip(*pairs))
        else:  # no decode step of the model itself ran (e.g. every row exited early)
            row["decode_step_s"] = row["decode_speedup"] = row["decode_speedup_range"] = None
        row["retained"] = row["accuracy"] / rows[0]["accuracy"] if rows[0]["accuracy"] else None


# ---------------------------------------------------------------------------------------------- run


def _plans(model, settings: CompareSettings) -> tuple[list[tuple[str, MethodConfig | None]], dict[str, str]]:
    from vlm_accel.api import patch_model
    from vlm_accel.errors import MethodNotApplicable
    from vlm_accel.registry import get_method_class

    plans: list[tuple[str, MethodConfig | None]] = [("unpatched", None)]
    skipped: dict[str, str] = {}
    for name in settings.methods or _default_methods():
        configs = get_method_class(name).sweep_configs(settings.keep_ratios)
        for config in configs:
            try:
                with patch_model(model, config):
                    pass  # binding raises for a setting that cannot act on this model
            except MethodNotApplicable as err:
                skipped[name] = str(err)
                break  # the method as a whole does not apply
            except ValueError as err:  # e.g. a shipped router trained for another model
                skipped[f"{config.label()} {setting_text(config)}"] = str(err)
                continue
            plans.append((config.label(), config))
    return plans, skipped


def chair_phase(rows: list[dict[str, Any]], plans: list[tuple[str, MethodConfig | None]], settings: CompareSettings,
                bar) -> None:
    """CHAIR of every setting on free-form descriptions (issue #15): the same method configs on
    ``settings.chair_model`` (a testbed model trained on the ``describe`` family and its planted language prior),
    ``settings.chair_n`` "list the objects" questions, greedy; adds ``chair_i`` (± its 95 % Wilson half-width),
    ``chair_s`` and ``recall`` to each row. A setting that cannot bind to that model (e.g. a router trained for
    another model's weights) gets ``chair_skipped`` with the reason and no CHAIR numbers."""
    from vlm_accel.api import patch_model
    from vlm_accel.errors import MethodNotApplicable
    from vlm_accel.testbed import evaluate, load_model, make_dataset

    model, processor = load_model(settings.chair_model, device=settings.device)
    dataset = make_dataset(settings.chair_n, seed=settings.seed, split="test", families=("describe",))
    task = bar.add_task("CHAIR", total=len(plans) * len(dataset))
    for row, (label, config) in zip(rows, plans):
        bar.update(task, description=f"CHAIR ({settings.chair_model}): {label} {setting_text(config)}")
        try:
            if config is None:
                result = evaluate(model, processor, dataset, batch_size=settings.batch_size)
            else:
                with patch_model(model, config):
                    result = evaluate(model, processor, dataset, batch_size=settings.batch_size)
        except (MethodNotApplicable, ValueError) as err:
            row["chair_skipped"] = str(err)
            bar.advance(task, len(dataset))
            continue
        low, high = result.chair_i_ci
        row.update(chair_i=result.chair_i, chair_i_ci95=(high - low) / 2, chair_s=result.chair_s,
                   recall=result.recall, chair_mentions=result.mentions, chair_model=settings.chair_model,
                   chair_n=len(dataset))  # fmt: skip
        bar.advance(task, len(dataset))
    bar.update(task, description=f"CHAIR ({settings.chair_model})")


def _accuracy(model, processor, dataset, batch_size: int, advance: Callable[[int], None]):
    """``evaluate`` batch by batch (so progress moves), scored once over all predictions."""
    from vlm_accel.testbed.evaluate import evaluate, score

    predictions: list[dict] = []
    for start in range(0, len(dataset), batch_size):
        chunk = dataset.select(range(start, min(len(dataset), start + batch_size)))
        predictions += evaluate(model, processor, chunk, batch_size=batch_size).predictions
        advance(len(chunk))
    return score(predictions)


def run_compare(settings: CompareSettings, progress: bool = True) -> dict[str, Any]:
    """Accuracy of every setting, then interleaved timing rounds; one progress bar per phase."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from vlm_accel.api import patch_model
    from vlm_accel.testbed import load_model, make_dataset

    if progress:  # ours covers every phase; transformers' weight-loading bars would interleave with it
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    clock = "wall" if settings.device.startswith("cuda") else "process CPU"
    started = time.perf_counter(), time.process_time()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress) as bar:
        load = bar.add_task(f"loading {settings.model} and {settings.n} questions", total=1)
        model, processor = load_model(settings.model, device=settings.device)
        dataset = make_dataset(settings.n, seed=settings.seed, split="test")
        timing_inputs = timing_batch(processor, dataset, settings.batch_size, settings.device)
        plans, skipped = _plans(model, settings)
        bar.update(load, completed=1, description=f"loaded {settings.model}; {len(plans)} settings")
        phase_cpu = {"load": time.process_time() - started[1]}

        accuracy = bar.add_task("accuracy", total=len(plans) * len(dataset))
        rows = []
        for label, config in plans:
            bar.update(accuracy, description=f"accuracy: {label} {setting_text(config)}")

            def advance(k: int) -> None:
                bar.advance(accuracy, k)

            if config is None:
                result = _accuracy(model, processor, dataset, settings.batch_size, advance)
                keep_fraction = 1.0
            else:
                with patch_model(model, config) as patch:
                    result = _accuracy(model, processor, dataset, settings.batch_size, advance)
                    keep_fraction = patch.stats.visual_keep_fraction
            rows.append(_row(label, config, result, keep_fraction))
        bar.update(accuracy, description="accuracy")
        phase_cpu["accuracy"] = time.process_time() - started[1] - sum(phase_cpu.values())
        if settings.chair_n:
            chair_phase(rows, plans, settings, bar)
            phase_cpu["chair"] = time.process_time() - started[1] - sum(phase_cpu.values())

        timing = bar.add_task("timing", total=runs_per_round(len(plans)) * settings.timing_rounds)

        def on_run(round_index: int, i: int) -> None:
            label, config = plans[i]
            bar.update(timing, advance=1, description=f"timing round {round_index + 1}/{settings.timing_rounds}: "
                                                      f"{label} {setting_text(config)}")  # fmt: skip

        with torch.no_grad():
            times = interleaved_rounds(model, timing_inputs, [c for _, c in plans], settings.timing_rounds,
                                       settings.device, on_run)  # fmt: skip
        bar.update(timing, description="timing")
        phase_cpu["timing"] = time.process_time() - started[1] - sum(phase_cpu.values())
    add_speed(rows, times, "wall" if clock == "wall" else "cpu")
    return {
        "model": settings.model,
        "n": settings.n,
        "seed": settings.seed,
        "batch_size": settings.batch_size,
        "timing_rounds": settings.timing_rounds,
        "reference_every": REFERENCE_EVERY,
        "chair_n": settings.chair_n,
        "chair_model": settings.chair_model if settings.chair_n else None,
        "decode_tokens": DECODE_TOKENS,
        "timing_prompt_tokens": int(timing_inputs["input_ids"].shape[1]),
        "clock": clock,
        "device": settings.device,
        "torch_threads": torch.get_num_threads(),
        "elapsed_wall_s": time.perf_counter() - started[0],
        "elapsed_cpu_s": time.process_time() - started[1],
        "phase_cpu_s": phase_cpu,
        "rows": rows,
        "skipped": skipped,
    }


# ---------------------------------------------------------------------------------------------- output


def _speed_cell(row: dict[str, Any], key: str) -> str:
    value, spread = row.get(key), row.get(key + "_range")
    if value is None:
        return "—"
    return f"{value:.2f} ({spread[0]:.2f}–{spread[1]:.2f})" if spread else f"{value:.2f}"


def _chair_cells(row: dict[str, Any]) -> list[str]:
    if row.get("chair_i") is None:
        return ["-", "-"]
    return [f"{row['chair_i']:.3f} ±{row['chair_i_ci95']:.3f}", f"{row['recall']:.3f}"]


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    families = list(result["rows"][0]["per_family"])
    table = Table(title=f"vlm-accel compare — {result['model']}, n={result['n']}, seed={result['seed']}",
                  title_justify="left")  # fmt: skip
    chair = any("chair_i" in row for row in result["rows"])
    columns = ["method", "setting", "visual kept", *families, "mean ±95%", "retained", "exist F1", "yes@absent-co",
               *(["CHAIR_I ±95%", "recall"] if chair else []), "prefill speed-up", "decode-step speed-up"]  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("method", "setting") else "right")
    for row in result["rows"]:
        yes, f1 = row["yes_rate_absent_cooccur"], row["exist_f1"]
        table.add_row(
            row["label"], row["setting"], f"{row['visual_kept']:.1%}",
            *(f"{row['per_family'][f]:.3f}" for f in families),
            f"{row['accuracy']:.3f} ±{row['accuracy_ci95']:.3f}",
            f"{row['retained']:.1%}" if row["retained"] is not None else "-", "-" if f1 is None else f"{f1:.3f}",
            "-" if yes is None else f"{yes:.3f}", *(_chair_cells(row) if chair else []),
            _speed_cell(row, "prefill_speedup"), _speed_cell(row, "decode_speedup"),
        )  # fmt: skip
    console = Console()
    if not console.is_terminal or console.width < 200:  # never squeeze the table; files and pipes get it whole
        console = Console(width=220)
    console.print(table)
    for name, reason in result.get("skipped", {}).items():
        console.print(f"skipped {name}: {reason}")
    for row in result["rows"]:
        if row.get("chair_skipped"):
            console.print(f"no CHAIR for {row['label']} {row['setting']}: {row['chair_skipped']}")
    if chair:
        console.print(
            f"CHAIR_I: hallucinated object mentions / mentions in {result['chair_n']} free-form descriptions by "
            f"{result['chair_model']} (the same settings on the testbed model trained with a planted language "
            "prior), ±95% Wilson half-width; recall: present objects mentioned."
        )
    console.print(
        f"visual kept: share of visual tokens present after the last layer; mean ±95%: Wilson interval over "
        f"n={result['n']} questions; yes@absent-co: yes-rate on absent co-occurring objects (hallucination; few "
        f"questions at this n). Speed-ups are over unpatched (> 1: faster): prefill = time to first token inside "
        f"generate() (SGL: guide included), decode-step = one decode step timed directly; median (min–max) of "
        f"{result['timing_rounds']} interleaved rounds (each run against the unpatched runs around it) on one batch "
        f"of {result['batch_size']} "
        f"({result['timing_prompt_tokens']} prompt tokens), {result['clock']} time, {result['device']}, "
        f"{result['torch_threads']} thread(s). Ran in {result['elapsed_wall_s']:.0f} s wall, "
        f"{result['elapsed_cpu_s']:.0f} s CPU."
    )


def write_plot(result: dict[str, Any], path: Path) -> Path:
    from vlm_accel.eval.plots import pareto_plot

    points = [{
        "series": row["label"], "label": row["setting"] if row["label"] != "unpatched" else "",
        "prefill_speedup": row["prefill_speedup"], "accuracy": row["accuracy"],
        "x_range": row.get("prefill_speedup_range"), "y_err": row.get("accuracy_ci95"),
    } for row in result["rows"]]  # fmt: skip
    return pareto_plot(points, path, x="prefill_speedup", y="accuracy", series="series", x_range="x_range",
                       y_err="y_err", title=f"{result['model']}: accuracy vs prefill speed-up (n={result['n']}, "
                                            f"{result['clock']} time)")  # fmt: skip


# ---------------------------------------------------------------------------------------------- CLI


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _ratios(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated keep ratios, got {text!r}") from None
    bad = [v for v in values if not 0 < v <= 1]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"keep ratios must lie in (0, 1], got {text!r}")
    return values


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare", help="every method on the bundled testbed model: accuracy x speed table and Pareto plot",
        description=__doc__.split("\n\n")[0] + " Defaults: n=60, 3 timing rounds (under 3 minutes on one core); "
        "--full: n=200, 5 rounds (the README table).",
    )  # fmt: skip
    parser.add_argument("--model", default="testbed-l", help="testbed name or a directory of a trained testbed model")
    parser.add_argument("--full", action="store_true",
                        help=f"the thorough run: n={FULL['n']}, {FULL['rounds']} timing rounds, CHAIR on "
                             f"{FULL['chair']} descriptions")  # fmt: skip
    parser.add_argument("--n", type=_positive_int, default=None,
                        help=f"number of test questions (default {QUICK['n']}; --full: {FULL['n']})")  # fmt: skip
    parser.add_argument("--rounds", type=_positive_int, default=None,
                        help=f"interleaved timing rounds (default {QUICK['rounds']}; --full: {FULL['rounds']})")  # fmt: skip
    parser.add_argument("--seed", type=int, default=CompareSettings.seed, help="dataset seed (never used in training)")
    parser.add_argument("--methods", default="", help="comma-separated method names (default: every registered one)")
    parser.add_argument("--keep", type=_ratios, default=DEFAULT_KEEP_RATIOS,
                        help="keep ratios to sweep (default " + ",".join(map(str, DEFAULT_KEEP_RATIOS)) + ")")  # fmt: skip
    parser.add_argument("--chair", type=int, default=None, metavar="N",
                        help=f"also CHAIR_I of every setting on N free-form descriptions by testbed-describe "
                             f"(default 0: off; --full: {FULL['chair']})")  # fmt: skip
    parser.add_argument("--batch-size", type=_positive_int, default=16)
    parser.add_argument("--out", type=Path, default=Path("outputs/compare"), help="directory for JSON and plot")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: CPU time of one thread is the stable clock; 0: torch's "
                             "default)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from vlm_accel.registry import get_method_class

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    for name in methods:
        get_method_class(name)  # clear error for unknown names before any work
    preset = FULL if args.full else QUICK
    settings = CompareSettings(
        model=args.model, n=args.n or preset["n"], seed=args.seed, methods=methods, keep_ratios=args.keep,
        batch_size=args.batch_size, timing_rounds=args.rounds or preset["rounds"], out_dir=args.out,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        chair_n=args.chair if args.chair is not None else preset.get("chair", 0),
    )  # fmt: skip
    if settings.chair_n < 0:
        raise ValueError(f"--chair must be >= 0, got {settings.chair_n}")
    result = run_compare(settings, progress=not args.no_progress)
    print_table(result)
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    (settings.out_dir / "compare.json").write_text(json.dumps(result, indent=2))
    plot = write_plot(result, settings.out_dir / "pareto.png")
    print(f"wrote {settings.out_dir / 'compare.json'} and {plot}")
    return 0
