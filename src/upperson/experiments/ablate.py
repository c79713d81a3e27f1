"""Ablation studies: train and evaluate variants of one base config, then tabulate them (paper Tables V, X).

A variants file is a YAML list; each entry names a variant and the dotted config keys it changes::

    - name: sdm                      # run directory name and table row; letters, digits, . _ + -
    - name: sdm+itc
      set:
        train.losses: [sdm, itc]
    - name: lora-only
      set: {model.prefix: false, model.adapter: false}

Values are YAML values (lists, booleans, numbers), applied after the base config file and the
command-line ``--set`` overrides, with the same strict checks as ``upperson train --set``. Each
variant trains in ``<out>/<name>/``; a variant whose directory already holds ``metrics.json`` is
not trained again and an interrupted one resumes after its last completed epoch, so re-running
the same command finishes an interrupted study. ``ablation.md`` and ``ablation.json`` in ``<out>``
are rewritten after every variant.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from upperson._io import atomic_path
from upperson.config import ConfigError, RunConfig, load_config, read_yaml
from upperson.data import load_dataset
from upperson.methods import get_method
from upperson.runtime import Progress
from upperson.training.checkpoint import STATE_FILE
from upperson.training.history import CONFIG_FILE, METRICS_FILE
from upperson.training.loop import Trainer
from upperson.training.step import build_training

logger = logging.getLogger(__name__)

ABLATION_MARKDOWN = "ablation.md"
ABLATION_JSON = "ablation.json"
METRIC_COLUMNS = (("R1", "R@1"), ("R5", "R@5"), ("R10", "R@10"), ("mAP", "mAP"), ("mINP", "mINP"))
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


@dataclass(frozen=True)
class Variant:
    """One row of an ablation: a name and the dotted config overrides it applies."""

    name: str
    """Run directory name and table label."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted key → YAML value, e.g. ``{"model.lora": False}``."""

    def override_strings(self) -> list[str]:
        """As ``key=value`` strings for :func:`upperson.config.load_config` (JSON is valid YAML)."""
        return [f"{key}={json.dumps(value)}" for key, value in self.overrides.items()]


@dataclass
class AblationRow:
    """A finished variant, as tabulated."""

    name: str
    components: str
    """Summary of the method config, e.g. ``S-Prefix(L=10) + LoRA(r=32) + L-Adapter(1/8)``."""
    losses: str
    """e.g. ``SDM + ID``."""
    metrics: dict[str, float]
    """Test text-to-image metrics (R1, R5, R10, mAP, mINP, ...)."""
    trainable_parameters: int
    """PETL tensors plus any loss head (the ID classifier), as in the paper's Table X."""
    total_parameters: int
    selection: str
    """How the evaluated epoch was chosen (val, last epoch, or the test split)."""
    best_epoch: int
    run_dir: str


