"""Training samplers: P x K identity batches, determinism per epoch, disjoint distributed ranks."""

from __future__ import annotations

from collections import Counter

import pytest
from torch.utils.data import DistributedSampler, RandomSampler

from upperson.data import RandomIdentitySampler, build_train_batches, build_train_sampler

# 12 ids with 1..12 samples each, interleaved so that indices of one id are not contiguous
PIDS = [pid for round_ in range(12) for pid in range(12) if round_ <= pid]


def batches(indices: list[int], size: int) -> list[list[int]]:
    assert len(indices) % size == 0
    return [indices[start : start + size] for start in range(0, len(indices), size)]


def test_every_batch_has_p_distinct_ids_with_k_instances() -> None:
    sampler = RandomIdentitySampler(PIDS, batch_size=16, num_instances=4, seed=0)
    indices = list(sampler)
    assert len(indices) == len(sampler) > 0
    for batch in batches(indices, 16):
        per_id = Counter(PIDS[index] for index in batch)
        assert len(per_id) == 4 and set(per_id.values()) == {4}
    # ids with fewer than K samples are drawn with replacement; others never repeat an index
    repeated = {PIDS[index] for index, count in Counter(indices).items() if count > 1}
    assert repeated <= {0, 1, 2}
    # batching stops only when fewer than P ids have unused chunks of K left
    chunks = {pid: max(1, PIDS.count(pid) // 4) for pid in range(12)}
    used = Counter(PIDS[index] for index in indices)
    assert all(used[pid] % 4 == 0 and used[pid] // 4 <= chunks[pid] for pid in range(12))
    assert 0 < sum(used[pid] // 4 < chunks[pid] for pid in range(12)) < 4


def test_deterministic_per_seed_and_epoch() -> None:
    first, second = RandomIdentitySampler(PIDS, 16, seed=5), RandomIdentitySampler(PIDS, 16, seed=5)
    first.set_epoch(3)
    second.set_epoch(3)
    assert list(first) == list(second)
    epoch3 = list(first)
    first.set_epoch(4)
    assert list(first) != epoch3
    first.set_epoch(3)
    assert list(first) == epoch3
    assert list(RandomIdentitySampler(PIDS, 16, seed=6)) != list(RandomIdentitySampler(PIDS, 16, seed=5))


def test_distributed_ranks_get_disjoint_equal_whole_batches() -> None:
    pids = [pid for pid in range(40) for _ in range(1 + pid % 7)]
    single = batches(list(RandomIdentitySampler(pids, 8, 4, seed=2)), 8)
    ranks = [RandomIdentitySampler(pids, 8, 4, seed=2, num_replicas=3, rank=rank) for rank in range(3)]
    for sampler in ranks:
        sampler.set_epoch(0)
    slices = [list(sampler) for sampler in ranks]
    per_rank = len(single) // 3
    assert [len(part) for part in slices] == [per_rank * 8] * 3
    assert [len(sampler) for sampler in ranks] == [per_rank * 8] * 3
    for rank, part in enumerate(slices):
        assert batches(part, 8) == single[rank::3][:per_rank]
        for batch in batches(part, 8):
            assert sorted(Counter(pids[i] for i in batch).values()) == [4, 4]
    assert not set(slices[0]) & set(slices[1]) and not set(slices[1]) & set(slices[2]) and not set(slices[0]) & set(slices[2])


def test_invalid_configurations_name_the_fix() -> None:
    with pytest.raises(ValueError, match="multiple of num_instances"):
        RandomIdentitySampler(PIDS, batch_size=10, num_instances=4)
    with pytest.raises(ValueError, match="needs 32 distinct ids .* has 12; lower batch_size"):
        RandomIdentitySampler(PIDS, batch_size=128, num_instances=4)
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        RandomIdentitySampler(PIDS, batch_size=8, num_replicas=2, rank=2)


def test_build_train_sampler_kinds() -> None:
    sampler = build_train_sampler("random", PIDS, batch_size=8, seed=1)
    assert isinstance(sampler, RandomSampler)
    sampler.set_epoch(2)
    epoch2 = list(sampler)
    assert sorted(epoch2) == list(range(len(PIDS)))
    again = build_train_sampler("random", PIDS, batch_size=8, seed=1)
    again.set_epoch(2)
    assert list(again) == epoch2
    sampler.set_epoch(3)
    assert list(sampler) != epoch2

    ranks = [build_train_sampler("random", PIDS, batch_size=8, seed=1, num_replicas=2, rank=r) for r in range(2)]
    assert all(isinstance(s, DistributedSampler) and s.seed == 1 for s in ranks)
    assert set(ranks[0]) | set(ranks[1]) == set(range(len(PIDS))) and len(ranks[0]) == len(ranks[1])

    identity = build_train_sampler("identity", PIDS, batch_size=8, seed=1, num_instances=2)
    assert isinstance(identity, RandomIdentitySampler) and identity.ids_per_batch == 4
    with pytest.raises(ValueError, match="unknown sampler 'balanced'"):
        build_train_sampler("balanced", PIDS, batch_size=8, seed=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["random", "identity"])
@pytest.mark.parametrize("world", [2, 4])
def test_ranks_slices_rebuild_the_single_process_batches(kind: str, world: int) -> None:
    """Gathered in rank order, the ranks' slices of each step are the batch one process trains on."""
    pids = [index // 3 for index in range(68)]  # 68 samples: the random order ends in a partial batch
    single = build_train_batches(kind, pids, batch_size=16, micro_batch=8, seed=3, num_instances=2)
    ranks = [build_train_batches(kind, pids, 16, 8, seed=3, num_replicas=world, rank=r, num_instances=2) for r in range(world)]
    for epoch in (0, 1):
        for sampler in [single, *ranks]:
            sampler.set_epoch(epoch)
        expected = list(single)
        per_rank = [list(sampler) for sampler in ranks]
        assert all(len(batches) == len(expected) for batches in per_rank)
        for step, batch in enumerate(expected):
            assert [index for batches in per_rank for index in batches[step]] == batch
            assert {len(batches[step]) for batches in per_rank} <= {len(batch) // world, -(-len(batch) // world)}
    if kind == "random":
        assert len(expected[-1]) == 68 - 8 * 8  # the partial micro-batch (4 samples) is kept and split
