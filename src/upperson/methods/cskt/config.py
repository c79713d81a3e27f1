"""CSKT's typed configuration (paper and official run: C 4, depth 12, reduction 8)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from upperson.methods.registry import MethodOptionError

PromptInit = Literal["paper", "official"]


@dataclass(frozen=True)
class CSKTConfig:
    """CSKT's components and sizes (paper and official run: C 4, depth 12, reduction 8)."""

    prompts: bool = True
    """Bidirectional prompts with coupling layers (BPT)."""
    prompt_length: int = 4
    """Prompt vectors C per modality and layer; each encoder sees 2C prompt tokens."""
    depth: int | None = None
    """First blocks with prompt sets; None = every block (official ``--depth 12``)."""
    prompt_init: PromptInit = "paper"
    """Layer-0 text prompts: ``paper`` = CLIP's embeddings of the first C tokens of
    "a photo of a person or a pedestrian"; ``official`` = rows of a random N(0, 0.02) table at
    those token ids (what the official code really does: rows 0 and 3 equal for C = 4)."""
    adapters: bool = True
    """Dual adapters beside every MLP (DAT)."""
    adapter_reduction: int = 8
    """Adapter bottleneck = width // reduction."""
    text_adapter_scale: float = 4.0
    vision_adapter_scale: float = 0.1

    def __post_init__(self) -> None:
        for name in ("prompt_length", "adapter_reduction"):
            if getattr(self, name) < 1:
                raise MethodOptionError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.depth is not None and self.depth < 1:
            raise MethodOptionError("depth", f"must be >= 1 or null (every block), got {self.depth}")
        if self.prompt_init not in get_args(PromptInit):
            raise MethodOptionError("prompt_init", f"must be one of {', '.join(get_args(PromptInit))}; got {self.prompt_init!r}")


INIT_ONLY_FIELDS = frozenset({"prompt_init"})
"""``prompt_init`` only sets the layer-0 text prompts' initial values; adapter files need not match it."""
