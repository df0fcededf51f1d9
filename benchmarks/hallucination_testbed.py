"""Object hallucination on the testbed: PAI, GIFT and PAINT at several settings against the unpatched model.

The shipped ``testbed-l`` was trained with a planted co-occurrence prior (``--prior-yes-p 0.45 --prior-items 0.5``:
a question about the partner of a present anchor was answered "yes" 45 % of the time although the partner was not
drawn), so it answers "yes" to some absent partners, the POPE-adversarial failure. For every setting this
measures, on fresh questions (seed 20261124):

* ``exist`` (POPE-style, 1/4 absent co-occurring partners): accuracy, F1, and the yes-rate on present objects,
  on random absent objects and on absent co-occurring partners (the hallucination rate);
* mean accuracy on the other four families (what the reweighting costs elsewhere);
* time per decode step relative to unpatched, measured interleaved in this run (CPU ratios only).

PAINT runs with ``summary_layer=0``: the testbed's vision tower has a single layer, so there is no penultimate one.

Run: ``python benchmarks/hallucination_testbed.py [--n-exist 400] [--n-other 200] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vlm_accel.api import patch_model
from vlm_accel.config import MethodConfig
from vlm_accel.eval.compare import interleaved_timings, timing_batch
from vlm_accel.registry import get_method_class
from vlm_accel.testbed import evaluate, load_model, make_dataset

# PAI's and PAINT's image-free guidance is on by default (γ = 1.1); the rows without it say gamma=1.0
SETTINGS: list[tuple[str, dict]] = [
    ("pai", {"alpha": 0.2, "gamma": 1.0}),
    ("pai", {"alpha": 0.2}),
    ("pai", {"alpha": 0.5, "gamma": 1.0}),
    ("pai", {"alpha": 1.0, "gamma": 1.0}),
    ("pai", {"alpha": 0.5}),
    ("pai", {"alpha": 0.2, "layers": (0.75, 1.0), "gamma": 1.0}),
    ("pai", {"alpha": 0.5, "layers": (0.75, 1.0), "gamma": 1.0}),
    ("gift", {"alpha": 2.0}),
    ("gift", {"alpha": 5.0}),
    ("gift", {"alpha": 10.0}),
    # the testbed tower has one layer, so PAINT's summary tokens come from that layer too (default: penultimate)
    ("paint", {"summary_layer": 0, "gamma": 1.0}),
    ("paint", {"summary_layer": 0}),
    ("paint", {"summary_layer": 0, "layers": (0.75, 1.0), "gamma": 1.0}),
    ("paint", {"summary_layer": 0, "head_specific": True, "gamma": 1.0}),
]


def _config(name: str, params: dict, processor) -> MethodConfig:
    if name == "gift":  # the question span and content words come from the processor's chat template
        params = {**params, "processor": processor}
    return get_method_class(name).config_cls(**params)


def _label(config: MethodConfig | None) -> str:
    if config is None:
        return "unpatched"
    d = config.to_dict()
    default = type(config)().to_dict()
    extra = f", γ={d['gamma']}" if d.get("gamma", 1.0) != 1.0 else ""
    if d["layers"] != default["layers"] and d["layers"] is not None:
        extra += f", layers {d['layers'][0]:g}–{d['layers'][1]:g} of depth"
    if d.get("head_specific"):
        extra += ", head-specific"
    return f"{d['method']} (α={d['alpha']}{extra})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="testbed-l")
    parser.add_argument("--n-exist", type=int, default=400)
    parser.add_argument("--n-other", type=int, default=200)
    parser.add_argument("--seed", type=int, default=20261124)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--methods", default="", help="comma-separated subset of pai,gift,paint (default: all)")
    parser.add_argument("--out", type=Path, default=Path("outputs/hallucination"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, processor = load_model(args.model)
    exist = make_dataset(args.n_exist, seed=args.seed, families=["exist"])
    other = make_dataset(args.n_other, seed=args.seed, families=["color", "shape", "count", "position"])
    chosen = set(filter(None, args.methods.split(","))) or {name for name, _ in SETTINGS}
    configs: list[MethodConfig | None] = [None, *(_config(n, p, processor) for n, p in SETTINGS if n in chosen)]
    timings = interleaved_timings(model, timing_batch(processor, exist, args.batch_size, "cpu"), configs, rounds=5)
    rows = []
    for config, (_, decode_s) in zip(configs, timings):
        if config is None:
            r_exist, r_other = (evaluate(model, processor, d, batch_size=args.batch_size) for d in (exist, other))
        else:
            with patch_model(model, config):
                r_exist, r_other = (evaluate(model, processor, d, batch_size=args.batch_size) for d in (exist, other))
        rows.append({
            "setting": _label(config),
            "config": None if config is None else config.to_dict(),
            "exist_acc": r_exist.accuracy["exist"],
            "exist_f1": r_exist.exist_f1,
            "yes_present": r_exist.yes_rate_present,
            "yes_absent": r_exist.yes_rate_absent,
            "yes_absent_cooccur": r_exist.yes_rate_absent_cooccur,
            "other_mean": r_other.mean,
            "other_per_family": r_other.accuracy,
            "decode_step_s": decode_s,
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["decode_step_s"]
    print("\n| setting | exist acc | exist F1 | yes: present / absent / absent co-occurring | other families | "
          "decode step × |\n|---|---:|---:|---|---:|---:|")  # fmt: skip
    for row in rows:
        row["decode_step_ratio"] = row["decode_step_s"] / base
        print(f"| {row['setting']} | {row['exist_acc']:.3f} | {row['exist_f1']:.3f} | {row['yes_present']:.2f} / "
              f"{row['yes_absent']:.2f} / **{row['yes_absent_cooccur']:.2f}** | {row['other_mean']:.3f} | "
              f"{row['decode_step_ratio']:.2f} |")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "seed": args.seed, "n_exist": args.n_exist, "n_other": args.n_other,
            "threads": args.threads, "batch_size": args.batch_size}  # fmt: skip
    (args.out / "hallucination.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    print(f"\nwrote {args.out / 'hallucination.json'}")


if __name__ == "__main__":
    main()
