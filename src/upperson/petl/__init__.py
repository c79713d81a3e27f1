"""Parameter-efficient building blocks, one technique per module."""

from upperson.petl.adapter import AdaptedLayerNorm, BottleneckAdapter, LayerNormAdapter
from upperson.petl.attention import PETLAttention
from upperson.petl.base import PETLModule
from upperson.petl.dora import KVDoRA
from upperson.petl.ln_tuning import LayerNormAffine, TunedLayerNorm
from upperson.petl.lora import KVLoRA, LowRankDelta
from upperson.petl.prefix import ScaledPrefix
from upperson.petl.sublayer_adapter import SublayerAdaptedBlock
from upperson.petl.wora import KVWoRA

__all__ = [
    "AdaptedLayerNorm",
    "BottleneckAdapter",
    "KVDoRA",
    "KVLoRA",
    "KVWoRA",
    "LayerNormAdapter",
    "LayerNormAffine",
    "LowRankDelta",
    "PETLAttention",
    "PETLModule",
    "ScaledPrefix",
    "SublayerAdaptedBlock",
    "TunedLayerNorm",
]
