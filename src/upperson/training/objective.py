"""The training objective: the selected losses plus the parts they train besides the model.

IRRA's ID loss needs an identity classifier. It lives here, not in the `RetrievalModel`, because
it only exists for training: adapter files stay retrieval-only, while the trainer optimises the
classifier with the model and keeps it in the resumable state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from upperson.losses import LOSS_NAMES, at_least_fp32, id_loss, itc_loss, sdm_loss

CLASSIFIER_INIT_STD = 0.001
"""IRRA initialises the classifier weight with N(0, 0.001²) and the bias with 0 (spec B.8)."""


class TrainingObjective(nn.Module):
    """Sum of the configured losses over unnormalised image and text features.

    Args:
        losses: names from :data:`upperson.losses.LOSS_NAMES`, e.g. ``("sdm", "id")``.
        embed_dim: feature size of the encoders (input of the identity classifier).
        num_classes: number of training identities (output of the identity classifier).
        temperature: τ of the SDM and ITC logits.
    """

    def __init__(self, losses: Sequence[str], embed_dim: int, num_classes: int, temperature: float) -> None:
        super().__init__()
        unknown = [name for name in losses if name not in LOSS_NAMES]
        if unknown or not losses:
            raise ValueError(f"losses must be a non-empty selection of {LOSS_NAMES}, got {list(losses)}")
        self.losses = tuple(losses)
        self.temperature = temperature
        self.classifier = nn.Linear(embed_dim, num_classes) if "id" in self.losses else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=CLASSIFIER_INIT_STD)
            nn.init.zeros_(self.classifier.bias)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, pids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each selected loss by name (``[B, D]`` features, ``[B]`` pids); the training loss is their sum."""
        terms: dict[str, torch.Tensor] = {}
        for name in self.losses:
            if name == "sdm":
                terms[name] = sdm_loss(image_features, text_features, pids, temperature=self.temperature)
            elif name == "itc":
                terms[name] = itc_loss(image_features, text_features, temperature=self.temperature)
            else:
                weight = self.classifier.weight
                image_logits = self.classifier(at_least_fp32(image_features).to(weight.dtype))  # [B, num_classes]
                text_logits = self.classifier(at_least_fp32(text_features).to(weight.dtype))
                terms[name] = id_loss(image_logits, text_logits, pids)
        return terms

    def num_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.parameters())
