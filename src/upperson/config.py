"""Typed run configuration: YAML files and ``--set key=value`` overrides, strictly checked.

Unknown keys and values of the wrong type are errors naming the file and the key; the resolved
configuration is stored in every run directory so a run can be reproduced from it alone.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from upperson.losses import LOSS_NAMES
from upperson.methods import METHODS, build_method_config
from upperson.methods.baselines import inject_nothing


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

    def __post_init__(self) -> None:
        if not self.losses:
            raise ConfigError(f"train.losses must name at least one loss of {', '.join(LOSS_NAMES)}")
        unknown = [name for name in self.losses if name not in LOSS_NAMES]
        if unknown:
            raise ConfigError(f"train.losses: unknown loss(es) {unknown}; choose from {', '.join(LOSS_NAMES)}")
        if len(set(self.losses)) != len(self.losses):
            raise ConfigError(f"train.losses lists a loss twice: {list(self.losses)}")
        if self.id_lr_factor <= 0:
            raise ConfigError(f"train.id_lr_factor must be > 0, got {self.id_lr_factor}")


@dataclass
class EvalConfig:
    """Feature extraction and metrics."""

    batch_size: int = 256
    """Images or captions per encoder call."""
    i2t: bool = False
    """Also report image-to-text retrieval."""
    chunk_size: int = 1024
    """Query rows ranked at a time (bounds memory)."""


@dataclass
class RunConfig:
    """Everything a training or evaluation run needs."""

    method: str = "up-person"
    """Method registry name."""
    backbone: str = "tiny"
    """'tiny', a CLIP checkpoint path, or '<open_clip name>:<tag or file>'."""
    model: dict[str, Any] = field(default_factory=dict)
    """Method options (e.g. prefix_length, lora_rank), checked against the method's config."""
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
            build_method_config(self.method, self.model)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"model: {error}") from error
        if self.train.batch_size % self.train.grad_accumulation:
            raise ConfigError("train.batch_size must be divisible by train.grad_accumulation")
        if "mlm" in self.train.losses:
            entry = METHODS[self.method]
            if entry.encode_image is not None or entry.encode_text is not None:
                raise ConfigError(
                    f"train.losses: 'mlm' is not supported for method {self.method!r}: it encodes with its own token "
                    "flow (the official CSKT mlm path is broken, spec A.13); remove 'mlm' from train.losses"
                )
            if entry.inject is inject_nothing and not entry.trains_backbone:
                raise ConfigError(f"train.losses: 'mlm' needs a trainable method; {self.method!r} trains nothing")

    def method_config(self) -> Any:
        return build_method_config(self.method, self.model)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


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
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as error:
            raise ConfigError(f"config file {path} does not exist") from error
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: invalid YAML ({error})") from error
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of config sections")
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} must look like key=value (e.g. data.root=/data)")
        _set_dotted(raw, key.strip().split("."), yaml.safe_load(text) if text.strip() else "")
    return _build(RunConfig, raw, origin, prefix="")


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def _set_dotted(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        child = tree.setdefault(key, {})
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
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
        except ValueError:
            raise fail() from None
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
    return getattr(hint, "__name__", str(hint))
