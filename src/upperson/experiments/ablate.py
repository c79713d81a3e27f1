"""Ablation studies: train and evaluate variants of one base config, then tabulate them (paper Tables V, X).

A variants file is a YAML list; each entry names a variant and the dotted config keys it changes::

    - name: sdm                      # run directory name and table row; letters, digits, . _ + -
    - name: sdm+itc
      set:
        train.losses: [sdm, itc]
    - name: lora-only
      set: {model.prefix: false, model.adapter: false}

Values are YAML values (lists, booleans, numbers), applied after the base config file and the
command-line ``--set`` overrides, with the same strict checks as ``upperson train --set``.

Seeds: with ``seeds=1`` (the default) each variant trains once, with its config's ``train.seed``,
in ``<out>/<name>/``. With ``seeds=N`` it trains N times, with ``train.seed`` = s, s+1, ..., s+N-1
(s = the variant's configured seed), in ``<out>/<name>/seed-<seed>/``; the table shows the mean ±
the sample standard deviation (ddof=1) of each metric and ``ablation.json`` holds every seed's
values as well. Growing N later reuses the seeds already trained. The two layouts are not mixed:
a variant directory holding runs of the other layout is refused before anything trains.

A run whose directory already holds ``metrics.json`` is not trained again and an interrupted one
resumes after its last completed epoch, so re-running the same command finishes an interrupted
study. ``ablation.md`` and ``ablation.json`` in ``<out>`` are rewritten after every variant.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import statistics
from collections.abc import Sequence
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
SEED_DIR_PREFIX = "seed-"
"""Per-seed run directories of a multi-seed study: ``<out>/<variant>/seed-<seed>/``."""
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


@dataclass(frozen=True)
class SeedRun:
    """One training run of a study: a variant at one seed."""

    variant: str
    """The variant's name (its table row)."""
    config: RunConfig
    """The variant's config with this run's ``train.seed``; ``output_dir/run_name`` is the run directory."""

    @property
    def seed(self) -> int:
        return self.config.train.seed

    @property
    def run_dir(self) -> Path:
        return Path(self.config.output_dir) / self.config.run_name


@dataclass
class SeedResult:
    """One seed's run of a variant."""

    seed: int
    metrics: dict[str, float]
    """Test text-to-image metrics of this run."""
    best_epoch: int
    run_dir: str


@dataclass
class AblationRow:
    """A finished variant, as tabulated: the mean (and spread) of its seed runs."""

    name: str
    components: str
    """Summary of the method config, e.g. ``S-Prefix(L=10) + LoRA(r=32) + L-Adapter(1/8)``."""
    losses: str
    """e.g. ``SDM + ID``."""
    metrics: dict[str, float]
    """Test text-to-image metrics (R1, R5, R10, mAP, mINP, ...): the mean over seeds (one seed: its values)."""
    std: dict[str, float] | None
    """Sample standard deviation (ddof=1) of each metric over seeds; ``None`` with one seed."""
    trainable_parameters: int
    """PETL tensors plus any loss head (the ID classifier), as in the paper's Table X."""
    total_parameters: int
    selection: str
    """How the evaluated epoch was chosen (val, last epoch, or the test split)."""
    seeds: list[SeedResult]
    """Every seed's run, in seed order."""


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


def seed_runs(base: str | Path | None, base_overrides: list[str], variant: Variant, out_dir: Path, seeds: int = 1) -> list[SeedRun]:
    """The variant's runs: one in ``out_dir/name`` with its own seed, or ``seeds`` consecutive seeds in
    ``out_dir/name/seed-<seed>`` (see the module docstring)."""
    if seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {seeds}")
    config = variant_config(base, base_overrides, variant, out_dir)
    if seeds == 1:
        return [SeedRun(variant.name, config)]
    variant_dir = str(out_dir / variant.name)
    return [
        SeedRun(variant.name, dataclasses.replace(
            config, train=dataclasses.replace(config.train, seed=seed), output_dir=variant_dir, run_name=f"{SEED_DIR_PREFIX}{seed}",
        ))
        for seed in range(config.train.seed, config.train.seed + seeds)
    ]


def run_seed(run: SeedRun, progress: Progress | None = None) -> dict[str, Any]:
    """Train (or resume, or skip if finished) one run; returns its ``metrics.json`` content."""
    label = f"{run.variant} (seed {run.seed})"
    check_run_dir(run)
    metrics_path = run.run_dir / METRICS_FILE
    if metrics_path.is_file():
        logger.info("%s: finished earlier (%s), not trained again", label, metrics_path)
    else:
        resume = (run.run_dir / CONFIG_FILE).is_file()  # started earlier: continue (from epoch 0 if none completed)
        logger.info("%s: %s", label, "resuming after the last completed epoch" if resume else "training")
        Trainer(run.config, run.run_dir, progress=progress).fit(resume=resume)
    return json.loads(metrics_path.read_text())


def check_run_dir(run: SeedRun) -> None:
    """Refuse to reuse a run directory that was trained with another config."""
    stored_path = run.run_dir / CONFIG_FILE
    if not stored_path.is_file() or not ((run.run_dir / STATE_FILE).is_file() or (run.run_dir / METRICS_FILE).is_file()):
        return
    stored = load_config(stored_path).to_dict()
    if stored != run.config.to_dict():
        changed = sorted(_diff(stored, run.config.to_dict()))
        raise ConfigError(
            f"{run.run_dir} holds a run of variant {run.variant!r} (seed {run.seed}) with a different config "
            f"(changed: {changed}); move that directory away or rename the variant"
        )


