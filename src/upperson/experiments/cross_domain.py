"""Domain generalisation (paper Table XI): evaluate trained runs on other datasets' test splits.

Each run directory is what ``upperson train`` wrote (``config.yaml`` + ``best.safetensors``); the
model is rebuilt from its config, its best adapter loaded and LoRA merged, and it is evaluated
text-to-image on every target dataset. The result is a source × target matrix of R@1 and mAP,
written as markdown and JSON. Cells where the target is the run's own dataset are in-domain.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from upperson._io import atomic_path
from upperson.config import RunConfig, load_config
from upperson.data import load_dataset
from upperson.data.readers import get_reader
from upperson.data.records import RetrievalDataset
from upperson.evaluation.evaluate import evaluate_with_config
from upperson.retrieval.factory import build_inference_model
from upperson.runtime import Progress, resolve_device
from upperson.training.checkpoint import BEST_ADAPTER
from upperson.training.history import CONFIG_FILE

logger = logging.getLogger(__name__)

CROSS_DOMAIN_MARKDOWN = "cross_domain.md"
CROSS_DOMAIN_JSON = "cross_domain.json"
PAIR_COLUMNS = (("R1", "R@1"), ("R5", "R@5"), ("R10", "R@10"), ("mAP", "mAP"))
MATRIX_METRICS = (("R1", "R@1"), ("mAP", "mAP"))


@dataclass(frozen=True)
class Target:
    """A dataset to evaluate on: registry name and data root."""

    name: str
    root: str

    @classmethod
    def parse(cls, text: str) -> Target:
        """``NAME=ROOT``, e.g. ``rstpreid=/data``; the name is checked against the dataset registry."""
        name, sep, root = text.partition("=")
        if not sep or not name.strip() or not root.strip():
            raise ValueError(f"target dataset {text!r} must look like NAME=ROOT, e.g. rstpreid=/data")
        key, _ = get_reader(name)
        return cls(key, root.strip())


@dataclass
class TrainedRun:
    """A finished training run: where it is, its config and the adapter to evaluate."""

    label: str
    """Row label (the run directory name, or its path where names collide)."""
    run_dir: Path
    config: RunConfig
    adapter: Path

    @property
    def source(self) -> str:
        return self.config.data.dataset


@dataclass
class CrossDomainResult:
    """Text-to-image metrics of every run on every target: ``metrics[run label][target name]``."""

    runs: list[TrainedRun]
    targets: list[Target]
    split: str
    metrics: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)


def load_runs(run_dirs: Sequence[str | Path], overrides: Sequence[str] = (), adapter_name: str = BEST_ADAPTER) -> list[TrainedRun]:
    """Read each run's ``config.yaml`` (plus ``overrides``, e.g. ``device=cpu``) and locate its adapter."""
    dirs = [Path(run_dir) for run_dir in run_dirs]
    names = [run_dir.name for run_dir in dirs]
    runs = []
    for run_dir in dirs:
        config_path, adapter = run_dir / CONFIG_FILE, run_dir / adapter_name
        for path in (config_path, adapter):
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a finished `upperson train` run")
        label = run_dir.name if names.count(run_dir.name) == 1 else str(run_dir)
        runs.append(TrainedRun(label, run_dir, load_config(config_path, list(overrides)), adapter))
    return runs


def default_targets(runs: Sequence[TrainedRun]) -> list[Target]:
    """The runs' own training datasets, once each: every run on every other run's data."""
    targets: dict[str, Target] = {}
    for run in runs:
        target = Target(get_reader(run.source)[0], run.config.data.root)
        if targets.setdefault(target.name, target) != target:
            raise ValueError(
                f"runs were trained on {target.name} at two roots ({targets[target.name].root}, {target.root}); "
                "name the targets explicitly"
            )
    return list(targets.values())


