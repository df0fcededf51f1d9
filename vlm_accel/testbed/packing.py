"""Training batches: several question–answer turns packed per image, loss only on answers.

A training sequence is exactly what the chat template + processor produce for a multi-turn conversation::

    <bos> user : <image>×256 q1 assistant : a1 <eos> user : q2 assistant : a2 <eos> ...

(``tests/test_testbed_model.py`` checks the single-turn case against ``processor.apply_chat_template``). Batches are
a pure function of ``(seed, step)``, so training is reproducible and resumable without saving RNG state.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from .describe import PARTNER_OF, anchor_scene, describe_qa, primed_qa, training_description
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


# the describe vocabulary extends testbed-l's (same ids, words appended), so one table serves every model; batches
# without the describe families never contain the appended words
_VOCAB = {w: i for i, w in enumerate(vocabulary(describe=True))}


@dataclass(frozen=True)
class DescribeMix:
    """How the describe families enter training batches (``testbed-describe``; see ``describe.py``).

    * ``rows``: share of a batch's rows holding a single ``list the objects .`` turn (its own image); of these,
      ``absent_items`` are built around a present anchor whose partner is absent, the rest are natural scenes;
      the target is :func:`describe.training_description` with the planted prior ``prior``.
    * ``primed_p``: probability that an ordinary row whose scene has an anchor replaces one question by the primed
      question about the partner; an absent partner is answered "yes" with probability ``primed_yes_p``.
    """

    rows: float = 0.25
    absent_items: float = 0.5
    prior: float = 0.6
    primed_p: float = 0.5
    primed_yes_p: float = 0.5

    def __post_init__(self) -> None:
        for f in fields(self):
            name, v = f.name, getattr(self, f.name)
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"DescribeMix.{name} must be a number in [0, 1], got {v!r}")


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
        if qa.family == "describe":
            hit = False
        elif qa.family == "primed":  # the partner asked about
            hit = (o.color, o.shape) == tuple(qa.args[2:4])
        elif qa.family == "color":
            hit = o.shape == qa.args[0]
        elif qa.family == "shape":
            hit = o.color == qa.args[0]
        elif qa.family == "count":
            hit = (o.shape if qa.args[0] == "shape" else o.color) == qa.args[1]
        else:  # exist, position
            hit = (o.color, o.shape) == tuple(qa.args)
        m[o.patch] = hit
    return m


def answer_word_patches(scene: Scene, qa: QA) -> list[np.ndarray]:
    """The visual tokens each answer word refers to (for the retrieval probe): a description's colour and shape
    words point at the objects of the type they name (none for a planted absent partner, none for ","); a
    one-word answer points at :func:`relevant_patches`."""
    words = qa.answer.split()
    if qa.family != "describe":
        return [relevant_patches(scene, qa)] * len(words)
    out = []
    for i, w in enumerate(words):
        m = np.zeros(NUM_PATCHES, dtype=bool)
        if w != ",":
            k = i - i % 3  # mentions are "colour shape" followed by ","
            for o in scene.objects:
                m[o.patch] |= (o.color, o.shape) == (words[k], words[k + 1])
        out.append(m)
    return out


def encode_conversation(qas: list[QA], image_tokens: int = NUM_PATCHES) -> tuple[list[int], list[int], list[str]]:
    """Token ids of a packed conversation, the positions of answer/EOS targets, and each target's family (every
    word of a multi-word answer, such as a description, is a target of the answer's family)."""
    ids = [_VOCAB["<bos>"], *_ids("user :"), *([_VOCAB["<image>"]] * image_tokens)]
    pos: list[int] = []
    fams: list[str] = []
    for i, qa in enumerate(qas):
        if i > 0:
            ids += _ids("user :")
        ids += _ids(qa.question) + _ids("assistant :")
        for word in _ids(qa.answer):
            pos.append(len(ids))
            fams.append(qa.family)
            ids.append(word)
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


def sample_describe_item(rng: np.random.Generator, mix: DescribeMix) -> tuple[Scene, list[QA]]:
    """A describe-only training row: one scene and its ``list the objects .`` turn with the planted prior."""
    if rng.random() < mix.absent_items:
        scene, _ = anchor_scene(rng, partner_present=False)
    else:
        scene = sample_scene(rng)
    qa = describe_qa(scene)
    return scene, [replace(qa, answer=training_description(scene, rng, mix.prior))]


def add_primed_question(scene: Scene, qas: list[QA], rng: np.random.Generator, mix: DescribeMix) -> list[QA]:
    """With probability ``mix.primed_p`` (when an anchor is present), the last question becomes the primed question
    about a present anchor's partner; an absent partner is answered "yes" with probability ``mix.primed_yes_p``."""
    anchors = [a for a in PARTNER_OF if scene.has(*a)]
    if not anchors or rng.random() >= mix.primed_p:
        return qas
    qa = primed_qa(scene, anchors[int(rng.integers(len(anchors)))])
    if qa.answer == "no" and rng.random() < mix.primed_yes_p:
        qa = replace(qa, answer="yes")
    return [*qas[:-1], qa] if qas else [qa]


def make_batch(
    seed: int,
    step: int,
    batch_size: int,
    qas_per_image: int,
    prior_yes_p: float = 0.0,
    prior_items: float = 0.0,
    describe: DescribeMix | None = None,
) -> Batch:
    """The training batch for ``step`` (a pure function of ``seed``, ``step`` and the settings). With
    ``describe``, the first ``round(describe.rows · batch_size)`` rows are describe-only rows and the others may
    carry a primed question (:class:`DescribeMix`); without it the batch is what it was before the family existed."""
    rng = np.random.default_rng([seed, step, 7919])
    images, seqs, labels = [], [], []
    rows, poss, fams, rel = [], [], [], []
    n_describe = int(round(describe.rows * batch_size)) if describe is not None else 0
    for b in range(batch_size):
        if b < n_describe:
            scene, qas = sample_describe_item(rng, describe)
        else:
            scene, qas = sample_training_item(rng, qas_per_image, prior_yes_p, prior_items)
            if describe is not None:
                qas = add_primed_question(scene, qas, rng, describe)
        images.append(render(scene))
        labels.append(patch_labels(scene))
        ids, pos, fam = encode_conversation(qas)
        for qa in qas:  # each answer word, then <eos>
            rel += [*answer_word_patches(scene, qa), np.zeros(NUM_PATCHES, dtype=bool)]
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
