"""Adapter files: only the trainable tensors (safetensors) plus JSON metadata, loaded strictly.

One frozen backbone can serve many scenarios: load one adapter file after another onto the same
model. The metadata records the method, its full config and the backbone identity (architecture +
SHA-256 of the frozen weights), so a file is never silently applied to the wrong model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from upperson._io import atomic_path
from upperson.methods import RetrievalModel
from upperson.version import __version__

FORMAT_NAME = "upperson-adapter"
FORMAT_VERSION = "1"
REQUIRED_METADATA = ("method", "config", "backbone")
"""Metadata keys a file must carry to be checked against a model; ``config`` and ``backbone`` are JSON objects."""


class AdapterMismatchError(ValueError):
    """The adapter file does not fit the model it is loaded onto."""


def adapter_metadata(model: RetrievalModel) -> dict[str, str]:
    """The JSON metadata written into every adapter file (safetensors metadata is ``str → str``)."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "method": model.method,
        "config": json.dumps(dataclasses.asdict(model.config), sort_keys=True),
        "backbone": json.dumps(model.backbone_spec.to_dict(), sort_keys=True),
        "backbone_sha256": model.backbone_sha256,
        "backbone_source": model.backbone_source,
        "upperson_version": __version__,
    }


def save_adapter(model: RetrievalModel, path: str | os.PathLike[str]) -> Path:
    """Write the model's trainable tensors (fp32) and metadata to ``path`` atomically."""
    tensors = {name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in model.trainable_state_dict().items()}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=adapter_metadata(model))
    return Path(path)


