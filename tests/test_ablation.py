"""Ablation studies: the variants format, the pure table writer, seed statistics, and resumable studies end to end."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_training import tiny_overrides, write_cuhk_fixture

import upperson
from upperson.cli import main
from upperson.config import ConfigError, load_config, save_config
from upperson.experiments.ablate import (
    AblationRow,
    SeedResult,
    format_ablation_table,
    format_count,
    read_variants,
    run_ablation,
    seed_statistics,
)
from upperson.training.loop import Trainer


def _row(name: str, r1: float, trainable: int, selection: str = "best R1 on val") -> AblationRow:
    metrics = {"R1": r1, "R5": 80.0, "R10": 90.5, "mAP": 60.125, "mINP": 40.0}
    seeds = [SeedResult(1, metrics, 3, f"runs/{name}")]
    return AblationRow(name, "LoRA(r=32)", "SDM + ID", metrics, None, trainable, 10 * trainable, selection, seeds)


def test_table_has_the_paper_layout_and_is_pure() -> None:
    rows = [_row("sdm", 74.17, 7_419_816), _row("a|b", 73.5, 13_100_000, "last epoch")]
    table = format_ablation_table(rows, title="Loss ablation")
    lines = table.splitlines()
    assert lines[0] == "## Loss ablation"
    assert lines[2] == "| Variant | Components | Loss | R@1 | R@5 | R@10 | mAP | mINP | Trainable #Param |"
    assert lines[4] == "| sdm | LoRA(r=32) | SDM + ID | 74.17 | 80.00 | 90.50 | 60.12 | 40.00 | 7.42M |"
    assert lines[5].startswith("| a\\|b |") and lines[5].endswith("| 13.1M |")
    assert "best R1 on val; last epoch" in table
    assert format_ablation_table(rows, title="Loss ablation") == table
    assert [format_count(n) for n in (950, 12_345, 7_419_816, 1_900_000_000)] == ["950", "12.3K", "7.42M", "1.90B"]
    assert "standard deviation" not in table  # one seed: the table of a single run, as before seeds existed


def test_seed_statistics_are_the_mean_and_sample_std() -> None:
    per_seed = [{"R1": 12.0, "mAP": 15.5, "rSum": 100.0}, {"R1": 14.5, "mAP": 16.25}, {"R1": 9.75, "mAP": 13.0}]
    mean, std = seed_statistics(per_seed)
    assert set(mean) == set(std) == {"R1", "mAP"}  # rSum is missing from two seeds
    for key in ("R1", "mAP"):
        values = np.array([run[key] for run in per_seed])
        assert mean[key] == pytest.approx(values.mean(), abs=1e-12)
        assert std[key] == pytest.approx(values.std(ddof=1), abs=1e-12)
    assert std["R1"] == pytest.approx(statistics.stdev([12.0, 14.5, 9.75]))
    assert seed_statistics([{"R1": 12.0}]) == ({"R1": 12.0}, None)  # ddof=1 is undefined for one seed


def test_table_of_several_seeds_shows_mean_and_std() -> None:
    runs = [{"R1": 10.0, "R5": 40.0, "R10": 50.0, "mAP": 12.0, "mINP": 5.0}, {"R1": 12.0, "R5": 44.0, "R10": 56.0, "mAP": 13.0, "mINP": 6.0}]
    mean, std = seed_statistics(runs)
    seeds = [SeedResult(seed, values, 2, f"runs/full/seed-{seed}") for seed, values in zip((1, 2), runs)]
    row = AblationRow("full", "LoRA(r=8)", "SDM", mean, std, 26_600, 100_000, "best R1 on val", seeds)
    lines = format_ablation_table([row]).splitlines()
    # std of (10, 12) with ddof=1 is sqrt(2) = 1.41; of (40, 44) 2.83; of (50, 56) 4.24; of (12, 13) and (5, 6) 0.71
    assert lines[2] == "| full | LoRA(r=8) | SDM | 11.00 ± 1.41 | 42.00 ± 2.83 | 53.00 ± 4.24 | 12.50 ± 0.71 | 5.50 ± 0.71 | 26.6K |"
    assert lines[-1] == "Mean ± sample standard deviation (ddof=1) over train.seed = 1, 2."


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{name: a}", "non-empty YAML list"),
        ("- {name: a, sets: {}}", "unknown key"),
        ("- {name: a}\n- {name: a}", "duplicate"),
        ("- {name: ../x}", "directory-safe"),
        ("- {name: a, set: [1]}", "dotted config keys"),
    ],
)
def test_bad_variants_files_are_rejected(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "variants.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_variants(path)


def test_two_variant_study_trains_resumes_skips_and_tabulates(tmp_path: Path) -> None:
    root = write_cuhk_fixture(tmp_path / "data", {"train": 2, "test": 1})
    base = tmp_path / "base.yaml"
    save_config(load_config(None, tiny_overrides(root, tmp_path / "runs", epochs=1) + ["train.select_on=last"]), base)
    variants = tmp_path / "variants.yaml"
    entries = [
        {"name": "up-person"},
        {"name": "lora+id", "set": {"model.prefix": False, "model.adapter": False, "train.losses": ["sdm", "id"], "train.epochs": 2}},
    ]
    variants.write_text(yaml.safe_dump(entries))
    out = tmp_path / "study"

    # an interrupted variant: one of its two epochs done
    interrupted = load_config(base, ["model.prefix=false", "model.adapter=false", "train.losses=[sdm,id]", "train.epochs=2",
                                     f"output_dir={out}", "run_name=lora+id"])
    assert Trainer(interrupted, out / "lora+id").fit(stop_after_epochs=1) is None

    assert main(["ablate", "--base", str(base), "--variants", str(variants), "--out", str(out), "--set", "eval.batch_size=8"]) == 1  # config changed
    assert main(["ablate", "--base", str(base), "--variants", str(variants), "--out", str(out)]) == 0
    log = (out / "lora+id" / "train_log.txt").read_text()
    assert "resuming after epoch 1" in log and log.count("epoch 2 done") == 1 and "epoch 1 done" in log

    payload = json.loads((out / "ablation.json").read_text())
    rows = {row["name"]: row for row in payload["rows"]}
    assert list(rows) == ["up-person", "lora+id"]
    for name, row in rows.items():
        stored = json.loads((out / name / "metrics.json").read_text())
        assert row["metrics"]["R1"] == stored["t2i"]["R1"] and row["trainable_parameters"] == stored["parameters"]["trainable"]
        assert row["std"] is None and [(run["seed"], run["run_dir"]) for run in row["seeds"]] == [(1, str(out / name))]
    assert rows["up-person"]["components"] == "S-Prefix(L=2) + LoRA(r=2) + L-Adapter(1/8)"
    assert rows["lora+id"]["components"] == "LoRA(r=2)" and rows["lora+id"]["losses"] == "SDM + ID"
    assert stored["parameters"]["loss_head"] == (upperson.load_backbone("tiny", (64, 32)).spec.embed_dim + 1) * 2  # 2 train ids
    table = (out / "ablation.md").read_text()
    assert "| up-person | S-Prefix(L=2) + LoRA(r=2) + L-Adapter(1/8) | SDM |" in table and "| lora+id | LoRA(r=2) | SDM + ID |" in table

    # finished variants are not trained again
    before = {name: (out / name / "train_log.txt").read_text() for name in rows}
    again = run_ablation(base, variants, out)
    assert [row.name for row in again] == ["up-person", "lora+id"]
    assert {name: (out / name / "train_log.txt").read_text() for name in rows} == before


def test_study_with_two_seeds_trains_each_seed_and_reports_mean_and_std(tmp_path: Path) -> None:
    root = write_cuhk_fixture(tmp_path / "data", {"train": 2, "test": 1})
    base = tmp_path / "base.yaml"
    save_config(load_config(None, tiny_overrides(root, tmp_path / "runs", epochs=1) + ["train.select_on=last", "train.seed=5"]), base)
    variants = tmp_path / "variants.yaml"
    variants.write_text(yaml.safe_dump([{"name": "lora-only", "set": {"model.prefix": False, "model.adapter": False}}]))
    out = tmp_path / "study"
    study = ["ablate", "--base", str(base), "--variants", str(variants), "--out", str(out)]

    assert main([*study, "--seeds", "0"]) == 1
    assert main([*study, "--seeds", "2"]) == 0
    runs = {seed: out / "lora-only" / f"seed-{seed}" for seed in (5, 6)}  # train.seed 5 and 5 + 1
    for seed, run_dir in runs.items():
        assert load_config(run_dir / "config.yaml").train.seed == seed and (run_dir / "metrics.json").is_file()
    adapters = {seed: load_file(str(run_dir / "best.safetensors")) for seed, run_dir in runs.items()}
    assert any(not torch.equal(adapters[5][key], adapters[6][key]) for key in adapters[5])  # another seed, another run

    # the same seed trained alone gives the same adapter: `train --seed` is `--set train.seed`
    alone = tmp_path / "alone"
    assert main(["train", "--config", str(base), "--seed", "6", "--set", "model.prefix=false", "--set", "model.adapter=false",
                 "--run-dir", str(alone)]) == 0
    repeated = load_file(str(alone / "best.safetensors"))
    assert repeated.keys() == adapters[6].keys() and all(torch.equal(repeated[key], adapters[6][key]) for key in repeated)
    assert main(["train", "--config", str(base), "--seed", "6", "--set", "train.seed=7", "--run-dir", str(tmp_path / "x")]) == 1
    assert not (tmp_path / "x").exists()

    (row,) = json.loads((out / "ablation.json").read_text())["rows"]
    per_seed = [json.loads((runs[seed] / "metrics.json").read_text())["t2i"] for seed in (5, 6)]
    assert [run["seed"] for run in row["seeds"]] == [5, 6]
    assert [run["metrics"]["R1"] for run in row["seeds"]] == [values["R1"] for values in per_seed]
    for key in ("R1", "R5", "mAP", "mINP"):
        values = np.array([values[key] for values in per_seed])
        assert row["metrics"][key] == pytest.approx(values.mean()) and row["std"][key] == pytest.approx(values.std(ddof=1))
    table = (out / "ablation.md").read_text()
    assert f"| {row['metrics']['R1']:.2f} ± {row['std']['R1']:.2f} |" in table and "over train.seed = 5, 6." in table

    # re-running trains nothing; a third seed trains only seed 7; the single-run layout is refused on top
    before = {seed: (run_dir / "train_log.txt").read_text() for seed, run_dir in runs.items()}
    (again,) = run_ablation(base, variants, out, seeds=3)
    assert [result.seed for result in again.seeds] == [5, 6, 7]
    assert {seed: (run_dir / "train_log.txt").read_text() for seed, run_dir in runs.items()} == before
    with pytest.raises(ConfigError, match="per-seed runs"):
        run_ablation(base, variants, out)
