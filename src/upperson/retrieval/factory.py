"""The one place that turns a run config and an adapter file into a model ready for inference.

Evaluation, gallery indexing and search, cross-domain matrices, the demo and the server all need the
same thing: the backbone loaded, the method injected, the adapter loaded (strictly), LoRA merged
into the frozen weights (no side branch at inference), eval mode, on the chosen device. Building it
in one place keeps those paths from drifting apart.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from upperson.adapter_file import load_adapter
from upperson.config import DataConfig, RunConfig
from upperson.methods import RetrievalModel, create_model
from upperson.runtime import resolve_device


def build_inference_model(
    config: RunConfig,
    adapter: str | os.PathLike[str] | None,
    device: torch.device | str | None = None,
    allow_other_backbone_weights: bool = False,
) -> RetrievalModel:
    """``config``'s backbone and method with ``adapter`` loaded, LoRA merged, in eval mode, on ``device``.

    Args:
        config: the run config the adapter was trained with (method, its options, backbone, image size).
        adapter: the adapter file; ``None`` only for methods with nothing to train (zero-shot).
        device: where the model goes; default ``config.device`` (``auto`` = CUDA if available).
        allow_other_backbone_weights: accept a backbone whose weights hash differs from the adapter's.

    Raises:
        ValueError: no adapter for a method that trains one.
        AdapterMismatchError: the adapter does not fit the config or backbone.
    """
    model = create_model(config.method, backbone=config.backbone, image_size=config.data.image_size, config=config.model)
    if adapter is not None:
        load_adapter(model, adapter, allow_other_backbone_weights=allow_other_backbone_weights)
    elif model.trainable_state_dict():
        raise ValueError(f"--adapter is required for method {config.method!r}: give the adapter file it trained (only zero-shot runs without one)")
    model.merge_lora()
    target = device if isinstance(device, torch.device) else resolve_device(device or config.device)
    return model.eval().to(target)


def inference_config(method: str, backbone: str, image_size: tuple[int, int], model: dict[str, Any] | Any) -> RunConfig:
    """A run config holding only what inference needs (e.g. rebuilt from a gallery index's metadata)."""
    return RunConfig(method=method, backbone=backbone, model=model, data=DataConfig(image_size=tuple(image_size)), device="cpu")
