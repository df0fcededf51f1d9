"""SGL and DyVTE on the testbed: accuracy, exit rate, mean exit layer, FLOPs and measured speedup (issue #5).

    python benchmarks/sgl_dyvte_testbed.py --n 200 --seed 777001 --out outputs/sgl_dyvte.json

Rows (every setting evaluated on the same fresh-seed test questions, through ``model.generate``):

- ``testbed-l`` and ``testbed-s`` unpatched;
- FastV, random and SGL (``testbed-s`` guiding ``testbed-l``) at 9 / 25 / 50 % of the visual tokens, all pruning
  at layer 2 of 8 (SGL ``layer_fraction = 0.25``); SGL also with early exit, τ set (as in the paper) to reach
  target exit ratios — the quantiles of S over the evaluation questions for 25 / 50 / 75 % exits;
- DyVTE with the shipped routers (and a forced exit layer for reference).

Speed: wall time of ``generate()`` on one batch (answers are 1–2 tokens), guide pass included for SGL, as a ratio
to the unpatched large model; settings are timed round-robin after a warm-up round so load drift hits them alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

import vlm_accel
from vlm_accel import patch_model
from vlm_accel.methods.dyvte import DyVTE, DyVTEConfig
from vlm_accel.methods.fastv import FastVConfig
from vlm_accel.methods.random_prune import RandomPruneConfig
from vlm_accel.methods.sgl import SGL, SGLConfig
from vlm_accel.registry import list_methods
from vlm_accel.testbed import evaluate, load_model, make_dataset, model_dir
from vlm_accel.testbed.evaluate import build_messages

for _name, _cls in (("sgl", SGL), ("dyvte", DyVTE)):
    if _name not in list_methods():
        vlm_accel.register_method(_name, _cls)

MAX_NEW = 3


def timing_inputs(processor, dataset, batch: int) -> dict:
    rows = [dataset[i] for i in range(min(batch, len(dataset)))]
    texts = [
        processor.apply_chat_template(build_messages(r["question"]), add_generation_prompt=True) for r in rows
    ]
    return processor(
        images=[r["image"].convert("RGB") for r in rows], text=texts, padding=True, return_tensors="pt"
    )


def timed_generate(model, batches: list[dict], pad: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for inputs in batches:
            model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=pad)
    return time.perf_counter() - start


def timing_batches(processor, dataset, batch: int, latency_rows: int) -> tuple[list[dict], list[dict]]:
    """One batch of ``batch`` rows (throughput) and ``latency_rows`` single-row calls (batch-1 latency)."""
    single = [
        timing_inputs(processor, dataset.select([i]), 1) for i in range(min(latency_rows, len(dataset)))
    ]
    return [timing_inputs(processor, dataset, batch)], single


def measure(
    model, processor, dataset, settings: list[tuple[str, object]], rounds: int, batch: int
) -> list[dict]:
    pad = processor.tokenizer.pad_token_id
    batched, single = timing_batches(processor, dataset, batch, latency_rows=8)
    times: list[list[float]] = [[] for _ in settings]
    latency: list[list[float]] = [[] for _ in settings]
    for round_index in range(rounds + 1):
        for i, (_, config) in enumerate(settings):
            with patch_model(model, config) if config is not None else contextlib.nullcontext():
                elapsed = timed_generate(model, batched, pad)
                alone = timed_generate(model, single, pad)
            if round_index:
                times[i].append(elapsed)
                latency[i].append(alone)
    rows = []
    for (label, config), t in zip(settings, times):
        if config is None:
            result, stats = (
                evaluate(model, processor, dataset, batch_size=batch, max_new_tokens=MAX_NEW),
                None,
            )
        else:
            with patch_model(model, config) as patch:
                result = evaluate(model, processor, dataset, batch_size=batch, max_new_tokens=MAX_NEW)
                stats = patch.stats
        row = {"label": label, "accuracy": result.mean, "per_family": result.accuracy,
               "generate_s": statistics.median(t), "batch1_s": statistics.median(latency[len(rows)])}  # fmt: skip
        if stats is not None:
            row["visual_kept"] = stats.visual_keep_fraction
            for name in ("sgl", "dyvte"):
                if name in stats.methods:
                    extra = stats.methods[name]
                    row[name] = {k: v for k, v in extra.items() if not k.startswith("last_")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base, base1 = rows[0]["generate_s"], rows[0]["batch1_s"]
    for row in rows:
        row["speedup"] = base / row["generate_s"]
        row["speedup_batch1"] = base1 / row["batch1_s"]
    return rows


def exit_score_quantiles(
    guide, processor, dataset, batch: int, exit_rates: list[float]
) -> dict[float, float]:
    """τ reaching each target exit rate: quantiles of SEE's S over the questions (S does not depend on ρ)."""
    from vlm_accel.methods.sgl_guide import consistency_score, run_guide

    values = []
    pad = processor.tokenizer.pad_token_id
    for first in range(0, len(dataset), batch):
        inputs = timing_inputs(
            processor, dataset.select(range(first, min(len(dataset), first + batch))), batch
        )
        kwargs = {**inputs, "max_new_tokens": MAX_NEW, "pad_token_id": pad}
        result = run_guide(guide, kwargs, generate=True)
        s = 0.5 * (result.confidence + consistency_score(guide, kwargs, result, 0.05))
        values.append(s)
    s = torch.cat(values)
    return {rate: float(torch.quantile(s.double(), 1 - rate)) for rate in exit_rates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", default="testbed-l")
    parser.add_argument("--guide", default="testbed-s")
    parser.add_argument("--routers", default=None, help="default: the shipped testbed-l routers")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=777001)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", default="0.09,0.25,0.5")
    parser.add_argument(
        "--exit-rates", default="0.25,0.5,0.75", help="target SEE exit rates (τ from S quantiles)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--part",
        choices=["all", "prune", "dyvte"],
        default="all",
        help="prune: FastV/random/SGL (needs the guide); dyvte: DyVTE only",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/sgl_dyvte.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    large, processor = load_model(args.large)
    guide = load_model(args.guide)[0] if args.part != "dyvte" else None
    dataset = make_dataset(args.n, seed=args.seed, split="test")
    keeps = [float(k) for k in args.keep.split(",")]
    settings: list[tuple[str, object]] = [(args.large, None)]
    taus: dict[float, float] = {}
    if guide is not None:
        rates = [float(t) for t in args.exit_rates.split(",")]
        taus = exit_score_quantiles(guide, processor, dataset, args.batch, rates)
        print("tau per target exit rate:", taus, flush=True)
        for r in keeps:
            settings += [
                (f"fastv {r:.0%}", FastVConfig(layer=2, keep_ratio=r)),
                (f"random {r:.0%}", RandomPruneConfig(layer=2, keep_ratio=r)),
                (f"sgl {r:.0%}", SGLConfig(guide=guide, keep_ratio=r, layer_fraction=0.25)),
            ]
            settings += [(f"sgl {r:.0%} exit~{rate:.0%}", SGLConfig(guide=guide, keep_ratio=r, layer_fraction=0.25,
                                                                     exit_threshold=t)) for rate, t in taus.items()]  # fmt: skip
    if args.part != "prune":
        routers = args.routers or str(model_dir(args.large) / "dyvte_routers.safetensors")
        if Path(routers).is_file():
            settings.append(("dyvte", DyVTEConfig(routers=routers)))
            settings.append(("dyvte p>0.7", DyVTEConfig(routers=routers, exit_probability=0.7)))
        settings += [(f"dyvte forced exit@{e}", DyVTEConfig(exit_layer=e)) for e in (1, 3, 5)]
    start = time.perf_counter()
    rows = measure(large, processor, dataset, settings, args.rounds, args.batch)
    guide_acc = (
        evaluate(guide, processor, dataset, batch_size=args.batch, max_new_tokens=MAX_NEW) if guide else None
    )
    result = {
        "large": args.large, "guide": args.guide, "n": args.n, "seed": args.seed, "batch": args.batch,
        "device": "cpu", "threads": args.threads, "guide_accuracy": guide_acc.mean if guide_acc else None, "taus": taus, "rows": rows,
        "seconds": time.perf_counter() - start,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    if guide_acc is not None:
        print(f"guide ({args.guide}) accuracy {guide_acc.mean:.3f}")
    for row in rows:
        extra = ""
        if "sgl" in row:
            extra = f" exit {row['sgl']['exit_rate']:.1%}"
        if "dyvte" in row:
            d = row["dyvte"]
            extra = (f" exit {d['exit_rate']:.1%} visual layers {d['mean_visual_layers']:.2f} "
                     f"FLOPs saved {d['prefill_flops_saved']:.1%} (rows alone {d['prefill_flops_saved_alone']:.1%})")  # fmt: skip
        print(f"{row['label']:<22} acc {row['accuracy']:.3f} kept {row.get('visual_kept', 1.0):.1%} "
              f"speedup b{args.batch} {row['speedup']:.2f}x b1 {row['speedup_batch1']:.2f}x{extra}")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
