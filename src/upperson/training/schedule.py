"""The official per-epoch learning-rate schedule and Adam parameter groups."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from upperson.config import OptimConfig


def lr_multiplier(epoch: int, total_epochs: int, warmup_epochs: int = 5, warmup_factor: float = 0.1) -> float:
    """Multiplier of the base lr during 0-based ``epoch``: linear warm-up from ``warmup_factor``, then cosine.

    Reproduces the official table (spec B.10): epochs 1..60 give 0.10, 0.28, 0.46, 0.64, 0.82, 1.0,
    0.99918, ... 0.00082; it never reaches 0.
    """
    if epoch < warmup_epochs:
        progress = epoch / warmup_epochs
        return warmup_factor * (1 - progress) + progress
    progress = min(1.0, (epoch - warmup_epochs) / max(1, total_epochs - warmup_epochs))
    return 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module, config: OptimConfig, head: nn.Module | None = None, head_lr_factor: float = 1.0
) -> torch.optim.Adam:
    """Adam over the trainable tensors: biases get ``weight_decay_bias`` and ``lr × bias_lr_factor``.

    "Bias" means a 1-d tensor named ``*bias`` (adapter and projection biases), as in the official rules.
    ``head`` (the identity classifier of the ID loss) follows IRRA's classifier rule (spec B.9): its
    tensors get ``lr × head_lr_factor`` instead of the bias factor, and the usual weight decays.
    """
    groups = _groups(model, config.lr, config.lr * config.bias_lr_factor, config)
    if head is not None and any(parameter.requires_grad for parameter in head.parameters()):
        head_lr = config.lr * head_lr_factor
        groups += _groups(head, head_lr, head_lr, config)
    return torch.optim.Adam(groups, lr=config.lr, betas=config.betas, eps=config.adam_eps)


def _groups(module: nn.Module, lr: float, bias_lr: float, config: OptimConfig) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            (no_decay if name.endswith("bias") else decay).append(parameter)
    groups = [{"params": decay, "lr": lr, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "lr": bias_lr, "weight_decay": config.weight_decay_bias})
    return groups


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, total_epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per epoch; each group keeps its own base lr."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: lr_multiplier(epoch, total_epochs, config.warmup_epochs, config.warmup_factor)
    )


def sync_lr_with_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set every group's lr to the schedule's value at ``last_epoch``, as ``scheduler.step()`` would have.

    A resumed run restores the optimizer's stored lr, which belongs to the schedule the run was
    started with; when ``train.epochs`` grew, that lr (0 at the old last epoch of the cosine) is wrong
    for the extended schedule. Recomputing it with the same expression as LambdaLR leaves an
    unchanged schedule bit-identical.
    """
    for group, base_lr, multiplier in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * multiplier(scheduler.last_epoch)
