"""Keeping a run directory consistent: one writer at a time, no silent overwrite, sane after a crash.

A run directory belongs to one run. Starting a new run where one exists is refused unless the user
asks to overwrite, and then the old run is moved aside whole, never mixed or deleted; a directory
holding none of a run's files (e.g. after a ``train`` whose dataset check failed) is free. A lock file
stops a second process from writing the same directory. Resuming may only change fields that do not
alter what the finished run means (more epochs, evaluation cadence, workers), compared with the config
the checkpoint was trained with (recorded in ``state.pt``, so editing ``config.yaml`` by hand is caught
as well as ``--set``); the history is cut
back to the epochs the checkpoint holds, so a crash between writing history and checkpoint never
leaves duplicate rows, and temporary files of interrupted atomic writes are removed.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from upperson._io import atomic_path
from upperson.config import RunConfig
from upperson.training.checkpoint import BEST_ADAPTER, LAST_ADAPTER, STATE_FILE
from upperson.training.history import CONFIG_FILE, HISTORY_FILE, LOG_FILE, METRICS_FILE

logger = logging.getLogger(__name__)

RUN_FILES = (CONFIG_FILE, STATE_FILE, LAST_ADAPTER, BEST_ADAPTER, HISTORY_FILE, METRICS_FILE, LOG_FILE)
"""Files a run writes; a directory holding any of them holds a run."""
LOCK_FILE = ".upperson.lock"
RESUMABLE_FIELDS = frozenset(
    {
        "train.epochs",
        "train.eval_every",
        "train.compile",
        "train.log_every",
        "eval.batch_size",
        "eval.chunk_size",
        "eval.i2t",
        "data.num_workers",
        "data.verify_images",
        "device",
        "output_dir",
        "run_name",
    }
)
"""Fields ``--resume`` may change: how long (``train.epochs``, which can only grow) and how often, evaluation
batching, workers, device and naming; not what is trained on which data, nor how (the model structure,
losses, optimiser, schedule, seed, precision, data and its augmentation)."""


class RunDirectoryError(ValueError):
    """The run directory cannot be used as asked; the message says what to do instead."""


def check_new_run(run_dir: Path, overwrite: bool) -> list[str]:
    """The run files ``run_dir`` holds; refuses them unless ``overwrite`` (nothing is changed here)."""
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if existing and not overwrite:
        raise RunDirectoryError(
            f"{run_dir} already holds a run ({', '.join(existing)}); continue it with `upperson train --resume {run_dir}`, "
            "start over with --overwrite (the old run is moved aside, not deleted), or choose another --run-dir"
        )
    return existing


def prepare_new_run(run_dir: Path, overwrite: bool) -> Path | None:
    """Make the (locked) ``run_dir`` ready for a fresh run; with ``overwrite`` an existing run is moved aside.

    Everything in the directory but the lock moves to a sibling ``<name>.replaced-<time>`` folder, which is
    returned; nothing is deleted.
    """
    if not check_new_run(run_dir, overwrite):
        return None
    aside = run_dir.with_name(f"{run_dir.name}.replaced-{datetime.now():%Y%m%d-%H%M%S}")
    copy = 1
    while aside.exists():
        aside, copy = aside.with_name(f"{run_dir.name}.replaced-{datetime.now():%Y%m%d-%H%M%S}-{copy}"), copy + 1
    aside.mkdir()
    for entry in run_dir.iterdir():
        if entry.name != LOCK_FILE:
            entry.rename(aside / entry.name)
    logger.warning("--overwrite: the previous run in %s was moved to %s", run_dir, aside)
    return aside


def resume_changes(trained: dict[str, Any], requested: RunConfig, run_dir: Path, source: str) -> dict[str, tuple[Any, Any]]:
    """Fields that differ between the config the run was trained with and the resumed one; refuses any not resumable.

    Args:
        trained: ``RunConfig.to_dict()`` of the run so far (as recorded in ``state.pt``).
        source: where ``trained`` was read, for the message.
    """
    before, after = _flatten(trained), _flatten(requested.to_dict())
    changed = {key: (before.get(key), after.get(key)) for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)}
    refused = [key for key in changed if key not in RESUMABLE_FIELDS]
    if refused:
        details = "; ".join(f"{key}: {changed[key][0]!r} -> {changed[key][1]!r}" for key in refused)
        raise RunDirectoryError(
            f"--resume {run_dir}: {details} would change what the run trains (compared with the config it was trained with "
            f"({source})); undo the edit of {run_dir / CONFIG_FILE} or the --set. Resume only changes "
            f"{', '.join(sorted(RESUMABLE_FIELDS))}; start a new run (another --run-dir) for other changes"
        )
    epochs = before.get("train.epochs")
    if isinstance(epochs, int) and requested.train.epochs < epochs:
        raise RunDirectoryError(f"--resume {run_dir}: train.epochs can only grow ({epochs} -> {requested.train.epochs})")
    for key, (old, new) in changed.items():
        logger.info("resume: %s %r -> %r", key, old, new)
    return changed


def rebuild_history(run_dir: Path, completed_epochs: int) -> int:
    """Keep only history rows of epochs the checkpoint holds (and well-formed ones); returns rows dropped."""
    path = run_dir / HISTORY_FILE
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    rows = list(csv.reader(io.StringIO(path.read_text(errors="replace"))))
    for row in rows[1:]:
        if len(row) == 3 and row[0].isdigit() and int(row[0]) <= completed_epochs:
            kept.append(row)
        else:
            dropped += 1
    if dropped:
        buffer = io.StringIO()
        csv.writer(buffer).writerows([["epoch", "key", "value"], *kept])
        with atomic_path(path) as temporary:
            temporary.write_text(buffer.getvalue())
        logger.info("history: dropped %d rows of epochs after %d (written before an interruption)", dropped, completed_epochs)
    return dropped


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporaries an interrupted atomic write of one of the run's own files left behind."""
    stale = [path for name in RUN_FILES for path in run_dir.glob(f".{name}.*.tmp")]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        logger.info("removed %d temporary files of interrupted writes", len(stale))
    return stale


@contextmanager
def run_lock(run_dir: Path) -> Iterator[Path]:
    """Hold ``run_dir``'s lock file while the block runs; a live holder makes this fail, a stale one is replaced."""
    path = run_dir / LOCK_FILE
    for _ in range(2):
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            _refuse_if_locked(run_dir)
            logger.warning("%s: removing a stale lock of a process that no longer runs", path)
            path.unlink(missing_ok=True)
    else:
        raise RunDirectoryError(f"{run_dir}: could not take the lock {path}; another process keeps creating it")
    with os.fdopen(handle, "w") as file:
        file.write(f"{socket.gethostname()} {os.getpid()}\n")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _refuse_if_locked(run_dir: Path) -> None:
    holder = _lock_holder(run_dir / LOCK_FILE)
    if holder is not None:
        host, pid = holder
        raise RunDirectoryError(
            f"{run_dir} is being written by another upperson process (pid {pid} on {host}); wait for it to finish or stop it"
        )


def _lock_holder(path: Path) -> tuple[str, int] | None:
    """``(host, pid)`` of a live lock holder; ``None`` when there is no lock or its process is gone."""
    try:
        host, pid_text = path.read_text().split()
        pid = int(pid_text)
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # half-written or foreign content: treated as stale
    if host != socket.gethostname():
        return host, pid  # cannot check another machine's processes: assume it is alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return host, pid
    return host, pid


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "model" or (key == "model" and isinstance(value, dict) and not prefix):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
