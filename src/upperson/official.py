"""Importing the official UP-Person / CSKT model's ``state_dict`` (IRRA layout) onto an upperson model.

Official key layout (spec §7), ``{tower}`` = ``visual.`` for the vision encoder, empty for text:
    ``LORA_learner.lora_{image|text}.{l}.lora_{A|B}.{0|1}`` and ``...scale.{0|1}.scale`` (0 = K, 1 = V)
    ``{vit|text}_prefix_learner.{vit|text}_prefix.{l}.{key|val}.tokens`` / ``...scaler.scale`` / ``{l}.scale_to_grad``
    ``base_model.{tower}transformer.resblocks.{l}.adapter_ln_{msa|mlp}.{down|up}.{weight|bias}`` and ``.scale_{1|2}``
    ``base_model.<OpenAI CLIP key>`` for the frozen CLIP weights.
Alias keys ``base_model.{tower}transformer.resblocks.{l}.attn.prefix.*`` duplicate the prefix tensors
and are ignored. fp16 tensors are converted to fp32 by copying into our fp32 parameters.

Official CSKT layout (spec Part A): ``prompt_learner.{ctx|vision}`` (layer 0),
``prompt_learner.compound_prompts_{text|vision}.{k}`` (layer k+1), ``prompt_learner.{tmap|vmap}.*``
(layer-0 coupling), ``prompt_learner.compound_prompt_projections[_vision].{k}.*`` (layer k+1), and
``base_model.{tower}transformer.resblocks.{l}.{ln_3|adapter_mlp.down|adapter_mlp.up}.*``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from upperson.backbone.pos_embed import resize_visual_pos_embed
from upperson.methods import CSKTConfig, RetrievalModel, UPPersonConfig

logger = logging.getLogger(__name__)

_TOWER = {"image": "visual.", "vit": "visual.", "text": ""}
_KV = {"0": "key", "1": "value", "key": "key", "val": "value"}
_LN = {"msa": "1", "mlp": "2"}

_RULES: list[tuple[re.Pattern[str], str]] = [
    (
        re.compile(r"^LORA_learner\.lora_(?P<tower>image|text)\.(?P<l>\d+)\.lora_(?P<ab>[AB])\.(?P<kv>[01])$"),
        "clip.{tower}transformer.resblocks.{l}.attn.lora.{kv}.lora_{ab_lower}",
    ),
    (
        re.compile(r"^LORA_learner\.lora_(?P<tower>image|text)\.(?P<l>\d+)\.scale\.(?P<kv>[01])\.scale$"),
        "clip.{tower}transformer.resblocks.{l}.attn.lora.{kv}.scale",
    ),
    (
        re.compile(r"^(?P<tower>vit|text)_prefix_learner\.(?:vit|text)_prefix\.(?P<l>\d+)\.(?P<kv>key|val)\.tokens$"),
        "clip.{tower}transformer.resblocks.{l}.attn.prefix.{kv}_tokens",
    ),
    (
        re.compile(r"^(?P<tower>vit|text)_prefix_learner\.(?:vit|text)_prefix\.(?P<l>\d+)\.(?P<kv>key|val)\.scaler\.scale$"),
        "clip.{tower}transformer.resblocks.{l}.attn.prefix.{kv}_scale",
    ),
    (
        re.compile(r"^(?P<tower>vit|text)_prefix_learner\.(?:vit|text)_prefix\.(?P<l>\d+)\.scale_to_grad$"),
        "clip.{tower}transformer.resblocks.{l}.attn.prefix.attention_scale",
    ),
    (
        re.compile(
            r"^base_model\.(?P<tower>visual\.|)transformer\.resblocks\.(?P<l>\d+)\.adapter_ln_(?P<ln>msa|mlp)\.(?P<rest>(?:down|up)\.(?:weight|bias))$"
        ),
        "clip.{tower}transformer.resblocks.{l}.ln_{ln}.adapter.{rest}",
    ),
    (
        re.compile(r"^base_model\.(?P<tower>visual\.|)transformer\.resblocks\.(?P<l>\d+)\.scale_(?P<ln>[12])$"),
        "clip.{tower}transformer.resblocks.{l}.ln_{ln}.adapter.scale",
    ),
]
_CSKT_RULES: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(r"^prompt_learner\.ctx$"), lambda m: "clip.transformer.cskt_prompts.prompts.0"),
    (re.compile(r"^prompt_learner\.vision$"), lambda m: "clip.visual.cskt_prompts.prompts.0"),
    (
        re.compile(r"^prompt_learner\.compound_prompts_(?P<tower>text|vision)\.(?P<k>\d+)$"),
        lambda m: f"clip.{_CSKT_TOWER[m['tower']]}cskt_prompts.prompts.{int(m['k']) + 1}",
    ),
    (re.compile(r"^prompt_learner\.tmap\.(?P<p>weight|bias)$"), lambda m: f"clip.transformer.cskt_coupling.layers.0.{m['p']}"),
    (re.compile(r"^prompt_learner\.vmap\.(?P<p>weight|bias)$"), lambda m: f"clip.visual.cskt_coupling.layers.0.{m['p']}"),
    (
        re.compile(r"^prompt_learner\.compound_prompt_projections(?P<vision>_vision)?\.(?P<k>\d+)\.(?P<p>weight|bias)$"),
        lambda m: f"clip.{'visual.' if m['vision'] else 'transformer.'}cskt_coupling.layers.{int(m['k']) + 1}.{m['p']}",
    ),
    (
        re.compile(r"^base_model\.(?P<tower>visual\.|)transformer\.resblocks\.(?P<l>\d+)\.ln_3\.(?P<p>weight|bias)$"),
        lambda m: f"clip.{m['tower']}transformer.resblocks.{m['l']}.cskt_adapter.ln.{m['p']}",
    ),
    (
        re.compile(r"^base_model\.(?P<tower>visual\.|)transformer\.resblocks\.(?P<l>\d+)\.adapter_mlp\.(?P<rest>(?:down|up)\.(?:weight|bias))$"),
        lambda m: f"clip.{m['tower']}transformer.resblocks.{m['l']}.cskt_adapter.{m['rest']}",
    ),
]
_CSKT_TOWER = {"text": "transformer.", "vision": "visual."}
_ALIAS = re.compile(r"^base_model\.(?:visual\.)?transformer\.resblocks\.\d+\.attn\.prefix\.")


@dataclass
class ImportReport:
    """What an official import touched."""

    petl_tensors: int = 0
    backbone_tensors: int = 0
    ignored_aliases: int = 0
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def official_to_upperson_key(key: str) -> str | None:
    """Our model key for an official PETL key, or ``None`` if ``key`` is not a PETL tensor."""
    for pattern, template in _RULES:
        match = pattern.match(key)
        if match is None:
            continue
        groups = match.groupdict()
        tower = groups.get("tower", "")
        return template.format(
            tower=_TOWER.get(tower, tower),
            l=groups["l"],
            kv=_KV.get(groups.get("kv", ""), ""),
            ab_lower=groups.get("ab", "").lower(),
            ln=_LN.get(groups.get("ln", ""), groups.get("ln", "")),
            rest=groups.get("rest", ""),
        )
    return None


def cskt_official_to_upperson_key(key: str) -> str | None:
    """Our model key for an official CSKT trainable key, or ``None`` if ``key`` is not one."""
    for pattern, target in _CSKT_RULES:
        match = pattern.match(key)
        if match is not None:
            return target(match)
    return None


_KEY_MAPPERS: dict[str, Callable[[str], str | None]] = {
    "up-person": official_to_upperson_key,
    "cskt": cskt_official_to_upperson_key,
}


def import_official_state_dict(
    model: RetrievalModel,
    state_dict: dict[str, torch.Tensor],
    load_backbone: bool = True,
    strict: bool = True,
) -> ImportReport:
    """Copy an official UP-Person or CSKT ``state_dict`` into ``model`` (PETL tensors and, optionally, CLIP).

    The layout is chosen by ``model.method``.

    Args:
        model: an ``up-person`` model whose config matches the checkpoint (prefix length, rank,
            depths, reduction; see :func:`upperson.official_config_from_state_dict`) or a ``cskt``
            model (prompt length, depth, reduction).
        state_dict: the official model object's ``state_dict()`` (a ``{"model": ...}`` wrapper is unwrapped).
        load_backbone: also copy the CLIP weights under ``base_model.``.
        strict: raise if a PETL tensor of the model is not in the checkpoint or a key is not understood.

    Raises:
        ValueError: unknown/missing keys (strict) or shape mismatches, naming the keys.
    """
    if model.method not in _KEY_MAPPERS:
        raise ValueError(f"official checkpoints import onto {sorted(_KEY_MAPPERS)} models, not {model.method!r}")
    to_ours = _KEY_MAPPERS[model.method]
    state_dict = state_dict.get("model", state_dict) if isinstance(state_dict.get("model"), dict) else state_dict
    targets = model.state_dict(keep_vars=True)
    petl_keys = set(model.trainable_state_dict())
    report = ImportReport()
    assignments: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        key = key.removeprefix("module.")
        ours = to_ours(key)
        if ours is None and model.method == "up-person" and _ALIAS.match(key):
            report.ignored_aliases += 1
            continue
        if ours is None and key.startswith("base_model."):
            if not load_backbone:
                continue
            ours = "clip." + key.removeprefix("base_model.")
            if ours == "clip.visual.positional_embedding" and ours in targets and tensor.shape != targets[ours].shape:
                tensor = resize_visual_pos_embed(tensor, model.clip.visual.grid_size)
        if ours is None or ours not in targets:
            report.unexpected.append(key)
            continue
        if tensor.shape != targets[ours].shape:
            raise ValueError(f"official key {key}: shape {tuple(tensor.shape)} does not fit {ours} {tuple(targets[ours].shape)}")
        assignments[ours] = tensor
    report.missing = sorted(petl_keys - set(assignments))
    if strict and (report.missing or report.unexpected):
        raise ValueError(
            f"official state dict does not match this model's config: missing {report.missing[:6]} "
            f"({len(report.missing)}), not understood {report.unexpected[:6]} ({len(report.unexpected)})"
        )
    model.unmerge_lora()
    with torch.no_grad():
        for ours, tensor in assignments.items():
            targets[ours].copy_(tensor.to(targets[ours].dtype))
    report.petl_tensors = sum(1 for key in assignments if key in petl_keys)
    report.backbone_tensors = len(assignments) - report.petl_tensors
    if report.backbone_tensors:
        model.refresh_backbone_fingerprint()
    logger.info(
        "imported %d PETL and %d CLIP tensors (%d alias keys ignored)",
        report.petl_tensors,
        report.backbone_tensors,
        report.ignored_aliases,
    )
    return report


def official_config_from_state_dict(state_dict: dict[str, torch.Tensor], **overrides: object) -> UPPersonConfig:
    """Read prefix length, LoRA rank, adapter reduction and depths from an official checkpoint.

    A depth is ``None`` (every block) when the component is in every block of both encoders.
    """
    found: dict[str, dict[str, dict[int, torch.Tensor]]] = {"lora": {}, "prefix": {}, "adapter": {}}
    for key, tensor in state_dict.items():
        for component, pattern in _COMPONENT_PROBES.items():
            match = pattern.match(key)
            if match:
                tower = "vision" if match["tower"] in ("image", "vit", "visual.") else "text"
                found[component].setdefault(tower, {})[int(match["l"])] = tensor
    layers = {
        tower: len({k.split(".")[stem.count(".")] for k in state_dict if k.startswith(stem)})
        for tower, stem in (("vision", "base_model.visual.transformer.resblocks."), ("text", "base_model.transformer.resblocks."))
    }

    def depth(component: str) -> int | None:
        per_tower = found[component]
        if all(len(per_tower.get(tower, {})) == count for tower, count in layers.items()):
            return None
        return max(len(blocks) for blocks in per_tower.values())

    def first(component: str) -> torch.Tensor | None:
        return next((t for blocks in found[component].values() for t in blocks.values()), None)

    lora, prefix, adapter = first("lora"), first("prefix"), first("adapter")
    fields: dict[str, object] = {
        "prefix": prefix is not None,
        "prefix_length": prefix.shape[0] if prefix is not None else 10,
        "depth_prefix": depth("prefix") if prefix is not None else None,
        "lora": lora is not None,
        "lora_rank": lora.shape[0] if lora is not None else 32,
        "depth_lora": depth("lora") if lora is not None else None,
        "adapter": adapter is not None,
        "adapter_reduction": adapter.shape[1] // adapter.shape[0] if adapter is not None else 8,
        "depth_adapter": depth("adapter") if adapter is not None else None,
    }
    fields.update(overrides)
    return UPPersonConfig(**fields)


def official_backbone_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CLIP weights inside an official checkpoint, in the OpenAI key layout."""
    return {
        key.removeprefix("base_model."): tensor
        for key, tensor in state_dict.items()
        if key.startswith("base_model.")
        and official_to_upperson_key(key) is None
        and cskt_official_to_upperson_key(key) is None
        and not _ALIAS.match(key)
    }


