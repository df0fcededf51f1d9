"""The ``describe`` family's text side (issue #15): reference descriptions with a planted *language* prior,
text-primed yes/no questions, and CHAIR scored against the scene spec.

Only the pieces that need no new vocabulary or training are here; the family is not yet in the dataset, the
tokenizer or a trained model (see the module's tests and the README's hallucination section).

- Descriptions list the objects' types in reading order (``"red circle , blue square"``), one mention per type.
  :func:`training_description` plants the language prior: after an anchor of a co-occurrence pair
  (``scenes.COOCCUR_PAIRS``) the partner is written with probability ``prior`` *even when the scene has none* —
  a text-driven habit, unlike the existing visual co-occurrence in the scenes.
- :func:`primed_question`: ``"there is a red circle . is there a blue square ?"`` — a present anchor primes its
  partner; the answer comes from the scene.
- :func:`chair`: CHAIR_I = hallucinated mentions / mentions, CHAIR_S = descriptions with any hallucinated mention /
  descriptions (Rohrbach et al., EMNLP 2018, with the scene spec as ground truth instead of COCO annotations),
  recall = present types mentioned / present types; each with a 95 % Wilson interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vlm_accel.testbed.scenes import COLOR_NAMES, COOCCUR_PAIRS, SHAPES, Scene

DESCRIBE_QUESTION = "list the objects ."
PARTNER_OF: dict[tuple[str, str], tuple[str, str]] = {anchor: partner for anchor, partner in COOCCUR_PAIRS}


def scene_types(scene: Scene) -> list[tuple[str, str]]:
    """The scene's object types, once each, in reading order (row, then column of their grid cell)."""
    seen: list[tuple[str, str]] = []
    for o in sorted(scene.objects, key=lambda o: (o.row, o.col)):
        if (o.color, o.shape) not in seen:
            seen.append((o.color, o.shape))
    return seen


def format_description(types: Sequence[tuple[str, str]]) -> str:
    return " , ".join(f"{color} {shape}" for color, shape in types)


def reference_description(scene: Scene) -> str:
    """The faithful description: every present type, nothing else."""
    return format_description(scene_types(scene))


def training_description(scene: Scene, rng: np.random.Generator, prior: float) -> str:
    """A training target with the planted language prior: an anchor is followed by its partner with probability
    ``prior`` whether or not the partner is present (when present, it moves up to follow the anchor)."""
    types = scene_types(scene)
    out: list[tuple[str, str]] = []
    for t in types:
        if t in out:
            continue
        out.append(t)
        partner = PARTNER_OF.get(t)
        if partner is not None and partner not in out and rng.random() < prior:
            out.append(partner)
    return format_description(out)


def primed_question(scene: Scene, anchor: tuple[str, str]) -> tuple[str, str]:
    """``("there is <anchor> . is there <partner> ?", "yes"/"no")`` for a pair's anchor (present in ``scene``)."""
    if anchor not in PARTNER_OF:
        raise ValueError(f"{anchor} is not the anchor of a co-occurrence pair")
    if not scene.has(*anchor):
        raise ValueError(f"the scene has no {anchor[0]} {anchor[1]} to prime with")
    partner = PARTNER_OF[anchor]
    question = f"there is a {anchor[0]} {anchor[1]} . is there a {partner[0]} {partner[1]} ?"
    return question, "yes" if scene.has(*partner) else "no"


def parse_description(text: str) -> tuple[list[tuple[str, str]], int]:
    """Mentioned types (once each, in order) and the number of comma-separated chunks that name no type."""
    mentioned: list[tuple[str, str]] = []
    unparsed = 0
    for chunk in text.split(","):
        words = chunk.split()
        found = [(c, s) for c, s in zip(words, words[1:], strict=False) if c in COLOR_NAMES and s in SHAPES]
        if not found:
            unparsed += bool(words)
        for t in found:
            if t not in mentioned:
                mentioned.append(t)
    return mentioned, unparsed


def wilson(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (``(nan, nan)`` for an empty sample)."""
    if total == 0:
        return math.nan, math.nan
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return centre - half, centre + half


@dataclass
class ChairResult:
    chair_i: float
    chair_s: float
    recall: float
    chair_i_ci: tuple[float, float]
    chair_s_ci: tuple[float, float]
    recall_ci: tuple[float, float]
    mentions: int
    captions: int
    unparsed_chunks: int


def chair(descriptions: Sequence[str], scenes: Sequence[Scene]) -> ChairResult:
    """CHAIR_I, CHAIR_S and recall of ``descriptions`` against their scenes' specs (intervals treat mentions /
    captions / present objects as independent draws, an approximation for CHAIR_I and recall)."""
    if len(descriptions) != len(scenes):
        raise ValueError(f"{len(descriptions)} descriptions for {len(scenes)} scenes")
    mentions = hallucinated = bad_captions = present = recalled = unparsed = 0
    for text, scene in zip(descriptions, scenes, strict=True):
        mentioned, missed = parse_description(text)
        truth = set(scene_types(scene))
        wrong = sum(t not in truth for t in mentioned)
        mentions += len(mentioned)
        hallucinated += wrong
        bad_captions += wrong > 0
        present += len(truth)
        recalled += len(truth & set(mentioned))
        unparsed += missed
    ratio = lambda a, b: a / b if b else math.nan  # noqa: E731
    return ChairResult(
        chair_i=ratio(hallucinated, mentions),
        chair_s=ratio(bad_captions, len(descriptions)),
        recall=ratio(recalled, present),
        chair_i_ci=wilson(hallucinated, mentions),
        chair_s_ci=wilson(bad_captions, len(descriptions)),
        recall_ci=wilson(recalled, present),
        mentions=mentions,
        captions=len(descriptions),
        unparsed_chunks=unparsed,
    )
