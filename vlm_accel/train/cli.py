"""``vlm-accel train``: training entry points for methods with trained parts.

``vlm-accel train dyvte --model testbed-l --out routers.safetensors`` labels a dataset with the frozen model
(DyVTE's exit-simulation rule) and trains one router per layer (:mod:`vlm_accel.train.dyvte`).
``vlm-accel train moh --model testbed-l --active-heads 0.75 --out router.safetensors`` trains MoH's learned head
router on the frozen model (:mod:`vlm_accel.train.moh`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train the trained parts of a method (DyVTE, MoH routers)")
    methods = parser.add_subparsers(dest="train_method", metavar="METHOD", required=True)
    d = methods.add_parser(
        "dyvte",
        help="train DyVTE routers on a frozen model",
        description="Label (image, question, answer) samples with DyVTE's exit-simulation rule on the frozen model "
        "and train one router per layer (vlm_accel.train.dyvte).",
    )
    d.add_argument("--model", default="testbed-l", help="testbed-s, testbed-l, or a local model directory")
    d.add_argument("--out", type=Path, required=True, help="router file to write (.safetensors)")
    d.add_argument("--data", default="testbed",
                   help="'testbed' (procedural questions), a datasets.save_to_disk directory or a JSONL file with "
                        "image (path), question and answer")  # fmt: skip
    d.add_argument("--n", type=int, default=2000, help="number of training samples (testbed data)")
    d.add_argument(
        "--seed", type=int, default=101, help="testbed data seed (train split) and router init seed"
    )
    d.add_argument("--router-hidden", type=int, default=256, help="router width r (paper: 2048)")
    d.add_argument("--epochs", type=int, default=40)
    d.add_argument("--lr", type=float, default=1e-3)
    d.add_argument("--batch-size", type=int, default=64, help="router training batch")
    d.add_argument("--label-batch-size", type=int, default=8, help="samples per labelling forward")
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    d.add_argument("--device", default="cpu")
    d.add_argument("--report", type=Path, help="also write the training report as JSON here")
    d.set_defaults(func=main_dyvte)
    m = methods.add_parser(
        "moh",
        help="train MoH's learned head router on a frozen testbed model",
        description="Train the paper's head router (shared/routed gates, two-stage balance, load-balance loss "
        "β=0.01) on the frozen model with the testbed's packed training batches (vlm_accel.train.moh).",
    )
    m.add_argument("--model", default="testbed-l", help="testbed-s, testbed-l, or a testbed training directory")
    m.add_argument("--out", type=Path, required=True, help="router file to write (.safetensors)")
    m.add_argument("--active-heads", type=_share, default=0.75, help="fraction (0.75) or count (3) of active heads")
    m.add_argument("--shared-heads", type=_share, default=None, help="fraction or count of always-on heads")
    m.add_argument("--per-kv-group", action="store_true", help="route whole KV groups (GQA)")
    m.add_argument("--steps", type=int, default=300)
    m.add_argument("--batch-size", type=int, default=8, help="images per step (several QAs each)")
    m.add_argument("--lr", type=float, default=5e-3)
    m.add_argument("--warmup", type=int, default=20, help="linear warm-up steps (then cosine decay to 10 %%)")
    m.add_argument("--balance-coef", type=float, default=0.01, help="β of the load-balance loss")
    m.add_argument("--seed", type=int, default=0, help="training-batch and init seed")
    m.add_argument("--tune-lm", action="store_true",
                   help="also continue-tune the language model (saved as OUT-stem.lm.safetensors)")  # fmt: skip
    m.add_argument("--lm-lr", type=float, default=1e-4)
    m.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    m.add_argument("--device", default="cpu")
    m.add_argument("--report", type=Path, help="also write the training report as JSON here")
    m.set_defaults(func=main_moh)


def _share(text: str) -> float | int:
    """``0.75`` → a fraction, ``3`` → a count."""
    return float(text) if "." in text else int(text)


def load_any_model(name: str, device: str):
    """A testbed model by name, or a local transformers VLM directory, with its processor."""
    from vlm_accel.testbed import MODEL_NAMES, load_model

    if name in MODEL_NAMES:
        return load_model(name, device=device)
    path = Path(name)
    if not path.is_dir():
        raise ValueError(
            f"--model must be a testbed name {list(MODEL_NAMES)} or a local model directory, got {name!r}"
        )
    if (path / "model.safetensors").exists() and (path / "processor_config.json").exists():
        return load_model(str(path), device=device)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True).to(device).eval()
    return model, AutoProcessor.from_pretrained(path, local_files_only=True)


def load_rows(data: str, n: int, seed: int):
    """Training rows: testbed questions, a saved ``datasets`` directory, or a JSONL of (image path, question,
    answer)."""
    if data == "testbed":
        from vlm_accel.testbed import make_dataset

        return make_dataset(n, seed=seed, split="train")
    path = Path(data)
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        missing = {"image", "question", "answer"} - set(ds.column_names)
        if missing:
            raise ValueError(f"{path} lacks column(s) {sorted(missing)}; need image, question, answer")
        return ds.select(range(min(n, len(ds))))
    if path.is_file() and path.suffix == ".jsonl":
        from PIL import Image

        rows = []
        for line in path.read_text().splitlines()[:n]:
            item = json.loads(line)
            rows.append({"image": Image.open(path.parent / item["image"]), "question": item["question"],
                         "answer": item["answer"]})  # fmt: skip
        return rows
    raise ValueError(f"--data must be 'testbed', a datasets directory or a .jsonl file, got {data!r}")


def main_dyvte(args: argparse.Namespace) -> int:
    import torch

    from vlm_accel.train.dyvte import DyVTETrainConfig, save_routers, train_routers

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.n < 1:
        raise ValueError(f"--n must be positive, got {args.n}")
    config = DyVTETrainConfig(router_hidden=args.router_hidden, epochs=args.epochs, lr=args.lr,
                              batch_size=args.batch_size, label_batch_size=args.label_batch_size,
                              seed=args.seed)  # fmt: skip
    model, processor = load_any_model(args.model, args.device)
    rows = load_rows(args.data, args.n, args.seed)
    routers, report = train_routers(model, processor, rows, config, progress=True)
    save_routers(routers, model, args.out, report)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=1))
    if args.report:
        args.report.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


def main_moh(args: argparse.Namespace) -> int:
    import torch

    from vlm_accel.train.moh import MoHTrainConfig, save_router, train_router

    if args.threads:
        torch.set_num_threads(args.threads)
    config = MoHTrainConfig(active_heads=args.active_heads, shared_heads=args.shared_heads,
                            per_kv_group=args.per_kv_group, steps=args.steps, batch_size=args.batch_size,
                            lr=args.lr, warmup=args.warmup, balance_coef=args.balance_coef, seed=args.seed, tune_lm=args.tune_lm,
                            lm_lr=args.lm_lr)  # fmt: skip
    model, _ = load_any_model(args.model, args.device)
    router, report, lm_state = train_router(model, config, progress=True)
    save_router(router, model, args.out, report, lm_state)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=1))
    if args.report:
        args.report.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0
