"""WoRA (weighted DoRA, Sun et al. "Filtering-WoRA") on the key and value rows of a fused in-projection (Table VI).

For a frozen projection ``W0 [out, in]`` (``y = x W0ᵀ``), WoRA weighs the frozen weight and the
low-rank update with two learnable scalars before DoRA's weight decomposition:

    ``W' = m ⊙ (β·W0 + α·B·A) / ‖β·W0 + α·B·A‖``,  the norm taken per output row, over the input
    dimension (as :mod:`upperson.petl.dora` normalises).

Structure: :class:`KVWoRA` holds ``key`` and ``value``, one :class:`WeightedDecomposition` each, with
the trainable tensors

* ``lora_a [rank, width]``: kaiming-uniform (a=√5), as LoRA's A;
* ``lora_b [width, rank]``: zeros;
* ``magnitude [width]``: the row norms of that projection's ``W0``;
* ``alpha``, ``beta``: scalars, both initialised to 1.0.

There is no separate LoRA scale σ: α plays that role. With ``B = 0`` the direction is ``β·W0`` and
the row normalisation removes β, so a fresh WoRA reproduces ``W0`` exactly; with α = β = 1 WoRA is
our DoRA at its init (σ = 1), for any ``A``, ``B`` and ``m``. Gradients flow through the norm.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from upperson.petl.base import PETLModule, fused_in_proj_width


def _row_norm(weight: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` → ``[out]``: the L2 norm of each output row (over the input dimension)."""
    return torch.linalg.vector_norm(weight, dim=1)


