"""CSKT's dual adapter (DAT): a LayerNorm-fronted bottleneck added beside a block's MLP, with a constant scale."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from upperson.petl.base import PETLModule
from upperson.petl.prompts import INIT_STD


class DualAdapter(PETLModule):
    """DAT: ``scale · up(ReLU(down(ln(x))))`` added beside the MLP; ``scale`` is a constant."""

    component = "adapter"

    def __init__(self, width: int, reduction: int, scale: float) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.down = nn.Linear(width, width // reduction)
        self.up = nn.Linear(width // reduction, width)
        self.scale = scale
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.ln.reset_parameters()
        for linear in (self.down, self.up):
            nn.init.normal_(linear.weight, std=INIT_STD)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, self.ln.weight.dtype))  # LayerNorm in fp32 even under autocast
        normed = F.layer_norm(wide, self.ln.normalized_shape, self.ln.weight, self.ln.bias, self.ln.eps).to(x.dtype)
        return self.scale * self.up(F.relu(self.down(normed)))

    def extra_repr(self) -> str:
        return f"scale={self.scale}"
