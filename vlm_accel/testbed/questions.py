"""Question families and answer derivation for testbed scenes.

Every answer is derived from the scene spec alone (``answer_for``), so tests can re-check any sample. Answers are
single words: colours, shapes, digits for counts (``0``–``5`` by design; a co-occurring pair can rarely
push a count to ``6``–``8``), ``yes``/``no``, and one of ``topleft``, ``topright``,
``bottomleft``, ``bottomright`` for positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scenes import (
    COLOR_NAMES,
    COOCCUR_PAIRS,
    FREE_TYPES,
    MAX_COUNT,
    MAX_OBJECTS,
    PAIR_TYPES,
    SHAPE_PLURALS,
    SHAPES,
    Scene,
    build_scene,
    sample_scene,
    sample_types,
)

FAMILIES: tuple[str, ...] = ("color", "shape", "count", "exist", "position")
EXIST_SUBTYPES: tuple[str, ...] = ("present", "absent", "absent_cooccur")
COUNT_ANSWERS: tuple[str, ...] = tuple(str(i) for i in range(MAX_OBJECTS + 1))  # targets are 0..5, rare 6..8


@dataclass(frozen=True)
class QA:
    """One question about a scene. ``args`` holds what the question refers to; ``subtype`` is set for ``exist``."""

    family: str
    question: str
    answer: str
    args: tuple[str, ...]
    subtype: str = ""


def question_text(family: str, args: tuple[str, ...]) -> str:
    """The question string for a family and its arguments (all lower-case, space-separated words)."""
    if family == "color":
        return f"what color is the {args[0]} ?"
    if family == "shape":
        return f"what shape is the {args[0]} object ?"
    if family == "count":
        kind, value = args
        if kind == "shape":
            return f"how many {SHAPE_PLURALS[value]} are there ?"
        return f"how many {value} objects are there ?"
    if family == "exist":
        return f"is there a {args[0]} {args[1]} ?"
    if family == "position":
        return f"where is the {args[0]} {args[1]} ?"
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def answer_for(scene: Scene, family: str, args: tuple[str, ...]) -> str:
    """Derive the answer to a question from the scene spec. Raises ``ValueError`` if the question is ill-posed."""
    if family == "color":
        objs = [o for o in scene.objects if o.shape == args[0]]
        if len(objs) != 1:
            raise ValueError(f"color question needs a unique {args[0]}, scene has {len(objs)}")
        return objs[0].color
    if family == "shape":
        objs = [o for o in scene.objects if o.color == args[0]]
        if len(objs) != 1:
            raise ValueError(f"shape question needs a unique {args[0]} object, scene has {len(objs)}")
        return objs[0].shape
    if family == "count":
        kind, value = args
        n = scene.count(shape=value) if kind == "shape" else scene.count(color=value)
        return str(n)
    if family == "exist":
        return "yes" if scene.has(args[0], args[1]) else "no"
    if family == "position":
        objs = [o for o in scene.objects if (o.color, o.shape) == (args[0], args[1])]
        if len(objs) != 1:
            raise ValueError(f"position question needs a unique {args[0]} {args[1]}, scene has {len(objs)}")
        return objs[0].quadrant
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def make_qa(scene: Scene, family: str, args: tuple[str, ...], subtype: str = "") -> QA:
    return QA(family, question_text(family, args), answer_for(scene, family, args), tuple(args), subtype)


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def present_partners(scene: Scene) -> list[tuple[str, str]]:
    """Partner types whose anchor is in the scene."""
    return [p for a, p in COOCCUR_PAIRS if scene.has(*a)]


def candidate_questions(scene: Scene, rng: np.random.Generator, family: str, hard_negative_p: float = 0.6) -> QA | None:
    """One random well-posed question of ``family`` about ``scene``, or None if the scene admits none.

    Used for training: ``exist`` mixes present objects, hard negatives (absent types sharing a colour or shape with a
    present object), random absent types, and — when an anchor is present — its co-occurrence partner.
    """
    types_present = {(o.color, o.shape) for o in scene.objects}
    if family == "color":
        shapes = [s for s in SHAPES if scene.count(shape=s) == 1]
        return make_qa(scene, "color", (_pick(rng, shapes),)) if shapes else None
    if family == "shape":
        colors = [c for c in COLOR_NAMES if scene.count(color=c) == 1]
        return make_qa(scene, "shape", (_pick(rng, colors),)) if colors else None
    if family == "count":
        if rng.random() < 0.5:
            return make_qa(scene, "count", ("shape", _pick(rng, SHAPES)))
        return make_qa(scene, "count", ("color", _pick(rng, COLOR_NAMES)))
    if family == "position":
        uniq = [(o.color, o.shape) for o in scene.objects if scene.count(color=o.color, shape=o.shape) == 1]
        return make_qa(scene, "position", _pick(rng, uniq)) if uniq else None
    if family == "exist":
        partners = present_partners(scene)
        u = rng.random()
        if partners and u < 0.25:
            t = _pick(rng, partners)
            return make_qa(scene, "exist", t, "present" if t in types_present else "absent_cooccur")
        if rng.random() < 0.5:
            o = _pick(rng, scene.objects)
            return make_qa(scene, "exist", (o.color, o.shape), "present")
        absent = [t for t in FREE_TYPES + PAIR_TYPES if t not in types_present]
        if rng.random() < hard_negative_p:
            hard = [t for t in absent if any(t[0] == p[0] or t[1] == p[1] for p in types_present)]
            if hard:
                absent = hard
        return make_qa(scene, "exist", _pick(rng, absent), "absent")
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def sample_eval_item(rng: np.random.Generator, family: str, subtype: str | None = None) -> tuple[Scene, QA]:
    """Sample one (scene, question) pair for evaluation, with balanced answers where the family allows it.

    * ``count``: the target count is uniform over 0..5 and the scene is built to match.
    * ``exist``: ``subtype`` "present" (a present object), "absent" (a random absent, non-partner type) or
      "absent_cooccur" (an anchor is present and its co-occurring partner is absent — the adversarial probe).
    """
    if family == "count":
        kind = "shape" if rng.random() < 0.5 else "color"
        value = _pick(rng, SHAPES) if kind == "shape" else _pick(rng, COLOR_NAMES)
        c = int(rng.integers(0, MAX_COUNT + 1))
        scene = sample_scene(rng, count_target=(kind, value, c))
        return scene, make_qa(scene, "count", (kind, value))
    if family == "exist":
        subtype = subtype or _pick(rng, EXIST_SUBTYPES)
        if subtype == "absent_cooccur":
            anchor, partner = COOCCUR_PAIRS[int(rng.integers(len(COOCCUR_PAIRS)))]
            types = [t for t in sample_types(rng) if t != partner]
            if anchor not in types:
                if len(types) >= 8:
                    types[0] = anchor
                else:
                    types.append(anchor)
            scene = build_scene(rng, types)
            return scene, make_qa(scene, "exist", partner, "absent_cooccur")
        scene = sample_scene(rng)
        types_present = {(o.color, o.shape) for o in scene.objects}
        if subtype == "present":
            o = _pick(rng, scene.objects)
            return scene, make_qa(scene, "exist", (o.color, o.shape), "present")
        if subtype == "absent":
            partners = set(present_partners(scene))
            absent = [t for t in FREE_TYPES + PAIR_TYPES if t not in types_present and t not in partners]
            return scene, make_qa(scene, "exist", _pick(rng, absent), "absent")
        raise ValueError(f"unknown exist subtype {subtype!r}; expected one of {EXIST_SUBTYPES}")
    for _ in range(1000):
        scene = sample_scene(rng)
        qa = candidate_questions(scene, rng, family)
        if qa is not None:
            return scene, qa
    raise RuntimeError(f"could not sample a {family} question")  # pragma: no cover


def sample_training_qas(
    scene: Scene, rng: np.random.Generator, k: int, families: tuple[str, ...] = FAMILIES
) -> list[QA]:
    """Up to ``k`` distinct questions about one scene, each of a random family from ``families``."""
    out: list[QA] = []
    seen: set[str] = set()
    for _ in range(4 * k):
        fam = families[int(rng.integers(len(families)))]
        qa = candidate_questions(scene, rng, fam)
        if qa is None or qa.question in seen:
            continue
        seen.add(qa.question)
        out.append(qa)
        if len(out) == k:
            break
    return out


def parse_question(question: str) -> tuple[str, tuple[str, ...]]:
    """Inverse of :func:`question_text`: the family and arguments of a question string."""
    w = question.split()
    plural_to_shape = {p: s for s, p in SHAPE_PLURALS.items()}
    if w[:3] == ["what", "color", "is"]:
        return "color", (w[4],)
    if w[:3] == ["what", "shape", "is"]:
        return "shape", (w[4],)
    if w[:2] == ["how", "many"]:
        if w[2] in plural_to_shape:
            return "count", ("shape", plural_to_shape[w[2]])
        return "count", ("color", w[2])
    if w[:2] == ["is", "there"]:
        return "exist", (w[3], w[4])
    if w[:2] == ["where", "is"]:
        return "position", (w[3], w[4])
    raise ValueError(f"not a testbed question: {question!r}")
