"""Validity checks: does the testbed reward keeping the *right* visual tokens?

On a fresh seed, each configuration keeps a subset of the 256 visual tokens from layer 0 on (see
``evaluate.visual_keep``):

* ``full`` — all tokens; ``no_image`` — none (the language prior alone);
* ``background`` — only tokens whose cell holds no object, as many as the oracle keeps;
* ``oracle`` — the object tokens (from the scene spec) first, topped up with random background tokens to
  ``keep_ratio`` of the tokens; ``random`` — ``keep_ratio`` of the tokens uniformly at random.

The bar (issue #3): ``background`` ≈ ``no_image`` (visual tokens are local: background tokens carry no object
information), and ``oracle`` beats ``random`` by ≥ 15 points at 10 % of the tokens.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

import numpy as np

from .evaluate import EvalResult, evaluate
from .scenes import NUM_PATCHES

CONFIGS: tuple[str, ...] = ("full", "no_image", "background", "oracle", "random")


def _row_rng(row: dict, salt: str) -> np.random.Generator:
    return np.random.default_rng([int(row.get("index") or 0), zlib.crc32(row["question"].encode()),
                                  zlib.crc32(salt.encode())])  # fmt: skip


def keep_fn(config: str, keep_ratio: float = 0.1, num_tokens: int = NUM_PATCHES):
    """The ``visual_keep(row)`` function of a validity configuration (``None`` for ``full``)."""
    budget = max(1, int(round(keep_ratio * num_tokens)))

    def objects(row: dict) -> list[int]:
        return list(row["object_patches"])

    if config == "full":
        return None
    if config == "no_image":
        return lambda row: []
    if config == "random":
        return lambda row: sorted(_row_rng(row, "random").choice(num_tokens, size=budget, replace=False).tolist())
    if config == "oracle":

        def oracle(row: dict) -> list[int]:
            obj = objects(row)[:budget]
            rest = np.setdiff1d(np.arange(num_tokens), obj)
            fill = _row_rng(row, "oracle").choice(rest, size=budget - len(obj), replace=False).tolist()
            return sorted(obj + fill)

        return oracle
    if config == "background":

        def background(row: dict) -> list[int]:
            rest = np.setdiff1d(np.arange(num_tokens), objects(row))
            return sorted(_row_rng(row, "background").choice(rest, size=budget, replace=False).tolist())

        return background
    raise ValueError(f"unknown validity config {config!r}; expected one of {CONFIGS}")


@dataclass
class ValidityReport:
    results: dict[str, EvalResult]
    keep_ratio: float
    n: int
    seed: int

    @property
    def background_minus_no_image(self) -> float:
        return self.results["background"].mean - self.results["no_image"].mean

    @property
    def oracle_minus_random(self) -> float:
        return self.results["oracle"].mean - self.results["random"].mean

    def passed(self, background_tol: float = 0.05, oracle_margin: float = 0.15) -> dict[str, bool]:
        return {
            "background_about_no_image": abs(self.background_minus_no_image) <= background_tol,
            "oracle_beats_random": self.oracle_minus_random >= oracle_margin,
        }

    def as_dict(self) -> dict:
        return {
            "n": self.n,
            "seed": self.seed,
            "keep_ratio": self.keep_ratio,
            "background_minus_no_image": self.background_minus_no_image,
            "oracle_minus_random": self.oracle_minus_random,
            "passed": self.passed(),
            "results": {k: v.as_dict(with_predictions=False) for k, v in self.results.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=1)


def run_validity(model, processor, dataset, keep_ratio: float = 0.1, batch_size: int = 16,
                 configs: tuple[str, ...] = CONFIGS, progress: bool = False, seed: int = -1) -> ValidityReport:  # fmt: skip
    """Evaluate every validity configuration on ``dataset`` (a testbed dataset with ``object_patches``)."""
    results = {}
    for c in configs:
        results[c] = evaluate(model, processor, dataset, batch_size=batch_size, progress=progress,
                              visual_keep=keep_fn(c, keep_ratio))  # fmt: skip
    return ValidityReport(results=results, keep_ratio=keep_ratio, n=len(dataset), seed=seed)
