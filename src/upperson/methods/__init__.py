"""Methods: each composes PETL pieces on a backbone and declares itself on a registry entry.

Importing this package registers the built-in methods (up-person, cskt, zero-shot, full-finetune).
A new method is a module that builds a :class:`MethodEntry` and calls :func:`register_method`;
nothing here or in other generic modules names it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from upperson.backbone.loading import Backbone, load_backbone
from upperson.methods.model import ParameterReport, RetrievalModel
from upperson.methods.registry import (
    METHODS,
    ExtraLossTerms,
    MethodEntry,
    MethodOptionError,
    OfficialFormat,
    get_method,
    register_method,
    unregister_method,
)
from upperson.methods.baselines import FullFinetuneConfig, ZeroShotConfig
from upperson.methods.cskt import CSKTConfig
from upperson.methods.up_person import UPPersonConfig


def build_method_config(method: str, config: Any = None, **options: Any) -> Any:
    """A method's config from a config object and/or keyword options (options win)."""
    entry = get_method(method)
    valid = {f.name for f in dataclasses.fields(entry.config_class)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(f"unknown {method} option(s) {unknown}; valid options: {sorted(valid)}")
    if config is None:
        return entry.config_class(**options)
    if isinstance(config, dict):
        return build_method_config(method, **{**config, **options})
    if not isinstance(config, entry.config_class):
        raise TypeError(f"{method} expects a {entry.config_class.__name__}, got {type(config).__name__}")
    return dataclasses.replace(config, **options)


def create_model(
    method: str = "up-person",
    backbone: str = "tiny",
    image_size: int | tuple[int, int] = (384, 128),
    config: Any = None,
    **options: Any,
) -> RetrievalModel:
    """Load a frozen CLIP and inject a method's PETL modules.

    Args:
        method: a key of :data:`METHODS`, e.g. ``"up-person"``.
        backbone: ``"tiny"``, a checkpoint path, or ``"<open_clip name>[:<tag or file>]"``.
        image_size: ``(height, width)`` or a side length; the positional embedding is resized.
        config: the method's config dataclass (or a dict of its fields).
        **options: config fields, overriding ``config``; e.g. ``prefix_length=10, lora_rank=32``.
    """
    method_config = build_method_config(method, config, **options)
    return build_model(load_backbone(backbone, image_size), method, method_config)


def build_model(backbone: Backbone, method: str, config: Any) -> RetrievalModel:
    """Inject ``method`` (configured by ``config``) into an already loaded backbone."""
    entry = get_method(method)
    method_config = build_method_config(method, config)
    entry.inject(backbone.clip, method_config)
    return RetrievalModel(backbone, entry, method_config)


__all__ = [
    "CSKTConfig",
    "ExtraLossTerms",
    "FullFinetuneConfig",
    "METHODS",
    "MethodEntry",
    "MethodOptionError",
    "OfficialFormat",
    "ParameterReport",
    "RetrievalModel",
    "UPPersonConfig",
    "ZeroShotConfig",
    "build_method_config",
    "build_model",
    "create_model",
    "get_method",
    "register_method",
    "unregister_method",
]
