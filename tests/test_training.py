"""End-to-end training on a tiny CUHK-format fixture: resume == uninterrupted, CLI train + eval."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from upperson.cli import main
from upperson.config import load_config
from upperson.training.loop import Trainer

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
RGB = {"red": (200, 30, 30), "blue": (30, 30, 200), "green": (30, 160, 30), "yellow": (220, 220, 40),
       "black": (20, 20, 20), "white": (235, 235, 235), "purple": (120, 40, 140), "orange": (240, 140, 20)}


def write_cuhk_fixture(root: Path, ids_per_split: dict[str, int], images_per_id: int = 2) -> Path:
    """A CUHK-PEDES folder whose captions name the two colours drawn on each image."""
    rng = random.Random(0)
    dataset = root / "CUHK-PEDES"
    records, next_id = [], 1
    for split, count in ids_per_split.items():
        for _ in range(count):
            top, bottom = rng.sample(COLOURS, 2)
            for index in range(images_per_id):
                relative = f"{split}_query/p{next_id:05d}_s{index}.jpg"
                path = dataset / "imgs" / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                image = Image.new("RGB", (48, 128), RGB[bottom])
                image.paste(RGB[top], (0, 0, 48, 64))
                image.save(path)
                records.append({"split": split, "id": next_id, "file_path": relative, "processed_tokens": [],
                                "captions": [f"a person in a {top} top and {bottom} trousers", f"{bottom} pants, {top} shirt"]})
            next_id += 1
    (dataset / "reid_raw.json").write_text(json.dumps(records))
    return root


def tiny_overrides(root: Path, output: Path, epochs: int = 3) -> list[str]:
    return [
        "backbone=tiny", f"data.root={root}", "data.image_size=[64,32]", "data.num_workers=0",
        "model.prefix_length=2", "model.lora_rank=2", f"train.epochs={epochs}", "train.batch_size=8",
        "train.precision=fp32", "optim.warmup_epochs=1", "eval.batch_size=16", f"output_dir={output}",
        "device=cpu",
    ]


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cuhk_fixture(tmp_path_factory.mktemp("data"), {"train": 6, "val": 3, "test": 3})


def _adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(fixture_root: Path, tmp_path: Path) -> None:
    # SDM + ID: the identity classifier lives outside the adapter and must be resumed too
    config = load_config(None, tiny_overrides(fixture_root, tmp_path) + ["train.losses=[sdm,id]", "train.id_lr_factor=5"])
    straight = Trainer(config, tmp_path / "straight").fit()
    interrupted = Trainer(config, tmp_path / "resumed")
    assert interrupted.fit(stop_after_epochs=2) is None
    resumed = Trainer(config, tmp_path / "resumed").fit(resume=True)
    for name in ("last.safetensors", "best.safetensors"):
        a, b = _adapter_tensors(tmp_path / "straight" / name), _adapter_tensors(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.test_metrics == resumed.test_metrics
    states = [torch.load(tmp_path / run / "state.pt", weights_only=True)["objective"] for run in ("straight", "resumed")]
    assert states[0].keys() == {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])
    history = (tmp_path / "straight" / "history.csv").read_text()
    assert "val_R1" in history and "images_per_s" in history
    assert (tmp_path / "straight" / "train_log.txt").read_text().count("epoch 3 done") == 1


def test_cli_train_then_eval(fixture_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overrides = tiny_overrides(fixture_root, tmp_path, epochs=2)
    argv = ["train", "--run-dir", str(tmp_path / "run")]
    for item in overrides:
        argv += ["--set", item]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "R1" in out and "t2i" in out
    run = tmp_path / "run"
    assert {"config.yaml", "best.safetensors", "last.safetensors", "state.pt", "metrics.json"} <= {p.name for p in run.iterdir()}
    assert main(["eval", "--config", str(run / "config.yaml"), "--adapter", str(run / "best.safetensors"),
                 "--i2t", "--json", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert set(result["t2i"]) >= {"R1", "R5", "R10", "mAP", "mINP", "rSum", "num_queries", "queries_without_positive"}
    assert "i2t" in result and result["t2i"]["num_queries"] == 3 * 2 * 2
    stored = json.loads((run / "metrics.json").read_text())
    assert stored["t2i"]["R1"] == pytest.approx(result["t2i"]["R1"], abs=1e-6)


def test_select_on_test_is_labelled(fixture_root: Path, tmp_path: Path) -> None:
    config = load_config(None, tiny_overrides(fixture_root, tmp_path, epochs=1) + ["train.select_on=test"])
    result = Trainer(config, tmp_path / "t").fit()
    assert "TEST" in result.selection
    assert "TEST" in json.loads((tmp_path / "t" / "metrics.json").read_text())["selection"]


def test_training_fails_fast_on_a_broken_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_cuhk_fixture(tmp_path / "broken", {"train": 2, "test": 1})
    next((root / "CUHK-PEDES" / "imgs" / "train_query").iterdir()).unlink()
    argv = ["train"]
    for item in tiny_overrides(root, tmp_path, epochs=1):
        argv += ["--set", item]
    assert main(argv) == 1
    assert "missing" in capsys.readouterr().err.lower()


def test_zero_shot_evaluates_without_an_adapter_and_refuses_to_train(
    fixture_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--set", f"data.root={fixture_root}", "--set", "backbone=tiny", "--set", "data.image_size=[64,32]",
            "--set", "data.num_workers=0", "--set", "train.precision=fp32", "--set", "device=cpu"]
    config = Path(__file__).resolve().parents[1] / "configs" / "zero-shot" / "cuhk-pedes.yaml"
    assert main(["eval", "--config", str(config), *base, "--json", str(tmp_path / "zs.json")]) == 0
    assert json.loads((tmp_path / "zs.json").read_text())["t2i"]["num_queries"] == 3 * 2 * 2
    assert main(["train", "--config", str(config), *base, "--set", f"output_dir={tmp_path}"]) == 1
    assert "nothing to train" in capsys.readouterr().err
    up_person = Path(__file__).resolve().parents[1] / "configs" / "up-person" / "cuhk-pedes.yaml"
    assert main(["eval", "--config", str(up_person), *base, "--set", "model.prefix_length=2"]) == 1
    assert "--adapter is required" in capsys.readouterr().err


def test_bf16_training_stores_frozen_weights_in_bf16_and_runs(fixture_root: Path, tmp_path: Path) -> None:
    overrides = [item for item in tiny_overrides(fixture_root, tmp_path, epochs=1) if not item.startswith("train.precision")]
    config = load_config(None, [*overrides, "train.precision=bf16", "run_name=bf16"])
    result = Trainer(config, tmp_path / "bf16").fit()
    assert result is not None and result.best_adapter.is_file()
    assert all(value == value for value in result.test_metrics["t2i"].values())  # no NaN
