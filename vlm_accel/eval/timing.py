"""The interleaving schedule shared by ``vlm-accel compare`` and ``vlm-accel bench``: which setting runs when within
a timing round, and which reference (unpatched) runs each setting's run is compared with.

On a shared CPU a single run's time moves by tens of percent (another process on the sibling core, frequency
changes), even in process CPU time. Pairing every setting of a round with the round's *one* unpatched run lets
that run's luck shift every ratio of the round together (the common-mode error that made compare and bench
disagree by 0.3–0.5× on whole runs). So the reference runs again after every ``reference_every`` settings, and a
setting's reference is the mean of the reference runs right before and right after it (one of them at a round's
end): two reference runs instead of one, at most ``reference_every − 1`` runs away, which also cancels a linear
drift between them. Rounds alternate direction so no setting always follows the same neighbour.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import TypeVar

REFERENCE_EVERY = 5  # compare with 22 settings: 5 extra reference runs per round (+23 % runs), see the docstring

T = TypeVar("T")


def round_schedule(settings: int, round_index: int, reference_every: int = REFERENCE_EVERY) -> list[int]:
    """Setting indices in run order for one round; index 0 is the reference. ``[0, 1, 2, 3, 0, 4, 5, 0]`` for four
    settings besides the reference on round 0 with ``reference_every=3``; round 1 runs them backwards."""
    if settings < 1 or reference_every < 1:
        raise ValueError(f"round_schedule needs >= 1 setting and reference_every >= 1, got {settings}, "
                         f"{reference_every}")  # fmt: skip
    others = list(range(1, settings))
    if round_index % 2:
        others.reverse()
    order = [0]
    for count, setting in enumerate(others, start=1):
        order.append(setting)
        if count % reference_every == 0 or count == len(others):
            order.append(0)
    return order


def bracket_references(order: Sequence[int], values: Sequence[T | None], mean: Callable[[list[T]], T]) -> list[T | None]:
    """For each position of a round, the ``mean`` of the nearest reference runs (index 0 in ``order``) before and
    after it whose value is not None; None at the reference's own positions or when no reference value exists."""
    if len(order) != len(values):
        raise ValueError(f"bracket_references: {len(order)} positions but {len(values)} values")
    refs: list[T | None] = []
    for position, setting in enumerate(order):
        if setting == 0:
            refs.append(None)
            continue
        near = []
        for step in (-1, 1):
            j = position + step
            while 0 <= j < len(order) and (order[j] != 0 or values[j] is None):
                j += step
            if 0 <= j < len(order):
                near.append(values[j])
        refs.append(mean(near) if near else None)
    return refs


def mean_pair(values: list[tuple[float, float]]) -> tuple[float, float]:
    """Element-wise mean of (wall, CPU) pairs."""
    return tuple(statistics.fmean(v[i] for v in values) for i in range(2))  # type: ignore[return-value]
