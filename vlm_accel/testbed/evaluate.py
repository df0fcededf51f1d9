"""Accuracy of a (possibly patched) VLM on a testbed dataset, through the standard transformers flow.

``processor.apply_chat_template`` (an image part and a text part) → ``processor(images=..., text=...,
padding=True)`` with left padding → ``model.generate(do_sample=False)`` → ``processor.batch_decode`` of the new
tokens. Only ``model.generate`` is called, so patches that act inside ``forward``/``generate`` are evaluated as
users would run them.

``visual_keep`` (used by the validity checks) hides visual tokens from layer 0 on: the 2-D ``attention_mask`` is
zeroed at the dropped image-token positions (hiding them as keys in every layer) while ``position_ids`` are passed
explicitly from the unmodified mask, so every kept token keeps its original position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

FAMILY_ORDER: tuple[str, ...] = ("color", "shape", "count", "exist", "position")


@dataclass
class EvalResult:
    """Per-family accuracy and hallucination statistics of one evaluation run."""

    accuracy: dict[str, float]
    n: dict[str, int]
    mean: float
    yes_rate_present: float | None
    yes_rate_absent: float | None
    yes_rate_absent_cooccur: float | None
    exist_f1: float | None
    predictions: list[dict] = field(default_factory=list, repr=False)
    visual_tokens_kept: float | None = None

    def as_dict(self, with_predictions: bool = True) -> dict:
        d = asdict(self)
        if not with_predictions:
            d.pop("predictions")
        return d

    def summary(self) -> str:
        fams = " ".join(f"{k} {v:.3f}" for k, v in self.accuracy.items())
        return (
            f"mean {self.mean:.3f} | {fams} | yes-rate present {_fmt(self.yes_rate_present)} absent "
            f"{_fmt(self.yes_rate_absent)} absent_cooccur {_fmt(self.yes_rate_absent_cooccur)}"
        )


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def normalize_answer(text: str) -> str:
    """First word of a generated answer, lower-cased, without punctuation."""
    words = text.strip().lower().replace(".", " ").replace(",", " ").split()
    return words[0] if words else ""


def build_messages(question: str) -> list[dict]:
    """One user turn with an image part and a text part (the standard multimodal chat format)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def score(predictions: list[dict]) -> EvalResult:
    """Aggregate per-sample predictions (dicts with family, subtype, answer, prediction) into an ``EvalResult``."""
    fams = [f for f in FAMILY_ORDER if any(p["family"] == f for p in predictions)]
    fams += sorted({p["family"] for p in predictions} - set(fams))
    acc, n = {}, {}
    for f in fams:
        rows = [p for p in predictions if p["family"] == f]
        n[f] = len(rows)
        acc[f] = sum(p["correct"] for p in rows) / len(rows)

    def yes_rate(sub: str) -> float | None:
        rows = [p for p in predictions if p["family"] == "exist" and p.get("subtype") == sub]
        return sum(p["prediction"] == "yes" for p in rows) / len(rows) if rows else None

    ex = [p for p in predictions if p["family"] == "exist"]
    f1 = None
    if ex:
        tp = sum(p["prediction"] == "yes" and p["answer"] == "yes" for p in ex)
        fp = sum(p["prediction"] == "yes" and p["answer"] == "no" for p in ex)
        fn = sum(p["prediction"] != "yes" and p["answer"] == "yes" for p in ex)
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    kept = [p["visual_kept"] for p in predictions if p.get("visual_kept") is not None]
    return EvalResult(
        accuracy=acc,
        n=n,
        mean=sum(acc.values()) / len(acc) if acc else 0.0,
        yes_rate_present=yes_rate("present"),
        yes_rate_absent=yes_rate("absent"),
        yes_rate_absent_cooccur=yes_rate("absent_cooccur"),
        exist_f1=f1,
        predictions=predictions,
        visual_tokens_kept=sum(kept) / len(kept) if kept else None,
    )


@torch.no_grad()
def evaluate(
    model,
    processor,
    dataset,
    batch_size: int = 16,
    max_new_tokens: int = 3,
    progress: bool = False,
    visual_keep: Callable[[dict], Sequence[int]] | None = None,
) -> EvalResult:
    """Evaluate ``model`` on ``dataset`` (a testbed ``datasets.Dataset`` or a list of row dicts).

    ``visual_keep(row)`` optionally returns the indices (0..N-1, in image-token order) of the visual tokens to keep
    for that row; the others are hidden from layer 0 on (see the module docstring).
    """
    from rich.progress import Progress

    device = next(model.parameters()).device
    image_token_id = model.config.image_token_id
    tok = processor.tokenizer
    was_training = model.training
    model.eval()
    preds: list[dict] = []
    n = len(dataset)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("evaluate", total=n)
        for s in range(0, n, batch_size):
            rows = [dataset[i] for i in range(s, min(n, s + batch_size))]
            texts = [processor.apply_chat_template(build_messages(r["question"]), add_generation_prompt=True)
                     for r in rows]  # fmt: skip
            images = [r["image"].convert("RGB") for r in rows]
            inputs = processor(images=images, text=texts, padding=True, return_tensors="pt").to(device)
            gen_kwargs = {}
            kept_frac: list[float | None] = [None] * len(rows)
            if visual_keep is not None:
                mask = inputs["attention_mask"].clone()
                pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
                is_img = inputs["input_ids"] == image_token_id
                for b, r in enumerate(rows):
                    img_pos = is_img[b].nonzero().flatten()
                    keep = torch.zeros(len(img_pos), dtype=torch.bool, device=device)
                    idx = torch.as_tensor(list(visual_keep(r)), dtype=torch.long, device=device)
                    if idx.numel():
                        keep[idx] = True
                    mask[b, img_pos[~keep]] = 0
                    kept_frac[b] = keep.float().mean().item()
                inputs["attention_mask"] = mask
                gen_kwargs["position_ids"] = pos
            out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=tok.pad_token_id, **gen_kwargs)  # fmt: skip
            new = out[:, inputs["input_ids"].shape[1] :]
            decoded = processor.batch_decode(new, skip_special_tokens=True)
            for r, d, k in zip(rows, decoded, kept_frac):
                pred = normalize_answer(d)
                preds.append({
                    "index": r.get("index"), "family": r["family"], "subtype": r.get("subtype", ""),
                    "question": r["question"], "answer": r["answer"], "prediction": pred, "raw": d,
                    "correct": pred == r["answer"], "visual_kept": k,
                })  # fmt: skip
            bar.update(task, advance=len(rows))
    if was_training:
        model.train()
    return score(preds)
