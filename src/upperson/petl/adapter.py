"""Bottleneck adapters; the L-Adapter runs them beside a LayerNorm (UP-Person §IV-D)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm
from torch import nn

from upperson.petl.base import PETLModule

AdapterConnection = Literal["parallel", "sequential"]
"""``parallel``: the adapter reads what its host reads; ``sequential``: it reads the host's output."""


class BottleneckAdapter(PETLModule):
    """``s · (W_up · ReLU(W_down · x + b_down) + b_up)``, zero at initialisation.

    The same module serves the L-Adapter (beside a LayerNorm) and the vanilla adapters around a
    whole MHA or MLP sublayer, so that the ablations differ only in where it is connected.

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
        """``s · up(h)`` computed as ``up_w (s · h) + s · up_b``: the same value, but autograd keeps the
        bottleneck-wide ``h`` (already kept by the ReLU) for s's gradient, not a width-wide tensor."""
        hidden = torch.relu(self.down(x))
        return F.linear(hidden * self.scale, self.up.weight, self.up.bias * self.scale)


LayerNormAdapter = BottleneckAdapter
"""The L-Adapter's bottleneck (kept under the name the rest of the code and users know)."""


class AdaptedLayerNorm(LayerNorm):
    """The block's frozen LayerNorm plus an L-Adapter.

    Parallel (UP-Person): ``LN(x) + s · A(x)``: the adapter sees the pre-norm residual stream and its
    output is added to the normalised output, not to the residual. Sequential (Table VIII
    "Sequential L-Adapter"): ``LN(x) + s · A(LN(x))``. Subclassing open_clip's LayerNorm keeps the
    checkpoint keys ``ln_1.weight`` / ``ln_1.bias`` unchanged after injection.
    """

    def __init__(self, norm: nn.LayerNorm, reduction: int, connection: AdapterConnection = "parallel") -> None:
        if connection not in ("parallel", "sequential"):
            raise ValueError(f"L-Adapter connection must be 'parallel' or 'sequential', got {connection!r}")
        width = norm.normalized_shape[0]
        super().__init__(width, eps=norm.eps, device=norm.weight.device, dtype=norm.weight.dtype)
        self.weight = norm.weight
        self.bias = norm.bias
        self.connection = connection
        self.adapter = LayerNormAdapter(width, reduction).to(norm.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.connection == "parallel":
            return super().forward(x) + self.adapter(x)
        normalised = super().forward(x)
        return normalised + self.adapter(normalised)
