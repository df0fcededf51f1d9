"""The describe family's text side: CHAIR from the scene spec, the planted language prior, text-primed questions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vlm_accel.testbed.describe import (
    chair,
    parse_description,
    primed_question,
    reference_description,
    training_description,
    wilson,
)
from vlm_accel.testbed.scenes import build_scene


def scene(*types):
    return build_scene(np.random.default_rng(0), list(types))


def test_chair_counts_hallucinated_mentions_captions_and_recall_by_hand():
    scenes = [scene(("red", "circle"), ("green", "square")), scene(("blue", "cross"))]
    # caption 1: 2 correct + 1 hallucinated (blue square); caption 2: the only object, nothing invented
    result = chair(["red circle , blue square , green square", "blue cross"], scenes)
    assert (result.mentions, result.captions) == (4, 2)
    assert result.chair_i == pytest.approx(1 / 4) and result.chair_s == pytest.approx(1 / 2)
    assert result.recall == pytest.approx(3 / 3)
    lo, hi = result.chair_s_ci
    assert lo < 0.5 < hi
    missing = chair(["red circle , purple diamond , something"], [scenes[0]])
    assert (missing.chair_i, missing.chair_s, missing.recall, missing.unparsed_chunks) == (0.5, 1.0, 0.5, 1)


def test_reference_description_is_faithful_and_parses_back():
    s = scene(("yellow", "diamond"), ("red", "circle"), ("yellow", "diamond"))
    mentioned, unparsed = parse_description(reference_description(s))
    assert sorted(mentioned) == [("red", "circle"), ("yellow", "diamond")] and unparsed == 0
    result = chair([reference_description(s)], [s])
    assert (result.chair_i, result.chair_s, result.recall) == (0.0, 0.0, 1.0)


def test_training_descriptions_plant_the_partner_after_its_anchor_even_when_absent():
    s = scene(("red", "circle"), ("green", "cross"))  # anchor present, partner (blue square) absent
    rng = np.random.default_rng(1)
    texts = [training_description(s, rng, prior=0.8) for _ in range(400)]
    planted = sum("red circle , blue square" in t for t in texts) / len(texts)
    assert 0.72 < planted < 0.88
    assert all("blue square" not in training_description(s, rng, prior=0.0) for _ in range(50))


def test_primed_question_answers_from_the_scene():
    assert primed_question(scene(("red", "circle")), ("red", "circle")) == (
        "there is a red circle . is there a blue square ?", "no")  # fmt: skip
    assert primed_question(scene(("red", "circle"), ("blue", "square")), ("red", "circle"))[1] == "yes"
    with pytest.raises(ValueError, match="no red circle"):
        primed_question(scene(("green", "cross")), ("red", "circle"))


def test_wilson_interval():
    lo, hi = wilson(10, 100)
    assert lo == pytest.approx(0.0552, abs=1e-3) and hi == pytest.approx(0.1744, abs=1e-3)
    assert all(math.isnan(x) for x in wilson(0, 0))
