"""Cross-domain evaluation: two runs x two fixture datasets (CUHK-PEDES and RSTPReid formats) -> a 2x2 matrix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import randomise_petl
from test_training import tiny_overrides, write_cuhk_fixture

import upperson
from upperson.cli import main
from upperson.config import load_config, save_config
from upperson.experiments.cross_domain import CrossDomainResult, Target, TrainedRun, format_cross_domain
from upperson.data import load_dataset
from upperson.evaluation.evaluate import evaluate_split


def write_rstpreid_fixture(root: Path) -> Path:
    """The CUHK fixture rewritten in the RSTPReid layout (RSTPReid/data_captions.json, img_path, 0-based ids)."""
    cuhk = write_cuhk_fixture(root / "staging", {"train": 2, "val": 1, "test": 3}) / "CUHK-PEDES"
    target = root / "RSTPReid"
    shutil.move(str(cuhk / "imgs"), str(target / "imgs"))
    records = json.loads((cuhk / "reid_raw.json").read_text())
    for record in records:
        record["img_path"] = record.pop("file_path")
        record["id"] += 100  # different raw ids from the CUHK fixture
    (target / "data_captions.json").write_text(json.dumps(records))
    shutil.rmtree(root / "staging")
    return root


def make_run(run_dir: Path, dataset: str, root: Path, seed: int) -> Path:
    """A run directory as `upperson train` leaves it, with a random (not zero) adapter: no training needed."""
    config = load_config(None, tiny_overrides(root, run_dir.parent) + [f"data.dataset={dataset}", f"run_name={run_dir.name}"])
    run_dir.mkdir(parents=True)
    save_config(config, run_dir / "config.yaml")
    model = upperson.create_model(config.method, backbone=config.backbone, image_size=config.data.image_size, config=config.method_config())
    randomise_petl(model, seed=seed)
    upperson.save_adapter(model, run_dir / "best.safetensors")
    return run_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("cross")
    cuhk_root = write_cuhk_fixture(base / "cuhk", {"train": 2, "test": 2})
    rstp_root = write_rstpreid_fixture(base / "rstp")
    return {
        "cuhk_root": cuhk_root,
        "rstp_root": rstp_root,
        "cuhk_run": make_run(base / "runs" / "on-cuhk", "cuhk-pedes", cuhk_root, seed=1),
        "rstp_run": make_run(base / "runs" / "on-rstp", "rstpreid", rstp_root, seed=2),
        "base": base,
    }


def test_two_runs_on_two_datasets_give_a_2x2_matrix(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = setup["base"] / "matrix"
    argv = ["cross-domain", "--runs", str(setup["cuhk_run"]), str(setup["rstp_run"]), "--out", str(out),
            "--datasets", f"cuhk-pedes={setup['cuhk_root']}", f"RSTPReid={setup['rstp_root']}"]
    assert main(argv) == 0
    assert "### R@1" in capsys.readouterr().out
    payload = json.loads((out / "cross_domain.json").read_text())
    matrix = payload["matrix"]
    assert matrix["rows"] == ["on-cuhk", "on-rstp"] and matrix["columns"] == ["cuhk-pedes", "rstpreid"]
    assert len(matrix["R1"]) == 2 and all(len(row) == 2 for row in matrix["R1"] + matrix["mAP"])
    assert [run["source"] for run in payload["runs"]] == ["cuhk-pedes", "rstpreid"]

    # every cell equals an independent evaluation of the unmerged model
    for row, run_dir in enumerate((setup["cuhk_run"], setup["rstp_run"])):
        config = load_config(run_dir / "config.yaml")
        model = upperson.create_model(config.method, backbone=config.backbone, image_size=config.data.image_size, config=config.method_config())
        upperson.load_adapter(model, run_dir / "best.safetensors")
        for column, (name, root) in enumerate((("cuhk-pedes", setup["cuhk_root"]), ("rstpreid", setup["rstp_root"]))):
            expected = evaluate_split(model, load_dataset(name, root).split("test"), torch.device("cpu"), config.data.image_size, precision="fp32")["t2i"]
            assert matrix["R1"][row][column] == pytest.approx(expected["R1"], abs=1e-4)
            assert matrix["mAP"][row][column] == pytest.approx(expected["mAP"], abs=1e-4)
            assert payload["t2i"][matrix["rows"][row]][name]["num_queries"] == expected["num_queries"]
    markdown = (out / "cross_domain.md").read_text()
    assert "| cuhk-pedes | rstpreid | on-cuhk |" in markdown and "| rstpreid | cuhk-pedes | on-rstp |" in markdown


def test_targets_default_to_the_runs_own_datasets_and_errors_exit_1(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = setup["base"] / "default"
    assert main(["cross-domain", "--runs", str(setup["cuhk_run"]), str(setup["rstp_run"]), "--out", str(out)]) == 0
    assert json.loads((out / "cross_domain.json").read_text())["matrix"]["columns"] == ["cuhk-pedes", "rstpreid"]
    assert main(["cross-domain", "--runs", str(setup["cuhk_run"]), "--split", "val", "--out", str(out)]) == 1
    assert "no 'val' split" in capsys.readouterr().err
    assert main(["cross-domain", "--runs", str(setup["base"] / "missing"), "--out", str(out)]) == 1
    assert main(["cross-domain", "--runs", str(setup["cuhk_run"]), "--datasets", "nonsense", "--out", str(out)]) == 1
    assert main(["cross-domain"]) == 2


def test_markdown_marks_in_domain_cells_and_is_pure() -> None:
    config = load_config(None, ["data.dataset=rstpreid"])
    run = TrainedRun("r", Path("r"), config, Path("r/best.safetensors"))
    metrics = {"R1": 50.0, "R5": 70.0, "R10": 80.0, "mAP": 40.0}
    result = CrossDomainResult([run], [Target("rstpreid", "/d"), Target("cuhk-pedes", "/d")], "test",
                               {"r": {"rstpreid": metrics, "cuhk-pedes": {**metrics, "R1": 12.345}}})
    text = format_cross_domain(result)
    assert "| rstpreid (r) | *50.00* | 12.35 |" in text
    assert "| rstpreid | cuhk-pedes | r | 12.35 | 70.00 | 80.00 | 40.00 |" in text
    assert format_cross_domain(result) == text
    with pytest.raises(ValueError, match="NAME=ROOT"):
        Target.parse("rstpreid")
