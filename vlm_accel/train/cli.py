"""``vlm-accel train``: training entry points for methods with trained parts.

``vlm-accel train dyvte --model testbed-l --out routers.safetensors`` labels a dataset with the frozen model
(DyVTE's exit-simulation rule) and trains one router per layer (:mod:`vlm_accel.train.dyvte`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train the trained parts of a method (DyVTE routers)")
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
