"""The reference rows of the papers' tables: frozen CLIP zero-shot, and full fine-tuning of CLIP."""

from __future__ import annotations

from dataclasses import dataclass

from open_clip.model import CLIP

from upperson.methods.registry import MethodEntry, register_method


@dataclass(frozen=True)
class ZeroShotConfig:
    """Frozen CLIP as released: nothing trains; evaluate with ``upperson eval`` (no adapter file)."""


@dataclass(frozen=True)
class FullFinetuneConfig:
    """Every CLIP weight trains (IRRA's CLIP baseline recipe: lr 1e-5, bias lr x2, SDM).

    CLIP's ``logit_scale`` stays frozen: the temperature is the fixed 0.02 of every method here.
    The "adapter" file of this method holds the whole fine-tuned CLIP.
    """


def inject_nothing(clip: CLIP, config: object) -> None:
    """Neither baseline adds modules; what trains is decided by the method entry."""


ZERO_SHOT = register_method(
    MethodEntry(
        name="zero-shot",
        config_class=ZeroShotConfig,
        inject=inject_nothing,
        summary="frozen CLIP as released (evaluation only)",
        losses=frozenset(),
        trains=False,
    )
)
FULL_FINETUNE = register_method(
    MethodEntry(
        name="full-finetune",
        config_class=FullFinetuneConfig,
        inject=inject_nothing,
        summary="every CLIP weight trains (IRRA's CLIP baseline)",
        trains_backbone=True,
    )
)