def read_variants(path: str | Path) -> list[Variant]:
    """Parse and check a variants file (see the module docstring); errors name the file and entry."""
    try:
        raw = read_yaml(path)  # the config value syntax, duplicate keys refused
    except FileNotFoundError as error:
        raise ConfigError(f"variants file {path} does not exist") from error
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{path}: must be a non-empty YAML list of {{name: ..., set: {{key: value}}}} entries")
    variants, seen = [], set()
    for index, entry in enumerate(raw):
        where = f"{path} entry {index}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a mapping with 'name' and optionally 'set'")
        unknown = sorted(set(entry) - {"name", "set"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; valid: ['name', 'set']")
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(f"{where}: 'name' must be a directory-safe string (letters, digits, . _ + -), got {name!r}")
        if name in seen:
            raise ConfigError(f"{where}: duplicate variant name {name!r}")
        seen.add(name)
        overrides = entry.get("set") or {}
        if not isinstance(overrides, dict) or not all(isinstance(key, str) for key in overrides):
            raise ConfigError(f"{where}: 'set' must map dotted config keys to values, e.g. {{model.lora: false}}")
        variants.append(Variant(name, dict(overrides)))
    return variants


def variant_config(base: str | Path | None, base_overrides: list[str], variant: Variant, out_dir: Path) -> RunConfig:
    """Base file, then command-line overrides, then the variant's; the run goes to ``out_dir/name``."""
    overrides = [*base_overrides, *variant.override_strings(), f"output_dir={json.dumps(str(out_dir))}", f"run_name={json.dumps(variant.name)}"]
    try:
        return load_config(base, overrides)
    except ConfigError as error:
        raise ConfigError(f"variant {variant.name!r}: {error}") from error


def describe_components(config: RunConfig) -> str:
    """The components column: the method's own summary from its registry entry (changed options appended)."""
    return get_method(config.method).describe_config(config.model)


def describe_losses(config: RunConfig) -> str:
    return " + ".join(name.upper() for name in config.train.losses)


def run_variant(config: RunConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Train (or resume, or skip if finished) one variant; returns its ``metrics.json`` content."""
    run_dir = Path(config.output_dir) / config.run_name
    check_run_dir(config)
    metrics_path = run_dir / METRICS_FILE
    if metrics_path.is_file():
        logger.info("%s: finished earlier (%s), not trained again", config.run_name, metrics_path)
    else:
        resume = (run_dir / CONFIG_FILE).is_file()  # started earlier: continue (from epoch 0 if none completed)
        logger.info("%s: %s", config.run_name, "resuming after the last completed epoch" if resume else "training")
        Trainer(config, run_dir, progress=progress).fit(resume=resume)
    return json.loads(metrics_path.read_text())


def check_run_dir(config: RunConfig) -> None:
    """Refuse to reuse a variant's run directory that was trained with another config."""
    run_dir = Path(config.output_dir) / config.run_name
    stored_path = run_dir / CONFIG_FILE
    if not stored_path.is_file() or not ((run_dir / STATE_FILE).is_file() or (run_dir / METRICS_FILE).is_file()):
        return
    stored = load_config(stored_path).to_dict()
    if stored != config.to_dict():
        changed = sorted(_diff(stored, config.to_dict()))
        raise ConfigError(
            f"{run_dir} holds a run of variant {config.run_name!r} with a different config (changed: {changed}); "
            "move that directory away or rename the variant"
        )


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            keys += _diff(left, right, f"{prefix}{key}.")
        elif left != right:
            keys.append(prefix + key)
    return keys


def ablation_row(config: RunConfig, metrics: dict[str, Any]) -> AblationRow:
    """A table row from a variant's config and ``metrics.json`` (parameter counts rebuilt if absent)."""
    counts = metrics.get("parameters") or _count_parameters(config)
    return AblationRow(
        name=config.run_name,
        components=describe_components(config),
        losses=describe_losses(config),
        metrics={key: value for key, value in metrics["t2i"].items() if isinstance(value, (int, float))},
        trainable_parameters=counts["trainable"],
        total_parameters=counts["total"],
        selection=metrics["selection"],
        best_epoch=metrics["best_epoch"],
        run_dir=str(Path(config.output_dir) / config.run_name),
    )


def _count_parameters(config: RunConfig) -> dict[str, int]:
    """For runs whose metrics.json predates parameter counts; builds the model on the CPU."""
    num_train_ids = load_dataset(config.data.dataset, config.data.root).num_train_ids
    return build_training(config, num_train_ids, torch.device("cpu")).parameter_counts()


def format_count(count: int) -> str:
    """Parameter counts as the paper prints them: 7.4M, 13.1M; small counts as 12.3K or 950."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.{1 if count >= 10 * scale else 2}f}{suffix}"
    return str(count)


def format_ablation_table(rows: list[AblationRow], title: str = "") -> str:
    """The paper's ablation layout as markdown: variant | components | loss | R@1 ... mINP | trainable.

    Pure: depends on its arguments only. Selection protocols are listed under the table so that
    test-split selection (optimistic) is never silent.
    """
    header = ["Variant", "Components", "Loss", *(label for _, label in METRIC_COLUMNS), "Trainable #Param"]
    lines = [f"## {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
    for row in rows:
        values = [f"{row.metrics[key]:.2f}" if key in row.metrics else "n/a" for key, _ in METRIC_COLUMNS]
        cells = [row.name, row.components, row.losses, *values, format_count(row.trainable_parameters)]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    selections = sorted({row.selection for row in rows})
    if selections:
        lines += ["", "Text-to-image retrieval on the test split; model selection: " + "; ".join(selections) + "."]
    return "\n".join(lines) + "\n"


def write_ablation(out_dir: Path, rows: list[AblationRow], base: str | Path | None, variants_file: str | Path, title: str = "") -> None:
    """``ablation.md`` (the table) and ``ablation.json`` (rows with exact numbers), atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / ABLATION_MARKDOWN) as temporary:
        temporary.write_text(format_ablation_table(rows, title))
    payload = {
        "base_config": None if base is None else str(base),
        "variants_file": str(variants_file),
        "rows": [dataclasses.asdict(row) for row in rows],
    }
    with atomic_path(out_dir / ABLATION_JSON) as temporary:
        temporary.write_text(json.dumps(payload, indent=2))


def run_ablation(
    base: str | Path | None,
    variants_file: str | Path,
    out_dir: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    progress: Progress | None = None,
) -> list[AblationRow]:
    """Train, evaluate and tabulate every variant; all configs (and existing run directories) are
    checked before anything trains."""
    out_dir = Path(out_dir)
    variants = read_variants(variants_file)
    configs = [variant_config(base, list(overrides), variant, out_dir) for variant in variants]
    for config in configs:
        check_run_dir(config)
    title = "Ablation on " + ", ".join(sorted({config.data.dataset for config in configs}))
    rows: list[AblationRow] = []
    for index, config in enumerate(configs, start=1):
        logger.info("variant %d/%d: %s", index, len(configs), config.run_name)
        rows.append(ablation_row(config, run_variant(config, progress)))
        write_ablation(out_dir, rows, base, variants_file, title)
    return rows
