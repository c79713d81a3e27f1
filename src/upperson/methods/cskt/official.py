"""CSKT's official checkpoint layout (spec Part A) mapped onto our model keys.

``prompt_learner.{ctx|vision}`` (layer 0), ``prompt_learner.compound_prompts_{text|vision}.{k}`` (layer k+1),
``prompt_learner.{tmap|vmap}.*`` (layer-0 coupling), ``prompt_learner.compound_prompt_projections[_vision].{k}.*``
(layer k+1), and ``base_model.{tower}transformer.resblocks.{l}.{ln_3|adapter_mlp.down|adapter_mlp.up}.*``.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import torch

from upperson.methods.cskt.config import CSKTConfig
from upperson.methods.registry import OfficialFormat

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


def cskt_official_to_upperson_key(key: str) -> str | None:
    """Our model key for an official CSKT trainable key, or ``None`` if ``key`` is not one."""
    for pattern, target in _CSKT_RULES:
        match = pattern.match(key)
        if match is not None:
            return target(match)
    return None


def cskt_config_from_state_dict(state_dict: Mapping[str, torch.Tensor], **overrides: object) -> CSKTConfig:
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


def is_cskt_checkpoint(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """CSKT checkpoints hold its prompt learner."""
    return any(key.startswith("prompt_learner.") for key in state_dict)


OFFICIAL_FORMAT = OfficialFormat(detect=is_cskt_checkpoint, map_key=cskt_official_to_upperson_key, read_config=cskt_config_from_state_dict)
