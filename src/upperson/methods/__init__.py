"""Methods: each composes PETL pieces on a backbone. A registry maps names to them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from open_clip.model import CLIP

from upperson.backbone.loading import Backbone, load_backbone
from upperson.methods.model import ParameterReport, RetrievalModel
from upperson.methods import cskt
from upperson.methods.baselines import FullFinetuneConfig, ZeroShotConfig, inject_nothing
from upperson.methods.cskt import CSKTConfig
from upperson.methods.up_person import UPPersonConfig, inject_up_person


@dataclass(frozen=True)
class MethodEntry:
    """How a method is configured, put into a CLIP, and (if it changes the token flow) run."""

    config_class: type
    inject: Callable[[CLIP, Any], None]
    encode_image: Callable[[CLIP, torch.Tensor], torch.Tensor] | None = None
    """Replaces ``clip.encode_image(images, normalize=False)`` when the method inserts tokens."""
    encode_text: Callable[[CLIP, torch.Tensor], torch.Tensor] | None = None
    """Replaces ``clip.encode_text(ids, normalize=False)``."""
    trains_backbone: bool = False
    """Full fine-tuning: every CLIP weight (but ``logit_scale``) trains and is saved."""


METHODS: dict[str, MethodEntry] = {
    "up-person": MethodEntry(UPPersonConfig, inject_up_person),
    "cskt": MethodEntry(CSKTConfig, cskt.inject_cskt, encode_image=cskt.encode_image, encode_text=cskt.encode_text),
    "zero-shot": MethodEntry(ZeroShotConfig, inject_nothing),
    "full-finetune": MethodEntry(FullFinetuneConfig, inject_nothing, trains_backbone=True),
}


def build_method_config(method: str, config: Any = None, **options: Any) -> Any:
    """A method's config from a config object and/or keyword options (options win)."""
    entry = _method_entry(method)
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
    method_config = build_method_config(method, config)
    entry = METHODS[method]
    entry.inject(backbone.clip, method_config)
    return RetrievalModel(
        backbone,
        method,
        method_config,
        image_encoder=entry.encode_image,
        text_encoder=entry.encode_text,
        trains_backbone=entry.trains_backbone,
    )


def _method_entry(method: str) -> MethodEntry:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {sorted(METHODS)}")
    return METHODS[method]


__all__ = ["CSKTConfig", "FullFinetuneConfig", "METHODS", "ZeroShotConfig", "ParameterReport", "RetrievalModel", "UPPersonConfig", "build_method_config", "build_model", "create_model"]
