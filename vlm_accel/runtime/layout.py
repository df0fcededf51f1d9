"""Where the visual tokens are, per row, in the current forward's query window.

The text model never sees ``input_ids`` (the VLM base model merges image features into ``inputs_embeds`` first),
so the layout is captured on the base model from ``input_ids == <visual token id>`` (hf_internals §0.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VisualLayout:
    """Visual-token positions of one forward call.

    Attributes:
        visual: bool ``[B, W]`` — True where the query window holds a visual (image or video) token.
        padding: bool ``[B, W]`` — True where the window holds left padding (from the 2-D attention mask).
    """

    visual: torch.Tensor
    padding: torch.Tensor

    @property
    def counts(self) -> torch.Tensor:
        """Visual tokens per row, ``[B]``."""
        return self.visual.sum(dim=1)

    @property
    def any_visual(self) -> bool:
        return bool(self.visual.any())

    @classmethod
    def from_input_ids(
        cls,
        input_ids: torch.Tensor,
        visual_token_ids: tuple[int, ...],
        attention_mask_2d: torch.Tensor | None,
    ) -> VisualLayout:
        visual = torch.zeros_like(input_ids, dtype=torch.bool)
        for token_id in visual_token_ids:
            visual |= input_ids == token_id
        window = input_ids.shape[1]
        if attention_mask_2d is not None:
            padding = attention_mask_2d[:, -window:] == 0
            visual &= ~padding
        else:
            padding = torch.zeros_like(visual)
        return cls(visual=visual, padding=padding)

    @classmethod
    def from_embeddings(
        cls,
        inputs_embeds: torch.Tensor,
        visual_embeddings: list[torch.Tensor],
        attention_mask_2d: torch.Tensor | None,
    ) -> VisualLayout:
        """Fallback when only ``inputs_embeds`` is given: placeholder rows equal the visual token's embedding
        (the rule transformers' own ``get_placeholder_mask`` applies)."""
        visual = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        for emb in visual_embeddings:
            visual |= (inputs_embeds == emb.to(inputs_embeds)).all(-1)
        fake_ids = visual.long()
        layout = cls.from_input_ids(fake_ids, (1,), attention_mask_2d)
        return layout
