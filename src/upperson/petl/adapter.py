"""L-Adapter: a bottleneck MLP running parallel to a LayerNorm (UP-Person §IV-D)."""

from __future__ import annotations

import math

import torch
from open_clip.transformer import LayerNorm
from torch import nn

from upperson.petl.base import PETLModule


class LayerNormAdapter(PETLModule):
    """``s · (W_up · ReLU(W_down · x + b_down) + b_up)``, zero at initialisation.

    Args:
        width: residual-stream width of the block.
        reduction: bottleneck = ``width // reduction``.
    """

    component = "adapter"

    def __init__(self, width: int, reduction: int) -> None:
        super().__init__()
        if width % reduction:
            raise ValueError(f"adapter reduction {reduction} must divide the width {width}")
        hidden = width // reduction
        self.down = nn.Linear(width, hidden)
        self.up = nn.Linear(hidden, width)
        self.scale = nn.Parameter(torch.ones(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        nn.init.ones_(self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(torch.relu(self.down(x)))


class AdaptedLayerNorm(LayerNorm):
    """The block's frozen LayerNorm plus an L-Adapter reading the same raw input.

    ``LN(x) + s · A(x)``: the adapter sees the pre-norm residual stream and its output is added to
    the normalised output, not to the residual. Subclassing open_clip's LayerNorm keeps the
    checkpoint keys ``ln_1.weight`` / ``ln_1.bias`` unchanged after injection.
    """

    def __init__(self, norm: nn.LayerNorm, reduction: int) -> None:
        width = norm.normalized_shape[0]
        super().__init__(width, eps=norm.eps, device=norm.weight.device, dtype=norm.weight.dtype)
        self.weight = norm.weight
        self.bias = norm.bias
        self.adapter = LayerNormAdapter(width, reduction).to(norm.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.adapter(x)
