"""Importing an official implementation's ``state_dict`` (IRRA layout) onto an upperson model.

Each method declares its layout on its registry entry (:class:`~upperson.methods.registry.OfficialFormat`);
this module only applies it: detect the method, read its config, map keys, copy tensors. CLIP's own
weights sit under ``base_model.`` in every official layout. fp16 tensors are converted by copying into
our fp32 parameters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from upperson.backbone.pos_embed import resize_visual_pos_embed
from upperson.methods.model import RetrievalModel
from upperson.methods.registry import METHODS, get_method

logger = logging.getLogger(__name__)


@dataclass
class ImportReport:
    """What an official import touched."""

    petl_tensors: int = 0
    backbone_tensors: int = 0
    ignored_aliases: int = 0
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def official_method(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The registered method whose official layout ``state_dict`` follows."""
    state_dict = _unwrap(state_dict)
    found = [name for name, entry in METHODS.items() if entry.official is not None and entry.official.detect(state_dict)]
    if len(found) != 1:
        known = sorted(name for name, entry in METHODS.items() if entry.official is not None)
        what = "matches none" if not found else f"matches several ({', '.join(found)})"
        raise ValueError(f"the checkpoint {what} of the official layouts upperson reads ({', '.join(known)})")
    return found[0]


def read_official_config(state_dict: Mapping[str, torch.Tensor], method: str | None = None, **overrides: Any) -> Any:
    """The method config an official checkpoint was trained with (sizes and depths read off its tensors)."""
    state_dict = _unwrap(state_dict)
    official = get_method(method or official_method(state_dict)).official
    if official is None:
        raise ValueError(f"method {method!r} has no official checkpoint importer")
    return official.read_config(state_dict, **overrides)


def official_backbone_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CLIP weights inside an official checkpoint, in the OpenAI key layout."""
    formats = [entry.official for entry in METHODS.values() if entry.official is not None]
    return {
        key.removeprefix("base_model."): tensor
        for key, tensor in _unwrap(state_dict).items()
        if key.startswith("base_model.")
        and not any(official.map_key(key) is not None or official.ignore_key(key) for official in formats)
    }


def _unwrap(state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Official checkpoints store the state dict under ``model`` (and DDP prefixes keys with ``module.``)."""
    inner = state_dict.get("model")
    state_dict = inner if isinstance(inner, dict) else state_dict
    return {key.removeprefix("module."): tensor for key, tensor in state_dict.items()}


def import_official_state_dict(
    model: RetrievalModel,
    state_dict: Mapping[str, torch.Tensor],
    load_backbone: bool = True,
    strict: bool = True,
) -> ImportReport:
    """Copy an official UP-Person or CSKT ``state_dict`` into ``model`` (PETL tensors and, optionally, CLIP).

    The layout is the one declared by ``model.method``'s registry entry (:attr:`MethodEntry.official`).

    Args:
        model: a model of a method with an official importer whose config matches the checkpoint
            (e.g. UP-Person's prefix length, rank, depths, reduction; see :func:`read_official_config`).
        state_dict: the official model object's ``state_dict()`` (a ``{"model": ...}`` wrapper is unwrapped).
        load_backbone: also copy the CLIP weights under ``base_model.``.
        strict: raise if a PETL tensor of the model is not in the checkpoint or a key is not understood.

    Raises:
        ValueError: unknown/missing keys (strict) or shape mismatches, naming the keys.
    """
    official = get_method(model.method).official
    if official is None:
        with_importer = sorted(name for name, entry in METHODS.items() if entry.official is not None)
        raise ValueError(f"official checkpoints import onto {with_importer} models, not {model.method!r}")
    state_dict = _unwrap(state_dict)
    targets = model.state_dict(keep_vars=True)
    petl_keys = set(model.trainable_state_dict())
    report = ImportReport()
    assignments: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        ours = official.map_key(key)
        if ours is None and official.ignore_key(key):
            report.ignored_aliases += 1
            continue
        if ours is None and key.startswith("base_model."):
            if not load_backbone:
                continue
            ours = "clip." + key.removeprefix("base_model.")
            if ours == "clip.visual.positional_embedding" and ours in targets and tensor.shape != targets[ours].shape:
                tensor = resize_visual_pos_embed(tensor, model.clip.visual.grid_size)
        if ours is None or ours not in targets:
            report.unexpected.append(key)
            continue
        if tensor.shape != targets[ours].shape:
            raise ValueError(f"official key {key}: shape {tuple(tensor.shape)} does not fit {ours} {tuple(targets[ours].shape)}")
        assignments[ours] = tensor
    report.missing = sorted(petl_keys - set(assignments))
    if strict and (report.missing or report.unexpected):
        raise ValueError(
            f"official state dict does not match this model's config: missing {report.missing[:6]} "
            f"({len(report.missing)}), not understood {report.unexpected[:6]} ({len(report.unexpected)})"
        )
    model.unmerge_lora()
    with torch.no_grad():
        for ours, tensor in assignments.items():
            targets[ours].copy_(tensor.to(targets[ours].dtype))
    report.petl_tensors = sum(1 for key in assignments if key in petl_keys)
    report.backbone_tensors = len(assignments) - report.petl_tensors
    if report.backbone_tensors:
        model.refresh_backbone_fingerprint()
    logger.info(
        "imported %d PETL and %d CLIP tensors (%d alias keys ignored)",
        report.petl_tensors,
        report.backbone_tensors,
        report.ignored_aliases,
    )
    return report
