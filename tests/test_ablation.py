"""Ablation studies: the variants format, the pure table writer, and a resumable two-variant study end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_training import tiny_overrides, write_cuhk_fixture

import upperson
from upperson.experiments.ablate import AblationRow, format_ablation_table, format_count, read_variants, run_ablation
from upperson.cli import main
from upperson.config import ConfigError, load_config, save_config
from upperson.training.loop import Trainer


def _row(name: str, r1: float, trainable: int, selection: str = "best R1 on val") -> AblationRow:
    metrics = {"R1": r1, "R5": 80.0, "R10": 90.5, "mAP": 60.125, "mINP": 40.0}
    return AblationRow(name, "LoRA(r=32)", "SDM + ID", metrics, trainable, 10 * trainable, selection, 3, f"runs/{name}")


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