def evaluate_cross_domain(
    runs: Sequence[TrainedRun], targets: Sequence[Target], split: str = "test", progress: Progress | None = None
) -> CrossDomainResult:
    """Every run on every target's ``split``; targets are read (and their split checked) before any model is built."""
    if not runs or not targets:
        raise ValueError("cross-domain evaluation needs at least one run and one target dataset")
    names = [target.name for target in targets]
    if len(set(names)) != len(names):
        raise ValueError(f"each target dataset may appear once, got {names}")
    datasets: dict[str, RetrievalDataset] = {target.name: load_dataset(target.name, target.root) for target in targets}
    for dataset in datasets.values():
        dataset.split(split)  # raises MissingSplitError naming the splits that exist
    result = CrossDomainResult(list(runs), list(targets), split)
    for run in runs:
        config = run.config
        device = resolve_device(config.device)
        model = build_inference_model(config, run.adapter, device)
        result.metrics[run.label] = {}
        for target in targets:
            logger.info("%s (trained on %s) → %s %s", run.label, run.source, target.name, split)
            metrics = evaluate_with_config(model, datasets[target.name].split(split), config, device, progress=progress)["t2i"]
            result.metrics[run.label][target.name] = metrics
    return result


def format_cross_domain(result: CrossDomainResult) -> str:
    """Markdown: an R@1 and an mAP matrix (rows = source runs, columns = targets), then Table XI's per-pair layout."""
    targets = [target.name for target in result.targets]
    lines = [f"## Cross-domain text-to-image retrieval ({result.split} split)", ""]
    for key, label in MATRIX_METRICS:
        lines += [f"### {label}", "", "| Source (run) | " + " | ".join(targets) + " |", "|---|" + "---:|" * len(targets)]
        for run in result.runs:
            cells = []
            for target in targets:
                value = f"{result.metrics[run.label][target][key]:.2f}"
                cells.append(f"*{value}*" if _same_dataset(run.source, target) else value)
            lines.append(f"| {run.source} ({run.label}) | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Italic: in-domain (the target is the run's training dataset).", "", "### Per source → target pair", ""]
    lines += ["| Source | Target | Run | " + " | ".join(label for _, label in PAIR_COLUMNS) + " |"]
    lines += ["|---|---|---|" + "---:|" * len(PAIR_COLUMNS)]
    for run in result.runs:
        for target in targets:
            if _same_dataset(run.source, target):
                continue
            values = result.metrics[run.label][target]
            lines.append(
                f"| {run.source} | {target} | {run.label} | " + " | ".join(f"{values[key]:.2f}" for key, _ in PAIR_COLUMNS) + " |"
            )
    return "\n".join(lines) + "\n"


def _same_dataset(source: str, target: str) -> bool:
    return get_reader(source)[0] == target


def cross_domain_json(result: CrossDomainResult) -> dict[str, Any]:
    """Runs, targets, full metrics per cell, and the R@1 / mAP matrices (rows = runs, columns = targets)."""
    labels = [run.label for run in result.runs]
    names = [target.name for target in result.targets]
    return {
        "split": result.split,
        "runs": [{"label": run.label, "run_dir": str(run.run_dir), "source": run.source, "adapter": str(run.adapter)} for run in result.runs],
        "targets": [{"name": target.name, "root": target.root} for target in result.targets],
        "t2i": result.metrics,
        "matrix": {
            "rows": labels,
            "columns": names,
            **{key: [[result.metrics[label][name][key] for name in names] for label in labels] for key, _ in MATRIX_METRICS},
        },
    }


def write_cross_domain(out_dir: str | Path, result: CrossDomainResult) -> tuple[Path, Path]:
    """``cross_domain.md`` and ``cross_domain.json`` in ``out_dir``, atomically; returns their paths."""
    out_dir = Path(out_dir)
    markdown, payload = out_dir / CROSS_DOMAIN_MARKDOWN, out_dir / CROSS_DOMAIN_JSON
    with atomic_path(markdown) as temporary:
        temporary.write_text(format_cross_domain(result))
    with atomic_path(payload) as temporary:
        temporary.write_text(json.dumps(cross_domain_json(result), indent=2))
    return markdown, payload
