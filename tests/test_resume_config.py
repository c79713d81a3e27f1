"""`train --resume` compares with the config the run was trained with, and a run that never started is not a run.

Reproduces two defects: editing a run's config.yaml (optim.lr, data.root) and resuming was not refused
(the check compared the file with itself) and an edited lora_rank ended in "internal error:
RuntimeError: size ..."; and a `train` whose dataset check failed left config.yaml and train_log.txt,
so retrying it with fixed data was refused as "already holds a run".
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from test_training import tiny_overrides, write_cuhk_fixture
from upperson.cli import main
from upperson.config import load_config
from upperson.training.checkpoint import STATE_FILE, read_trained_config
from upperson.training.history import CONFIG_FILE, HISTORY_FILE, LOG_FILE
from upperson.training.loop import Trainer
from upperson.training.run_dir import RESUMABLE_FIELDS


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cuhk_fixture(tmp_path_factory.mktemp("data"), {"train": 4, "val": 2, "test": 2})


@pytest.fixture(scope="module")
def stopped(fixture_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of 2 epochs stopped after the first (state.pt holds epoch 1); copied by each test."""
    out = tmp_path_factory.mktemp("stopped")
    Trainer(load_config(None, tiny_overrides(fixture_root, out, epochs=2)), out / "run").fit(stop_after_epochs=1)
    return out / "run"


@pytest.fixture
def run(stopped: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(stopped, copy)
    return copy


def _edit_config(run: Path, **changes: object) -> None:
    """Edit config.yaml by hand (dotted keys)."""
    config = yaml.safe_load((run / CONFIG_FILE).read_text())
    for dotted, value in changes.items():
        section, _, key = dotted.rpartition(".")
        (config[section] if section else config)[key] = value
    (run / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))


def _files(run: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in run.iterdir() if path.is_file() and path.name != LOG_FILE}


def test_the_state_records_the_config_it_was_trained_with(run: Path) -> None:
    assert read_trained_config(run / STATE_FILE) == load_config(run / CONFIG_FILE).to_dict()


def test_edited_config_yaml_is_refused_naming_every_changed_field(run: Path, fixture_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other_data = tmp_path / "copy-of-the-data"
    shutil.copytree(fixture_root, other_data)  # a valid dataset: only the comparison can refuse it
    _edit_config(run, **{"optim.lr": 0.5, "data.root": str(other_data)})
    before = _files(run)
    assert main(["train", "--resume", str(run)]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "internal error" not in error, error
    assert "optim.lr: 0.001 -> 0.5" in error and f"data.root: '{fixture_root}' -> '{other_data}'" in error
    assert f"trained with ({STATE_FILE})" in error and f"undo the edit of {run / CONFIG_FILE}" in error
    assert _files(run) == before


def test_an_edited_structural_field_is_refused_before_any_tensor_loads(run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import upperson.training.loop as loop

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built before the config was checked")

    monkeypatch.setattr(loop, "build_training", no_build)
    _edit_config(run, **{"model.lora_rank": 3})
    assert main(["train", "--resume", str(run)]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "model.lora_rank: 2 -> 3" in error and "RuntimeError" not in error, error


def test_resumable_fields_may_change_in_config_yaml_too(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _edit_config(run, **{"train.epochs": 3, "train.eval_every": 2})
    assert main(["train", "--resume", str(run)]) == 0
    assert read_trained_config(run / STATE_FILE)["train"]["epochs"] == 3
    assert max(int(line.split(",")[0]) for line in (run / HISTORY_FILE).read_text().splitlines()[1:]) == 3
    assert {"train.epochs", "train.eval_every", "data.num_workers", "device"} <= RESUMABLE_FIELDS


def test_fewer_epochs_than_trained_with_are_refused(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _edit_config(run, **{"train.epochs": 1})
    assert main(["train", "--resume", str(run)]) == 1
    assert "train.epochs can only grow (2 -> 1)" in capsys.readouterr().err


def test_a_state_without_a_recorded_config_falls_back_to_config_yaml(run: Path, caplog: pytest.LogCaptureFixture) -> None:
    import torch

    payload = torch.load(run / STATE_FILE, weights_only=True)
    del payload["config"]  # written before the config was recorded
    torch.save(payload, run / STATE_FILE)
    assert read_trained_config(run / STATE_FILE) is None
    config = load_config(run / CONFIG_FILE)
    with caplog.at_level("WARNING"):
        assert Trainer(config, run).fit(resume=True) is not None
    assert "records no config" in caplog.text


# --------------------------------------------------------------------------------------------
# row 16: a run that failed its dataset check never started


def _train_argv(root: Path, output: Path, run_dir: Path) -> list[str]:
    argv = ["train", "--run-dir", str(run_dir)]
    for item in tiny_overrides(root, output, epochs=1):
        argv += ["--set", item]
    return argv


def test_a_failed_dataset_check_leaves_nothing_and_the_retry_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_cuhk_fixture(tmp_path / "data", {"train": 4, "val": 2, "test": 2})
    image = next((root / "CUHK-PEDES" / "imgs" / "train_query").iterdir())
    kept = image.read_bytes()
    image.unlink()
    run_dir = tmp_path / "run"
    assert main(_train_argv(root, tmp_path, run_dir)) == 1
    assert "dataset would break training" in capsys.readouterr().err
    assert not run_dir.exists() or list(run_dir.iterdir()) == []
    image.write_bytes(kept)  # the data fixed, the same command again
    assert main(_train_argv(root, tmp_path, run_dir)) == 0
    assert (run_dir / STATE_FILE).is_file() and (run_dir / CONFIG_FILE).is_file()
    capsys.readouterr()
    assert main(_train_argv(root, tmp_path, run_dir)) == 1  # a real run is still protected
    assert "already holds a run" in capsys.readouterr().err


def test_an_existing_run_is_refused_before_the_dataset_is_checked(stopped: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import upperson.training.loop as loop

    def no_check(*args: object, **kwargs: object) -> None:
        raise AssertionError("the dataset was checked before the run directory")

    monkeypatch.setattr(loop, "check_dataset", no_check)
    assert main(_train_argv(tmp_path / "no-data", tmp_path, stopped)) == 1
    assert "already holds a run" in capsys.readouterr().err


def test_overwrite_moves_nothing_aside_when_the_dataset_check_fails(stopped: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    before = _files(run)
    root = write_cuhk_fixture(tmp_path / "broken", {"train": 2, "test": 1})
    next((root / "CUHK-PEDES" / "imgs" / "train_query").iterdir()).unlink()
    assert main([*_train_argv(root, tmp_path, run), "--overwrite"]) == 1
    assert _files(run) == before and not list(tmp_path.glob("run.replaced-*"))
