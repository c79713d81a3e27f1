"""The marker every trainable PETL part derives from."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


class PETLModule(nn.Module, ABC):
    """A module whose own parameters are the trainable ones.

    Freezing is structural: the model freezes everything, then re-enables the parameters of every
    ``PETLModule`` it finds, so no parameter name ever decides what trains.
    """

    @abstractmethod
    def reset_parameters(self) -> None:
        """Put the parameters at their documented initial values."""


def fused_in_proj_width(in_proj_weight: torch.Tensor) -> int:
    """The width of a fused ``[3·width, width]`` Q|K|V in-projection; anything else is refused."""
    width = in_proj_weight.shape[1]
    if in_proj_weight.dim() != 2 or in_proj_weight.shape[0] != 3 * width:
        raise ValueError(f"expected a fused [3·width, width] in-projection, got {tuple(in_proj_weight.shape)}")
    return width
