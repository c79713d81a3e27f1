"""The low-rank K/V updates UP-Person can put on the attention in-projection (Table VI), by name.

``UPPersonConfig.lora_type`` names an entry here; a new technique (one module in ``petl/``) becomes
selectable by adding one line to :data:`LOW_RANK_UPDATES`. Every entry builds a module that
implements :class:`KVUpdate`, which is all :class:`~upperson.petl.PETLAttention` relies on.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from upperson.petl.base import PETLModule
from upperson.petl.dora import KVDoRA
from upperson.petl.lora import KVLoRA
from upperson.petl.wora import KVWoRA


class KVUpdate(Protocol):
    """What a low-rank update of the K/V rows of a fused ``[3·width, width]`` in-projection provides."""

    def updated_in_proj(self, in_proj_weight: torch.Tensor) -> torch.Tensor:
        """The whole in-projection with the update applied (explicit backend, merging)."""

    def update_key_value(
        self, x: torch.Tensor, key: torch.Tensor, value: torch.Tensor, in_proj_weight: torch.Tensor, in_proj_bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen-projection ``k``, ``v`` of ``x`` → updated ones (fused backend)."""

    def merge_(self, in_proj_weight: torch.Tensor) -> None:
        """Write the update into the frozen weight, exactly undoable by :meth:`unmerge_`."""

    def unmerge_(self, in_proj_weight: torch.Tensor) -> None:
        """Undo :meth:`merge_`."""


LowRankFactory = Callable[[torch.Tensor, int], PETLModule]
"""``(frozen in_proj_weight, rank) → module`` on the weight's device; the weight is read, never stored."""


def _lora(in_proj_weight: torch.Tensor, rank: int) -> PETLModule:
    return KVLoRA(in_proj_weight.shape[1], rank).to(in_proj_weight.device)


LOW_RANK_UPDATES: dict[str, LowRankFactory] = {
    "lora": _lora,
    "dora": KVDoRA,
    "wora": KVWoRA,
}
"""``lora_type`` name → factory."""


def build_low_rank_update(kind: str, in_proj_weight: torch.Tensor, rank: int) -> PETLModule:
    """The ``kind`` update for one attention layer; unknown kinds name the available ones."""
    if kind not in LOW_RANK_UPDATES:
        raise ValueError(f"unknown low-rank update {kind!r}; available: {sorted(LOW_RANK_UPDATES)}")
    return LOW_RANK_UPDATES[kind](in_proj_weight, rank)
