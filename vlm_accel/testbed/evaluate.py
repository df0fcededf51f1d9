"""Accuracy of a (possibly patched) VLM on a testbed dataset, through the standard transformers flow.

``processor.apply_chat_template`` (an image part and a text part) → ``processor(images=..., text=...,
padding=True)`` with left padding → ``model.generate(do_sample=False)`` → ``processor.batch_decode`` of the new
tokens. Only ``model.generate`` is called, so patches that act inside ``forward``/``generate`` are evaluated as
users would run them.

``visual_keep`` (used by the validity checks) hides visual tokens from layer 0 on: the 2-D ``attention_mask`` is
zeroed at the dropped image-token positions (hiding them as keys in every layer) while ``position_ids`` are passed
explicitly from the unmodified mask, so every kept token keeps its original position.

The describe families (``describe.py``): ``describe`` rows are generated greedily up to
``DESCRIBE_MAX_NEW_TOKENS`` in batches of their own and scored with CHAIR against their scene spec (``chair_i``,
``chair_s``, ``recall`` with 95 % Wilson intervals, and ``partner_mention_rate``: the share of ``absent_cooccur``
scenes whose description names the absent partner); ``primed`` rows report ``primed_yes_rate_absent`` (the
text-primed hallucination rate) and ``primed_yes_rate_present``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from .describe import DESCRIBE_MAX_NEW_TOKENS, PARTNER_OF, chair, parse_description, scene_types
from .scenes import Scene

FAMILY_ORDER: tuple[str, ...] = ("color", "shape", "count", "exist", "position", "describe", "primed")


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
    chair_i: float | None = None
    chair_s: float | None = None
    recall: float | None = None
    chair_i_ci: tuple[float, float] | None = None
    chair_s_ci: tuple[float, float] | None = None
    recall_ci: tuple[float, float] | None = None
    mentions: int | None = None
    partner_mention_rate: float | None = None
    primed_yes_rate_absent: float | None = None
    primed_yes_rate_present: float | None = None

    def as_dict(self, with_predictions: bool = True) -> dict:
        d = asdict(self)
        if not with_predictions:
            d.pop("predictions")
        return d

    def summary(self) -> str:
        fams = " ".join(f"{k} {v:.3f}" for k, v in self.accuracy.items())
        text = (
            f"mean {self.mean:.3f} | {fams} | yes-rate present {_fmt(self.yes_rate_present)} absent "
            f"{_fmt(self.yes_rate_absent)} absent_cooccur {_fmt(self.yes_rate_absent_cooccur)}"
        )
        if self.chair_i is not None:
            text += (f" | CHAIR_I {_fmt(self.chair_i)} CHAIR_S {_fmt(self.chair_s)} recall {_fmt(self.recall)} "
                     f"partner mentioned {_fmt(self.partner_mention_rate)}")  # fmt: skip
        if self.primed_yes_rate_absent is not None:
            text += f" | primed yes-rate absent {_fmt(self.primed_yes_rate_absent)}"
        return text


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def normalize_answer(text: str) -> str:
    """First word of a generated answer, lower-cased, without punctuation."""
    words = text.strip().lower().replace(".", " ").replace(",", " ").split()
    return words[0] if words else ""


def describe_prediction(text: str, spec: str, subtype: str = "") -> dict:
    """Per-row fields of a generated description: the mentioned types, whether it names exactly the scene's types,
    and (``absent_cooccur`` rows) whether it names the absent partner of a present anchor."""
    scene = Scene.from_json(spec)
    mentioned, unparsed = parse_description(text)
    truth = scene_types(scene)
    absent_partners = [p for a, p in PARTNER_OF.items() if scene.has(*a) and not scene.has(*p)]
    return {
        "prediction": " ".join(text.split()),
        "correct": set(mentioned) == set(truth) and unparsed == 0,
        "mentioned": [" ".join(t) for t in mentioned],
        "partner_mentioned": any(p in mentioned for p in absent_partners) if absent_partners else None,
    }


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
    extra: dict = {}
    desc = [p for p in predictions if p["family"] == "describe"]
    if desc:
        c = chair([p["prediction"] for p in desc], [Scene.from_json(p["spec"]) for p in desc])
        flags = [p["partner_mentioned"] for p in desc if p.get("partner_mentioned") is not None]
        extra.update(chair_i=c.chair_i, chair_s=c.chair_s, recall=c.recall, chair_i_ci=c.chair_i_ci,
                     chair_s_ci=c.chair_s_ci, recall_ci=c.recall_ci, mentions=c.mentions,
                     partner_mention_rate=sum(flags) / len(flags) if flags else None)  # fmt: skip
    for sub, key in (("absent_cooccur", "primed_yes_rate_absent"), ("present", "primed_yes_rate_present")):
        rows = [p for p in predictions if p["family"] == "primed" and p.get("subtype") == sub]
        if rows:
            extra[key] = sum(p["prediction"] == "yes" for p in rows) / len(rows)
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
        **extra,
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
    for that row; the others are hidden from layer 0 on (see the module docstring). ``describe`` rows run in
    batches of their own with ``max(max_new_tokens, DESCRIBE_MAX_NEW_TOKENS)`` new tokens; predictions keep the
    dataset's order.
    """
    from rich.progress import Progress

    device = next(model.parameters()).device
    image_token_id = model.config.image_token_id
    tok = processor.tokenizer
    was_training = model.training
    model.eval()
    preds: dict[int, dict] = {}
    n = len(dataset)
    families = dataset["family"] if hasattr(dataset, "column_names") else [r["family"] for r in dataset]
    groups = [[i for i in range(n) if families[i] != "describe"], [i for i in range(n) if families[i] == "describe"]]
    chunks = [(g[s : s + batch_size], max(max_new_tokens, DESCRIBE_MAX_NEW_TOKENS) if k else max_new_tokens)
              for k, g in enumerate(groups) for s in range(0, len(g), batch_size)]  # fmt: skip
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("evaluate", total=n)
        for chunk, new_tokens in chunks:
            rows = [dataset[i] for i in chunk]
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
            out = model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens,
                                 pad_token_id=tok.pad_token_id, **gen_kwargs)  # fmt: skip
            new = out[:, inputs["input_ids"].shape[1] :]
            decoded = processor.batch_decode(new, skip_special_tokens=True)
            for i, r, d, k in zip(chunk, rows, decoded, kept_frac):
                pred = normalize_answer(d)
                preds[i] = {
                    "index": r.get("index"), "family": r["family"], "subtype": r.get("subtype", ""),
                    "question": r["question"], "answer": r["answer"], "prediction": pred, "raw": d,
                    "correct": pred == r["answer"], "visual_kept": k,
                }  # fmt: skip
                if r["family"] == "describe":
                    preds[i].update(describe_prediction(d, r["spec"], r.get("subtype", "")), spec=r["spec"])
            bar.update(task, advance=len(rows))
    if was_training:
        model.train()
    return score([preds[i] for i in range(n)])
