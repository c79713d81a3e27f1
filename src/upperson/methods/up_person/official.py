"""UP-Person's official checkpoint layout (IRRA-based code, spec §7) mapped onto our model keys.

``{tower}`` = ``visual.`` for the vision encoder, empty for text:
    ``LORA_learner.lora_{image|text}.{l}.lora_{A|B}.{0|1}`` and ``...scale.{0|1}.scale`` (0 = K, 1 = V)
    ``{vit|text}_prefix_learner.{vit|text}_prefix.{l}.{key|val}.tokens`` / ``...scaler.scale`` / ``{l}.scale_to_grad``
    ``base_model.{tower}transformer.resblocks.{l}.adapter_ln_{msa|mlp}.{down|up}.{weight|bias}`` and ``.scale_{1|2}``
    ``base_model.<OpenAI CLIP key>`` for the frozen CLIP weights.
Alias keys ``base_model.{tower}transformer.resblocks.{l}.attn.prefix.*`` duplicate the prefix tensors
and are ignored.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from upperson.methods.registry import OfficialFormat
from upperson.methods.up_person.config import UPPersonConfig

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


_ALIAS = re.compile(r"^base_model\.(?:visual\.)?transformer\.resblocks\.\d+\.attn\.prefix\.")


def is_alias_key(key: str) -> bool:
    """Official checkpoints store each prefix tensor a second time under the attention module."""
    return _ALIAS.match(key) is not None


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


def official_config_from_state_dict(state_dict: Mapping[str, torch.Tensor], **overrides: object) -> UPPersonConfig:
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


_COMPONENT_PROBES = {
    "lora": re.compile(r"^LORA_learner\.lora_(?P<tower>image|text)\.(?P<l>\d+)\.lora_A\.0$"),
    "prefix": re.compile(r"^(?P<tower>vit|text)_prefix_learner\.(?:vit|text)_prefix\.(?P<l>\d+)\.key\.tokens$"),
    "adapter": re.compile(r"^base_model\.(?P<tower>visual\.|)transformer\.resblocks\.(?P<l>\d+)\.adapter_ln_msa\.down\.weight$"),
}


def is_up_person_checkpoint(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """UP-Person checkpoints hold LoRA, prefix or L-Adapter tensors under their official names."""
    return any(official_to_upperson_key(key) is not None for key in state_dict)


OFFICIAL_FORMAT = OfficialFormat(
    detect=is_up_person_checkpoint,
    map_key=official_to_upperson_key,
    read_config=official_config_from_state_dict,
    ignore_key=is_alias_key,
)
