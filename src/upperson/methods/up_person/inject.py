"""UP-Person: S-Prefix + K/V LoRA + L-Adapter in every block of both CLIP encoders."""

from __future__ import annotations

from open_clip.model import CLIP
from open_clip.transformer import ResidualAttentionBlock, Transformer

from upperson.methods.up_person.config import AdapterPlacement, UPPersonConfig
from upperson.petl import (
    AdaptedLayerNorm,
    PETLAttention,
    ScaledPrefix,
    SublayerAdaptedBlock,
    TunedLayerNorm,
)
from upperson.petl.adapter import AdapterConnection
from upperson.petl.low_rank import build_low_rank_update


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
