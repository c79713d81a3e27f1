"""UP-Person's typed configuration: which components go where, and how big they are."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from upperson.methods.registry import MethodOptionError, changed_options
from upperson.petl.attention import AttentionBackend
from upperson.petl.low_rank import LOW_RANK_UPDATES

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
                raise MethodOptionError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("depth_prefix", "depth_lora", "depth_adapter"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise MethodOptionError(name, f"must be >= 0 or null (every block), got {value}")
        for name, options in (("attention_backend", get_args(AttentionBackend)), ("adapter_placement", get_args(AdapterPlacement))):
            if getattr(self, name) not in options:
                raise MethodOptionError(name, f"must be one of {', '.join(options)}; got {getattr(self, name)!r}")
        if self.lora_type not in LOW_RANK_UPDATES:
            raise MethodOptionError("lora_type", f"must be one of {', '.join(sorted(LOW_RANK_UPDATES))}; got {self.lora_type!r}")
        if self.lambda_init <= 0 and self.prefix:
            raise MethodOptionError("lambda_init", f"must be > 0 (it scales the prefix attention), got {self.lambda_init}")


INIT_ONLY_FIELDS = frozenset({"lambda_init", "attention_backend"})
"""Fields that only set an initial value or pick the attention kernel; adapter files need not match them."""

_NAMED_FIELDS = frozenset(
    {"prefix", "prefix_length", "depth_prefix", "lora", "lora_rank", "depth_lora", "adapter", "adapter_reduction", "depth_adapter"}
)
"""Fields the paper-style summary already shows (``attention_backend`` changes how, not what, is computed)."""


def describe_up_person(config: UPPersonConfig) -> str:
    """The paper's names, e.g. ``S-Prefix(L=10) + LoRA(r=32) + L-Adapter(1/8)``, then other changed options
    as ``[name=value, ...]`` so that variants never look alike."""
    parts = []
    if config.prefix:
        vanilla = not config.learn_lambda and config.lambda_init == 1
        parts.append(f"{'Prefix' if vanilla else 'S-Prefix'}(L={config.prefix_length}{_depth(config.depth_prefix)})")
    if config.lora:
        parts.append(f"LoRA(r={config.lora_rank}{_depth(config.depth_lora)})")
    if config.adapter:
        name = "L-Adapter" if config.adapter_placement == "parallel-ln" else "Adapter"
        parts.append(f"{name}(1/{config.adapter_reduction}{_depth(config.depth_adapter, last=True)})")
    return (" + ".join(parts) or "frozen CLIP") + changed_options(config, _NAMED_FIELDS | {"attention_backend"})


def _depth(depth: int | None, last: bool = False) -> str:
    return "" if depth is None else f", {'last' if last else 'first'} {depth} blocks"
