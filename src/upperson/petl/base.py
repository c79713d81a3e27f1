"""The marker every trainable PETL part derives from."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import nn


class PETLModule(nn.Module, ABC):
    """A module whose own parameters are the trainable ones.

    Freezing is structural: the model freezes everything, then re-enables the parameters of every
    ``PETLModule`` it finds, so no parameter name ever decides what trains.
    """

    @abstractmethod
    def reset_parameters(self) -> None:
        """Put the parameters at their documented initial values."""
