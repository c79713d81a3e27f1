"""Image transforms of the official pipeline (spec B.5), built on torchvision.transforms.v2."""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel mean of CLIP's pre-processing (RGB, 0..1 scale)."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel standard deviation of CLIP's pre-processing."""

PAD = 10
"""Black border added before the random crop (404 x 148 before cropping at 384 x 128)."""


def build_transforms(
    image_size: tuple[int, int] = (384, 128),
    *,
    train: bool,
    augment: bool = True,
    erasing_prob: float = 0.5,
) -> v2.Compose:
    """PIL image → normalised ``[3, H, W]`` float tensor, as the official code prepares images.

    Args:
        image_size: ``(height, width)`` of the output.
        train: training pipeline (random flip, and with ``augment`` pad-crop and erasing) or the
            deterministic evaluation one.
        augment: the official ``--img_aug`` pipeline; without it training only flips.
        erasing_prob: probability of random erasing; erasing runs after normalisation and fills
            with the raw CLIP mean, exactly like the official code (so not black, spec C.17).
    """
    height, width = image_size
    resize = v2.Resize((height, width), interpolation=InterpolationMode.BILINEAR, antialias=True)
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(CLIP_MEAN, CLIP_STD)]
    if not train:
        return v2.Compose([resize, *to_tensor])
    if not augment:
        return v2.Compose([resize, v2.RandomHorizontalFlip(0.5), *to_tensor])
    return v2.Compose(
        [
            resize,
            v2.RandomHorizontalFlip(0.5),
            v2.Pad(PAD, fill=0),
            v2.RandomCrop((height, width)),
            *to_tensor,
            v2.RandomErasing(p=erasing_prob, scale=(0.02, 0.4), ratio=(0.3, 3.3), value=list(CLIP_MEAN)),
        ]
    )


def describe_eval_transforms(image_size: tuple[int, int]) -> dict[str, Any]:
    """The evaluation pipeline of `build_transforms` as data, for runtimes that re-implement it (exports).

    Read off the pipeline itself, so the description cannot drift from what evaluation runs.

    Raises:
        ValueError: the pipeline holds a step this description does not know.
    """
    description: dict[str, Any] = {"input": "RGB image (every PIL mode converted to RGB first)", "layout": "NCHW", "dtype": "float32"}
    for step in build_transforms(image_size, train=False).transforms:
        if isinstance(step, v2.Resize):
            description["resize"] = {
                "size": list(step.size),
                "interpolation": step.interpolation.value,
                "antialias": bool(step.antialias),
                "keep_aspect_ratio": len(step.size) == 1,  # (H, W): stretched to exactly that size
                "crop": None,
            }
        elif isinstance(step, v2.ToImage):
            continue
        elif isinstance(step, v2.ToDtype):
            description["scale"] = "pixel values / 255 (0..1)" if step.scale else "none"
        elif isinstance(step, v2.Normalize):
            description["mean"], description["std"] = list(step.mean), list(step.std)
            description["normalize"] = "(x - mean) / std per channel, after scaling"
        else:
            raise ValueError(f"describe_eval_transforms does not know the evaluation step {step!r}; add it here")
    return description
