"""Do `vlm-accel compare`'s speed columns agree with `vlm-accel bench` on the same settings? (issue #18)

    OMP_NUM_THREADS=1 python benchmarks/compare_vs_bench.py --runs 2 --json docs/bench/compare_vs_bench.json

Each run times the same settings twice, back to back in one process: first as ``vlm-accel compare`` does (its
accuracy phase on ``--n`` questions, then interleaved timing rounds on its timing batch), then as
``vlm-accel bench`` does (``--prompts testbed``: the same batch of testbed questions; arms interleaved per repeat;
the bench arms are built from compare's own plans, so the method configs are identical). Both use process CPU
time on one thread. A column *agrees* when the two (min–max) ranges of the per-round paired speed-ups overlap:
compare's "prefill speed-up" (time to first token inside ``generate()``) against bench's "TTFT × cpu-t", and the
two "decode-step" speed-ups.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def one_run(args: argparse.Namespace) -> list[dict]:
    from vlm_accel.eval.bench import Arm, BenchSettings, run_bench
    from vlm_accel.eval.compare import CompareSettings, _plans, run_compare, setting_text
    from vlm_accel.testbed import load_model

    compare = run_compare(
        CompareSettings(model=args.model, n=args.n, methods=tuple(args.methods), keep_ratios=tuple(args.keep),
                        batch_size=args.batch, timing_rounds=args.rounds, out_dir=Path("outputs/compare")),
        progress=not args.no_progress,
    )  # fmt: skip
    model, _ = load_model(args.model)
    plans, _ = _plans(model, CompareSettings(model=args.model, methods=tuple(args.methods),
                                             keep_ratios=tuple(args.keep)))  # fmt: skip
    del model
    arms = [Arm(f"{label} {setting_text(config)}", [config]) for label, config in plans if config is not None]
    bench = run_bench(
        BenchSettings(model=args.model, batch_sizes=(args.batch,), warmup=1, repeats=args.rounds, new_tokens=16,
                      threads=1, prompts="testbed", prompt_seed=CompareSettings().seed),
        arms, progress=not args.no_progress,
    )  # fmt: skip
    if len(bench["rows"]) != len(compare["rows"]):
        raise RuntimeError("compare and bench timed different settings")
    out = []
    out.append({"setting": "unpatched", "runs": {"compare_prefill_s": compare["rows"][0].get("prefill_s_runs"),
                                                 "bench_ttft_cpu_s": bench["rows"][0].get("ttft_cpu_s_runs")}})
    for row, b in zip(compare["rows"][1:], bench["rows"][1:]):  # both in plan order, unpatched first
        entry = {"setting": b["arm"], "runs": {
            "compare_prefill_s": row.get("prefill_s_runs"), "bench_ttft_cpu_s": b.get("ttft_cpu_s_runs"),
            "compare_decode_step_s": row.get("decode_step_s_runs"), "bench_decode_step_cpu_s": b.get("decode_step_cpu_s_runs"),
        }}
        for name, ckey, bkey in (("prefill/TTFT", "prefill_speedup", "ttft_cpu_speedup"),
                                 ("decode step", "decode_speedup", "decode_cpu_speedup")):  # fmt: skip
            c_med, c_rng = row.get(ckey), row.get(ckey + "_range")
            b_med, b_rng = b.get(bkey), b.get(bkey + "_range")
            if c_med is None or b_med is None:
                continue
            entry[name] = {"compare": [c_med, *c_rng], "bench": [b_med, *b_rng],
                           "agree": overlap(tuple(c_rng), tuple(b_rng))}  # fmt: skip
        out.append(entry)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="testbed-l")
    p.add_argument("--methods", nargs="+", default=["fastv", "random"])
    p.add_argument("--keep", nargs="+", type=float, default=[0.25, 0.1])
    p.add_argument("--n", type=int, default=16, help="compare's accuracy questions (not what is checked here)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="compare's timing rounds = bench's repeats")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    runs = []
    for r in range(args.runs):
        start = time.process_time()
        rows = one_run(args)
        runs.append({"run": r + 1, "cpu_s": time.process_time() - start, "rows": rows})
        print(f"run {r + 1} ({runs[-1]['cpu_s']:.0f} s CPU)")
        for entry in rows:
            cells = []
            for name in ("prefill/TTFT", "decode step"):
                if name in entry:
                    c, b = entry[name]["compare"], entry[name]["bench"]
                    cells.append(f"{name}: compare {c[0]:.2f} ({c[1]:.2f}–{c[2]:.2f}) bench {b[0]:.2f} "
                                 f"({b[1]:.2f}–{b[2]:.2f}) {'agree' if entry[name]['agree'] else 'DISAGREE'}")  # fmt: skip
            print(f"  {entry['setting']:<28} " + " | ".join(cells))
    checks = [e[k]["agree"] for run in runs for e in run["rows"] for k in ("prefill/TTFT", "decode step") if k in e]
    print(f"agree in {sum(checks)} of {len(checks)} checks over {len(runs)} runs")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"argv": vars(args) | {"json": str(args.json)}, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
