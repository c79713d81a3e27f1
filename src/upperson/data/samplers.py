"""Training samplers: shuffled captions, or P identities x K instances per batch (spec B.6).

Every sampler is deterministic given ``(seed, epoch)`` and knows which slice of the data its
process owns, so the same code runs on one GPU and under DDP (the official code gives every rank
the full data, and its distributed identity sampler crashes). Ours draw from
:func:`upperson.runtime.epoch_seed`; torch's `DistributedSampler` draws from ``seed + epoch``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch.utils.data import DistributedSampler, RandomSampler, Sampler

from upperson.runtime import epoch_seed

logger = logging.getLogger(__name__)


class SeededRandomSampler(RandomSampler):
    """`RandomSampler` whose permutation depends only on ``(seed, epoch)``, e.g. after a resume."""

    def __init__(self, data_source: Sequence[object], seed: int = 0) -> None:
        super().__init__(data_source, generator=torch.Generator().manual_seed(seed))
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        """Reseed so that this epoch's order does not depend on how many epochs ran before."""
        self.generator.manual_seed(epoch_seed(self.seed, epoch))


class RandomIdentitySampler(Sampler[int]):
    """Indices in batches of ``P = batch_size // num_instances`` distinct ids x ``K = num_instances``.

    Per epoch: each id's sample indices are shuffled (ids with fewer than K samples first draw K
    with replacement) and cut into chunks of K, dropping the remainder; then batches repeatedly
    take P distinct ids at random and one chunk of each, until fewer than P ids have chunks left.
    With ``num_replicas > 1`` rank ``r`` gets batches ``r, r + num_replicas, ...``, cut to the same
    number of whole batches on every rank, so ranks see disjoint data and stay in step.

    Args:
        pids: identity of every sample, indexed like the dataset.
        batch_size: batch size of one process; a multiple of ``num_instances``.
        num_instances: K, samples per identity in a batch.
        seed: with the epoch, fixes the order.
        num_replicas: number of processes sharing the data.
        rank: this process.
    """

    def __init__(
        self,
        pids: Sequence[int],
        batch_size: int,
        num_instances: int = 4,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if num_instances < 1 or batch_size < num_instances or batch_size % num_instances:
            raise ValueError(
                f"identity sampler: batch_size ({batch_size}) must be a positive multiple of num_instances ({num_instances})"
            )
        if not 0 <= rank < num_replicas:
            raise ValueError(f"identity sampler: rank {rank} is not in 0..{num_replicas - 1} (num_replicas)")
        self.indices_by_pid: dict[int, list[int]] = {}
        for index, pid in enumerate(pids):
            self.indices_by_pid.setdefault(int(pid), []).append(index)
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.ids_per_batch = batch_size // num_instances
        if len(self.indices_by_pid) < self.ids_per_batch:
            raise ValueError(
                f"identity sampler: a batch needs {self.ids_per_batch} distinct ids (batch_size {batch_size} / "
                f"num_instances {num_instances}) but the data has {len(self.indices_by_pid)}; lower batch_size"
            )
        self.seed, self.num_replicas, self.rank = seed, num_replicas, rank
        self.epoch = 0
        self._cache: tuple[int, list[int]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order `__iter__` yields."""
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        """Every whole batch of the epoch, before the split across ranks."""
        rng = random.Random(epoch_seed(self.seed, self.epoch))
        chunks: dict[int, list[list[int]]] = {}
        k = self.num_instances
        for pid, indices in self.indices_by_pid.items():
            if len(indices) < k:
                indices = [rng.choice(indices) for _ in range(k)]
            else:
                indices = indices.copy()
                rng.shuffle(indices)
            chunks[pid] = [indices[start : start + k] for start in range(0, len(indices) - k + 1, k)]
        available = list(chunks)
        batches = []
        while len(available) >= self.ids_per_batch:
            batch = []
            for pid in rng.sample(available, self.ids_per_batch):
                batch.extend(chunks[pid].pop())
                if not chunks[pid]:
                    available.remove(pid)
            batches.append(batch)
        return batches

    def _indices(self) -> list[int]:
        if self._cache is None or self._cache[0] != self.epoch:
            batches = self._batches()
            per_rank = len(batches) // self.num_replicas
            if per_rank == 0:
                logger.warning("identity sampler: %d batches cannot be shared by %d processes; this epoch is empty", len(batches), self.num_replicas)
            mine = batches[self.rank :: self.num_replicas][:per_rank]
            self._cache = (self.epoch, [index for batch in mine for index in batch])
        return self._cache[1]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


class GlobalBatchSlices(Sampler[list[int]]):
    """Batch sampler: this process's slice of every global micro-batch of one global sample order.

    Every process draws the same global order (``order``, seeded by ``(seed, epoch)`` only) and
    cuts it into micro-batches of ``micro_batch`` samples, exactly as one process would batch it;
    rank ``r`` of ``N`` takes the ``r``-th of ``N`` equal slices of each. The ranks' slices,
    gathered in rank order (``train.sdm_scope: global``), are therefore the micro-batch that one
    process trains on at the same step, whatever ``N`` is. A last, partial micro-batch is split as
    evenly as possible; one with fewer than ``N`` samples is dropped (every rank must step).
    """

    def __init__(self, order: Sampler[int], micro_batch: int, num_replicas: int = 1, rank: int = 0, drop_last: bool = False) -> None:
        if micro_batch < num_replicas or micro_batch % num_replicas:
            raise ValueError(f"global micro-batch of {micro_batch} samples cannot be split evenly over {num_replicas} processes")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in 0..{num_replicas - 1} (num_replicas)")
        self.order, self.micro_batch = order, micro_batch
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, drop_last

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the global order."""
        self.order.set_epoch(epoch)  # type: ignore[attr-defined]

    def _slices(self) -> list[list[int]]:
        indices, world = list(self.order), self.num_replicas
        slices = []
        for start in range(0, len(indices), self.micro_batch):
            chunk = indices[start : start + self.micro_batch]  # one global micro-batch
            if len(chunk) < self.micro_batch and (self.drop_last or len(chunk) < world):
                break
            bounds = [len(chunk) * part // world for part in range(world + 1)]
            slices.append(chunk[bounds[self.rank] : bounds[self.rank + 1]])
        return slices

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._slices())

    def __len__(self) -> int:
        return len(self._slices())


def build_train_batches(
    kind: Literal["random", "identity"],
    pids: Sequence[int],
    batch_size: int,
    micro_batch: int,
    seed: int,
    num_replicas: int = 1,
    rank: int = 0,
    num_instances: int = 4,
    drop_last: bool = False,
) -> GlobalBatchSlices:
    """The training batch sampler: this rank's share of the one global order of ``kind``.

    Args:
        batch_size: the global batch (an optimizer step), which identity batches are built for.
        micro_batch: the global micro-batch (``batch_size / grad_accumulation``), split over the ranks.
    """
    order = build_train_sampler(kind, pids, batch_size, seed, num_instances=num_instances)
    return GlobalBatchSlices(order, micro_batch, num_replicas, rank, drop_last)


def build_train_sampler(
    kind: Literal["random", "identity"],
    pids: Sequence[int],
    batch_size: int,
    seed: int,
    num_replicas: int = 1,
    rank: int = 0,
    num_instances: int = 4,
) -> SeededRandomSampler | RandomIdentitySampler | DistributedSampler:
    """The training sampler for ``kind``; call its ``set_epoch(epoch)`` before every epoch.

    ``random`` is a seeded `RandomSampler` in one process and a `DistributedSampler` (shuffled with
    ``seed``, padded to equal length) with ``num_replicas > 1``. ``identity`` is
    `RandomIdentitySampler`, with ``batch_size`` the per-process batch size.
    """
    if kind == "identity":
        return RandomIdentitySampler(pids, batch_size, num_instances, seed, num_replicas, rank)
    if kind != "random":
        raise ValueError(f"unknown sampler {kind!r}; choose 'random' or 'identity'")
    if num_replicas > 1:
        return DistributedSampler(pids, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
    return SeededRandomSampler(pids, seed)
