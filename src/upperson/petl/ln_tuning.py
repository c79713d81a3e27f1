"""LN-tuning: train the gain and bias of a block's LayerNorm (UP-Person Table VIII baseline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm
from torch import nn

from upperson.petl.base import PETLModule


class LayerNormAffine(PETLModule):
    """Trainable copies of a LayerNorm's gain and bias, starting at the frozen values.

    Copies instead of unfreezing the originals keep freezing structural (only PETL modules train)
    and leave the CLIP tensors untouched, so the backbone fingerprint and adapter file stay valid.
    """

    component = "ln"

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        if norm.weight is None or norm.bias is None:
            raise ValueError("LN-tuning needs a LayerNorm with a gain and a bias (elementwise_affine=True, bias=True)")
        self.weight = nn.Parameter(torch.empty_like(norm.weight))
        self.bias = nn.Parameter(torch.empty_like(norm.bias))
        self.register_buffer("initial_weight", norm.weight.detach().clone(), persistent=False)
        self.register_buffer("initial_bias", norm.bias.detach().clone(), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.copy_(self.initial_weight)
        self.bias.copy_(self.initial_bias)


class TunedLayerNorm(LayerNorm):
    """A block's LayerNorm computed with :class:`LayerNormAffine`'s trainable gain and bias.

    The frozen ``weight`` / ``bias`` stay registered under their CLIP keys (unused in the forward),
    so state-dict keys and the backbone fingerprint do not change on injection.
    """

    def __init__(self, norm: nn.LayerNorm) -> None:
        width = norm.normalized_shape[0]
        super().__init__(width, eps=norm.eps, device=norm.weight.device, dtype=norm.weight.dtype)
        self.weight = norm.weight
        self.bias = norm.bias
        self.tuned = LayerNormAffine(norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x, self.normalized_shape, self.tuned.weight, self.tuned.bias, self.eps)
        return out.to(x.dtype)  # open_clip's LayerNorm casts back to the input dtype too
