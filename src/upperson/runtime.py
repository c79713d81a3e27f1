"""Where and how the work runs: device, precision (autocast and grad scaling), seeds, progress bars.

Every module asks this one for these facts instead of deciding them itself. It imports nothing
from the rest of the package.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)

Precision = Literal["bf16", "fp16", "fp32"]
"""A precision that runs: autocast to bf16 or fp16, or plain fp32."""

LOW_PRECISION: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""Autocast dtype of each low precision; fp32 runs without autocast."""

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
"""What a config may ask for."""

NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""/proc/cpuinfo flags of x86 CPUs that compute bf16 matmuls in hardware. Without them PyTorch's
bf16 GEMM falls back to a reference kernel, about 60x slower than fp32 on an AVX2-only CPU."""

EPOCH_SEED_STRIDE = 100_003
"""Spacing of the per-epoch seeds of consecutive base seeds (a prime, so seeds do not collide
for runs shorter than this many epochs)."""


def resolve_device(name: str) -> torch.device:
    """The device called ``name``; ``auto`` is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was requested but CUDA is not available; use device=cpu (or auto)")
    return device


@functools.cache
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU feature flags listed in ``cpuinfo``; empty where there is no such file (not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cuda_supports_bf16(device: torch.device) -> bool:
    """Whether the GPU ``device`` computes bf16 in hardware (Ampere or newer, or ROCm); no emulation."""
    return bool(torch.version.hip) or torch.cuda.get_device_properties(device).major >= 8


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` computes bf16 matmuls natively, and why (for the log)."""
    if device.type == "cuda":
        if cuda_supports_bf16(device):
            return True, "CUDA device with bf16 support"
        return False, "CUDA device without native bf16"
    if device.type != "cpu":
        return False, f"{device.type} device"
    found = sorted(NATIVE_BF16_CPU_FLAGS & cpu_flags())
    if found:
        return True, f"CPU with native bf16: {'/'.join(found)} in /proc/cpuinfo"
    return False, f"CPU without native bf16: no {'/'.join(sorted(NATIVE_BF16_CPU_FLAGS))} in /proc/cpuinfo"


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """The precision to run with on ``device`` when the config asks for ``requested``.

    ``auto`` picks bf16 where the hardware computes it natively (a CUDA GPU with bf16, a CPU with
    AVX512-BF16 or AMX), fp16 on other CUDA GPUs (with a GradScaler in training), fp32 otherwise;
    the choice is logged with its reason. An explicit precision is used as given; fp16 on a CPU is
    refused, and bf16 on a CPU without native bf16 runs with a warning, because it is far slower
    than fp32 there.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r}: choose one of {', '.join(PRECISIONS)}")
    if requested == "fp16" and device.type != "cuda":
        raise ValueError("train.precision fp16 needs a CUDA device; use auto, bf16 or fp32 on CPU")
    native, reason = native_bf16(device)
    if requested == "auto":
        chosen: Precision = "bf16" if native else "fp16" if device.type == "cuda" else "fp32"
        _log_once(logging.INFO, f"precision auto -> {chosen} ({reason})")
        return chosen
    if requested == "bf16" and device.type == "cpu" and not native:
        _log_once(
            logging.WARNING,
            f"precision bf16 on a {reason}: bf16 matmuls run on a slow fallback (~60x slower than fp32 on "
            "AVX2-only CPUs); set train.precision=auto or fp32",
        )
    return requested  # type: ignore[return-value]


def training_attention(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The SDPA kernels for a training step: the fastest measured on ``device`` at ``precision``.

    On a CPU with AVX512-BF16 but no AMX, bf16 training steps run 3-7 % faster with SDPA's math
    kernel than with its default flash kernel (three runs of ``benchmarks/train_step.py``; it keeps
    the attention probabilities, about 30 % more step memory). Everywhere else the default kernels
    measured as fast or faster (fp32 CPUs) or are not measured (AMX CPUs, GPUs): nothing is forced.
    """
    flags = cpu_flags() if device.type == "cpu" else frozenset()
    if precision == "bf16" and "avx512_bf16" in flags and "amx_bf16" not in flags:
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def resolve_compile(requested: str, device: torch.device, precision: str) -> bool:
    """Whether to ``torch.compile`` the training forward when the config asks for ``requested``.

    ``auto`` is the measured best choice: off. On CPUs compiling does not pay
    (``benchmarks/train_step.py``: fp32 and bf16 steps 2-4 % slower after a 20-60 s compile; the
    compiled graph must run captions at full length, while eager steps stop at the last EOT); on GPUs
    it is not measured yet (``make gpu-check`` measures it). ``on`` needs a C++ compiler for
    inductor's CPU kernels.
    """
    if requested not in ("auto", "on", "off"):
        raise ValueError(f"train.compile {requested!r}: choose one of auto, on, off")
    if requested == "on":
        if device.type == "cpu" and shutil.which("c++") is None and shutil.which("g++") is None:
            raise ValueError("train.compile on needs a C++ compiler on CPU (inductor builds its kernels with one): install g++ or set train.compile=off")
        _log_once(logging.INFO, f"torch.compile on ({device.type}, {precision}): the first step compiles")
        return True
    if requested == "auto":
        _log_once(logging.INFO, f"torch.compile auto -> off ({device.type}, {precision}: not measured to pay here)")
    return False


@functools.cache
def _log_once(level: int, message: str) -> None:
    """Log ``message`` the first time only: precision is resolved by every evaluation of a run."""
    logger.log(level, message)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast to bf16/fp16 on ``device``, or nothing for fp32; resolve ``auto`` first."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in LOW_PRECISION:
        raise ValueError(f"autocast: precision {precision!r} is not one of bf16, fp16, fp32 (resolve_precision gives one)")
    return torch.autocast(device.type, dtype=LOW_PRECISION[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 training (its gradients underflow without one); ``None`` otherwise."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (weights, dropout, main-process augmentation).

    DataLoader workers need nothing more: torch seeds each worker's torch, numpy and ``random``
    generators from the loader's generator, and the datasets draw from seeded generators of their own.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's random draws (sampler order, augmentation) in a run seeded with ``seed``.

    Depends on nothing but its arguments, so a resumed run draws what an uninterrupted one does.
    """
    return seed * EPOCH_SEED_STRIDE + epoch


Progress = Callable[..., Any]
"""A tqdm-like factory: ``progress(total=..., desc=...)`` returning an object with ``update``,
``set_postfix`` and ``close``. The library takes one; the CLI passes tqdm."""


class SilentProgress:
    """The :data:`Progress` of library calls that were given none: shows nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def update(self, count: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass
