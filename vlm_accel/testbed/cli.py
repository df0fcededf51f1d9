"""``vlm-accel testbed {train,eval,validity,package,tasks}``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .configs import MODEL_NAMES

DEFAULT_EVAL_SEED = 20_261_124  # never used in training (training batches use their own seed stream)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("testbed", help="procedural visual-QA testbed: train, evaluate, validate models")
    sub = p.add_subparsers(dest="testbed_command", metavar="ACTION")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    t = sub.add_parser("train", help="train a testbed model (reproducible from --seed, resumable)")
    t.add_argument("--model", required=True, choices=list(MODEL_NAMES))
    t.add_argument("--out", required=True, help="output directory (checkpoint/ inside it is resumed)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=5200)
    t.add_argument("--batch-size", type=int, default=16, help="images per step")
    t.add_argument("--qas-per-image", type=int, default=12)
    t.add_argument("--lr", type=float, default=1.5e-3)
    t.add_argument("--warmup", type=int, default=200)
    t.add_argument("--aux-weight", type=float, default=1.0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--no-bf16", action="store_true", help="disable bf16 autocast")
    t.add_argument("--vision-from", help="testbed-l run dir or vision_tower.safetensors: copy and freeze it")
    t.add_argument("--init-from", help="warm start from a model directory")
    t.add_argument("--freeze-vision-at", type=int, help="freeze the vision tower from this step on")
    t.add_argument("--pretrain-steps", type=int, default=400, help="stage-0 steps of visual-token pretraining")
    t.add_argument("--bg-drop-from", type=int, default=None,
                   help="from this step on, most steps see only object + 16..64 random background tokens")
    t.add_argument("--bg-keep", type=int, nargs=2, default=(16, 64), metavar=("LO", "HI"))
    t.add_argument("--bg-full-p", type=float, default=0.3, help="share of full-sequence steps")
    t.add_argument("--bg-schedule", default="1100:0.15:0:24,3800:0.7:32:128",
                   help="from_step:full_p:lo:hi,... overriding --bg-keep/--bg-full-p from those steps on ('' = none)")
    t.add_argument("--probe-layer", type=int, default=None, help="attention-supervised layer (retrieval probe)")
    t.add_argument("--probe-head", type=int, default=0)
    t.add_argument("--probe-weight", type=float, default=0.5)
    t.add_argument("--probe-from", type=int, default=0)
    t.add_argument("--count-probe-layer", type=int, default=None,
                   help="layer of the counting-supervised head (CountingProbe)")
    t.add_argument("--count-probe-head", type=int, default=1)
    t.add_argument("--count-probe-weight", type=float, default=0.5)
    t.add_argument("--count-probe-from", type=int, default=0)
    t.add_argument("--schedule-from", type=int, default=0,
                   help="step the learning-rate warm-up + cosine starts from (a fine-tuning segment of a resumed run)")
    t.add_argument("--stop-at", type=int, default=None,
                   help="stop after this step without changing the schedule (replays a segment of a run)")
    t.add_argument("--family-weight", action="append", default=[], metavar="FAMILY=W",
                   help="weight of a family's answer loss, e.g. count=3 (repeatable)")
    t.add_argument("--prior-yes-p", type=float, default=0.0,
                   help="answer 'yes' for an absent co-occurrence partner with this probability (language prior)")
    t.add_argument("--prior-items", type=float, default=0.0,
                   help="share of images built around an anchor whose partner is absent (with --prior-yes-p)")
    t.add_argument("--prior-from", type=int, default=0, help="first step of --prior-yes-p")
    t.add_argument("--describe-rows", type=float, default=0.0,
                   help="share of rows holding a 'list the objects .' turn (testbed-describe only)")
    t.add_argument("--describe-absent-items", type=float, default=0.5,
                   help="share of describe rows built around a present anchor whose partner is absent")
    t.add_argument("--describe-prior", type=float, default=0.6,
                   help="probability that a description names an absent partner after its anchor (language prior)")
    t.add_argument("--primed-p", type=float, default=0.5,
                   help="probability that a row with an anchor asks the primed question about its partner")
    t.add_argument("--primed-yes-p", type=float, default=0.5,
                   help="probability that a primed question about an absent partner is answered 'yes'")
    t.add_argument("--freeze-projector", action="store_true", help="keep the projector frozen (testbed-describe)")
    t.add_argument("--ckpt-every", type=int, default=100)
    t.add_argument("--eval-every", type=int, default=250)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_train)

    for name, fn, hlp in (("eval", _eval, "per-family accuracy on a fresh seed"),
                          ("validity", _validity, "background-only / oracle / random token-keeping checks")):  # fmt: skip
        e = sub.add_parser(name, help=hlp)
        e.add_argument("--model", default="testbed-l", help="testbed-s, testbed-l, or a model directory")
        e.add_argument("--n", type=int, default=500, help="number of questions (balanced over families)")
        e.add_argument("--seed", type=int, default=DEFAULT_EVAL_SEED)
        e.add_argument("--batch-size", type=int, default=32)
        e.add_argument("--threads", type=int, default=None)
        e.add_argument("--device", default="cpu")
        e.add_argument("--json", help="write the result as JSON here")
        if name == "validity":
            e.add_argument("--keep-ratio", type=float, default=0.1)
            e.add_argument("--describe", action="store_true",
                           help="the describe family's check instead: is the partner hallucination text-driven?")
        else:
            e.add_argument("--families", nargs="*", default=None,
                           help="default: the five families, plus describe and primed for testbed-describe")
        e.set_defaults(func=fn)

    k = sub.add_parser("package", help="copy a finished run's weights + processor into the package")
    k.add_argument("src")
    k.add_argument("--model", required=True, choices=list(MODEL_NAMES))
    k.set_defaults(func=_package)

    d = sub.add_parser("tasks", help="pre-generate the lm-eval task data (cached with save_to_disk)")
    d.add_argument("--n", type=int, default=200, help="questions per family")
    d.add_argument("--force", action="store_true")
    d.set_defaults(func=_tasks)


def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    cfg = TrainConfig(
        model=args.model, out=args.out, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
        qas_per_image=args.qas_per_image, lr=args.lr, warmup=args.warmup, aux_weight=args.aux_weight,
        device=args.device, threads=args.threads, bf16=not args.no_bf16, vision_from=args.vision_from,
        init_from=args.init_from, freeze_vision_at=args.freeze_vision_at, ckpt_every=args.ckpt_every,
        eval_every=args.eval_every, pretrain_steps=args.pretrain_steps, bg_drop_from=args.bg_drop_from,
        bg_keep=tuple(args.bg_keep), bg_full_p=args.bg_full_p, bg_schedule=_schedule(args.bg_schedule),
        probe_layer=args.probe_layer, probe_head=args.probe_head, probe_weight=args.probe_weight,
        probe_from=args.probe_from, family_weights=_family_weights(args.family_weight),
        prior_yes_p=args.prior_yes_p, prior_items=args.prior_items, prior_from=args.prior_from, count_probe_layer=args.count_probe_layer,
        count_probe_head=args.count_probe_head, count_probe_weight=args.count_probe_weight,
        count_probe_from=args.count_probe_from, schedule_from=args.schedule_from, stop_at=args.stop_at,
        describe_rows=args.describe_rows, describe_absent_items=args.describe_absent_items,
        describe_prior=args.describe_prior, primed_p=args.primed_p, primed_yes_p=args.primed_yes_p,
        freeze_projector=args.freeze_projector,
    )  # fmt: skip
    out = train(cfg, progress=not args.no_progress)
    print(f"saved {args.model} to {out}")
    return 0


def _family_weights(items: list[str]) -> dict[str, float]:
    from .describe import DESCRIBE_FAMILIES
    from .questions import FAMILIES

    out = {}
    for item in items:
        fam, _, w = item.partition("=")
        if fam not in FAMILIES + DESCRIBE_FAMILIES or not w:
            raise SystemExit(f"--family-weight expects FAMILY=W with FAMILY in {FAMILIES + DESCRIBE_FAMILIES}, "
                             f"got {item!r}")  # fmt: skip
        out[fam] = float(w)
    return out


def _schedule(text: str) -> list[tuple[int, float, int, int]]:
    out = []
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        step, p, lo, hi = part.split(":")
        out.append((int(step), float(p), int(lo), int(hi)))
    return out


def _load(args: argparse.Namespace):
    import torch

    from .models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    return load_model(args.model, device=args.device)


def _eval(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .dataset import make_dataset
    from .describe import DESCRIBE_FAMILIES
    from .evaluate import evaluate
    from .questions import FAMILIES

    model, processor = _load(args)
    families = args.families
    if families is None and "list" in processor.tokenizer.get_vocab():  # a describe model
        families = [*FAMILIES, *DESCRIBE_FAMILIES]
    ds = make_dataset(args.n, args.seed, families=families)
    res = evaluate(model, processor, ds, batch_size=args.batch_size, progress=True)
    table = Table(title=f"{args.model} on seed {args.seed} (n={args.n})")
    for col in ("family", "n", "accuracy"):
        table.add_column(col)
    for f, a in res.accuracy.items():
        table.add_row(f, str(res.n[f]), f"{a:.3f}")
    table.add_row("mean", str(args.n), f"{res.mean:.3f}")
    console = Console()
    console.print(table)
    console.print(f"exist F1 {_f(res.exist_f1)}; yes-rate present {_f(res.yes_rate_present)}, absent (random) "
                  f"{_f(res.yes_rate_absent)}, absent co-occurring partner {_f(res.yes_rate_absent_cooccur)}")  # fmt: skip
    if res.chair_i is not None:
        console.print(f"describe: CHAIR_I {_f(res.chair_i)} {_ci(res.chair_i_ci)}, CHAIR_S {_f(res.chair_s)} "
                      f"{_ci(res.chair_s_ci)}, recall {_f(res.recall)} {_ci(res.recall_ci)} ({res.mentions} mentions, "
                      f"{res.n['describe']} descriptions); absent partner named in "
                      f"{_f(res.partner_mention_rate)} of the absent_cooccur scenes")  # fmt: skip
    if res.primed_yes_rate_absent is not None:
        console.print(f"primed: yes-rate on absent partners {_f(res.primed_yes_rate_absent)}, on present partners "
                      f"{_f(res.primed_yes_rate_present)}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "seed": args.seed, **res.as_dict()}, indent=1))
    return 0


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _ci(ci: tuple[float, float] | None) -> str:
    return "" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _describe_validity(args: argparse.Namespace) -> int:
    from .describe_validity import CELLS, run_describe_validity

    model, processor = _load(args)
    rep = run_describe_validity(model, processor, n=args.n, seed=args.seed, batch_size=args.batch_size)
    print(f"describe validity of {args.model}: seed {args.seed}, n={args.n}; share of next mentions that name the "
          "absent partner")  # fmt: skip
    for c in CELLS:
        r = rep.next_is_partner[c]
        print(f"  {c:15s} {r['rate']:.3f} {_ci(r['ci95'])}")
    print(f"  (image_only: the next mention is the visible anchor in {rep.next_is_anchor_image_only['rate']:.3f})")
    print("yes-rate on the absent partner: " + ", ".join(f"{k} {v['rate']:.3f}" for k, v in rep.yes_rate.items()))
    print(f"free generation: partner named {rep.free_partner_given_anchor['rate']:.3f} of the times the model named "
          f"the anchor (n={rep.free_partner_given_anchor['n']}), {rep.free_partner_without_anchor['rate']:.3f} "
          f"otherwise (n={rep.free_partner_without_anchor['n']})")  # fmt: skip
    ok = rep.passed()
    print("text-driven: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in ok.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, **rep.as_dict()}, indent=1))
    return 0 if all(ok.values()) else 1


def _validity(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .dataset import make_dataset
    from .validity import CONFIGS, run_validity

    if args.describe:
        return _describe_validity(args)
    model, processor = _load(args)
    ds = make_dataset(args.n, args.seed)
    rep = run_validity(model, processor, ds, keep_ratio=args.keep_ratio, batch_size=args.batch_size,
                       progress=True, seed=args.seed)  # fmt: skip
    fams = list(rep.results["full"].accuracy)
    table = Table(title=f"validity of {args.model}: seed {args.seed}, n={args.n}, keep {args.keep_ratio:.0%}")
    for col in ("config", *fams, "mean", "yes absent", "yes partner"):
        table.add_column(col)
    for c in CONFIGS:
        r = rep.results[c]
        table.add_row(c, *(f"{r.accuracy[f]:.3f}" for f in fams), f"{r.mean:.3f}", _f(r.yes_rate_absent),
                      _f(r.yes_rate_absent_cooccur))  # fmt: skip
    console = Console()
    console.print(table)
    ok = rep.passed()
    console.print(f"background − no image: {rep.background_minus_no_image:+.3f} (want ≈ 0: "
                  f"{'PASS' if ok['background_about_no_image'] else 'FAIL'}); oracle − random: "
                  f"{rep.oracle_minus_random:+.3f} (want ≥ 0.15: {'PASS' if ok['oracle_beats_random'] else 'FAIL'})")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, **rep.as_dict()}, indent=1))
    return 0 if all(ok.values()) else 1


def _package(args: argparse.Namespace) -> int:
    from .models import package

    dst = package(args.src, args.model)
    print(f"packaged {args.src} → {dst}")
    return 0


def _tasks(args: argparse.Namespace) -> int:
    from .tasks.prepare import prepare

    paths = prepare(n_per_family=args.n, force=args.force)
    for p in paths:
        print(p)
    return 0
