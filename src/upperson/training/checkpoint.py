"""Resumable training state: written atomically every epoch, read without pickle code execution."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from upperson._io import atomic_path
from upperson.methods import RetrievalModel

STATE_FILE = "state.pt"
LAST_ADAPTER = "last.safetensors"
BEST_ADAPTER = "best.safetensors"


@dataclass
class TrainingState:
    """Where a run stands after its last completed epoch."""

    completed_epochs: int
    best_score: float | None
    best_epoch: int | None


def _rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "python": random.getstate(),
    }


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])


def save_training_state(
    path: Path,
    model: RetrievalModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    state: TrainingState,
    objective: nn.Module | None = None,
    config: dict[str, Any] | None = None,
) -> None:
    """Adapter tensors, loss-head tensors, optimizer, scheduler, grad scaler, RNG states, progress and the
    config they were trained with, atomically.

    ``objective`` holds what the losses train besides the model (the ID classifier); it is saved
    here and not in the adapter file because only a resumed run needs it. ``config`` is the run's
    ``RunConfig.to_dict()``: what ``--resume`` compares with (see :func:`read_trained_config`).
    """
    payload = {
        "adapter": {name: tensor.detach().cpu() for name, tensor in model.trainable_state_dict().items()},
        "objective": {name: tensor.detach().cpu() for name, tensor in (objective.state_dict() if objective else {}).items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": _rng_state(),
        "completed_epochs": state.completed_epochs,
        "best_score": state.best_score,
        "best_epoch": state.best_epoch,
        "config": config,
    }
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)


def load_training_state(
    path: Path,
    model: RetrievalModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    objective: nn.Module | None = None,
) -> TrainingState:
    """Restore everything :func:`save_training_state` wrote; returns the progress record."""
    payload = _read_state(path)
    targets = model.trainable_state_dict()
    if set(payload["adapter"]) != set(targets):
        raise ValueError(f"{path}: adapter tensors do not match the model built from the run's config")
    shapes = [name for name, tensor in payload["adapter"].items() if tensor.shape != targets[name].shape]
    if shapes:
        name = shapes[0]
        raise ValueError(
            f"{path}: adapter tensor {name} is {tuple(payload['adapter'][name].shape)} there but "
            f"{tuple(targets[name].shape)} in the model built from the run's config; resume with the config the run was started with"
        )
    with torch.no_grad():
        for name, tensor in payload["adapter"].items():
            targets[name].copy_(tensor)
    _restore_objective(path, payload.get("objective", {}), objective)
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    if scaler is not None and payload["scaler"] is not None:
        scaler.load_state_dict(payload["scaler"])
    _restore_rng(payload["rng"])
    return TrainingState(payload["completed_epochs"], payload["best_score"], payload["best_epoch"])


def read_trained_config(path: Path) -> dict[str, Any] | None:
    """The config (``RunConfig.to_dict()``) the state at ``path`` was trained with; ``None`` for states written
    before upperson recorded it. Tensors are memory-mapped, not read."""
    config = _read_state(path, mmap=True).get("config")
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"{path}: its recorded config is not a mapping; restore the file or start over with --overwrite")
    return config


def _read_state(path: Path, mmap: bool = False) -> dict[str, Any]:
    """The payload of a training state file, refused in one line when missing, unreadable or foreign."""
    if not path.is_file():
        raise FileNotFoundError(f"no training state at {path}: the run has not completed an epoch yet")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, OSError, ValueError) as error:  # torch reports corrupt zips and pickles this way
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{path} is unreadable ({reason[:200]}); the run cannot resume from it: restore the file, or start over "
            "in this run directory with --overwrite (the old run is moved aside)"
        ) from error
    if not isinstance(payload, dict) or not {"adapter", "optimizer", "scheduler", "rng", "completed_epochs"} <= set(payload):
        raise ValueError(f"{path} is not an upperson training state; start over with --overwrite or restore the file")
    return payload


def _restore_objective(path: Path, stored: dict[str, torch.Tensor], objective: nn.Module | None) -> None:
    expected = objective.state_dict() if objective is not None else {}
    shapes = {name: tuple(tensor.shape) for name, tensor in stored.items()}
    wanted = {name: tuple(tensor.shape) for name, tensor in expected.items()}
    if shapes != wanted:
        raise ValueError(
            f"{path}: loss-head tensors {shapes} do not match the run's train.losses and dataset ({wanted}); "
            "resume with the config and data the run was started with"
        )
    if objective is not None:
        objective.load_state_dict(stored)
