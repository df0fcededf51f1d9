"""Offline word-level tokenizer and a real ``LlavaProcessor`` (with a chat template) for the testbed models.

The vocabulary is closed: every word any question, answer or chat-template turn can use. The tokenizer is a
``tokenizers`` WordLevel model wrapped in ``PreTrainedTokenizerFast`` (left padding, ``<bos>`` prepended), and the
image processor is ``CLIPImageProcessorPil`` (no torchvision needed) with mean = std = 0.5.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlavaProcessor, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .questions import COUNT_ANSWERS
from .scenes import COLOR_NAMES, IMAGE_SIZE, PATCH_SIZE, QUADRANTS, SHAPE_PLURALS, SHAPES

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<bos>", "<eos>", "<image>"
SPECIALS: tuple[str, ...] = (PAD, UNK, BOS, EOS, IMAGE)

TEMPLATE_WORDS: tuple[str, ...] = (
    "user", "assistant", ":", "?", "what", "color", "shape", "is", "the", "object", "objects", "how", "many",
    "are", "there", "a", "where", "which", "frame", "last", "in", "of", "and", "image", "yes", "no",
)  # fmt: skip

# Words only the describe family uses (``describe.py``): appended after every other word, so a model trained on the
# extended vocabulary (``testbed-describe``) keeps the ids of testbed-l's vocabulary and only adds rows.
DESCRIBE_WORDS: tuple[str, ...] = ("list", ",", ".")

# Chat template: "user : <image> {question} assistant :" then "{answer} <eos>" for assistant turns. The BOS is added
# by the tokenizer's post-processor, not by the template.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ 'user :' }}"
    "{%- if message['content'] is string -%}{{ ' ' + message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ ' <image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ ' ' + part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'assistant :' }}"
    "{%- if message['content'] is string -%}{{ ' ' + message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ ' ' + part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ ' <eos> ' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'assistant :' }}{%- endif -%}"
)


def vocabulary(describe: bool = False) -> list[str]:
    """The ordered vocabulary (special tokens first; ids are stable for a given generator version).

    ``describe=True`` appends :data:`DESCRIBE_WORDS` (the ``testbed-describe`` vocabulary): the first
    ``len(vocabulary())`` ids are unchanged."""
    words: list[str] = []
    for w in (
        *TEMPLATE_WORDS,
        *COLOR_NAMES,
        *SHAPES,
        *SHAPE_PLURALS.values(),
        *COUNT_ANSWERS,
        *QUADRANTS,
    ):
        if w not in words:
            words.append(w)
    return list(SPECIALS) + words + (list(DESCRIBE_WORDS) if describe else [])


def build_tokenizer(describe: bool = False) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over :func:`vocabulary`, left padding, ``<bos>`` prepended."""
    vocab = {w: i for i, w in enumerate(vocabulary(describe))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        extra_special_tokens={"image_token": IMAGE},
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(describe: bool = False) -> LlavaProcessor:
    """The shared ``LlavaProcessor``: 256×256 images, patch 16 → 256 ``<image>`` tokens per image (CLS dropped).

    ``describe=True``: the tokenizer of ``testbed-describe`` (:data:`DESCRIBE_WORDS` appended)."""
    tokenizer = build_tokenizer(describe)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE,
    )


def token_ids(words: str, describe: bool = False) -> list[int]:
    """Word ids for a space-separated string (no BOS), e.g. for building training sequences directly."""
    vocab = {w: i for i, w in enumerate(vocabulary(describe))}
    return [vocab[w] for w in words.split()]
