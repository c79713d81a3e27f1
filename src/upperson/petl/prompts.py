"""Deep prompts with cross-modal coupling (CSKT's BPT): per-layer prompt vectors and coupling linears.

The method (``methods/cskt``) decides where the prompts enter the token flow; these modules only
hold the trainable tensors and their initialisation.
"""

from __future__ import annotations

import torch
from torch import nn

from upperson.petl.base import PETLModule

INIT_STD = 0.02
"""N(0, 0.02²) init of prompts and coupling weights, as the official CSKT code."""


class PromptBank(PETLModule):
    """One modality's prompt vectors for the prompted layers: ``prompts[i]`` is ``[C, width]``."""

    component = "prompts"

    def __init__(self, width: int, length: int, layers: int) -> None:
        super().__init__()
        self.prompts = nn.ParameterList([nn.Parameter(torch.empty(length, width)) for _ in range(layers)])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for prompt in self.prompts:
            nn.init.normal_(prompt, std=INIT_STD)


class PromptCoupling(PETLModule):
    """One linear per prompted layer mapping this modality's prompts into the other modality."""

    component = "coupling"

    def __init__(self, width_in: int, width_out: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(width_in, width_out) for _ in range(layers)])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in self.layers:
            nn.init.normal_(layer.weight, std=INIT_STD)
            nn.init.zeros_(layer.bias)
