"""Two-process DDP training on CPU (Gloo): gradients are the ranks' mean, ranks agree, rank 0 writes, resume;
``train.sdm_scope: global`` gives the single-process SDM/ITC of the global batch.

One spawn of two workers runs every scenario (spawning costs seconds); the tests read what the
workers left in a temporary folder.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_training import tiny_overrides, write_cuhk_fixture

from upperson.config import ConfigError, load_config
from upperson.losses import MLM_IGNORE_INDEX
from upperson.runtime import seed_everything
from upperson.training.distributed import DistributedEnv, gather_global_batch, process_group, resolve_distributed_device
from upperson.training.loop import Trainer
from upperson.training.objective import TrainingObjective
from upperson.training.step import TrainingParts, build_training, loss_terms

WORLD = 2
TIMEOUT_S = 120
TRAIN_OVERRIDES = ["train.losses=[sdm,id]", "train.id_lr_factor=5", "train.epochs=2"]
NUM_IDS = 4
SCOPE_SCENARIOS = {
    # name: (overrides, rows of rank 0 and rank 1); the global batch is their concatenation
    "global_sdm": (["train.losses=[sdm]", "train.sdm_scope=global"], (4, 4)),
    "global_itc": (["train.losses=[itc]", "train.sdm_scope=global"], (4, 4)),
    "global_all": (["train.losses=[sdm,itc,id,mlm]", "train.sdm_scope=global"], (4, 4)),
    "global_unequal": (["train.losses=[sdm]", "train.sdm_scope=global"], (4, 3)),
    "local_sdm": (["train.losses=[sdm]", "train.sdm_scope=local"], (4, 4)),
}
GRAD_ATOL = 1e-5
"""fp32: the largest gradient difference allowed, relative to the largest |gradient| of the whole
model. Summation order differs (two ranks, then DDP's mean, vs one matmul); observed up to 2.5e-6,
and ~1e-15 when the same scenarios run in fp64. A bound relative to each tensor's own maximum would
not hold for the tiny gradients of the scale parameters, whose rounding comes from larger terms."""
EQUIVALENCE_OVERRIDES = ["train.losses=[sdm]", "train.epochs=2", "data.augment=true", "data.text_mask_prob=0.15", "train.select_on=last"]
"""Two epochs of SDM with augmentation and caption masking on: the run 1 and 2 processes must share."""
EQUIVALENCE_RTOL = 1e-4
"""Largest ``max|a - b| / max|b|`` per adapter tensor between the 2-process and the 1-process run. The
global batches are identical; only fp32 summation order differs (the ranks' halves, then the
gradient all-reduce, vs one pass), a few roundings (~1e-7 relative) per step that Adam's
normalisation can enlarge on near-zero gradients over the run's steps."""
LOSS_RTOL = 1e-6
"""fp32: relative difference allowed between loss values (the encoders batch the rows differently)."""


class _RecordingTrainer(Trainer):
    """Test-only hook: every rank saves its trainable tensors (adapter and loss head) after each epoch."""

    def __init__(self, *args: object, record_dir: Path, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.record_dir = record_dir

    def _train_epoch(self, parts: TrainingParts, train_set: object, epoch: int) -> None:
        super()._train_epoch(parts, train_set, epoch)
        tensors = {**parts.model.trainable_state_dict(), **{f"objective.{k}": v for k, v in parts.objective.state_dict().items()}}
        name = f"{self.run_dir.name}_rank{self.distributed.rank}_epoch{epoch + 1}.pt"
        torch.save({key: value.detach().clone() for key, value in tensors.items()}, self.record_dir / name)


def _trainable_grads(parts: TrainingParts) -> dict[str, torch.Tensor]:
    named = [*parts.model.named_parameters(), *(("objective." + n, p) for n, p in parts.objective.named_parameters())]
    return {name: p.grad.detach().clone() for name, p in named if p.requires_grad and p.grad is not None}


def _local_batch(parts: TrainingParts, rank: int, size: int = 4) -> dict[str, torch.Tensor]:
    """A different synthetic batch per rank, with MLM inputs (3 masked positions per caption)."""
    generator = torch.Generator().manual_seed(100 + rank)
    vocab, length = parts.model.clip.token_embedding.num_embeddings, parts.model.clip.positional_embedding.shape[0]
    caption_ids = torch.randint(2, vocab - 1, (size, length), generator=generator)
    mlm_ids, mlm_labels = caption_ids.clone(), torch.full_like(caption_ids, MLM_IGNORE_INDEX)
    mlm_ids[:, 1:4] = 1
    mlm_labels[:, 1:4] = caption_ids[:, 1:4]
    return {
        "images": torch.randn(size, 3, 64, 32, generator=generator),
        "caption_ids": caption_ids,
        "pids": (torch.tensor([0, 0, 1, 2]) + rank)[:size],  # ids 1 and 2 on both ranks
        "mlm_ids": mlm_ids,
        "mlm_labels": mlm_labels,
    }


def _gradients(parts: TrainingParts, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _step(parts, batch)[1]


def _step(parts: TrainingParts, batch: dict[str, torch.Tensor], backward: bool = True) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The loss terms of one forward and, after its backward, the trainable gradients (none without it)."""
    terms = loss_terms(parts, batch["images"], batch["caption_ids"], batch["pids"], "fp32", batch["mlm_ids"], batch["mlm_labels"])
    if backward:
        sum(terms.values()).backward()
    return {name: term.item() for name, term in terms.items()}, _trainable_grads(parts) if backward else {}


class _Messages(logging.Handler):
    """Collects the INFO messages of one logger."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _scope_scenarios(rank: int, env: DistributedEnv, device: torch.device, data_root: Path, out: Path) -> None:
    """Each scenario through DDP as the Trainer wraps it, on this rank's slice of a fixed global batch.

    The samplers split an epoch differently in one process and under DDP, so the global batch is
    fed explicitly: rank ``r`` takes the ``r``-th block of rows, the order the gather concatenates
    in. Rank 0 also runs the unwrapped single-process reference on the whole global batch and, for
    the per-rank losses, on each slice.
    """
    step_logger = logging.getLogger("upperson.training.step")
    step_logger.setLevel(logging.INFO)
    for name, (overrides, sizes) in SCOPE_SCENARIOS.items():
        config = load_config(None, tiny_overrides(data_root, out) + overrides)
        handler = _Messages()
        step_logger.addHandler(handler)
        seed_everything(config.train.seed)
        ddp = build_training(config, NUM_IDS, device, env)
        step_logger.removeHandler(handler)
        slices = [_local_batch(ddp, r, size) for r, size in enumerate(sizes)]
        record = {"ddp": _step(ddp, slices[rank]), "log": handler.messages}
        if rank == 0:
            seed_everything(config.train.seed)
            single = build_training(config, NUM_IDS, device)
            whole = {key: torch.cat([piece[key] for piece in slices]) for key in slices[0]}
            record["single"] = _step(single, whole)
            record["single_slices"] = [_step(single, piece, backward=False)[0] for piece in slices]
        torch.save(record, out / f"{name}_rank{rank}.pt")


def _worker(rank: int, port: int, data_root: Path, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    env = DistributedEnv.from_environment()
    device = torch.device("cpu")
    with process_group(env, device):
        _scope_scenarios(rank, env, device, data_root, out)
        # one step of SDM + ID + MLM: DDP-wrapped on the local batch vs unwrapped on the same batch
        config = load_config(None, tiny_overrides(data_root, out) + ["train.losses=[sdm,id,mlm]"])
        seed_everything(config.train.seed)
        wrapped = build_training(config, 4, device, env)
        seed_everything(config.train.seed)
        plain = build_training(config, 4, device)
        batch = _local_batch(plain, rank)
        torch.save({"ddp": _gradients(wrapped, batch), "plain": _gradients(plain, batch)}, out / f"grads_rank{rank}.pt")

        for scope in ("global", "local"):
            config = load_config(None, tiny_overrides(data_root, out) + EQUIVALENCE_OVERRIDES + [f"train.sdm_scope={scope}"])
            Trainer(config, out / f"equivalence_{scope}").fit()
        config = load_config(None, tiny_overrides(data_root, out) + TRAIN_OVERRIDES)
        _RecordingTrainer(config, out / "straight", record_dir=out).fit()
        interrupted = _RecordingTrainer(config, out / "resumed", record_dir=out)
        assert interrupted.fit(stop_after_epochs=1) is None
        result = _RecordingTrainer(config, out / "resumed", record_dir=out).fit(resume=True)
        torch.save({"best_epoch": result.best_epoch, "t2i": result.test_metrics["t2i"]}, out / f"result_rank{rank}.pt")


def _data_root(runs: Path) -> Path:
    return Path((runs / "data_root.txt").read_text())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_root = write_cuhk_fixture(tmp_path_factory.mktemp("data"), {"train": 6, "val": 3, "test": 3})
    out = tmp_path_factory.mktemp("ddp")
    (out / "data_root.txt").write_text(str(data_root))
    context = mp.start_processes(_worker, args=(_free_port(), data_root, out), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    return out


def test_ddp_gradient_is_the_mean_of_the_ranks_gradients(runs: Path) -> None:
    grads = [torch.load(runs / f"grads_rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    names = grads[0]["plain"].keys()
    assert any(name.startswith("objective.classifier") for name in names)
    assert any(name.startswith("objective.mlm") for name in names)
    assert any(not name.startswith("objective.") for name in names)
    differing = [name for name in names if not torch.allclose(grads[0]["plain"][name], grads[1]["plain"][name])]
    assert len(differing) > len(names) // 2  # the ranks' batches really differ (zero-initialised gates excepted)
    for name in names:
        expected = (grads[0]["plain"][name] + grads[1]["plain"][name]) / 2
        for rank in range(WORLD):
            torch.testing.assert_close(grads[rank]["ddp"][name], expected, rtol=1e-5, atol=1e-7, msg=name)


def test_ranks_hold_identical_tensors_after_every_epoch(runs: Path) -> None:
    for run, epochs in (("straight", (1, 2)), ("resumed", (1, 2))):
        for epoch in epochs:
            rank0, rank1 = (torch.load(runs / f"{run}_rank{r}_epoch{epoch}.pt", weights_only=True) for r in range(WORLD))
            assert rank0.keys() == rank1.keys() and any(key.startswith("objective.") for key in rank0)
            assert all(torch.equal(rank0[key], rank1[key]) for key in rank0), (run, epoch)
    last = load_file(str(runs / "straight" / "last.safetensors"))
    recorded = torch.load(runs / "straight_rank1_epoch2.pt", weights_only=True)
    assert last.keys() == {key for key in recorded if not key.startswith("objective.")}
    assert all(torch.equal(last[key], recorded[key]) for key in last)


def _max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)).item() for k in b)


def test_two_processes_train_what_one_process_trains(runs: Path, tmp_path: Path) -> None:
    """Same global batches (one order, sliced per rank), augmentation and masking keyed on the sample:
    with ``sdm_scope: global`` 2 processes end where 1 process ends; with ``local`` they do not."""
    data_root = _data_root(runs)
    config = load_config(None, tiny_overrides(data_root, tmp_path) + EQUIVALENCE_OVERRIDES)
    Trainer(config, tmp_path / "single", distributed=DistributedEnv()).fit()
    single = load_file(str(tmp_path / "single" / "last.safetensors"))
    together = load_file(str(runs / "equivalence_global" / "last.safetensors"))
    apart = load_file(str(runs / "equivalence_local" / "last.safetensors"))
    assert _max_relative_difference(together, single) <= EQUIVALENCE_RTOL
    assert _max_relative_difference(apart, single) > 100 * EQUIVALENCE_RTOL  # the check has power
    rows = [(tmp_path / "single" / "history.csv").read_text().splitlines(), (runs / "equivalence_global" / "history.csv").read_text().splitlines()]
    assert len(rows[0]) == len(rows[1])
    for one, two in zip(*rows):
        for a, b in zip(one.split(","), two.split(",")):
            try:
                x, y = float(a), float(b)
            except ValueError:
                assert a == b
                continue
            if a and one.split(",")[1] == "loss":
                assert x == pytest.approx(y, rel=1e-4)


def test_rank_zero_writes_the_run_once(runs: Path) -> None:
    run = runs / "straight"
    assert {"config.yaml", "best.safetensors", "last.safetensors", "state.pt", "metrics.json"} <= {p.name for p in run.iterdir()}
    assert json.loads((run / "metrics.json").read_text())["t2i"]["num_queries"] == 3 * 2 * 2
    log = (run / "train_log.txt").read_text()
    assert log.count("epoch 2 done") == 1 and log.count("test (") == 1
    history = (run / "history.csv").read_text().splitlines()
    assert sum(line.startswith("1,loss,") for line in history) == 1
    assert sum(line.startswith("1,val_R1,") for line in history) == 1


def test_resume_under_two_processes_matches_the_uninterrupted_run(runs: Path) -> None:
    for name in ("last.safetensors", "best.safetensors"):
        a, b = load_file(str(runs / "straight" / name)), load_file(str(runs / "resumed" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    results = [torch.load(runs / f"result_rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    assert results[0] == results[1]  # every rank returns rank 0's result
    straight = json.loads((runs / "straight" / "metrics.json").read_text())
    assert straight["t2i"]["R1"] == pytest.approx(results[0]["t2i"]["R1"])


def _scope_records(runs: Path, scenario: str) -> list[dict]:
    return [torch.load(runs / f"{scenario}_rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


def _assert_single_process_gradients(records: list[dict]) -> None:
    """Every trainable gradient on every rank (after DDP's mean) is the single-process one on the global batch."""
    expected = records[0]["single"][1]
    assert any(not name.startswith("objective.") for name in expected)
    tolerance = GRAD_ATOL * max(float(grad.abs().max()) for grad in expected.values())
    assert tolerance > 0
    for rank, record in enumerate(records):
        grads = record["ddp"][1]
        assert grads.keys() == expected.keys()
        for name, reference in expected.items():
            torch.testing.assert_close(grads[name], reference, rtol=0, atol=tolerance, msg=f"rank {rank} {name}")


@pytest.mark.parametrize("loss", ["sdm", "itc"])
def test_global_scope_loss_and_gradients_equal_one_process_on_the_global_batch(runs: Path, loss: str) -> None:
    records = _scope_records(runs, f"global_{loss}")
    single, per_slice = records[0]["single"][0][loss], [terms[loss] for terms in records[0]["single_slices"]]
    assert abs(single - sum(per_slice) / WORLD) > 1e-2  # the global loss is not the mean of the local ones
    for record in records:
        assert record["ddp"][0][loss] == pytest.approx(single, rel=LOSS_RTOL)
    _assert_single_process_gradients(records)


def test_global_scope_leaves_id_and_mlm_local(runs: Path) -> None:
    records = _scope_records(runs, "global_all")
    single, per_slice = records[0]["single"][0], records[0]["single_slices"]
    for rank, record in enumerate(records):
        terms = record["ddp"][0]
        for loss in ("sdm", "itc"):
            assert terms[loss] == pytest.approx(single[loss], rel=LOSS_RTOL)
        for loss in ("id", "mlm"):
            assert terms[loss] == pytest.approx(per_slice[rank][loss], rel=LOSS_RTOL)
    for loss in ("id", "mlm"):  # equal slices (and masked positions): DDP's mean of local losses is the global one
        assert sum(terms[loss] for terms in per_slice) / WORLD == pytest.approx(single[loss], rel=LOSS_RTOL)
    grads = records[0]["single"][1]
    assert any(name.startswith("objective.classifier") for name in grads) and any(name.startswith("objective.mlm") for name in grads)
    _assert_single_process_gradients(records)  # so all four losses together train as one process would


def test_global_scope_gathers_batches_of_different_lengths(runs: Path) -> None:
    records = _scope_records(runs, "global_unequal")
    for record in records:
        assert record["ddp"][0]["sdm"] == pytest.approx(records[0]["single"][0]["sdm"], rel=LOSS_RTOL)
    _assert_single_process_gradients(records)


def test_local_scope_keeps_each_rank_on_its_own_batch(runs: Path) -> None:
    records = _scope_records(runs, "local_sdm")
    for rank, record in enumerate(records):
        assert record["ddp"][0]["sdm"] == pytest.approx(records[0]["single_slices"][rank]["sdm"], rel=LOSS_RTOL)
    assert records[0]["log"] == ["train.sdm_scope=local: sdm over each process's batch of 4 (train.sdm_scope=global: over all 8)"]
    assert _scope_records(runs, "global_sdm")[0]["log"] == [
        "train.sdm_scope=global: sdm over the global batch of 8 (features all-gathered from 2 processes)"
    ]
    assert "sdm+itc over the global batch" in _scope_records(runs, "global_all")[1]["log"][0]


def test_global_scope_in_one_process_is_the_local_scope(tmp_path: Path) -> None:
    features, pids = torch.randn(3, 8), torch.tensor([0, 1, 1])
    assert all(a is b for a, b in zip(gather_global_batch(features, features, pids), (features, features, pids)))
    image, text = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    pids = torch.tensor([0, 0, 1, 2, 2, 3])
    results = {}
    for scope in ("local", "global"):
        objective = TrainingObjective(["sdm", "itc", "id"], 8, NUM_IDS, 0.02, sdm_scope=scope)
        torch.manual_seed(0)
        objective.reset_parameters()
        loss = sum(objective(image, text, pids).values())
        results[scope] = (loss, *torch.autograd.grad(loss, [image, text]))
    assert all(torch.equal(a, b) for a, b in zip(results["local"], results["global"]))
    assert load_config(None, tiny_overrides(tmp_path, tmp_path)).train.sdm_scope == "local"
    config = load_config(None, tiny_overrides(tmp_path, tmp_path) + ["train.sdm_scope=global"])
    assert build_training(config, NUM_IDS, torch.device("cpu")).objective.sdm_scope == "local"  # no distributed env
    with pytest.raises(ConfigError, match="train.sdm_scope"):
        load_config(None, tiny_overrides(tmp_path, tmp_path) + ["train.sdm_scope=world"])


def test_environment_and_global_batch_checks(tmp_path: Path) -> None:
    assert DistributedEnv.from_environment({}) == DistributedEnv()
    env = DistributedEnv.from_environment({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (env.rank, env.local_rank, env.world_size, env.enabled, env.is_main) == (3, 1, 4, True, False)
    with pytest.raises(ValueError, match="RANK"):
        DistributedEnv.from_environment({"WORLD_SIZE": "2", "RANK": "2"})
    assert resolve_distributed_device("cpu", env) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_distributed_device("auto", env) == torch.device("cpu")
    else:
        assert resolve_distributed_device("auto", env) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        resolve_distributed_device("cuda:0", env)
    config = load_config(None, tiny_overrides(tmp_path, tmp_path) + ["train.batch_size=6"])
    with pytest.raises(ValueError, match="train.batch_size"):
        Trainer(config, tmp_path / "run", distributed=DistributedEnv(rank=0, local_rank=0, world_size=4))


def test_torchrun_cli_reports_once(tmp_path: Path) -> None:
    data_root = write_cuhk_fixture(tmp_path / "data", {"train": 4, "test": 2})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               "-m", "upperson", "train", "--run-dir", str(tmp_path / "run")]
    for item in tiny_overrides(data_root, tmp_path, epochs=1):
        command += ["--set", item]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run directory:") == 1 and done.stdout.count("test metrics") == 1
    assert done.stderr.count("epoch 1 done") == 1  # only rank 0 logs at INFO
    assert (tmp_path / "run" / "metrics.json").is_file()