def read_adapter(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of an adapter file, validating that it is one: format (not newer than ours), the
    metadata keys and JSON a model check needs, and finite floating-point tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise AdapterMismatchError(f"{path}: not a readable safetensors file ({error})") from error
    if metadata.get("format") != FORMAT_NAME:
        raise AdapterMismatchError(f"{path}: not an upperson adapter file (metadata 'format' is {metadata.get('format')!r})")
    _check_format_version(metadata.get("format_version", FORMAT_VERSION), path)
    for key in REQUIRED_METADATA:
        if key not in metadata:
            raise AdapterMismatchError(f"{path}: metadata key {key!r} is missing; the file is damaged or was not written by save_adapter")
    for key in ("config", "backbone"):
        _json_object(metadata, key, path)
    for name, tensor in tensors.items():
        _check_tensor(name, tensor, path)
    return tensors, metadata


def _check_format_version(version: str, path: Path) -> None:
    """Refuse files of a later format instead of misreading them; earlier formats stay loadable."""
    if not version.isdigit():
        raise AdapterMismatchError(f"{path}: metadata format_version {version!r} is not a format number; the file is damaged")
    if int(version) > int(FORMAT_VERSION):
        raise AdapterMismatchError(
            f"{path}: written by a newer upperson (format {version}); upgrade upperson to load it "
            f"(this is upperson {__version__}, which reads format {FORMAT_VERSION})"
        )


def _json_object(metadata: dict[str, str], key: str, path: Path) -> dict[str, Any]:
    """A metadata value that holds a JSON object (safetensors metadata is ``str → str``)."""
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError as error:
        raise AdapterMismatchError(f"{path}: metadata {key!r} must be a JSON object, it is not JSON ({error}); the file is damaged") from error
    if not isinstance(value, dict):
        raise AdapterMismatchError(f"{path}: metadata {key!r} must be a JSON object, got {type(value).__name__}; the file is damaged")
    return value


def _check_tensor(name: str, tensor: torch.Tensor, path: Path) -> None:
    """Adapter tensors are finite floats: anything else would be cast silently or poison every feature."""
    if not tensor.is_floating_point():
        raise AdapterMismatchError(f"{path}: tensor {name} has dtype {tensor.dtype}, adapter tensors are floating point; the file was altered")
    if not torch.isfinite(tensor).all():
        raise AdapterMismatchError(
            f"{path}: tensor {name} holds NaN or inf values (a diverged run?); use an earlier adapter or retrain"
        )


def load_adapter(
    model: RetrievalModel,
    path: str | os.PathLike[str],
    allow_other_backbone_weights: bool = False,
) -> dict[str, Any]:
    """Load an adapter file onto ``model``, replacing its current adapter tensors.

    Args:
        model: a model built with the same method, config and backbone architecture.
        path: the ``.safetensors`` file written by :func:`save_adapter`.
        allow_other_backbone_weights: accept a backbone whose weights hash differs (e.g. another
            copy of the same architecture); the architecture must still match.

    Returns:
        The file's metadata, with ``config`` and ``backbone`` decoded.

    Raises:
        AdapterMismatchError: wrong method, config, architecture, backbone weights, keys or shapes.
    """
    path = Path(path)
    tensors, metadata = read_adapter_for(model, path, allow_other_backbone_weights)
    targets = model.trainable_state_dict()
    was_merged = model.lora_merged
    model.unmerge_lora()
    with torch.no_grad():
        for name, tensor in tensors.items():
            targets[name].copy_(tensor)
    if was_merged:
        model.merge_lora()
    return {**metadata, "config": _json_object(metadata, "config", path), "backbone": _json_object(metadata, "backbone", path)}


def read_adapter_for(
    model: RetrievalModel,
    path: str | os.PathLike[str],
    allow_other_backbone_weights: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of an adapter file, checked (as :func:`load_adapter` checks them) to fit
    ``model``, without touching it: for keeping several adapters of one model in memory.

    Raises:
        AdapterMismatchError: wrong method, config, architecture, backbone weights, keys or shapes.
    """
    path = Path(path)
    tensors, metadata = read_adapter(path)
    _check_compatible(model, metadata, path, allow_other_backbone_weights)
    targets = model.trainable_state_dict()
    missing, unexpected = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
    if missing or unexpected:
        raise AdapterMismatchError(f"{path}: tensor names differ from the model; missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in tensors.items():
        if tensor.shape != targets[name].shape:
            raise AdapterMismatchError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(targets[name].shape)}")
    return tensors, metadata


def _check_compatible(model: RetrievalModel, metadata: dict[str, str], path: Path, allow_other_weights: bool) -> None:
    if metadata.get("method") != model.method:
        raise AdapterMismatchError(f"{path}: adapter is for method {metadata.get('method')!r}, the model is {model.method!r}")
    model_config = dataclasses.asdict(model.config)
    defaults = {f.name: f.default for f in dataclasses.fields(model.config) if f.default is not dataclasses.MISSING}
    file_config = {**defaults, **_json_object(metadata, "config", path)}  # files from before a field existed
    init_only = model.entry.init_only_fields  # the method declares what an adapter file need not match
    differing = sorted(
        key for key in set(file_config) | set(model_config) if file_config.get(key) != model_config.get(key) and key not in init_only
    )
    if differing:
        details = ", ".join(f"{key}: file {file_config.get(key)!r} vs model {model_config.get(key)!r}" for key in differing)
        raise AdapterMismatchError(f"{path}: adapter config differs from the model's ({details}); build the model with the file's config")
    file_backbone = _json_object(metadata, "backbone", path)
    if file_backbone != model.backbone_spec.to_dict():
        raise AdapterMismatchError(
            f"{path}: adapter was trained on backbone architecture {file_backbone}, the model has {model.backbone_spec.to_dict()}"
        )
    if metadata.get("backbone_sha256") != model.backbone_sha256 and not allow_other_weights:
        raise AdapterMismatchError(
            f"{path}: adapter was trained on backbone weights {metadata.get('backbone_sha256', '?')[:12]}… "
            f"({metadata.get('backbone_source')}), the model's are {model.backbone_sha256[:12]}… ({model.backbone_source}). "
            "Pass allow_other_backbone_weights=True (CLI: --allow-other-backbone) if this is another copy of the same weights."
        )
