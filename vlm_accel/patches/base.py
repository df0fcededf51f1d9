"""Model-family adapters: how to find a VLM's parts. Methods and the runtime never hard-code a family."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from vlm_accel.runtime.devices import onloaded


@dataclass(frozen=True)
class FamilyAdapter:
    """Locates the parts of one VLM family (Liger-style ``model_type`` dispatch, see ``vlm_accel.patches``).

    Attributes:
        model_types: the ``config.model_type`` values this adapter handles.
        class_names: accepted top-level classes (``*ForConditionalGeneration``).
        visual_token_attributes: config attributes holding the ids of visual placeholder tokens.
    """

    family: str
    model_types: tuple[str, ...]
    class_names: tuple[str, ...]
    visual_token_attributes: tuple[str, ...] = ("image_token_id",)

    def base_model(self, model: nn.Module) -> nn.Module:
        """The ``<Family>Model`` that merges visual features and calls the language model."""
        return model.model

    def language_model(self, model: nn.Module) -> nn.Module:
        return self.base_model(model).language_model

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.language_model(model).layers

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self.language_model(model).norm

    def text_config(self, model: nn.Module) -> PretrainedConfig:
        return self.language_model(model).config

    def visual_token_ids(self, model: nn.Module) -> tuple[int, ...]:
        ids = []
        for attribute in self.visual_token_attributes:
            value = getattr(model.config, attribute, None)
            if value is not None:
                ids.append(int(value))
        return tuple(ids)

    def visual_token_embeddings(self, model: nn.Module) -> list[torch.Tensor]:
        embed = self.language_model(model).get_input_embeddings()
        with onloaded(embed):  # an offloaded (accelerate) embedding's weight is on the meta device outside this
            return [embed.weight[i].clone() for i in self.visual_token_ids(model)]

    def check_model(self, model: nn.Module) -> None:
        if type(model).__name__ not in self.class_names:
            raise TypeError(
                f"vlm_accel patches the top-level {' / '.join(self.class_names)} for model_type "
                f"{model.config.model_type!r}, got {type(model).__name__}"
            )
