"""Parameter-efficient building blocks, one technique per module."""

from upperson.petl.adapter import AdaptedLayerNorm, LayerNormAdapter
from upperson.petl.attention import PETLAttention
from upperson.petl.base import PETLModule
from upperson.petl.lora import KVLoRA, LowRankDelta
from upperson.petl.prefix import ScaledPrefix

__all__ = [
    "AdaptedLayerNorm",
    "KVLoRA",
    "LayerNormAdapter",
    "LowRankDelta",
    "PETLAttention",
    "PETLModule",
    "ScaledPrefix",
]
