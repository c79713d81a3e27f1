"""UP-Person: S-Prefix + K/V LoRA + L-Adapter in every block of both CLIP encoders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from open_clip.model import CLIP
from open_clip.transformer import ResidualAttentionBlock, Transformer

from upperson.petl import (
    AdaptedLayerNorm,
    PETLAttention,
    ScaledPrefix,
    SublayerAdaptedBlock,
    TunedLayerNorm,
)
from upperson.petl.adapter import AdapterConnection
from upperson.petl.attention import AttentionBackend
from upperson.petl.low_rank import LOW_RANK_UPDATES, build_low_rank_update

AdapterPlacement = Literal[
    "parallel-ln",
    "sequential-ln",
    "ln-tuning",
    "sequential-mha+sequential-mlp",
    "parallel-mha+parallel-mlp",
    "parallel-ln-mha+parallel-mlp",
    "parallel-mha+parallel-ln-mlp",
    "sequential-mha",
    "sequential-mlp",
    "parallel-mha",
    "parallel-mlp",
    "parallel-mha+sequential-mlp",
    "sequential-mha+parallel-mlp",
]
"""Where the adapters of a block go; ``+`` joins the MHA-side and the MLP-side choice (see
:attr:`UPPersonConfig.adapter_placement`)."""



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
    lora_type: str = "lora"
    """Low-rank update on K and V, a name of :data:`upperson.petl.low_rank.LOW_RANK_UPDATES`: ``lora``
    (UP-Person), ``dora`` (weight-decomposed LoRA) or ``wora`` (DoRA with learnable weights α, β on
    the update and the frozen weight), Table VI, same rank."""
    adapter: bool = True
    """Use the adapters of ``adapter_placement`` (default: L-Adapters parallel to both LayerNorms)."""
    adapter_placement: AdapterPlacement = "parallel-ln"
    """Adapter type and connection (Tables VIII, IX); one bottleneck adapter per site, built like the
    L-Adapter (width // adapter_reduction, zero-initialised up projection, scalar s):

    * ``parallel-ln``: UP-Person's L-Adapter, ``LN(x) + s·A(x)`` at ``ln_1`` and ``ln_2``
      (Table VIII "Parallel L-Adapter", Table IX No.1).
    * ``sequential-ln``: ``LN(x) + s·A(LN(x))`` at both LayerNorms (Table VIII "Sequential L-Adapter").
    * ``ln-tuning``: no adapter; trainable copies of the gain and bias of ``ln_1`` and ``ln_2``
      (Table VIII "LN-tuning"; ``ln_pre``/``ln_post``/``ln_final`` stay frozen).
    * ``sequential-mha+sequential-mlp``: vanilla adapter after each sublayer's output,
      ``x + f(x) + A(f(x))`` (Table VIII "Sequential Adapter").
    * ``parallel-mha+parallel-mlp``: vanilla adapter spanning each sublayer, ``x + f(x) + A(x)`` with
      ``x`` the pre-LN residual stream (Table VIII "Parallel Adapter", Table IX No.3).
    * ``parallel-ln-mha+parallel-mlp``: L-Adapter at ``ln_1``, parallel adapter spanning the MLP
      (Table IX No.2 "MHA L-Adapter, MLP Adapter").
    * ``parallel-mha+parallel-ln-mlp``: parallel adapter spanning the MHA, L-Adapter at ``ln_2``
      (Table IX No.4 "MHA Adapter, MLP L-Adapter").
    * ``sequential-mha``, ``sequential-mlp``, ``parallel-mha``, ``parallel-mlp``: one vanilla adapter
      on that sublayer only; ``parallel-mha+sequential-mlp``, ``sequential-mha+parallel-mlp``: mixed
      connections (not in the paper; for finer ablations).
    """
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
        for name, options in (
            ("attention_backend", AttentionBackend),
            ("adapter_placement", AdapterPlacement),
        ):
            if getattr(self, name) not in get_args(options):
                raise ValueError(f"UPPersonConfig.{name} must be one of {get_args(options)}, got {getattr(self, name)!r}")
        if self.lora_type not in LOW_RANK_UPDATES:
            raise ValueError(f"UPPersonConfig.lora_type must be one of {sorted(LOW_RANK_UPDATES)}, got {self.lora_type!r}")


def _blocks_with(depth: int | None, layers: int, from_end: bool = False) -> range:
    count = layers if depth is None else min(depth, layers)
    return range(layers - count, layers) if from_end else range(count)


def adapter_sites(placement: AdapterPlacement) -> dict[str, tuple[str, AdapterConnection | None]]:
    """``{"mha" | "mlp": (kind, connection)}`` for a placement; kind is ``ln``, ``sublayer`` or ``ln-tuning``.

    Tokens read ``<connection>-<site>``: site ``ln`` = the L-Adapter at both LayerNorms, ``ln-mha`` /
    ``ln-mlp`` = at the LayerNorm in front of that sublayer, ``mha`` / ``mlp`` = a vanilla adapter
    around the sublayer.
    """
    sites: dict[str, tuple[str, AdapterConnection | None]] = {}
    for token in placement.split("+"):
        if token == "ln-tuning":
            sites.update(mha=("ln-tuning", None), mlp=("ln-tuning", None))
            continue
        connection, _, site = token.partition("-")
        if site == "ln":
            sites.update(mha=("ln", connection), mlp=("ln", connection))
        elif site.startswith("ln-"):
            sites[site.removeprefix("ln-")] = ("ln", connection)
        else:
            sites[site] = ("sublayer", connection)
    return sites


def inject_up_person(clip: CLIP, config: UPPersonConfig) -> None:
    """Replace ``ln_1``, ``attn`` and ``ln_2`` of every selected block of both encoders, in place.

    Adapters around a whole sublayer (``adapter_placement`` with ``-mha`` / ``-mlp`` vanilla adapters)
    replace the block itself by a :class:`~upperson.petl.SublayerAdaptedBlock` holding the same children.
    """
    for tower in (clip.visual.transformer, clip.transformer):
        _inject_tower(tower, config)


def _inject_tower(tower: Transformer, config: UPPersonConfig) -> None:
    layers = len(tower.resblocks)
    prefix_blocks = _blocks_with(depth=config.depth_prefix, layers=layers) if config.prefix else range(0)
    lora_blocks = _blocks_with(depth=config.depth_lora, layers=layers) if config.lora else range(0)
    adapter_blocks = _blocks_with(config.depth_adapter, layers, from_end=True) if config.adapter else range(0)
    for index, block in enumerate(list(tower.resblocks)):
        block: ResidualAttentionBlock
        width = block.attn.embed_dim
        device = block.attn.in_proj_weight.device
        lora = build_low_rank_update(config.lora_type, block.attn.in_proj_weight, config.lora_rank) if index in lora_blocks else None
        prefix = (
            ScaledPrefix(width, config.prefix_length, config.lambda_init, config.learn_lambda).to(device)
            if index in prefix_blocks
            else None
        )
        block.attn = PETLAttention(block.attn, lora=lora, prefix=prefix, backend=config.attention_backend)
        if index in adapter_blocks:
            tower.resblocks[index] = _add_adapters(block, config)




def _add_adapters(block: ResidualAttentionBlock, config: UPPersonConfig) -> ResidualAttentionBlock | SublayerAdaptedBlock:
    """The block with the adapters of ``config.adapter_placement``; LayerNorm sites are replaced in place."""
    sites = adapter_sites(config.adapter_placement)
    for sublayer, norm_name in (("mha", "ln_1"), ("mlp", "ln_2")):
        kind, connection = sites.get(sublayer, ("", None))
        if kind == "ln":
            setattr(block, norm_name, AdaptedLayerNorm(getattr(block, norm_name), config.adapter_reduction, connection))
        elif kind == "ln-tuning":
            setattr(block, norm_name, TunedLayerNorm(getattr(block, norm_name)))
    spanning = {sublayer: connection for sublayer, (kind, connection) in sites.items() if kind == "sublayer"}
    if not spanning:
        return block
    return SublayerAdaptedBlock(block, config.adapter_reduction, mha=spanning.get("mha"), mlp=spanning.get("mlp"))
