"""Processors for Qwen2-VL / Qwen2.5-VL and InternVL that build offline without torchvision.

In transformers 5.23 ``Qwen2VLProcessor`` and ``InternVLProcessor`` cannot be constructed without torchvision:
``ProcessorMixin`` reads the sub-processor list from the ``__init__`` signature and insists on a
``video_processor``, whose classes need torchvision (hf_internals §5). These subclasses drop that parameter, so
images go through the PIL image-processor backends (``Qwen2VLImageProcessorPil``, ``GotOcr2ImageProcessorPil``)
and video input raises a clear error. Use them like the stock classes::

    processor = Qwen2VLProcessorNoVideo(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer)
    processor = Qwen2VLProcessorNoVideo.from_pretrained(local_dir)      # reads the same files
"""

from __future__ import annotations

from typing import Any

from transformers import InternVLProcessor, Qwen2_5_VLProcessor, Qwen2VLProcessor


class _NoVideoMixin:
    def __call__(self, *args: Any, videos: Any = None, **kwargs: Any):
        if videos is not None:
            raise ValueError(
                f"{type(self).__name__} handles images only (video processors need torchvision); "
                "install torchvision and use the stock processor for videos"
            )
        return super().__call__(*args, **kwargs)


class Qwen2VLProcessorNoVideo(_NoVideoMixin, Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without its video processor (constructible offline, without torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2_5_VLProcessorNoVideo(_NoVideoMixin, Qwen2_5_VLProcessor):  # noqa: N801 — mirrors transformers' name
    """``Qwen2_5_VLProcessor`` without its video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class InternVLProcessorNoVideo(_NoVideoMixin, InternVLProcessor):
    """``InternVLProcessor`` without its video processor. The tokenizer must expose ``start_image_token``,
    ``end_image_token``, ``context_image_token`` and ``video_token`` (and their ``*_id``), e.g. through
    ``extra_special_tokens`` when it is built."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kw):
        super().__init__(image_processor, tokenizer, None, image_seq_length=image_seq_length,
                         chat_template=chat_template, **kw)
