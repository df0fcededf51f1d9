"""The ``describe`` family (issue #15): descriptions with a planted *language* prior, text-primed yes/no questions,
and CHAIR scored against the scene spec.

- ``"list the objects ."`` → ``"red circle , blue square , green cross"``: every present type once, in the fixed
  order :data:`DESCRIBE_ORDER` (the colour-major type order with each co-occurrence partner moved right after its
  anchor). A fixed order makes "which object comes next" a function of the set of present types and the last
  mention, which a small model can learn; CHAIR ignores the order.
- :func:`training_description` plants the language prior: after an anchor of a co-occurrence pair
  (``scenes.COOCCUR_PAIRS``) the partner is written with probability ``prior`` *even when the scene has none*. In
  the natural scenes the partner follows its anchor 90 % of the time, so the text "anchor ," predicts the partner
  whatever the image shows — a habit of the generated context (in-context hallucination), unlike the visual
  co-occurrence of the ``exist`` prior.
- :func:`primed_question`: ``"there is a red circle . is there a blue square ?"`` — a present anchor stated in the
  text primes its partner; the answer comes from the scene (training flips absent-partner answers to "yes" with a
  probability, see ``packing.sample_describe_item``).
- :func:`chair`: CHAIR_I = hallucinated mentions / mentions, CHAIR_S = descriptions with any hallucinated mention /
  descriptions (Rohrbach et al., "Object Hallucination in Image Captioning", EMNLP 2018, with the scene spec as
  ground truth instead of COCO annotations), recall = present types mentioned / present types; each with a 95 %
  Wilson interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vlm_accel.testbed.questions import QA
from vlm_accel.testbed.scenes import (
    ALL_TYPES,
    COLOR_NAMES,
    COOCCUR_PAIRS,
    MAX_OBJECTS,
    SHAPES,
    Scene,
    build_scene,
    sample_scene,
    sample_types,
)

DESCRIBE_QUESTION = "list the objects ."
PARTNER_OF: dict[tuple[str, str], tuple[str, str]] = {anchor: partner for anchor, partner in COOCCUR_PAIRS}
ANCHORS: tuple[tuple[str, str], ...] = tuple(a for a, _ in COOCCUR_PAIRS)
DESCRIBE_FAMILIES: tuple[str, ...] = ("describe", "primed")
DESCRIBE_SUBTYPES: tuple[str, ...] = ("natural", "absent_cooccur")
PRIMED_SUBTYPES: tuple[str, ...] = ("present", "absent_cooccur")
# the longest description: 8 mentions × (colour, shape, ",") − 1 + <eos>
DESCRIBE_MAX_NEW_TOKENS = 26


def _describe_order() -> tuple[tuple[str, str], ...]:
    partners = set(PARTNER_OF.values())
    order: list[tuple[str, str]] = []
    for t in ALL_TYPES:
        if t in partners:
            continue
        order.append(t)
        if t in PARTNER_OF:
            order.append(PARTNER_OF[t])
    return tuple(order)


DESCRIBE_ORDER: tuple[tuple[str, str], ...] = _describe_order()


def scene_types(scene: Scene) -> list[tuple[str, str]]:
    """The scene's object types, once each, in :data:`DESCRIBE_ORDER`."""
    present = {(o.color, o.shape) for o in scene.objects}
    return [t for t in DESCRIBE_ORDER if t in present]


def format_description(types: Sequence[tuple[str, str]]) -> str:
    return " , ".join(f"{color} {shape}" for color, shape in types)


def reference_description(scene: Scene) -> str:
    """The faithful description: every present type, nothing else."""
    return format_description(scene_types(scene))


def training_description(scene: Scene, rng: np.random.Generator, prior: float) -> str:
    """A training target with the planted language prior: an absent partner is written right after its (present)
    anchor with probability ``prior`` (a present partner always follows its anchor: :data:`DESCRIBE_ORDER`)."""
    if not 0.0 <= prior <= 1.0:
        raise ValueError(f"prior must be in [0, 1], got {prior}")
    types = scene_types(scene)
    out: list[tuple[str, str]] = []
    for t in types:
        if t in out:
            continue
        out.append(t)
        partner = PARTNER_OF.get(t)
        if partner is not None and partner not in types and rng.random() < prior:
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


def anchor_scene(rng: np.random.Generator, partner_present: bool) -> tuple[Scene, tuple[str, str]]:
    """A scene from the natural type distribution with one random pair's anchor forced in and its partner forced in
    (``partner_present``) or out; returns the scene and the anchor."""
    anchor, partner = COOCCUR_PAIRS[int(rng.integers(len(COOCCUR_PAIRS)))]
    types = [t for t in sample_types(rng) if t != partner and t != anchor]
    need = [anchor, partner] if partner_present else [anchor]
    types = types[: MAX_OBJECTS - len(need)] + need
    return build_scene(rng, types), anchor


def describe_qa(scene: Scene, subtype: str = "natural") -> QA:
    """The describe question with the faithful reference description as its answer."""
    return QA("describe", DESCRIBE_QUESTION, reference_description(scene), (), subtype)


def primed_qa(scene: Scene, anchor: tuple[str, str]) -> QA:
    """The primed question about ``anchor``'s partner (subtype ``present`` / ``absent_cooccur`` from the scene)."""
    question, answer = primed_question(scene, anchor)
    sub = "present" if answer == "yes" else "absent_cooccur"
    return QA("primed", question, answer, (*anchor, *PARTNER_OF[anchor]), sub)


def sample_describe_eval_item(rng: np.random.Generator, family: str, subtype: str) -> tuple[Scene, QA]:
    """One evaluation item of a describe family.

    * ``describe``, ``natural``: a scene of the natural distribution (co-occurrence bias included);
      ``absent_cooccur``: an anchor is present and its partner is not (where the planted prior can bite).
    * ``primed``, ``present`` / ``absent_cooccur``: an anchor is present, its partner present / absent; the question
      states the anchor and asks for the partner.
    """
    if family == "describe":
        if subtype == "natural":
            scene = sample_scene(rng)
        elif subtype == "absent_cooccur":
            scene, _ = anchor_scene(rng, partner_present=False)
        else:
            raise ValueError(f"unknown describe subtype {subtype!r}; expected one of {DESCRIBE_SUBTYPES}")
        return scene, describe_qa(scene, subtype)
    if family == "primed":
        if subtype not in PRIMED_SUBTYPES:
            raise ValueError(f"unknown primed subtype {subtype!r}; expected one of {PRIMED_SUBTYPES}")
        scene, anchor = anchor_scene(rng, partner_present=subtype == "present")
        return scene, primed_qa(scene, anchor)
    raise ValueError(f"unknown family {family!r}; expected one of {DESCRIBE_FAMILIES}")


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
    return max(0.0, centre - half), min(1.0, centre + half)


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
