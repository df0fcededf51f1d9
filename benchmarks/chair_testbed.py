"""Text-driven hallucination on the testbed (issue #15): CHAIR of PAI, PAINT and GIFT on ``testbed-describe``.

``testbed-describe`` was fine-tuned with a planted *language* prior: in its training descriptions an anchor object is
followed by its co-occurrence partner 60 % of the time when the partner is absent, and primed yes/no questions
("there is a red circle . is there a blue square ?") about an absent partner were answered "yes" half of the time
(``docs/testbed.md``; ``vlm-accel testbed validity --describe`` shows the habit is text-driven). For every setting this
measures, on a fresh seed never used in training or tuning:

* ``describe`` (``list the objects .``, greedy, half natural scenes, half scenes with an anchor and no partner):
  CHAIR_I, CHAIR_S and recall with 95 % Wilson intervals, the share of anchor-without-partner scenes whose
  description names the absent partner, and ΔCHAIR_I against unpatched with a paired bootstrap 95 % interval
  (descriptions resampled, 2,000 draws);
* ``primed``: the yes-rate on absent partners (text-primed hallucination) and on present partners;
* the five one-word families (accuracy; ``exist`` includes the visual POPE-adversarial probe).

Settings: unpatched; image-free guidance alone (PAI with α = 0, γ = 1.1); PAI at the paper's α = 0.2; PAINT at the
released a = 0.7, b = 0.3 (``alpha=1``); GIFT at the paper's α = 5 — each with and without image-free guidance
(γ = 1.1, PAI's released value; GIFT has none of its own, so "with guidance" composes it with PAI at α = 0) — and one
tuned setting per method, chosen on a separate tuning seed as the lowest CHAIR_I whose recall stays within 0.05 of
unpatched (the sweep is printed; when no setting of a sweep keeps recall, the mildest one is run and flagged). PAINT runs with ``summary_layer=0`` (the testbed tower has one layer).

Run: ``python -P benchmarks/chair_testbed.py [--n-describe 400] [--n-primed 200] [--n-other 250] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from vlm_accel.api import patch_model
from vlm_accel.registry import get_method_class
from vlm_accel.testbed import evaluate, load_model, make_dataset
from vlm_accel.testbed.describe import chair, wilson
from vlm_accel.testbed.scenes import Scene

GUIDANCE = {"gamma": 1.1}
PAPER: dict[str, dict] = {"pai": {"alpha": 0.2}, "paint": {"alpha": 1.0, "summary_layer": 0}, "gift": {"alpha": 5.0}}
# tuning sweeps (without guidance; the tuned setting is then run with and without it)
SWEEP: dict[str, list[dict]] = {
    "pai": [{"alpha": a} for a in (0.5, 1.0, 2.0)],
    "paint": [{"alpha": a, "summary_layer": 0} for a in (2.0, 4.0)],
    "gift": [{"alpha": a} for a in (10.0, 20.0)],
    "guidance": [{"gamma": g} for g in (1.5, 2.0)],
}


def configs_for(method: str, params: dict, guided: bool, processor) -> list:
    """The method configs of one setting (a list, composed by ``patch_model``)."""
    if method == "guidance":  # image-free guidance alone: PAI's contrastive step with no attention edit
        return [get_method_class("pai").config_cls(alpha=0.0, gamma=params.get("gamma", GUIDANCE["gamma"]))]
    extra = {"processor": processor} if method == "gift" else {}
    if method in ("pai", "paint"):
        return [get_method_class(method).config_cls(**params, **extra, gamma=GUIDANCE["gamma"] if guided else 1.0)]
    out = [get_method_class(method).config_cls(**params, **extra)]
    if guided:
        out.append(get_method_class("pai").config_cls(alpha=0.0, **GUIDANCE))
    return out


def run(model, processor, datasets: dict, configs: list, batch_size: int) -> dict:
    """Evaluate every dataset under one setting."""

    def go():
        return {k: evaluate(model, processor, ds, batch_size=batch_size) for k, ds in datasets.items()}

    t0 = time.process_time()
    if not configs:
        res = go()
    else:
        with patch_model(model, configs):
            res = go()
    res["cpu_s"] = time.process_time() - t0
    return res


def paired_delta(preds: list[dict], base: list[dict], draws: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """ΔCHAIR_I (setting − unpatched) on the same descriptions, with a paired bootstrap 95 % interval."""

    def counts(rows):
        h, m = [], []
        for p in rows:
            c = chair([p["prediction"]], [Scene.from_json(p["spec"])])
            h.append(round(c.chair_i * c.mentions) if c.mentions else 0)
            m.append(c.mentions)
        return np.array(h), np.array(m)

    h1, m1 = counts(preds)
    h0, m0 = counts(base)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(preds), size=(draws, len(preds)))
    d = h1[idx].sum(1) / np.maximum(m1[idx].sum(1), 1) - h0[idx].sum(1) / np.maximum(m0[idx].sum(1), 1)
    return float(h1.sum() / max(m1.sum(), 1) - h0.sum() / max(m0.sum(), 1)), *np.percentile(d, [2.5, 97.5]).tolist()


def row_of(label: str, method: str, params: dict, guided: bool, res: dict, base: dict | None) -> dict:
    d, p, o = res["describe"], res["primed"], res["other"]
    absent = [q for q in p.predictions if q["subtype"] == "absent_cooccur"]
    k = sum(q["prediction"] == "yes" for q in absent)
    row = {
        "setting": label, "method": method, "params": params, "guidance": guided,
        "chair_i": d.chair_i, "chair_i_ci": d.chair_i_ci, "chair_s": d.chair_s, "chair_s_ci": d.chair_s_ci,
        "recall": d.recall, "recall_ci": d.recall_ci, "mentions": d.mentions,
        "partner_named": d.partner_mention_rate,
        "primed_yes_absent": p.primed_yes_rate_absent, "primed_yes_absent_ci": wilson(k, len(absent)),
        "primed_yes_present": p.primed_yes_rate_present,
        "other": o.accuracy, "other_mean": o.mean, "exist_yes_absent_cooccur": o.yes_rate_absent_cooccur,
        "cpu_s": res["cpu_s"],
    }  # fmt: skip
    if base is not None:
        row["delta_chair_i"] = paired_delta(d.predictions, base["describe"].predictions)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="testbed-describe")
    parser.add_argument("--n-describe", type=int, default=400)
    parser.add_argument("--n-primed", type=int, default=200)
    parser.add_argument("--n-other", type=int, default=250)
    parser.add_argument("--n-tune", type=int, default=120, help="descriptions on the tuning seed")
    parser.add_argument("--seed", type=int, default=20261203, help="fresh evaluation seed")
    parser.add_argument("--tune-seed", type=int, default=777)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/chair_testbed.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = load_model(args.model)

    # tuning on its own seed: lowest CHAIR_I with recall within 0.05 of unpatched
    tune = {"describe": make_dataset(args.n_tune, args.tune_seed, split="validation", families=["describe"])}
    base_tune = run(model, processor, tune, [], args.batch_size)["describe"]
    print(f"tuning seed {args.tune_seed}: unpatched CHAIR_I {base_tune.chair_i:.3f} recall {base_tune.recall:.3f}")
    sweep_log, tuned, tuned_ok = [], {}, {}
    for method, grid in SWEEP.items():
        best = None
        for params in grid:
            r = run(model, processor, tune, configs_for(method, params, False, processor), args.batch_size)["describe"]
            ok = r.recall >= base_tune.recall - 0.05
            sweep_log.append({"method": method, "params": params, "chair_i": r.chair_i, "recall": r.recall, "ok": ok})
            print(json.dumps(sweep_log[-1]), flush=True)
            if ok and (best is None or r.chair_i < best[0]):
                best = (r.chair_i, params)
        tuned[method] = best[1] if best else grid[0]  # none kept recall: the mildest setting, flagged
        tuned_ok[method] = best is not None

    evals = {
        "describe": make_dataset(args.n_describe, args.seed, families=["describe"]),
        "primed": make_dataset(args.n_primed, args.seed, families=["primed"]),
        "other": make_dataset(args.n_other, args.seed, families=["color", "shape", "count", "exist", "position"]),
    }
    plan: list[tuple[str, str, dict, bool]] = [("unpatched", "none", {}, False),
                                               ("image-free guidance γ=1.1", "guidance", {"gamma": 1.1}, True),
                                               (f"image-free guidance tuned γ={tuned['guidance']['gamma']}",
                                                "guidance", tuned["guidance"], True)]  # fmt: skip
    for method in ("pai", "paint", "gift"):
        for kind, params in (("paper", PAPER[method]), ("tuned", tuned[method])):
            flag = "" if kind == "paper" or tuned_ok[method] else " (mildest; none kept recall)"
            for guided in (False, True):
                label = f"{method.upper()} {kind} α={params['alpha']}{flag}{' + guidance γ=1.1' if guided else ''}"
                plan.append((label, method, params, guided))
    rows, base = [], None
    for label, method, params, guided in plan:
        configs = [] if method == "none" else configs_for(method, params, guided, processor)
        res = run(model, processor, evals, configs, args.batch_size)
        rows.append(row_of(label, method, params, guided, res, base))
        base = base or res
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("other",)}), flush=True)

    print("\n| setting | CHAIR_I [95 % CI] | ΔCHAIR_I vs unpatched [95 % CI] | CHAIR_S | recall | absent partner named "
          "| primed yes (absent) | other families |\n|---|---|---|---:|---:|---:|---:|---:|")  # fmt: skip
    for r in rows:
        delta = r.get("delta_chair_i")
        dtxt = "—" if delta is None else f"{delta[0]:+.3f} [{delta[1]:+.3f}, {delta[2]:+.3f}]"
        print(f"| {r['setting']} | {r['chair_i']:.3f} [{r['chair_i_ci'][0]:.3f}, {r['chair_i_ci'][1]:.3f}] | {dtxt} | "
              f"{r['chair_s']:.3f} | {r['recall']:.3f} | {r['partner_named']:.3f} | {r['primed_yes_absent']:.3f} | "
              f"{r['other_mean']:.3f} |")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out = {**meta, "tuned": tuned, "tuned_met_recall_criterion": tuned_ok, "sweep": sweep_log, "rows": rows}
    args.out.write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
