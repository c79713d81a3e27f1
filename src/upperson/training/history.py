"""The records a run directory keeps besides its checkpoints: config, per-epoch history, log, final metrics.

The file names live here so that whoever reads a run directory (eval, ablate, cross-domain) asks
one place.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from upperson._io import atomic_path

CONFIG_FILE = "config.yaml"
"""The run's config as the user gave it (``precision: auto`` stays ``auto``)."""
METRICS_FILE = "metrics.json"
"""Test metrics of the selected adapter, written when the run finishes."""
HISTORY_FILE = "history.csv"
"""One ``epoch, key, value`` row per figure: losses, learning rate, throughput, selection metrics."""
LOG_FILE = "train_log.txt"
"""The package's log messages during the run."""


def append_history(run_dir: Path, row: dict[str, Any]) -> None:
    """Append ``row`` (its ``epoch`` and any figures) to the run's history as ``epoch, key, value`` rows.

    Long format, so that epochs may report different keys (selection metrics only every few epochs).
    """
    path = run_dir / HISTORY_FILE
    new_file = not path.exists()
    figures = dict(row)
    epoch = figures.pop("epoch")
    with path.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if new_file:
            writer.writerow(["epoch", "key", "value"])
        for key, value in figures.items():
            writer.writerow([epoch, key, value])


def write_metrics(run_dir: Path, report: dict[str, Any]) -> None:
    """Write the final report atomically: a reader never sees half a file, and its presence means done."""
    with atomic_path(run_dir / METRICS_FILE) as temporary:
        temporary.write_text(json.dumps(report, indent=2))


@contextmanager
def log_to_file(run_dir: Path) -> Iterator[None]:
    """Copy the package's log messages (INFO and up) into the run's log file while the block runs."""
    handler = logging.FileHandler(run_dir / LOG_FILE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    package_logger = logging.getLogger("upperson")
    package_logger.addHandler(handler)
    if package_logger.getEffectiveLevel() > logging.INFO:
        package_logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        package_logger.removeHandler(handler)
        handler.close()
