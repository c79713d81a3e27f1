"""DoRA (weight-decomposed LoRA) on the key and value rows of a fused in-projection (Table VI).

For a frozen projection ``W0 [out, in]`` (``y = x W0ᵀ``) and our LoRA update ``ΔW = σ · B · A``:

    ``W' = m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖``,  the norm taken per output row, over the input dimension,

with a trainable magnitude ``m [out]`` initialised to the row norms of ``W0``, so a fresh DoRA
reproduces ``W0``. The DoRA paper writes ``W ∈ R^{d×k}`` in the ``x W`` convention and normalises
each *column*, i.e. each output feature; in torch's ``[out, in]`` layout that is each *row*, which
is also what PEFT does. Gradients flow through the norm (the DoRA paper's optional "treat the norm
as a constant" memory saving is not applied).
"""

from __future__ import annotations

import torch
from torch import nn

from upperson.petl.base import PETLModule, fused_in_proj_width
from upperson.petl.lora import LowRankDelta


def _row_norm(weight: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` → ``[out]``: the L2 norm of each output row (over the input dimension)."""
    return torch.linalg.vector_norm(weight, dim=1)


class KVDoRA(PETLModule):
    """DoRA on the K and V rows of ``W_in = [W_q; W_k; W_v]``; Q stays frozen.

    Args:
        in_proj_weight: the frozen fused ``[3·width, width]`` in-projection, read once to
            initialise the magnitudes (it is not stored).
        rank: rank of the low-rank direction update.
    """

    component = "dora"

    def __init__(self, in_proj_weight: torch.Tensor, rank: int) -> None:
        super().__init__()
        width = fused_in_proj_width(in_proj_weight)
        device = in_proj_weight.device
        self.key = LowRankDelta(width, rank).to(device)
        self.value = LowRankDelta(width, rank).to(device)
        self.key_magnitude = nn.Parameter(torch.empty(width, device=device))
        self.value_magnitude = nn.Parameter(torch.empty(width, device=device))
        frozen_norms = _row_norm(in_proj_weight.detach()[width:].float())  # [2·width]: K rows then V rows
        self.register_buffer("initial_magnitude", frozen_norms, persistent=False)
        self.register_buffer("merged_norm", None, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.key.reset_parameters()
        self.value.reset_parameters()
        key_norm, value_norm = self.initial_magnitude.chunk(2)
        self.key_magnitude.copy_(key_norm)
        self.value_magnitude.copy_(value_norm)

    def _parts(self, in_proj_weight: torch.Tensor) -> tuple[tuple[torch.Tensor, LowRankDelta, torch.Tensor], ...]:
        """``(frozen rows, low-rank delta, magnitude)`` for K, then for V."""
        _, key_rows, value_rows = in_proj_weight.chunk(3, dim=0)  # each [width, width]
        return (key_rows, self.key, self.key_magnitude), (value_rows, self.value, self.value_magnitude)

    def updated_in_proj(self, in_proj_weight: torch.Tensor) -> torch.Tensor:
        """``[W_q; W'_k; W'_v]``: the whole in-projection with DoRA applied (explicit form)."""
        query_rows = in_proj_weight.chunk(3, dim=0)[0]
        decomposed = []
        for frozen, delta, magnitude in self._parts(in_proj_weight):
            direction = frozen + delta.weight()
            decomposed.append(direction * (magnitude / _row_norm(direction))[:, None])
        return torch.cat([query_rows, *decomposed], dim=0)

    def update_key_value(
        self,
        x: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        in_proj_weight: torch.Tensor,
        in_proj_bias: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen ``k = x W0_kᵀ + b_k`` (and v) → ``x W'_kᵀ + b_k``, with a low-rank side branch.

        ``x W'ᵀ = (m / ‖W0 + ΔW‖) ⊙ (x W0ᵀ + x ΔWᵀ)`` per output feature; only the norm needs the
        dense ``ΔW``.
        """
        _, key_bias, value_bias = in_proj_bias.chunk(3)
        outputs = []
        for (frozen, delta, magnitude), projected, bias in zip(self._parts(in_proj_weight), (key, value), (key_bias, value_bias)):
            scale = magnitude / _row_norm(frozen + delta.weight())  # [width]
            outputs.append((scale * (projected - bias + delta(x)) + bias).to(projected.dtype))  # keep autocast's dtype
        return outputs[0], outputs[1]

    @torch.no_grad()
    def merge_(self, in_proj_weight: torch.Tensor) -> None:
        """Write ``W'_k``, ``W'_v`` into the frozen weight; keep the norms so that unmerging is exact."""
        self.merged_norm = torch.cat([_row_norm(frozen + delta.weight()) for frozen, delta, _ in self._parts(in_proj_weight)])
        in_proj_weight.copy_(self.updated_in_proj(in_proj_weight).to(in_proj_weight.dtype))

    @torch.no_grad()
    def unmerge_(self, in_proj_weight: torch.Tensor) -> None:
        """Recover ``W0 = W' ⊙ ‖W0 + ΔW‖ / m − ΔW`` (magnitudes must be non-zero)."""
        norms = self.merged_norm.chunk(2)
        for (merged, delta, magnitude), norm in zip(self._parts(in_proj_weight), norms):
            merged.copy_((merged * (norm / magnitude)[:, None] - delta.weight()).to(merged.dtype))
        self.merged_norm = None