def check_layout(out_dir: Path, variant: str, seeds: int) -> None:
    """Refuse a variant directory that holds runs of the other layout (single run vs per-seed runs)."""
    variant_dir = out_dir / variant
    if seeds == 1 and any(path.is_file() for path in variant_dir.glob(f"{SEED_DIR_PREFIX}*/{CONFIG_FILE}")):
        raise ConfigError(
            f"{variant_dir} holds per-seed runs ({SEED_DIR_PREFIX}*/) of a multi-seed study; "
            "give the same --seeds as before, or another --out for a single-seed study"
        )
    if seeds > 1 and (variant_dir / CONFIG_FILE).is_file():
        raise ConfigError(
            f"{variant_dir} holds a single-seed run; --seeds {seeds} writes {variant_dir}/{SEED_DIR_PREFIX}<seed>/ "
            "instead: give another --out, or move that run away"
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


def seed_statistics(values: Sequence[dict[str, float]]) -> tuple[dict[str, float], dict[str, float] | None]:
    """Mean and sample standard deviation (ddof=1) per metric over seeds; std is ``None`` for one seed.

    Only metrics that every seed reports are kept.
    """
    if not values:
        raise ValueError("seed_statistics needs at least one seed's metrics")
    keys = [key for key in values[0] if all(key in other for other in values)]
    mean = {key: statistics.fmean(run[key] for run in values) for key in keys}
    if len(values) == 1:
        return mean, None
    return mean, {key: statistics.stdev(run[key] for run in values) for key in keys}


def ablation_row(runs: Sequence[SeedRun], metrics: Sequence[dict[str, Any]]) -> AblationRow:
    """A table row from a variant's seed runs and their ``metrics.json`` (parameter counts rebuilt if absent).

    The seeds change neither the model nor the losses, so components and parameter counts are the first run's.
    """
    first = runs[0].config
    counts = metrics[0].get("parameters") or _count_parameters(first)
    results = [
        SeedResult(
            seed=run.seed,
            metrics={key: value for key, value in stored["t2i"].items() if isinstance(value, (int, float))},
            best_epoch=stored["best_epoch"],
            run_dir=str(run.run_dir),
        )
        for run, stored in zip(runs, metrics, strict=True)
    ]
    mean, std = seed_statistics([result.metrics for result in results])
    return AblationRow(
        name=runs[0].variant,
        components=describe_components(first),
        losses=describe_losses(first),
        metrics=mean,
        std=std,
        trainable_parameters=counts["trainable"],
        total_parameters=counts["total"],
        selection="; ".join(sorted({stored["selection"] for stored in metrics})),
        seeds=results,
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

    Pure: depends on its arguments only. A row of several seeds shows ``mean ± std`` (sample standard
    deviation, ddof=1) and the seeds are listed under the table, as are the selection protocols, so
    that test-split selection (optimistic) is never silent.
    """
    header = ["Variant", "Components", "Loss", *(label for _, label in METRIC_COLUMNS), "Trainable #Param"]
    lines = [f"## {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
    for row in rows:
        values = [_metric_cell(row, key) for key, _ in METRIC_COLUMNS]
        cells = [row.name, row.components, row.losses, *values, format_count(row.trainable_parameters)]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    selections = sorted({row.selection for row in rows})
    if selections:
        lines += ["", "Text-to-image retrieval on the test split; model selection: " + "; ".join(selections) + "."]
    seed_lists = sorted({tuple(result.seed for result in row.seeds) for row in rows if len(row.seeds) > 1})
    if seed_lists:
        listed = "; ".join(", ".join(map(str, seeds)) for seeds in seed_lists)
        lines.append(f"Mean ± sample standard deviation (ddof=1) over train.seed = {listed}.")
    return "\n".join(lines) + "\n"


def _metric_cell(row: AblationRow, key: str) -> str:
    if key not in row.metrics:
        return "n/a"
    if row.std is None:
        return f"{row.metrics[key]:.2f}"
    return f"{row.metrics[key]:.2f} ± {row.std[key]:.2f}"


def write_ablation(out_dir: Path, rows: list[AblationRow], base: str | Path | None, variants_file: str | Path, title: str = "") -> None:
    """``ablation.md`` (the table) and ``ablation.json`` (rows with exact numbers), atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / ABLATION_MARKDOWN) as temporary:
        temporary.write_text(format_ablation_table(rows, title))
    payload = {
        "base_config": None if base is None else str(base),
        "variants_file": str(variants_file),
        "std": "sample standard deviation over seeds (ddof=1); null with one seed",
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
    seeds: int = 1,
) -> list[AblationRow]:
    """Train, evaluate and tabulate every variant, each with ``seeds`` consecutive seeds (module docstring);
    all configs (and existing run directories) are checked before anything trains."""
    out_dir = Path(out_dir)
    variants = read_variants(variants_file)
    studies = [seed_runs(base, list(overrides), variant, out_dir, seeds) for variant in variants]
    for variant, runs in zip(variants, studies, strict=True):
        check_layout(out_dir, variant.name, seeds)
        for run in runs:
            check_run_dir(run)
    title = "Ablation on " + ", ".join(sorted({runs[0].config.data.dataset for runs in studies}))
    rows: list[AblationRow] = []
    for index, runs in enumerate(studies, start=1):
        logger.info("variant %d/%d: %s", index, len(studies), runs[0].variant)
        rows.append(ablation_row(runs, [run_seed(run, progress) for run in runs]))
        write_ablation(out_dir, rows, base, variants_file, title)
    return rows
