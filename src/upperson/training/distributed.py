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


def all_reduce_sum(values: list[float], env: DistributedEnv, device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over the ranks, e.g. running losses for one log line."""
    if not env.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()
