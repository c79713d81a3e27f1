"""Multi-process training under ``torchrun``: which process this is, the process group's lifetime, DDP.

``torchrun`` starts one process per GPU and tells each its place through the ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK`` environment variables (plus ``MASTER_ADDR`` / ``MASTER_PORT`` for the
rendezvous). Without them, or with ``WORLD_SIZE=1``, training is a single process and nothing here
creates a process group, so single-process runs are untouched.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from upperson.losses import at_least_fp32
from upperson.runtime import resolve_device

logger = logging.getLogger(__name__)

GROUP_TIMEOUT = timedelta(minutes=60)
"""How long a collective may wait: the other ranks idle at a barrier while rank 0 evaluates and
writes checkpoints, which on a large test split takes longer than torch's 10-minute default."""


@dataclass(frozen=True)
class DistributedEnv:
    """This process's place among the training processes (``world_size == 1``: a plain run)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 evaluates, writes the run directory and reports."""
        return self.rank == 0

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> DistributedEnv:
        """Read torchrun's variables; absent variables mean a single process."""
        environ = os.environ if environ is None else environ
        world_size = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", str(rank)))
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"torchrun environment: RANK {rank} is not in 0..{world_size - 1} (WORLD_SIZE)")
        return cls(rank=rank, local_rank=local_rank, world_size=world_size)


def resolve_distributed_device(name: str, env: DistributedEnv) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for ``auto`` / ``cuda`` when CUDA exists, else the CPU.

    A fixed ``cuda:N`` would put every rank on one GPU, so it is refused under torchrun.
    """
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", env.local_rank)
    if name.startswith("cuda:"):
        raise ValueError(f"device {name!r} under torchrun: use 'auto' or 'cuda' (each rank takes cuda:LOCAL_RANK)")
    return resolve_device(name)


def wrap_ddp(module: nn.Module, device: torch.device) -> DistributedDataParallel:
    """``module`` in DistributedDataParallel on this rank's device (call after the process group is up).

    Wrap last, after every PETL module is injected and the frozen weights are stored: DDP registers
    the parameters that require gradients when it is built.
    """
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


@contextmanager
def process_group(env: DistributedEnv, device: torch.device) -> Iterator[None]:
    """Initialise the process group for ``env`` (NCCL on CUDA, Gloo on CPU) and destroy it on exit.

    Does nothing for a single process, and reuses a group the caller already initialised (then
    leaves it for the caller to destroy).
    """
    if not env.enabled or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=GROUP_TIMEOUT)
    logger.info("process group: %s, rank %d of %d on %s", backend, env.rank, env.world_size, device)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier(env: DistributedEnv, device: torch.device) -> None:
    """Wait for every rank (no-op in a single process)."""
    if not env.enabled:
        return
    if device.type == "cuda" and dist.get_backend() == "nccl":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def broadcast_from_main(value: Any, env: DistributedEnv) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object; returned unchanged in a single process)."""
    if not env.enabled:
        return value
    box = [value if env.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _GatherRows(torch.autograd.Function):
    """Differentiable all-gather along dim 0 of batches that may differ in length between ranks.

    Forward: rank ``r`` contributes ``x_r`` (``sizes[r]`` rows) and every rank receives
    ``X = cat(x_0, ..., x_{N-1})``. Backward: rank ``r`` holds ``∂L_r/∂X`` for its own loss
    ``L_r``; the all-reduce sums these over the ranks, and the slice of this rank's rows is
    ``∂(Σ_r' L_r')/∂x_r``, the gradient of the *sum* of all ranks' losses with respect to this
    rank's samples (the other ranks' samples are leaves here, their encoders run elsewhere).

    Combined with DDP, which averages parameter gradients over the N ranks, training optimises
    ``(1/N) Σ_r' L_r'``. When every rank computes the same loss ``L`` on the gathered batch,
    that is ``L`` itself: the parameter gradients equal those of one process computing ``L`` on
    the whole batch. (Without the all-reduce, rank ``r`` would pass on only ``∂L_r/∂x_r``, and
    DDP's averaging would leave ``1/N`` of the true gradient.)
    """

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        padded = rows.new_zeros((max(sizes), *rows.shape[1:]))  # all_gather needs equal shapes
        padded[: len(rows)] = rows
        slots = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(slots, padded)
        return torch.cat([slot[:size] for slot, size in zip(slots, sizes)])  # [sum(sizes), ...]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place; autograd's buffer is not ours
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def gather_global_batch(
    image_features: torch.Tensor, text_features: torch.Tensor, pids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch of all ranks, in rank order, with gradients flowing back to each rank's own samples.

    Features are gathered in at least fp32 (the precision the losses use anyway), image and text
    features together in one collective; ``pids`` need no gradient. Ranks may hold batches of
    different lengths (e.g. after unreadable images were skipped). Without an initialised process
    group of more than one process the inputs come back unchanged.

    Args:
        image_features: ``[b_r, D]`` this rank's image features.
        text_features: ``[b_r, D]`` this rank's text features.
        pids: ``[b_r]`` this rank's person ids.

    Returns:
        ``[B, D]`` image features, ``[B, D]`` text features and ``[B]`` pids with ``B = Σ_r b_r``;
        see :class:`_GatherRows` for why every rank's loss on them is the global loss.
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return image_features, text_features, pids
    length = torch.tensor([len(pids)], device=pids.device)
    lengths = [torch.empty_like(length) for _ in range(dist.get_world_size())]
    dist.all_gather(lengths, length)
    sizes = [int(size) for size in torch.cat(lengths).tolist()]
    features = torch.cat([at_least_fp32(image_features), at_least_fp32(text_features)], dim=1)  # [b_r, 2D]
    gathered = _GatherRows.apply(features, sizes)  # [B, 2D]
    image_all, text_all = gathered.split([image_features.shape[1], text_features.shape[1]], dim=1)
    return image_all, text_all, _GatherRows.apply(pids, sizes)


def all_reduce_sum(values: list[float], env: DistributedEnv, device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over the ranks, e.g. running losses for one log line."""
    if not env.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()
