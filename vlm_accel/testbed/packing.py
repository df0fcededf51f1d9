"""Training batches: several question–answer turns packed per image, loss only on answers.

A training sequence is exactly what the chat template + processor produce for a multi-turn conversation::

    <bos> user : <image>×256 q1 assistant : a1 <eos> user : q2 assistant : a2 <eos> ...

(``tests/test_testbed_model.py`` checks the single-turn case against ``processor.apply_chat_template``). Batches are
a pure function of ``(seed, step)``, so training is reproducible and resumable without saving RNG state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .processor import vocabulary
from .questions import COLOR_NAMES, FAMILIES, QA, SHAPES, sample_training_qas
from .scenes import MAX_COUNT, NUM_PATCHES, Scene, render, sample_scene, type_index

AUX_BACKGROUND = 30  # auxiliary patch label for "no object"


@dataclass
class Batch:
    """Tensors for one training step (right padding; ``target_pos`` index the tokens that are predicted)."""

    pixel_values: torch.Tensor  # (B, 3, 256, 256)
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    target_rows: torch.Tensor  # (T,) batch row of each target token
    target_pos: torch.Tensor  # (T,) position of each target token (predicted from position - 1)
    target_family: list[str]  # (T,) family of each target ("eos" for end-of-answer tokens)
    patch_labels: torch.Tensor  # (B, 256) object type per visual token, AUX_BACKGROUND for background
    target_patches: torch.Tensor | None = None  # (T, 256) visual tokens a target's question refers to

    def to(self, device: str | torch.device) -> Batch:
        return Batch(
            self.pixel_values.to(device),
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.target_rows.to(device),
            self.target_pos.to(device),
            self.target_family,
            self.patch_labels.to(device),
            None if self.target_patches is None else self.target_patches.to(device),
        )


_VOCAB = {w: i for i, w in enumerate(vocabulary())}


def _ids(text: str) -> list[int]:
    return [_VOCAB[w] for w in text.split()]


def pixel_values(images: list) -> torch.Tensor:
    """Exactly the processor's normalisation (mean = std = 0.5) for 256×256 RGB images, without PIL resampling."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0
    return torch.from_numpy((arr - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous()


def patch_labels(scene: Scene) -> np.ndarray:
    lab = np.full(NUM_PATCHES, AUX_BACKGROUND, dtype=np.int64)
    for o in scene.objects:
        lab[o.patch] = type_index(o.color, o.shape)
    return lab


def relevant_patches(scene: Scene, qa: QA) -> np.ndarray:
    """Bool (256,) mask of the visual tokens a question is about (empty for absent objects / zero counts)."""
    m = np.zeros(NUM_PATCHES, dtype=bool)
    for o in scene.objects:
        if qa.family == "color":
            hit = o.shape == qa.args[0]
        elif qa.family == "shape":
            hit = o.color == qa.args[0]
        elif qa.family == "count":
            hit = (o.shape if qa.args[0] == "shape" else o.color) == qa.args[1]
        else:  # exist, position
            hit = (o.color, o.shape) == tuple(qa.args)
        m[o.patch] = hit
    return m


def encode_conversation(qas: list[QA], image_tokens: int = NUM_PATCHES) -> tuple[list[int], list[int], list[str]]:
    """Token ids of a packed conversation, the positions of answer/EOS targets, and each target's family."""
    ids = [_VOCAB["<bos>"], *_ids("user :"), *([_VOCAB["<image>"]] * image_tokens)]
    pos: list[int] = []
    fams: list[str] = []
    for i, qa in enumerate(qas):
        if i > 0:
            ids += _ids("user :")
        ids += _ids(qa.question) + _ids("assistant :")
        pos.append(len(ids))
        fams.append(qa.family)
        ids.append(_VOCAB[qa.answer])
        pos.append(len(ids))
        fams.append("eos")
        ids.append(_VOCAB["<eos>"])
    return ids, pos, fams


def sample_training_item(
    rng: np.random.Generator, qas_per_image: int, prior_yes_p: float = 0.0, prior_items: float = 0.0
) -> tuple[Scene, list[QA]]:
    """A scene built around a uniformly drawn count target (balanced count answers) and its packed questions.

    ``prior_yes_p`` plants a language prior: a question about the co-occurrence partner of a present anchor is
    answered "yes" with this probability even when the partner is not in the image, as real captions name objects
    that usually co-occur but are not visible. It is what makes object hallucination measurable on the testbed
    (the ``absent_cooccur`` yes-rate); with 0 every answer follows from the image. ``prior_items`` is the share of
    images (when the prior is on) built around a present anchor whose partner is absent, with a question about the
    partner, so the prior is seen often enough to be learnt (such scenes are otherwise rare)."""
    from .questions import make_qa, sample_eval_item

    if prior_yes_p > 0 and prior_items > 0 and rng.random() < prior_items:
        scene, probe = sample_eval_item(rng, "exist", "absent_cooccur")
        others = [q for q in sample_training_qas(scene, rng, qas_per_image, FAMILIES) if q.question != probe.question]
        qas = [probe, *others[: qas_per_image - 1]]
    else:
        kind = "shape" if rng.random() < 0.5 else "color"
        value = SHAPES[int(rng.integers(len(SHAPES)))] if kind == "shape" else COLOR_NAMES[int(rng.integers(6))]
        c = int(rng.integers(0, MAX_COUNT + 1))
        scene = sample_scene(rng, count_target=(kind, value, c))
        first = make_qa(scene, "count", (kind, value))
        no_count = tuple(f for f in FAMILIES if f != "count")  # extra count questions would skew answers to 0/1
        rest = sample_training_qas(scene, rng, qas_per_image - 1, no_count)
        qas = [first, *rest[: qas_per_image - 1]]
    if prior_yes_p > 0:  # draw only when enabled, so batches without the prior stay what they were
        qas = [replace(qa, answer="yes") if qa.subtype == "absent_cooccur" and rng.random() < prior_yes_p else qa
               for qa in qas]  # fmt: skip
    order = rng.permutation(len(qas))
    return scene, [qas[int(i)] for i in order]


def make_batch(
    seed: int, step: int, batch_size: int, qas_per_image: int, prior_yes_p: float = 0.0, prior_items: float = 0.0
) -> Batch:
    """The training batch for ``step`` (a pure function of ``seed``, ``step`` and the settings)."""
    rng = np.random.default_rng([seed, step, 7919])
    images, seqs, labels = [], [], []
    rows, poss, fams, rel = [], [], [], []
    for b in range(batch_size):
        scene, qas = sample_training_item(rng, qas_per_image, prior_yes_p, prior_items)
        images.append(render(scene))
        labels.append(patch_labels(scene))
        for qa in qas:
            rel += [relevant_patches(scene, qa), np.zeros(NUM_PATCHES, dtype=bool)]  # answer, <eos>
        ids, pos, fam = encode_conversation(qas)
        seqs.append(ids)
        rows += [b] * len(pos)
        poss += pos
        fams += fam
    length = max(len(s) for s in seqs)
    input_ids = torch.full((batch_size, length), _VOCAB["<pad>"], dtype=torch.long)
    mask = torch.zeros((batch_size, length), dtype=torch.long)
    for b, s in enumerate(seqs):
        input_ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
    return Batch(
        pixel_values=pixel_values(images),
        input_ids=input_ids,
        attention_mask=mask,
        target_rows=torch.tensor(rows),
        target_pos=torch.tensor(poss),
        target_family=fams,
        patch_labels=torch.from_numpy(np.stack(labels)),
        target_patches=torch.from_numpy(np.stack(rel)),
    )
