"""Seeded evaluation datasets (``datasets.Dataset``) of testbed questions, one question per image.

``make_dataset(n, seed, split)`` is deterministic: the same ``(n, seed, split)`` gives the same pixels and questions.
Different splits draw from disjoint seed streams (training batches use yet another stream, see ``packing.py``).
Families are interleaved round-robin, so any prefix of the dataset is balanced; ``exist`` cycles through
``present, absent, present, absent_cooccur`` (half present, a quarter random absent, a quarter absent co-occurring
partner, POPE-style). The describe families (``describe.py``; opt-in through ``families``) alternate their subtypes:
``describe`` natural / absent_cooccur, ``primed`` present / absent_cooccur.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import datasets
import numpy as np

from .describe import DESCRIBE_FAMILIES, DESCRIBE_SUBTYPES, PRIMED_SUBTYPES, sample_describe_eval_item
from .questions import FAMILIES, QA, make_qa, sample_eval_item
from .scenes import COOCCUR_PAIRS, GRID, MAX_OBJECTS, NUM_PATCHES, Scene, build_scene, render, sample_types

EXIST_CYCLE: tuple[str, ...] = ("present", "absent", "present", "absent_cooccur")
SPLITS: tuple[str, ...] = ("test", "validation", "train")


def _features(frames: bool = False) -> datasets.Features:
    feats = {
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "family": datasets.Value("string"),
        "subtype": datasets.Value("string"),
        "spec": datasets.Value("string"),
        "object_patches": datasets.Sequence(datasets.Value("int32")),
        "index": datasets.Value("int32"),
    }
    if frames:
        feats["frames"] = datasets.Sequence(datasets.Image())
    else:
        feats["image"] = datasets.Image()
    return datasets.Features(feats)


def _rng(seed: int, split: str, i: int, salt: int = 0) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return np.random.default_rng([seed, zlib.crc32(split.encode()), i, salt])


def make_item(seed: int, i: int, family: str, split: str = "test", subtype: str | None = None) -> tuple[Scene, QA]:
    """The ``i``-th item of a dataset: its scene and question (deterministic)."""
    if family in DESCRIBE_FAMILIES:
        default = DESCRIBE_SUBTYPES[0] if family == "describe" else PRIMED_SUBTYPES[0]
        return sample_describe_eval_item(_rng(seed, split, i), family, subtype or default)
    return sample_eval_item(_rng(seed, split, i), family, subtype)


def _subtype_cycle(family: str) -> tuple[str, ...] | None:
    return {"exist": EXIST_CYCLE, "describe": DESCRIBE_SUBTYPES, "primed": PRIMED_SUBTYPES}.get(family)


def make_dataset(n: int, seed: int, split: str = "test", families: Sequence[str] | None = None) -> datasets.Dataset:
    """``n`` seeded visual-QA items with columns ``image`` (PIL), ``question``, ``answer``, ``family``, ``subtype``
    (exist only: ``present`` / ``absent`` / ``absent_cooccur``), ``spec`` (JSON of the scene: objects with shape,
    colour, size, bbox, patch index), ``object_patches`` (visual-token indices holding objects) and ``index``.
    ``families`` may include the describe families ``describe`` (answer: the reference description) and
    ``primed`` (see ``describe.py``)."""
    fams = tuple(families) if families else FAMILIES
    bad = [f for f in fams if f not in FAMILIES + DESCRIBE_FAMILIES]
    if bad:
        raise ValueError(f"unknown families {bad}; expected a subset of {FAMILIES + DESCRIBE_FAMILIES}")
    rows: dict[str, list] = {k: [] for k in _features()}
    per_family: dict[str, int] = {}
    for i in range(n):
        fam = fams[i % len(fams)]
        k = per_family.get(fam, 0)
        per_family[fam] = k + 1
        cycle = _subtype_cycle(fam)
        sub = cycle[k % len(cycle)] if cycle else None
        scene, qa = make_item(seed, i, fam, split, sub)
        rows["image"].append(render(scene))
        rows["question"].append(qa.question)
        rows["answer"].append(qa.answer)
        rows["family"].append(qa.family)
        rows["subtype"].append(qa.subtype)
        rows["spec"].append(scene.to_json())
        rows["object_patches"].append(scene.object_patches())
        rows["index"].append(i)
    return datasets.Dataset.from_dict(rows, features=_features())


def _move(obj, dr: int, dc: int, step: int):
    from .scenes import PATCH_SIZE, SceneObject

    row, col = obj.row + dr * step, obj.col + dc * step
    dy, dx = (row - obj.row) * PATCH_SIZE, (col - obj.col) * PATCH_SIZE
    x0, y0, x1, y1 = obj.bbox
    return SceneObject(obj.shape, obj.color, obj.size, row, col, obj.cx + dx, obj.cy + dy, obj.radius, obj.rgb,
                       (x0 + dx, y0 + dy, x1 + dx, y1 + dy))  # fmt: skip


def make_frame_sequence(rng: np.random.Generator, frames: int) -> tuple[list[Scene], QA]:
    """A static scene in which one object moves one cell per frame in a straight line; question about the last
    frame (position of the mover, or presence/colour/count as in still images)."""
    types = sample_types(rng, n_objects=int(rng.integers(2, MAX_OBJECTS + 1)))
    for _ in range(100):
        base = build_scene(rng, types)
        mover_i = int(rng.integers(len(base.objects)))
        dr, dc = [(0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (-1, -1), (1, -1), (-1, 1)][int(rng.integers(8))]
        m = base.objects[mover_i]
        end_r, end_c = m.row + dr * (frames - 1), m.col + dc * (frames - 1)
        occupied = {o.patch for j, o in enumerate(base.objects) if j != mover_i}
        path = [(m.row + dr * t) * GRID + (m.col + dc * t) for t in range(frames)]
        if 0 <= end_r < GRID and 0 <= end_c < GRID and not occupied.intersection(path):
            break
    else:  # pragma: no cover - practically unreachable
        raise RuntimeError("could not place a moving object")
    scenes = []
    for t in range(frames):
        objs = list(base.objects)
        objs[mover_i] = _move(m, dr, dc, t)
        scenes.append(Scene(objs, base.background_seed, base.tint, extra={"frame": t, "mover": mover_i,
                                                                          "direction": [dr, dc]}))  # fmt: skip
    last = scenes[-1]
    if last.count(color=m.color, shape=m.shape) == 1 and rng.random() < 0.5:
        qa = make_qa(last, "position", (m.color, m.shape))
    else:
        fam = ("color", "count", "exist")[int(rng.integers(3))]
        from .questions import candidate_questions

        qa = candidate_questions(last, rng, fam) or make_qa(last, "exist", (m.color, m.shape), "present")
    return scenes, qa


def make_frame_dataset(n: int, seed: int, frames: int = 4, split: str = "test") -> datasets.Dataset:
    """``n`` frame sequences (column ``frames``: list of PIL images, ``T = frames``) with one question each about
    the last frame. ``spec`` holds the JSON of the last frame's scene; ``object_patches`` its object tokens."""
    if frames < 1:
        raise ValueError("frames must be >= 1")
    rows: dict[str, list] = {k: [] for k in _features(frames=True)}
    for i in range(n):
        scenes, qa = make_frame_sequence(_rng(seed, split, i, salt=1), frames)
        rows["frames"].append([render(s) for s in scenes])
        rows["question"].append(qa.question)
        rows["answer"].append(qa.answer)
        rows["family"].append(qa.family)
        rows["subtype"].append(qa.subtype)
        rows["spec"].append(scenes[-1].to_json())
        rows["object_patches"].append(scenes[-1].object_patches())
        rows["index"].append(i)
    return datasets.Dataset.from_dict(rows, features=_features(frames=True))


def all_patches() -> list[int]:
    return list(range(NUM_PATCHES))


__all__ = ["make_dataset", "make_frame_dataset", "make_item", "COOCCUR_PAIRS"]
