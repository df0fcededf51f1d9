"""MoH accuracy on the testbed: per-family accuracy vs the share of active heads, for the qnorm router, the
learned router (shipped testbed-l routers) and the seeded random-heads control.

    OMP_NUM_THREADS=1 python benchmarks/moh_testbed.py --n 500 --seed 20261202 --json docs/bench/moh_testbed_l.json

Each arm is ``vlm_accel.testbed.evaluate`` (chat template → greedy ``generate``) on the same fresh test split.
``--arms`` picks a subset (e.g. to add the learned arms once their routers exist); ``--merge`` adds to an existing
JSON file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vlm_accel import patch_model
from vlm_accel.methods.moh import MoHConfig, shipped_router
from vlm_accel.methods.random_heads import RandomHeadsConfig


def arms(model: str, router_dir: Path | None = None) -> dict[str, object]:
    out: dict[str, object] = {"all heads (unpatched)": None}
    for share in (0.75, 0.5):
        out[f"qnorm {share:.0%}"] = MoHConfig(active_heads=share)
        for tuned in (False, True):
            path = shipped_router(share, model, tuned)
            path = path if router_dir is None else router_dir / path.name
            lm = path.with_name(path.stem + ".lm.safetensors")  # a --tune-lm router's language model
            name = f"learned{' +tuned LM' if tuned else ''} {share:.0%}"
            if not path.is_file() or (tuned and not lm.is_file()):
                out[name] = "missing"
                continue
            out[name] = MoHConfig(router="learned", active_heads=share, router_file=str(path),
                                  lm_file=str(lm) if tuned else None)  # fmt: skip
        out[f"random {share:.0%}"] = RandomHeadsConfig(active_heads=share, seed=0)
    return out


def main(argv: list[str] | None = None) -> int:
    from vlm_accel.testbed import evaluate, load_model, make_dataset

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="testbed-l")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seed", type=int, default=20261202)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--arms", nargs="*", help="substrings of arm names to run (default: all)")
    p.add_argument("--json", type=Path)
    p.add_argument("--merge", action="store_true", help="add to the rows already in --json")
    p.add_argument("--router-dir", type=Path, help="take the learned routers from here instead of the package")
    p.add_argument("--lm-weights", type=Path,
                   help="load a continue-tuned language model (train moh --tune-lm: *.lm.safetensors) first")  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, processor = load_model(args.model)
    if args.lm_weights:
        from safetensors.torch import load_file

        model.model.language_model.load_state_dict(load_file(str(args.lm_weights)))
    data = make_dataset(args.n, seed=args.seed, split="test")
    results = {}
    if args.merge and args.json and args.json.is_file():
        results = json.loads(args.json.read_text())["arms"]
    for name, config in arms(args.model, args.router_dir).items():
        if args.arms and not any(a in name for a in args.arms):
            continue
        if config == "missing":
            print(f"{name}: no shipped router, skipped", flush=True)
            continue
        start = time.perf_counter()
        if config is None:
            result = evaluate(model, processor, data, batch_size=args.batch_size)
            stats = {}
        else:
            with patch_model(model, config) as patch:
                result = evaluate(model, processor, data, batch_size=args.batch_size)
                stats = dict(patch.stats.methods)
        results[name] = {"mean": result.mean, "per_family": result.accuracy,
                         "config": None if config is None else config.to_dict(), "stats": stats,
                         "seconds": time.perf_counter() - start}  # fmt: skip
        fams = " ".join(f"{k} {v:.3f}" for k, v in result.accuracy.items())
        print(f"{name:26s} mean {result.mean:.3f} | {fams} ({time.perf_counter() - start:.0f}s)", flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"model": args.model, "n": args.n, "seed": args.seed,
                                             "arms": results}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
