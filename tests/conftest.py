"""Shared fixtures: tiny random CLIPs and official-layout state dicts the tests make themselves."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import upperson  # noqa: E402

SMALL_IMAGE = (64, 32)  # non-square, 4x2 patches of 16


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


def make_model(**options) -> upperson.RetrievalModel:
    options.setdefault("prefix_length", 3)
    options.setdefault("lora_rank", 4)
    image_size = options.pop("image_size", SMALL_IMAGE)
    return upperson.create_model("up-person", backbone="tiny", image_size=image_size, **options)


def randomise_petl(model: upperson.RetrievalModel, seed: int = 1) -> None:
    """Move every PETL tensor away from its init so that no path hides behind a zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.trainable_state_dict().items():
            noise = torch.randn(tensor.shape, generator=generator)
            if tensor.dim() == 0:
                tensor.copy_(1.0 + 0.3 * noise)
            else:
                tensor.add_(0.05 * noise)
        for module in model.modules():
            if isinstance(module, upperson.petl.ScaledPrefix):
                module.attention_scale.mul_(0.3)


def sample_batch(image_size=SMALL_IMAGE, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    images = torch.randn(batch, 3, *image_size, generator=generator)
    captions = [
        "a woman in a red coat carrying a black backpack",
        "man, grey jacket & blue jeans; white shoes!",
        "The girl wears a striped dress.",
        "a person with a hat",
    ][:batch]
    pids = torch.tensor([0, 1, 0, 2][:batch])
    return images, upperson.tokenize(captions), pids
