"""UP-Person: S-Prefix + K/V LoRA + L-Adapter in every block of both CLIP encoders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

from open_clip.model import CLIP
from open_clip.transformer import ResidualAttentionBlock, Transformer

from upperson.petl import AdaptedLayerNorm, KVLoRA, PETLAttention, ScaledPrefix
from upperson.petl.attention import AttentionBackend


@dataclass(frozen=True)
class UPPersonConfig:
    """Which UP-Person components go where, and how big they are.

    Depths count blocks: prefix and LoRA go into the *first* ``depth_*`` blocks, adapters into the
    *last* ``depth_adapter`` blocks (the official ``--depth_adapter k`` means "from block k on", i.e.
    ours = layers − k). ``None`` means every block of the encoder.
    """

    prefix: bool = True
    """Use S-Prefix (learned prefix keys/values with attention scale λ)."""
    prefix_length: int = 10
    """Prefix tokens per block L (paper: 10 CUHK-PEDES, 14 ICFG-PEDES, 2 RSTPReid)."""
    lambda_init: float = 10.0
    """Initial λ; the paper's 10 (the official final commit uses 100)."""
    learn_lambda: bool = True
    """Train λ; ``False`` with ``lambda_init=1`` is the vanilla prefix."""
    depth_prefix: int | None = None
    """Number of first blocks with a prefix; None = all."""
    lora: bool = True
    """Use LoRA on the key and value projections."""
    lora_rank: int = 32
    """LoRA rank r (paper: 32, 32, 16)."""
    depth_lora: int | None = None
    """Number of first blocks with LoRA; None = all."""
    adapter: bool = True
    """Use L-Adapters parallel to both LayerNorms of each block."""
    adapter_reduction: int = 8
    """Adapter bottleneck = width // reduction."""
    depth_adapter: int | None = None
    """Number of last blocks with adapters; None = all."""
    attention_backend: AttentionBackend = "sdpa"
    """``sdpa`` (fused, default) or ``explicit`` (official maths written out; for verification)."""

    def __post_init__(self) -> None:
        for name in ("prefix_length", "lora_rank", "adapter_reduction"):
            if getattr(self, name) < 1:
                raise ValueError(f"UPPersonConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("depth_prefix", "depth_lora", "depth_adapter"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"UPPersonConfig.{name} must be >= 0 or None, got {value}")
        if self.attention_backend not in get_args(AttentionBackend):
            raise ValueError(
                f"UPPersonConfig.attention_backend must be one of {get_args(AttentionBackend)}, "
                f"got {self.attention_backend!r}"
            )


def _blocks_with(depth: int | None, layers: int, from_end: bool = False) -> range:
    count = layers if depth is None else min(depth, layers)
    return range(layers - count, layers) if from_end else range(count)


def inject_up_person(clip: CLIP, config: UPPersonConfig) -> None:
    """Replace ``ln_1``, ``attn`` and ``ln_2`` of every selected block of both encoders, in place."""
    for tower in (clip.visual.transformer, clip.transformer):
        _inject_tower(tower, config)


def _inject_tower(tower: Transformer, config: UPPersonConfig) -> None:
    layers = len(tower.resblocks)
    prefix_blocks = _blocks_with(depth=config.depth_prefix, layers=layers) if config.prefix else range(0)
    lora_blocks = _blocks_with(depth=config.depth_lora, layers=layers) if config.lora else range(0)
    adapter_blocks = _blocks_with(config.depth_adapter, layers, from_end=True) if config.adapter else range(0)
    for index, block in enumerate(tower.resblocks):
        block: ResidualAttentionBlock
        width = block.attn.embed_dim
        device = block.attn.in_proj_weight.device
        lora = KVLoRA(width, config.lora_rank).to(device) if index in lora_blocks else None
        prefix = (
            ScaledPrefix(width, config.prefix_length, config.lambda_init, config.learn_lambda).to(device)
            if index in prefix_blocks
            else None
        )
        block.attn = PETLAttention(block.attn, lora=lora, prefix=prefix, backend=config.attention_backend)
        if index in adapter_blocks:
            block.ln_1 = AdaptedLayerNorm(block.ln_1, config.adapter_reduction)
            block.ln_2 = AdaptedLayerNorm(block.ln_2, config.adapter_reduction)