def official_method(state_dict: dict[str, torch.Tensor]) -> str:
    """``cskt`` for a checkpoint with CSKT's prompt learner, else ``up-person``."""
    return "cskt" if any(key.startswith("prompt_learner.") for key in state_dict) else "up-person"


def cskt_config_from_state_dict(state_dict: dict[str, torch.Tensor], **overrides: object) -> CSKTConfig:
    """Read prompt length, prompted depth and adapter reduction from an official CSKT checkpoint."""
    ctx = state_dict.get("prompt_learner.ctx")
    down = next((t for k, t in state_dict.items() if k.endswith("adapter_mlp.down.weight")), None)
    deep = sum(1 for key in state_dict if re.match(r"^prompt_learner\.compound_prompts_text\.\d+$", key))
    fields: dict[str, object] = {
        "prompts": ctx is not None,
        "prompt_length": ctx.shape[0] if ctx is not None else 4,
        "depth": deep + 1 if ctx is not None else None,
        "adapters": down is not None,
        "adapter_reduction": down.shape[1] // down.shape[0] if down is not None else 8,
    }
    fields.update(overrides)
    return CSKTConfig(**fields)


_COMPONENT_PROBES = {
    "lora": re.compile(r"^LORA_learner\.lora_(?P<tower>image|text)\.(?P<l>\d+)\.lora_A\.0$"),
    "prefix": re.compile(r"^(?P<tower>vit|text)_prefix_learner\.(?:vit|text)_prefix\.(?P<l>\d+)\.key\.tokens$"),
    "adapter": re.compile(r"^base_model\.(?P<tower>visual\.|)transformer\.resblocks\.(?P<l>\d+)\.adapter_ln_msa\.down\.weight$"),
}
