"""Typed run configuration: YAML files and ``--set key=value`` overrides, strictly checked.

Unknown keys and values of the wrong type are errors naming the file and the key; the resolved
configuration is stored in every run directory so a run can be reproduced from it alone. The
``model:`` section is the method's own config dataclass (from its registry entry), checked the same
way at load time.

Value syntax, the same in YAML files and in every command's ``--set KEY=VALUE`` (YAML 1.2 core
scalars): ``true`` / ``false`` are booleans (``yes``, ``no``, ``on``, ``off`` are plain strings);
``null`` or ``~`` is null; ``10``, ``-3`` are integers; ``0.5``, ``1e-4``, ``1e1``, ``.inf`` are
floats; ``[a, b]`` is a list and ``{k: v}`` a mapping; quote a string to keep it a string
(``run_name="007"``); anything else is a string. The field's type then decides: an integer is
accepted where a float is expected, a list where a tuple is, nothing else is converted. A key
written twice in one YAML mapping is an error.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from upperson._io import atomic_path
from upperson.losses import LOSS_NAMES
from upperson.methods.registry import MethodOptionError, get_method

MAX_IMAGE_SIDE = 4096
"""Largest height or width of ``data.image_size`` (and of a gallery index's): a ViT at 4096x4096 with 16-pixel
patches already has 65,536 tokens; larger sizes only come from typos or tampered files and would try to
allocate tens of GB for the position embedding."""


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


@dataclass
class DataConfig:
    """Which dataset, and how samples are read and augmented."""

    dataset: str = "cuhk-pedes"
    """Registry name: cuhk-pedes, icfg-pedes, rstpreid, flickr30k, mscoco."""
    root: str = ""
    """Directory holding the dataset folder (or the dataset folder itself)."""
    image_size: tuple[int, int] = (384, 128)
    """Input (height, width)."""
    augment: bool = True
    """Flip, pad + random crop and random erasing for training (spec B.5)."""
    text_mask_prob: float = 0.15
    """Caption token masking augmentation (spec B.4); 0 disables it."""
    sampler: Literal["random", "identity"] = "random"
    """Training sampler; identity = P ids x K instances."""
    num_instances: int = 4
    """K for the identity sampler."""
    num_workers: int = 4
    """DataLoader worker processes."""
    drop_last: bool = False
    """Drop the last partial batch (official: keep it)."""
    verify_images: bool = True
    """Open every image once before training (fails fast on corrupt files)."""

    def __post_init__(self) -> None:
        _require(
            len(self.image_size) == 2 and all(side >= 1 for side in self.image_size),
            "data.image_size", "two integers >= 1 (height, width)", self.image_size,
        )
        _require(all(side <= MAX_IMAGE_SIDE for side in self.image_size), "data.image_size", f"at most {MAX_IMAGE_SIDE} a side", self.image_size)
        _require(0.0 <= self.text_mask_prob < 1.0, "data.text_mask_prob", "in [0, 1)", self.text_mask_prob)
        _at_least(self.num_instances, 1, "data.num_instances")
        _at_least(self.num_workers, 0, "data.num_workers")


@dataclass
class OptimConfig:
    """Adam with the official epsilon, coupled weight decay, warm-up + cosine per epoch."""

    lr: float = 1e-3
    """Base learning rate."""
    weight_decay: float = 4e-5
    """Coupled L2 weight decay on non-bias tensors."""
    weight_decay_bias: float = 0.0
    """Weight decay on bias tensors."""
    bias_lr_factor: float = 1.0
    """Multiplier of the learning rate of bias tensors (CSKT: 2)."""
    adam_eps: float = 1e-3
    """Adam epsilon; 1e-3 is the official value and changes the update rule."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    warmup_epochs: int = 5
    """Linear warm-up epochs."""
    warmup_factor: float = 0.1
    """Learning-rate multiplier at the first epoch."""

    def __post_init__(self) -> None:
        _positive(self.lr, "optim.lr")
        _at_least(self.weight_decay, 0, "optim.weight_decay")
        _at_least(self.weight_decay_bias, 0, "optim.weight_decay_bias")
        _positive(self.bias_lr_factor, "optim.bias_lr_factor")
        _positive(self.adam_eps, "optim.adam_eps")
        _require(len(self.betas) == 2 and all(0.0 <= beta < 1.0 for beta in self.betas), "optim.betas", "two numbers in [0, 1)", self.betas)
        _at_least(self.warmup_epochs, 0, "optim.warmup_epochs")
        _require(0.0 < self.warmup_factor <= 1.0, "optim.warmup_factor", "in (0, 1]", self.warmup_factor)


@dataclass
class TrainConfig:
    """The training loop."""

    epochs: int = 60
    """Number of epochs."""
    batch_size: int = 128
    """Samples per optimizer step over all processes: under torchrun each of N processes takes
    batch_size / N (split further by ``grad_accumulation``)."""
    grad_accumulation: int = 1
    """Micro-batches per optimizer step; each has batch_size / grad_accumulation samples."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Autocast dtype; auto = bf16 where the hardware computes it natively (CUDA with bf16, a CPU with
    AVX512-BF16/AMX), fp16 on other GPUs, else fp32. fp16 uses a GradScaler and needs a GPU."""
    grad_checkpointing: bool = False
    """Recompute block activations in backward to save memory."""
    compile: Literal["auto", "on", "off"] = "auto"
    """``torch.compile`` (inductor) of the model's training forward. auto = off: measured on CPUs it does not
    pay (fp32 and bf16 steps 2-4 % slower after compiling, ``benchmarks/train_step.py``: the compiled graph runs
    captions at full length) and it is not measured on GPUs yet (``make gpu-check`` does). on = compile (needs a
    C++ compiler on CPU; the first step compiles for a minute or more)."""
    temperature: float = 0.02
    """SDM temperature τ (fixed)."""
    seed: int = 1
    """Seed for weights, sampling, augmentation and workers."""
    eval_every: int = 1
    """Evaluate on the selection split every this many epochs."""
    select_on: Literal["val", "test", "last"] = "val"
    """Model selection: val split, test split (the papers' protocol, labelled in reports), or last epoch."""
    log_every: int = 50
    """Log the running loss every this many steps."""
    losses: tuple[str, ...] = ("sdm",)
    """Training losses, summed with weight 1 (paper Table X): any of sdm, itc, id, mlm; id adds an identity
    classifier, mlm IRRA's cross-modal MLM head (up-person and full-finetune only)."""
    id_lr_factor: float = 1.0
    """Learning-rate multiplier of the loss heads (ID classifier, MLM head): 1 = UP-Person code (one lr for
    all tensors), 5 = IRRA (which leaves the MLM head's LayerNorms at the base lr; here the whole head gets it)."""
    sdm_scope: Literal["local", "global"] = "local"
    """Batch the SDM and ITC losses contrast under torchrun: local = each process's own samples (the official DDP
    code); global = the samples of all N processes, features all-gathered with their gradients, so N processes compute
    exactly the single-process loss of the whole batch. ID and MLM stay per process; a single process is unaffected."""

    def __post_init__(self) -> None:
        if not self.losses:
            raise ConfigError(f"train.losses must name at least one loss of {', '.join(LOSS_NAMES)}")
        unknown = [name for name in self.losses if name not in LOSS_NAMES]
        if unknown:
            raise ConfigError(f"train.losses: unknown loss(es) {unknown}; choose from {', '.join(LOSS_NAMES)}")
        if len(set(self.losses)) != len(self.losses):
            raise ConfigError(f"train.losses lists a loss twice: {list(self.losses)}")
        _positive(self.id_lr_factor, "train.id_lr_factor")
        for name in ("epochs", "batch_size", "grad_accumulation", "eval_every", "log_every"):
            _at_least(getattr(self, name), 1, f"train.{name}")
        _positive(self.temperature, "train.temperature")
        _require(self.sdm_scope in ("local", "global"), "train.sdm_scope", "'local' or 'global'", self.sdm_scope)
        _require(self.compile in ("auto", "on", "off"), "train.compile", "'auto', 'on' or 'off'", self.compile)


@dataclass
class EvalConfig:
    """Feature extraction and metrics."""

    batch_size: int = 256
    """Images or captions per encoder call."""
    i2t: bool = False
    """Also report image-to-text retrieval."""
    chunk_size: int = 1024
    """Query rows ranked at a time (bounds memory)."""

    def __post_init__(self) -> None:
        _at_least(self.batch_size, 1, "eval.batch_size")
        _at_least(self.chunk_size, 1, "eval.chunk_size")


@dataclass
class RunConfig:
    """Everything a training or evaluation run needs."""

    method: str = "up-person"
    """Method registry name."""
    backbone: str = "tiny"
    """'tiny', a CLIP checkpoint path, or '<open_clip name>:<tag or file>'."""
    model: Any = None
    """The method's typed config (its registry entry's ``config_class``, e.g. ``UPPersonConfig``);
    in YAML a mapping of its fields. ``None`` (or a dict of fields) is turned into that class."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs"
    """Parent of run directories."""
    run_name: str = ""
    """Run directory name; empty = dataset + timestamp."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ..."""

    def __post_init__(self) -> None:
        try:
            entry = get_method(self.method)
        except ValueError as error:
            raise ConfigError(f"method: {error}") from error
        if self.model is None or isinstance(self.model, dict):
            self.model = _build(entry.config_class, self.model or {}, "config", prefix="model.")
        elif not isinstance(self.model, entry.config_class):
            raise ConfigError(f"model: method {self.method!r} expects a {entry.config_class.__name__}, got {type(self.model).__name__}")
        if self.train.batch_size % self.train.grad_accumulation:
            raise ConfigError("train.batch_size must be divisible by train.grad_accumulation")
        unsupported = [name for name in self.train.losses if name not in entry.losses]
        if not entry.trains and self.train.losses != TrainConfig.losses:
            raise ConfigError(f"train.losses: method {self.method!r} trains nothing, so it takes no losses; remove train.losses")
        if unsupported and entry.trains:
            supported = ", ".join(name for name in LOSS_NAMES if name in entry.losses)
            raise ConfigError(
                f"train.losses: {unsupported} not supported by method {self.method!r} (it supports {supported}); "
                "remove them from train.losses"
            )

    def method_config(self) -> Any:
        """The typed method config (the ``model:`` section)."""
        return self.model

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _require(ok: bool, key: str, rule: str, value: Any) -> None:
    """The one range error every section gives (``eval.batch_size must be >= 1, got 0``), raised at load
    time instead of as a ZeroDivisionError or an untrained run much later."""
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {_plain(value)!r}")


def _at_least(value: float, minimum: int, key: str) -> None:
    _require(value >= minimum, key, f">= {minimum}", value)


def _positive(value: float, key: str) -> None:
    _require(math.isfinite(value) and value > 0, key, "a finite number > 0", value)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config (or start from defaults) and apply ``key=value`` overrides (dotted keys)."""
    raw: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        try:
            raw = read_yaml(path) or {}
        except FileNotFoundError as error:
            raise ConfigError(f"config file {path} does not exist") from error
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of config sections")
    for override in overrides:
        keys, value = parse_override(override)
        _set_dotted(raw, keys, value)
    return build_run_config(raw, origin)


def build_run_config(raw: dict[str, Any], origin: str = "config") -> RunConfig:
    """A :class:`RunConfig` from plain values (as read from YAML), checking every key and type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: top level must be a mapping of config sections")
    method = _coerce(raw.get("method", RunConfig.method), str, origin, "method")
    try:
        entry = get_method(method)
    except ValueError as error:
        raise ConfigError(f"{origin}: method: {error}") from error
    model = _build(entry.config_class, raw.get("model") or {}, origin, prefix="model.")
    return _build(RunConfig, {**raw, "model": model}, origin, prefix="")


def override_fields(config: Any, overrides: list[str] | tuple[str, ...], origin: str = "--set") -> Any:
    """A copy of the dataclass ``config`` with ``FIELD=VALUE`` overrides, parsed and checked like ``--set``."""
    values = dataclasses.asdict(config)
    for override in overrides:
        keys, value = parse_override(override)
        if len(keys) != 1:
            raise ConfigError(f"{origin}: {'.'.join(keys)}: expected a field of {type(config).__name__}, not a dotted key")
        values[keys[0]] = value
    return _build(type(config), values, origin, prefix="")


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the config as YAML atomically (a crash never leaves half a config behind)."""
    with atomic_path(path) as temporary:
        temporary.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


class _ConfigLoader(yaml.SafeLoader):
    """YAML with the core scalars of YAML 1.2 (see the module docstring) and duplicate keys rejected."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is written twice (line {key_node.start_mark.line + 1}); keep one", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_BOOL, _INT, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in (_BOOL, _INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_ConfigLoader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"), list("-+0123456789"))
_ConfigLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"^(?:[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def read_yaml(path: str | Path) -> Any:
    """A YAML file read with the config value syntax; errors name the file (FileNotFoundError passes through)."""
    text = Path(path).read_text()
    try:
        return yaml.load(text, Loader=_ConfigLoader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML ({error})") from error


def parse_value(text: str) -> Any:
    """One ``--set`` value, read with the config value syntax (an empty value is the empty string)."""
    if not text.strip():
        return ""
    try:
        return yaml.load(text, Loader=_ConfigLoader)
    except yaml.YAMLError as error:
        raise ConfigError(f"cannot read the value {text!r} ({str(error).splitlines()[0]}); quote it if it is a string") from error


def parse_override(override: str) -> tuple[list[str], Any]:
    """``KEY=VALUE`` (``KEY`` dotted, e.g. ``model.lora_rank=16``) → ``(["model", "lora_rank"], 16)``."""
    key, sep, text = override.partition("=")
    keys = key.strip().split(".")
    if not sep or not key.strip() or not all(keys):
        raise ConfigError(f"override {override!r} must look like key=value (e.g. data.root=/data or model.lora_rank=16)")
    return keys, parse_value(text)


def _set_dotted(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        child = tree.setdefault(key, {})
        if child is None:
            child = tree[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {'.'.join(keys)}: {key} is not a section")
        tree = child
    tree[keys[-1]] = value


def _build(cls: type, raw: dict[str, Any], origin: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: {prefix.rstrip('.') or 'top level'} must be a mapping")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{origin}: unknown key(s) {[prefix + key for key in unknown]}; valid: {sorted(names)}")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, origin, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, hint, origin, prefix + name)
    try:
        return cls(**values)
    except MethodOptionError as error:
        raise ConfigError(f"{origin}: {prefix}{error.field} {error.problem}") from error
    except ConfigError as error:
        raise ConfigError(f"{origin}: {error}") from error


def _coerce(value: Any, hint: Any, origin: str, key: str) -> Any:
    """Check ``value`` against a type hint, allowing int → float and list → tuple."""
    def fail() -> ConfigError:
        return ConfigError(f"{origin}: {key} must be {_describe(hint)}, got {value!r}")

    origin_type = get_origin(hint)
    if hint is Any:
        return value
    if origin_type is Literal:
        if value not in get_args(hint):
            raise fail()
        return value
    if origin_type in (Union, types.UnionType):
        for option in get_args(hint):
            try:
                return _coerce(value, option, origin, key)
            except ConfigError:
                continue
        raise fail()
    if hint is type(None):
        if value is not None:
            raise fail()
        return None
    if origin_type is tuple and get_args(hint)[-1] is Ellipsis:
        if not isinstance(value, (list, tuple)):
            raise fail()
        return tuple(_coerce(item, get_args(hint)[0], origin, key) for item in value)
    if origin_type is tuple:
        item_types = get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(item_types):
            raise fail()
        return tuple(_coerce(item, item_type, origin, key) for item, item_type in zip(value, item_types))
    if origin_type is dict:
        if not isinstance(value, dict):
            raise fail()
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. a run name written as a number in YAML
    if hint is int and isinstance(value, bool):
        raise fail()
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise fail()
    return value


def _describe(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join("null" if option is type(None) else _describe(option) for option in get_args(hint))
    if hint is bool:
        return "a boolean (true or false)"
    if hint in (int, float, str):
        return {int: "an integer", float: "a number", str: "a string"}[hint]
    return getattr(hint, "__name__", str(hint))
