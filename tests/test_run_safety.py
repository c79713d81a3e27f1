"""Run directories: never overwritten silently, one writer, consistent after a crash at any point, safe resume."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_training import tiny_overrides, write_cuhk_fixture
from upperson.cli import main
from upperson.config import load_config
from upperson.training.run_dir import LOCK_FILE, RunDirectoryError
from upperson.training.loop import Trainer
from upperson.training.schedule import lr_multiplier

EPOCHS = 3


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cuhk_fixture(tmp_path_factory.mktemp("data"), {"train": 4, "val": 2, "test": 2})


@pytest.fixture(scope="module")
def reference(fixture_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run every crash/resume case must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    Trainer(load_config(None, tiny_overrides(fixture_root, out, epochs=EPOCHS)), out / "run").fit()
    return out / "run"


def history_rows(run_dir: Path) -> list[tuple[int, str, str]]:
    with (run_dir / "history.csv").open() as handle:
        return [(int(row["epoch"]), row["key"], row["value"]) for row in csv.DictReader(handle)]


def deterministic_history(run_dir: Path) -> dict[tuple[int, str], str]:
    """History without wall-clock figures; raises if any (epoch, key) appears twice."""
    rows = [(epoch, key, value) for epoch, key, value in history_rows(run_dir) if key not in ("seconds", "images_per_s")]
    keys = [(epoch, key) for epoch, key, _ in rows]
    assert len(keys) == len(set(keys)), f"duplicate history rows: {sorted(k for k in keys if keys.count(k) > 1)}"
    return {(epoch, key): value for epoch, key, value in rows}


def assert_same_adapter(left: Path, right: Path) -> None:
    a, b = load_file(str(left)), load_file(str(right))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_training_into_an_existing_run_is_refused_and_changes_nothing(fixture_root: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = {path.name: path.read_bytes() for path in reference.iterdir() if path.is_file()}
    overrides = [arg for item in tiny_overrides(fixture_root, tmp_path, epochs=1) for arg in ("--set", item)]
    assert main(["train", *overrides, "--run-dir", str(reference)]) == 1
    error = capsys.readouterr().err
    assert "already holds a run" in error and f"--resume {reference}" in error and "--overwrite" in error
    assert {path.name: path.read_bytes() for path in reference.iterdir() if path.is_file()} == before


def test_overwrite_moves_the_old_run_aside(fixture_root: Path, tmp_path: Path) -> None:
    config = load_config(None, tiny_overrides(fixture_root, tmp_path, epochs=1))
    run = tmp_path / "run"
    Trainer(config, run).fit()
    (run / "notes.txt").write_text("mine")
    old = {path.name: path.read_bytes() for path in run.iterdir()}
    Trainer(config, run).fit(overwrite=True)
    aside = [path for path in tmp_path.iterdir() if path.name.startswith("run.replaced-")]
    assert len(aside) == 1
    assert {path.name: path.read_bytes() for path in aside[0].iterdir()} == old
    assert not (run / "notes.txt").exists() and not (run / LOCK_FILE).exists()
    assert max(epoch for epoch, _, _ in history_rows(run)) == 1 and len(deterministic_history(run)) > 0


def test_a_live_lock_stops_a_second_writer_and_a_stale_one_is_taken_over(fixture_root: Path, tmp_path: Path) -> None:
    config = load_config(None, tiny_overrides(fixture_root, tmp_path, epochs=1))
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(f"{os.uname().nodename} {os.getpid()}\n")
    with pytest.raises(RunDirectoryError, match=rf"being written by another upperson process \(pid {os.getpid()}"):
        Trainer(config, run).fit()
    assert not (run / "config.yaml").exists()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    (run / LOCK_FILE).write_text(f"{os.uname().nodename} {finished.stdout.strip()}\n")  # that process has exited
    assert Trainer(config, run).fit() is not None
    assert not (run / LOCK_FILE).exists()


def test_extending_epochs_continues_the_schedule_and_records_it(fixture_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config(None, tiny_overrides(fixture_root, tmp_path, epochs=2))
    run = tmp_path / "run"
    Trainer(config, run).fit()
    assert main(["train", "--resume", str(run), "--set", "train.epochs=4"]) == 0
    lrs = {epoch: float(value) for epoch, key, value in history_rows(run) if key == "lr"}
    base, optim = config.optim.lr, config.optim
    assert lrs[3] == pytest.approx(base * lr_multiplier(2, 4, optim.warmup_epochs, optim.warmup_factor), rel=1e-12) and lrs[3] > 0
    assert lrs[4] == pytest.approx(base * lr_multiplier(3, 4, optim.warmup_epochs, optim.warmup_factor), rel=1e-12)
    assert load_config(run / "config.yaml").train.epochs == 4


@pytest.mark.parametrize(
    ("override", "field"),
    [("data.root=/elsewhere", "data.root"), ("model.lora_rank=3", "model.lora_rank"), ("train.losses=[sdm,itc]", "train.losses"), ("optim.lr=0.5", "optim.lr")],
)
def test_resume_refuses_changes_that_alter_the_run(reference: Path, override: str, field: str, capsys: pytest.CaptureFixture[str]) -> None:
    before = (reference / "config.yaml").read_text()
    assert main(["train", "--resume", str(reference), "--set", override]) == 1
    error = capsys.readouterr().err
    assert f"{field}:" in error and "would change what the run trains" in error
    assert (reference / "config.yaml").read_text() == before


def test_resume_with_a_corrupt_state_is_one_line(fixture_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides(fixture_root, tmp_path, epochs=2)), run).fit(stop_after_epochs=1)
    (run / "state.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    assert main(["train", "--resume", str(run)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "state.pt is unreadable" in error and "--overwrite" in error


_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import upperson
    import upperson.training.loop as loop
    import upperson.training.checkpoint as checkpoint
    from upperson.cli import main

    point, epoch_to_kill = sys.argv[1], int(sys.argv[2])
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    calls = {"history": 0, "steps": 0}
    real_append, real_save, real_step, real_adapter = loop.append_history, checkpoint.torch.save, loop.optimizer_step, upperson.save_adapter

    def append_history(run_dir, row):
        real_append(run_dir, row)
        if point == "after-history" and row["epoch"] == epoch_to_kill and "loss" in row:
            die()

    def save(payload, path):
        real_save(payload, path)
        if point == "state-before-rename" and payload["completed_epochs"] == epoch_to_kill:
            die()  # the temporary is written, the rename onto state.pt has not happened

    def optimizer_step(parts):
        calls["steps"] += 1
        if point == "mid-epoch" and calls["steps"] == epoch_to_kill:
            die()
        real_step(parts)

    def save_adapter(model, path):
        real_adapter(model, path)
        if point == "after-last-adapter" and str(path).endswith("last.safetensors") and calls["history"] == 0:
            calls["history"] = 1
            if epoch_to_kill == 1:
                die()

    loop.append_history, checkpoint.torch.save, loop.optimizer_step, upperson.save_adapter = append_history, save, optimizer_step, save_adapter
    sys.exit(main(sys.argv[3:]))
    """
)


@pytest.mark.parametrize(
    ("point", "when"),
    [("after-history", 2), ("state-before-rename", 2), ("mid-epoch", 3), ("after-last-adapter", 1)],
)
def test_sigkill_at_any_point_then_resume_is_bit_identical(
    fixture_root: Path, reference: Path, tmp_path: Path, point: str, when: int
) -> None:
    run = tmp_path / "run"
    overrides = [arg for item in tiny_overrides(fixture_root, tmp_path, epochs=EPOCHS) for arg in ("--set", item)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run(
        [sys.executable, "-c", _KILLER, point, str(when), "train", *overrides, "--run-dir", str(run)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (run / LOCK_FILE).exists()  # the killed process could not clean up: its lock is stale now
    assert main(["train", "--resume", str(run)]) == 0
    assert_same_adapter(run / "best.safetensors", reference / "best.safetensors")
    assert_same_adapter(run / "last.safetensors", reference / "last.safetensors")
    assert deterministic_history(run) == deterministic_history(reference)
    assert sorted({epoch for epoch, _, _ in history_rows(run)}) == list(range(1, EPOCHS + 1))
    assert not list(run.glob(".*.tmp")) and not (run / LOCK_FILE).exists()
