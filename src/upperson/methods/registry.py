"""The method registry: every method declares what it is on one entry; generic code only asks the entry.

A method is one module or folder under ``methods/`` that builds a :class:`MethodEntry` and calls
:func:`register_method`. The model, the trainer, adapter files, ablation tables, official imports
and the CLI read everything method-specific from the entry (its config class, which config fields
an adapter file must match, which losses it can train with, how official checkpoints map, how it is
named in reports, extra loss terms), so adding a method touches no generic module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from upperson.losses import LOSS_NAMES

if TYPE_CHECKING:
    from open_clip.model import CLIP

    from upperson.methods.model import RetrievalModel


class MethodOptionError(ValueError):
    """A method config field has an invalid value; ``field`` names it so errors can say ``model.<field>``."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


ExtraLossTerms = Callable[["RetrievalModel", torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
"""``(model, image_features [B, D], text_features [B, D], pids [B]) → {name: scalar loss}``, added to the
configured losses in every training step (e.g. a regulariser on the method's own tensors)."""


@dataclass(frozen=True)
class OfficialFormat:
    """How a method's official checkpoint (IRRA layout) maps onto an upperson model."""

    detect: Callable[[Mapping[str, torch.Tensor]], bool]
    """Whether a state dict is this method's (looked at only when no earlier entry claimed it)."""
    map_key: Callable[[str], str | None]
    """Official trainable key → our model key, or ``None`` when the key is not one of the method's tensors."""
    read_config: Callable[..., Any]
    """``(state_dict, **overrides) → config``: sizes and depths read off the tensors."""
    ignore_key: Callable[[str], bool] = lambda key: False
    """Keys the official code stores twice (aliases); skipped on import."""


@dataclass(frozen=True)
class MethodEntry:
    """Everything generic code needs to know about a method."""

    name: str
    """Registry name used in configs (``method: up-person``) and adapter files."""
    config_class: type
    """Frozen dataclass of the method's options (the typed ``model:`` section)."""
    inject: Callable[["CLIP", Any], None]
    """Adds the method's modules to a loaded CLIP, in place (once, at build time)."""
    summary: str = ""
    """One line for ``--help`` texts and reports."""
    init_only_fields: frozenset[str] = frozenset()
    """Config fields that only set initial values or pick a kernel: an adapter file need not match them.
    Every other field is structural (decides which tensors exist or what they compute)."""
    losses: frozenset[str] = frozenset(LOSS_NAMES)
    """Training losses this method supports (``mlm`` needs token-level features of both encoders)."""
    trains: bool = True
    """False for methods with nothing to train (zero-shot): they are evaluated, never trained."""
    trains_backbone: bool = False
    """Full fine-tuning: every CLIP weight (but ``logit_scale``) trains and is saved."""
    official: OfficialFormat | None = None
    """Importer of the official implementation's checkpoints, if one exists."""
    parameter_columns: tuple[str, ...] = ()
    """Components always shown in parameter reports (others appear when present)."""
    describe: Callable[[Any], str] | None = None
    """The components column of ablation tables for a config (default: the method name)."""
    encode_image: Callable[["CLIP", torch.Tensor], torch.Tensor] | None = None
    """Replaces ``clip.encode_image(images, normalize=False)`` when the method inserts tokens."""
    encode_text: Callable[["CLIP", torch.Tensor], torch.Tensor] | None = None
    """Replaces ``clip.encode_text(ids, normalize=False)``."""
    extra_loss_terms: ExtraLossTerms | None = None
    """Loss terms the method adds to every training step, beyond ``train.losses``."""

    def __post_init__(self) -> None:
        if not dataclasses.is_dataclass(self.config_class):
            raise TypeError(f"method {self.name!r}: config_class must be a dataclass, got {self.config_class!r}")
        fields = {item.name for item in dataclasses.fields(self.config_class)}
        unknown = sorted(self.init_only_fields - fields)
        if unknown:
            raise ValueError(f"method {self.name!r}: init_only_fields {unknown} are not fields of {self.config_class.__name__}")
        unsupported = sorted(self.losses - set(LOSS_NAMES))
        if unsupported:
            raise ValueError(f"method {self.name!r}: unknown losses {unsupported}; known: {list(LOSS_NAMES)}")
        if "mlm" in self.losses and (self.encode_image is not None or self.encode_text is not None):
            raise ValueError(f"method {self.name!r}: 'mlm' needs the plain token flow, but the method has its own encoders")

    @property
    def structural_fields(self) -> frozenset[str]:
        """Config fields an adapter file must match."""
        return frozenset(item.name for item in dataclasses.fields(self.config_class)) - self.init_only_fields

    def describe_config(self, config: Any) -> str:
        """Components summary for reports: the method's own, or its name plus every changed option."""
        return self.describe(config) if self.describe is not None else self.name + changed_options(config)


def changed_options(config: Any, shown: frozenset[str] | set[str] = frozenset()) -> str:
    """`` [name=value, ...]`` for the options of ``config`` that differ from their defaults (not in ``shown``)."""
    changed = [
        f"{item.name}={getattr(config, item.name)}"
        for item in dataclasses.fields(config)
        if item.name not in shown and item.default is not dataclasses.MISSING and getattr(config, item.name) != item.default
    ]
    return f" [{', '.join(changed)}]" if changed else ""


METHODS: dict[str, MethodEntry] = {}
"""Registered methods by name; filled by the method modules when :mod:`upperson.methods` is imported."""


def register_method(entry: MethodEntry, replace: bool = False) -> MethodEntry:
    """Make ``entry`` available by name to configs, the CLI and every generic module."""
    if entry.name in METHODS and not replace:
        raise ValueError(f"method {entry.name!r} is already registered; pass replace=True to redefine it")
    METHODS[entry.name] = entry
    return entry


def unregister_method(name: str) -> None:
    """Remove a registered method (for plug-ins and tests that register temporary ones)."""
    METHODS.pop(name, None)


def get_method(name: str) -> MethodEntry:
    """The entry of ``name``; unknown names list the registered ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]
