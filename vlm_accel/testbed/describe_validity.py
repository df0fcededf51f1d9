"""Validity check of the describe family (issue #15): is the partner hallucination driven by the *text*?

On fresh scenes with a present anchor and an absent partner (``describe.anchor_scene``), the anchor is put in or
out of the image (``unseen``: the anchor's objects deleted, everything else identical) and in or out of the text
the model continues. The text is a teacher-forced assistant prefix: the reference mentions up to the anchor's slot
in ``DESCRIBE_ORDER``, with the anchor (``anchor in text``) or without it; the model's next greedy mention is
recorded. Four cells:

==================  =====================  ==========================
                    anchor in the image    anchor not in the image
anchor in text      ``text_and_image``     ``text_only`` (false mention)
no anchor in text   ``image_only``         ``neither``
==================  =====================  ==========================

The partner hallucination is text-driven when the textual anchor alone brings the partner (``text_only`` at least
half of ``text_and_image``) and the visible anchor without its mention does not (``text_and_image`` −
``image_only`` ≥ 0.2). Both thresholds were fixed before the shipped model was measured.

The same design runs on yes/no questions (``is there a {partner} ?`` with and without the text prime ``there is a
{anchor} .``, anchor seen / unseen), and free generation is split by whether the model itself mentioned the anchor
(in-context hallucination: P(partner | own anchor mention) against P(partner | no anchor mention)).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .describe import (
    DESCRIBE_MAX_NEW_TOKENS,
    DESCRIBE_QUESTION,
    PARTNER_OF,
    anchor_scene,
    parse_description,
    scene_types,
    wilson,
)
from .evaluate import build_messages, normalize_answer
from .scenes import Scene, render

CELLS: tuple[str, ...] = ("text_and_image", "text_only", "image_only", "neither")


@dataclass
class Item:
    """One probe: the scene (anchor present, partner absent), the same scene without the anchor, and prefixes."""

    scene: Scene
    unseen: Scene
    anchor: tuple[str, str]
    with_anchor: list[tuple[str, str]]
    without_anchor: list[tuple[str, str]]


def make_items(n: int, seed: int) -> list[Item]:
    """``n`` probes (deterministic for ``seed``; a stream of its own, never used in training)."""
    items = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 15_003])
        scene, anchor = anchor_scene(rng, partner_present=False)
        unseen = Scene([o for o in scene.objects if (o.color, o.shape) != anchor], scene.background_seed, scene.tint)
        ref = scene_types(scene)
        k = ref.index(anchor)
        items.append(Item(scene, unseen, anchor, ref[: k + 1], ref[:k]))
    return items


def _prompt(processor, question: str, prefix: list[tuple[str, str]] | None = None) -> str:
    text = processor.apply_chat_template(build_messages(question), add_generation_prompt=True)
    if prefix:
        text += " " + " , ".join(f"{c} {s}" for c, s in prefix) + " ,"
    return text


@torch.no_grad()
def _generate(model, processor, images, texts, max_new_tokens: int, batch_size: int) -> list[str]:
    device = next(model.parameters()).device
    tok = processor.tokenizer
    out_text: list[str] = []
    for s in range(0, len(texts), batch_size):
        inputs = processor(images=images[s : s + batch_size], text=texts[s : s + batch_size], padding=True,
                           return_tensors="pt").to(device)  # fmt: skip
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        out_text += processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return out_text


def _rate(flags: list[bool]) -> dict:
    k, n = int(sum(flags)), len(flags)
    return {"rate": k / n if n else float("nan"), "k": k, "n": n, "ci95": wilson(k, n)}


@dataclass
class DescribeValidityReport:
    """Rates (with 95 % Wilson intervals) of the four cells, the primed yes/no grid and the free-generation split."""

    next_is_partner: dict[str, dict]
    next_is_anchor_image_only: dict
    yes_rate: dict[str, dict]
    free_partner_given_anchor: dict
    free_partner_without_anchor: dict
    n: int
    seed: int
    examples: list[dict] = field(default_factory=list)

    def passed(self, ratio: float = 0.5, margin: float = 0.2) -> dict[str, bool]:
        r = {k: v["rate"] for k, v in self.next_is_partner.items()}
        return {
            "text_alone_brings_the_partner": r["text_only"] >= ratio * r["text_and_image"] and r["text_only"] > 0,
            "visible_anchor_alone_does_not": r["text_and_image"] - r["image_only"] >= margin,
        }

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed()}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=1)


def run_describe_validity(model, processor, n: int = 200, seed: int = 20_261_202, batch_size: int = 32) -> DescribeValidityReport:  # fmt: skip
    """Measure the four prefix cells, the primed yes/no grid and free generation on ``n`` fresh probes."""
    items = make_items(n, seed)
    seen = [render(it.scene) for it in items]
    unseen = [render(it.unseen) for it in items]
    cells = {
        "text_and_image": (seen, "with_anchor"),
        "text_only": (unseen, "with_anchor"),
        "image_only": (seen, "without_anchor"),
        "neither": (unseen, "without_anchor"),
    }
    next_is_partner, anchor_next = {}, []
    examples: list[dict] = []
    for cell, (images, which) in cells.items():
        texts = [_prompt(processor, DESCRIBE_QUESTION, getattr(it, which)) for it in items]
        outs = _generate(model, processor, images, texts, 3, batch_size)
        nexts = [(parse_description(o.split(",")[0])[0] or [None])[0] for o in outs]
        next_is_partner[cell] = _rate([m == PARTNER_OF[it.anchor] for m, it in zip(nexts, items)])
        if cell == "image_only":
            anchor_next = [m == it.anchor for m, it in zip(nexts, items)]
        examples += [{"cell": cell, "prefix": texts[i].split("assistant :")[-1].strip(), "next": outs[i]}
                     for i in range(min(2, n))]  # fmt: skip
    yes_rate = {}
    for primed in (False, True):
        for label, images in (("seen", seen), ("unseen", unseen)):
            qs = []
            for it in items:
                pc, ps = PARTNER_OF[it.anchor]
                q = f"is there a {pc} {ps} ?"
                qs.append(f"there is a {it.anchor[0]} {it.anchor[1]} . {q}" if primed else q)
            outs = _generate(model, processor, images, [_prompt(processor, q) for q in qs], 3, batch_size)
            key = f"{'primed' if primed else 'unprimed'}_{label}"
            yes_rate[key] = _rate([normalize_answer(o) == "yes" for o in outs])
    free = _generate(model, processor, seen, [_prompt(processor, DESCRIBE_QUESTION)] * n, DESCRIBE_MAX_NEW_TOKENS,
                     batch_size)  # fmt: skip
    with_a, without_a = [], []
    for o, it in zip(free, items):
        mentioned = parse_description(o)[0]
        (with_a if it.anchor in mentioned else without_a).append(PARTNER_OF[it.anchor] in mentioned)
    return DescribeValidityReport(next_is_partner, _rate(anchor_next), yes_rate, _rate(with_a), _rate(without_a),
                                  n, seed, examples)  # fmt: skip
