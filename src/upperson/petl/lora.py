"""LoRA on the key and value rows of a fused attention in-projection (UP-Person §IV-B)."""

from __future__ import annotations

import math

import torch
from torch import nn

from upperson.petl.base import PETLModule


class LowRankDelta(PETLModule):
    """``σ · B · A`` with ``A [rank, width]``, ``B [width, rank]`` and a learnable scalar σ.

    There is no α/rank factor: σ (init 1) is the only scale, as in the official code.
    """

    def __init__(self, width: int, rank: int) -> None:
        super().__init__()
        self.lora_a = nn.Parameter(torch.empty(rank, width))
        self.lora_b = nn.Parameter(torch.empty(width, rank))
        self.scale = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)
        nn.init.ones_(self.scale)

    def weight(self) -> torch.Tensor:
        """The dense ``[width, width]`` update, for merging."""
        return self.scale * (self.lora_b @ self.lora_a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``σ · x Aᵀ Bᵀ`` without materialising the dense update.

        σ multiplies the rank-wide ``x Aᵀ``, not the width-wide result: the same value, but autograd
        then keeps a ``[..., rank]`` tensor for σ's gradient instead of a ``[..., width]`` one.
        """
        return ((x @ self.lora_a.t()) * self.scale) @ self.lora_b.t()


class KVLoRA(PETLModule):
    """Low-rank updates of the K and V rows of ``W_in = [W_q; W_k; W_v]``; Q stays frozen."""

    component = "lora"

    def __init__(self, width: int, rank: int) -> None:
        super().__init__()
        self.key = LowRankDelta(width, rank)
        self.value = LowRankDelta(width, rank)

    def reset_parameters(self) -> None:
        self.key.reset_parameters()
        self.value.reset_parameters()

    def in_proj_delta(self) -> torch.Tensor:
        """``[0; ΔW_k; ΔW_v]`` shaped like the fused ``[3·width, width]`` in-projection."""
        key_delta, value_delta = self.key.weight(), self.value.weight()
        return torch.cat([torch.zeros_like(key_delta), key_delta, value_delta], dim=0)

    def updated_in_proj(self, in_proj_weight: torch.Tensor) -> torch.Tensor:
        """``W_in + [0; ΔW_k; ΔW_v]``: the whole in-projection with LoRA applied (explicit form)."""
        return in_proj_weight + self.in_proj_delta()

    def update_key_value(
        self,
        x: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        in_proj_weight: torch.Tensor,
        in_proj_bias: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen ``k``, ``v`` → ``k + σK·x AKᵀ BKᵀ``, ``v + σV·x AVᵀ BVᵀ`` (the frozen weights are not needed)."""
        return key + self.key(x), value + self.value(x)

    @torch.no_grad()
    def merge_(self, in_proj_weight: torch.Tensor) -> None:
        """Add the update into the frozen weight in place."""
        in_proj_weight.add_(self.in_proj_delta().to(in_proj_weight.dtype))

    @torch.no_grad()
    def unmerge_(self, in_proj_weight: torch.Tensor) -> None:
        """Subtract the update that :meth:`merge_` added."""
        in_proj_weight.sub_(self.in_proj_delta().to(in_proj_weight.dtype))