class WeightedDecomposition(PETLModule):
    """WoRA's trainable part for one ``[width, width]`` projection: ``A``, ``B``, ``m``, α and β.

    Args:
        frozen_weight: that projection's frozen ``W0``, read once for the magnitude init (not stored).
        rank: rank of the low-rank direction update.
    """

    def __init__(self, frozen_weight: torch.Tensor, rank: int) -> None:
        super().__init__()
        width = frozen_weight.shape[1]
        device = frozen_weight.device
        self.lora_a = nn.Parameter(torch.empty(rank, width, device=device))
        self.lora_b = nn.Parameter(torch.empty(width, rank, device=device))
        self.magnitude = nn.Parameter(torch.empty(width, device=device))
        self.alpha = nn.Parameter(torch.empty((), device=device))
        self.beta = nn.Parameter(torch.empty((), device=device))
        self.register_buffer("initial_magnitude", _row_norm(frozen_weight.detach().float()), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)
        self.magnitude.copy_(self.initial_magnitude)
        nn.init.ones_(self.alpha)
        nn.init.ones_(self.beta)

    def low_rank(self) -> torch.Tensor:
        """The dense ``α·B·A [width, width]`` (for the norm, merging and the explicit backend)."""
        return self.alpha * (self.lora_b @ self.lora_a)

    def direction(self, frozen: torch.Tensor) -> torch.Tensor:
        """``β·W0 + α·B·A``, the un-normalised direction."""
        return self.beta * frozen + self.low_rank()

    def row_scale(self, frozen: torch.Tensor) -> torch.Tensor:
        """``m / ‖β·W0 + α·B·A‖ [width]``: what each output feature of the direction is multiplied by."""
        return self.magnitude / _row_norm(self.direction(frozen))

    def weight(self, frozen: torch.Tensor) -> torch.Tensor:
        """``W' = m ⊙ (β·W0 + α·B·A) / ‖β·W0 + α·B·A‖`` (explicit form)."""
        return self.direction(frozen) * self.row_scale(frozen)[:, None]

    def forward(self, x: torch.Tensor, frozen_projection: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
        """``x W'ᵀ`` from the frozen ``x W0ᵀ`` and a low-rank side branch; only the norm needs the dense update.

        Args:
            x: the attention input ``[..., width]``.
            frozen_projection: ``x W0ᵀ`` without bias, ``[..., width]``.
            frozen: ``W0``, for the row norms.
        """
        side = (x @ self.lora_a.t()) @ self.lora_b.t()  # [..., rank] → [..., width]
        return self.row_scale(frozen) * (self.beta * frozen_projection + self.alpha * side)


class KVWoRA(PETLModule):
    """WoRA on the K and V rows of ``W_in = [W_q; W_k; W_v]``; Q stays frozen.

    Args:
        in_proj_weight: the frozen fused ``[3·width, width]`` in-projection, read once to
            initialise the magnitudes (it is not stored).
        rank: rank of the low-rank direction update.
    """

    component = "wora"

    def __init__(self, in_proj_weight: torch.Tensor, rank: int) -> None:
        super().__init__()
        width = fused_in_proj_width(in_proj_weight)
        _, key_rows, value_rows = in_proj_weight.chunk(3, dim=0)  # each [width, width]
        self.key = WeightedDecomposition(key_rows, rank)
        self.value = WeightedDecomposition(value_rows, rank)
        self.register_buffer("merged_norm", None, persistent=False)

    def reset_parameters(self) -> None:
        self.key.reset_parameters()
        self.value.reset_parameters()

    def _parts(self, in_proj_weight: torch.Tensor) -> tuple[tuple[torch.Tensor, WeightedDecomposition], ...]:
        """``(frozen rows, WoRA part)`` for K, then for V."""
        _, key_rows, value_rows = in_proj_weight.chunk(3, dim=0)  # each [width, width]
        return (key_rows, self.key), (value_rows, self.value)

    def updated_in_proj(self, in_proj_weight: torch.Tensor) -> torch.Tensor:
        """``[W_q; W'_k; W'_v]``: the whole in-projection with WoRA applied (explicit form)."""
        query_rows = in_proj_weight.chunk(3, dim=0)[0]
        return torch.cat([query_rows, *(part.weight(frozen) for frozen, part in self._parts(in_proj_weight))], dim=0)

    def update_key_value(
        self,
        x: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        in_proj_weight: torch.Tensor,
        in_proj_bias: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen ``k = x W0_kᵀ + b_k`` (and v) → ``x W'_kᵀ + b_k``.

        ``x W'ᵀ = (m / ‖β·W0 + α·BA‖) ⊙ (β·(x W0ᵀ) + α·x Aᵀ Bᵀ)`` per output feature, with ``x W0ᵀ``
        recovered from the frozen projection by removing its bias.
        """
        _, key_bias, value_bias = in_proj_bias.chunk(3)
        outputs = []
        for (frozen, part), projected, bias in zip(self._parts(in_proj_weight), (key, value), (key_bias, value_bias)):
            outputs.append((part(x, projected - bias, frozen) + bias).to(projected.dtype))  # keep autocast's dtype
        return outputs[0], outputs[1]

    @torch.no_grad()
    def merge_(self, in_proj_weight: torch.Tensor) -> None:
        """Write ``W'_k``, ``W'_v`` into the frozen weight; keep the norms so that unmerging is exact."""
        self.merged_norm = torch.cat([_row_norm(part.direction(frozen)) for frozen, part in self._parts(in_proj_weight)])
        in_proj_weight.copy_(self.updated_in_proj(in_proj_weight).to(in_proj_weight.dtype))

    @torch.no_grad()
    def unmerge_(self, in_proj_weight: torch.Tensor) -> None:
        """Recover ``W0 = (W' ⊙ ‖β·W0 + α·BA‖ / m − α·BA) / β`` (needs β ≠ 0 and every m ≠ 0)."""
        norms = self.merged_norm.chunk(2)
        for (merged, part), norm in zip(self._parts(in_proj_weight), norms):
            direction = merged * (norm / part.magnitude)[:, None]  # β·W0 + α·BA
            merged.copy_(((direction - part.low_rank()) / part.beta).to(merged.dtype))
        self.merged_norm = None
