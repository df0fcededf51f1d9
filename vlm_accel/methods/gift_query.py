"""GIFT's question rows: the user's text span from the chat template, and the content-word filter.

The official code (``amazon-science/GIFT``, ``inference.py::get_token_indices`` / ``extract_and_align``) takes the
question span as fixed template offsets after the last image token (LLaVA-1.5 ``+3 … len−6``, Qwen2-VL
``+2 … len−6``) and keeps only the rows of *content words*: spaCy ``en_core_web_sm`` tokens whose POS is one of
``NOUN, PROPN, VERB, ADJ, ADV, NUM``, mapped onto tokens through the tokenizer's character offsets.

Here the offsets are derived from the processor's own chat template (:func:`chat_template_offsets`: the template
text between the image and the user's text, and after the user's text up to the end of the generation prompt), so
template tokens such as LLaVA's ``" ASSISTANT:"`` or Qwen2-VL's ``"<|im_end|>\\n<|im_start|>assistant\\n"`` never
enter the saliency rows or the query boost. The content filter uses spaCy when it is installed with
``en_core_web_sm``, otherwise :data:`CLOSED_CLASS_WORDS` — the English closed-class words (what spaCy tags DET,
PRON, ADP, AUX, CCONJ, SCONJ, PART, INTJ) — every other alphanumeric word counts as content.
"""

from __future__ import annotations

import re
from typing import Any

#: spaCy universal POS tags the official code keeps (``inference.py::CONTENT_TAGS``).
CONTENT_TAGS = frozenset({"NOUN", "PROPN", "VERB", "ADJ", "ADV", "NUM"})

#: Closed-class English words: the fallback filter when spaCy (with ``en_core_web_sm``) is not installed.
#: Determiners, pronouns (incl. existential "there"), prepositions, auxiliaries and modals, conjunctions,
#: particles and interjections — the tags the official filter drops. Wh-adverbs (how, where, when, why) stay
#: content, as spaCy tags them ADV in questions.
CLOSED_CLASS_WORDS = frozenset(
    """
    a an the this that these those each every either neither some any no all both half another such what which
    whose whatever whichever
    i me my mine myself you your yours yourself yourselves he him his himself she her hers herself it its itself
    we us our ours ourselves they them their theirs themselves who whom there someone something anyone
    anything everyone everything nobody nothing somebody anybody everybody
    of in on at by for with about against between into through during before after above below to from up down
    over under again off out around among across behind beside besides beyond inside near onto outside per since
    than toward towards upon via within without along
    be am is are was were been being have has had having do does did doing will would shall should can could may
    might must 's 're 've 'd 'll 'm
    and or but nor yet so if because although though while whereas unless until whether
    not n't to
    oh yes yeah hello hi please ok okay
    """.split()
)

_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?|'[A-Za-z]+")
SENTINEL = "giftquerysentinel"


def load_spacy() -> Any | None:
    """spaCy's ``en_core_web_sm`` tagger (parser and NER off, as the official code loads it), or None."""
    try:
        import spacy  # noqa: PLC0415 (optional dependency)

        return spacy.load("en_core_web_sm", disable=["parser", "ner"])
    except (ImportError, OSError):
        return None


def content_spans(text: str, nlp: Any | None) -> list[tuple[int, int]]:
    """Character ranges of the content words of ``text`` (spaCy POS tags, or the closed-class fallback)."""
    if nlp is not None:
        return [(t.idx, t.idx + len(t.text)) for t in nlp(text) if t.pos_ in CONTENT_TAGS]
    return [m.span() for m in _WORD.finditer(text) if m.group().lower() not in CLOSED_CLASS_WORDS]


def content_token_mask(ids: list[int], tokenizer: Any, nlp: Any | None) -> list[bool] | None:
    """Which of the question's tokens ``ids`` overlap a content word (``extract_and_align``'s offset rule).

    The question text is decoded and re-tokenized with offsets; None when the re-tokenization does not give back
    the same number of tokens (the caller then keeps every row of that question).
    """
    if not ids:
        return []
    text = tokenizer.decode(ids, skip_special_tokens=False)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoding["offset_mapping"]
    if len(offsets) != len(ids):
        return None
    words = content_spans(text, nlp)
    return [any(not (end <= w_start or start >= w_end) for w_start, w_end in words) for start, end in offsets]


def chat_template_offsets(processor: Any) -> tuple[int, int]:
    """``(head, tail)``: template tokens between the last image token and the user's text, and after the user's
    text up to the end of the generation prompt, read off ``processor``'s chat template.

    Renders one user turn ``[image, SENTINEL]`` with the generation prompt, tokenizes it with offsets and counts
    the tokens on either side of the sentinel (the image placeholder is one token before the processor expands it).
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    image_token = getattr(processor, "image_token", None) or getattr(tokenizer, "image_token", None)
    if not hasattr(processor, "apply_chat_template") or image_token is None:
        raise TypeError(
            "gift: processor must be a transformers processor with a chat template and an image token "
            f"(got {type(processor).__name__})"
        )
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": SENTINEL}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    start = text.find(SENTINEL)
    image_at = text.rfind(image_token, 0, max(start, 0))
    if start < 0 or image_at < 0:
        raise ValueError("gift: the processor's chat template does not put the user's text after the image")
    end, image_end = start + len(SENTINEL), image_at + len(image_token)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    image_index = max(i for i, (s, e) in enumerate(offsets) if s < image_end and e > image_at)
    first = min(i for i, (s, e) in enumerate(offsets) if e > start and s < end)
    last = max(i for i, (s, e) in enumerate(offsets) if e > start and s < end)
    return first - image_index - 1, len(offsets) - last - 1
