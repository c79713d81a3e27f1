"""Efficiency profile of a configured method (paper Table IV): parameters, FLOPs, memory, throughput.

For each configuration:

* trainable and total parameters (PETL tensors plus any loss head, as training counts them);
* forward GFLOPs per image and per caption of the inference model (LoRA merged), counted by
  ``torch.utils.flop_counter.FlopCounterMode``: FLOPs = 2 × multiply-accumulates of convolutions,
  matrix products and attention; element-wise work is not counted (tools that report MACs give half);
* peak memory of one full training step (forward, losses, backward, optimizer step) at the given
  batch size, of the model exactly as the Trainer builds it (:func:`build_training`: under bf16/fp16
  the frozen matmul weights are stored in that dtype): see :class:`PeakMemory`;
* inference throughput, images/s and captions/s, of the merged model on the chosen device.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import random
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

import upperson
from upperson.config import RunConfig
from upperson.data import load_dataset
from upperson.data.masking import mask_caption_tokens_with_labels
from upperson.methods.exact_shortcuts import full_towers
from upperson.runtime import autocast, resolve_device, seed_everything
from upperson.training.step import (
    TrainingParts,
    backward,
    build_training,
    loss_terms,
    optimizer_step,
)

logger = logging.getLogger(__name__)

PROFILE_CAPTIONS = (
    "a woman in a red coat carrying a black backpack",
    "a man wearing a grey jacket, blue jeans and white sneakers",
    "the girl has long hair and wears a yellow dress",
    "a young man in a dark hoodie is walking while looking at his phone",
)
"""Cycled to the batch size; the text encoder runs all context positions, so content does not change FLOPs."""


@dataclass
class ProfileResult:
    """One configuration's efficiency numbers (``None`` where a measurement does not apply)."""

    label: str
    method: str
    backbone: str
    image_size: tuple[int, int]
    batch_size: int
    device: str
    precision: str
    """The precision it ran in (``train.precision`` resolved for the device)."""
    trainable_parameters: int
    total_parameters: int
    gflops_per_image: float
    gflops_per_text: float
    train_peak_bytes: int | None
    """Peak during one training step: CUDA memory allocated, or the process's resident set on CPU."""
    train_step_bytes: int | None
    """The same peak above the memory held just before the step (model, batch)."""
    memory_exact: bool
    """False on CPUs where the resident-set high-water mark could not be reset (then it includes set-up)."""
    images_per_s: float
    texts_per_s: float


def _cpu_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """``Q Kᵀ`` and ``A V`` of the CPU fused attention kernel, which the counter does not know."""
    batch, heads, queries, head_dim = query_shape
    keys, value_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * queries * keys * (head_dim + value_dim)


def _flop_counter() -> FlopCounterMode:
    custom = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        custom[cpu_sdpa] = _cpu_sdpa_flops
    return FlopCounterMode(display=False, custom_mapping=custom)


def count_flops(function: Callable[..., Any], *inputs: Any) -> int:
    """Forward FLOPs of ``function(*inputs)`` under ``torch.no_grad``.

    ``nn.MultiheadAttention``'s inference fast path (eval, no grad, even head count: every OpenAI
    CLIP) runs as one fused op the counter does not see, so it is switched off while counting.
    """
    counter = _flop_counter()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), counter:
            function(*inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops()


def _read_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def _release_free_heap() -> None:
    """Give glibc's free heap pages back to the OS, so that reusing them shows up in the resident set."""
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is not None:
        trim(0)


class PeakMemory:
    """Peak memory of a code region: ``peak`` (absolute) and ``delta`` (above the memory in use at its start).

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors only).
    CPU: the resident-set high-water mark ``VmHWM``, reset by writing ``5`` to
    ``/proc/self/clear_refs`` (Linux >= 4.0) after returning freed heap pages to the OS, so that the
    region's own allocations raise it even in a process that has already run other work. Where the
    reset is unavailable the lifetime maximum ``ru_maxrss`` is used and ``exact`` is False.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.exact = True
        self.baseline = 0
        self.peak = 0
        """Bytes at the peak, counting what was held before the region (set on exit)."""

    @property
    def delta(self) -> int:
        """Bytes at the peak above the memory in use when the region started."""
        return self.peak - self.baseline

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            return self
        _release_free_heap()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.baseline = _read_status("VmRSS")
        except OSError:
            self.exact = False
            self.baseline = _read_status("VmRSS") if Path("/proc/self/status").exists() else 0
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.exact:
            self.peak = _read_status("VmHWM")
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class _Batch:
    images: torch.Tensor
    caption_ids: torch.Tensor
    pids: torch.Tensor
    mlm_ids: torch.Tensor
    mlm_labels: torch.Tensor


def _make_batch(batch_size: int, image_size: tuple[int, int], num_classes: int, device: torch.device) -> _Batch:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, *image_size, generator=generator)
    captions = [PROFILE_CAPTIONS[index % len(PROFILE_CAPTIONS)] for index in range(batch_size)]
    pids = (torch.arange(batch_size) // 2) % num_classes  # pairs share an identity, as with K >= 2 samplers
    caption_ids = upperson.tokenize(captions)
    rng = random.Random(0)
    masked = [mask_caption_tokens_with_labels(ids, rng) for ids in caption_ids]
    mlm_ids = torch.stack([ids for ids, _ in masked])
    mlm_labels = torch.stack([labels for _, labels in masked])
    return _Batch(images.to(device), caption_ids.to(device), pids.to(device), mlm_ids.to(device), mlm_labels.to(device))


def train_step_memory(parts: TrainingParts, batch: _Batch) -> PeakMemory:
    """Run one full optimizer step, as the Trainer runs it, inside :class:`PeakMemory` (Adam state is allocated by it)."""
    parts.model.train()
    with PeakMemory(batch.images.device) as memory:
        parts.optimizer.zero_grad(set_to_none=True)
        terms = loss_terms(parts, batch.images, batch.caption_ids, batch.pids, parts.precision, batch.mlm_ids, batch.mlm_labels)
        backward(parts, sum(terms.values()))
        optimizer_step(parts)
    return memory


def synchronized_seconds(function: Callable[[], Any], device: torch.device) -> float:
    """Wall time of one call; on CUDA the queued kernels are waited for before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def _median_seconds(function: Callable[[], Any], device: torch.device, steps: int, warmup: int) -> float:
    def timed() -> float:
        return synchronized_seconds(function, device)

    for _ in range(warmup):
        timed()
    return statistics.median(timed() for _ in range(max(1, steps)))


def profile_config(
    config: RunConfig,
    label: str = "",
    batch_size: int | None = None,
    num_classes: int | None = None,
    steps: int = 5,
    warmup: int = 1,
) -> ProfileResult:
    """Profile ``config``'s method on its backbone, image size, precision (resolved for the device) and device.

    Args:
        batch_size: training and inference batch; default ``train.batch_size``.
        num_classes: training identities, sizing the ID classifier when ``train.losses`` has ``id``;
            default: read from the config's dataset.
        steps: timed inference batches per encoder (median); ``warmup`` untimed ones first.
    """
    batch_size = batch_size or config.train.batch_size
    device = resolve_device(config.device)
    num_classes = num_classes or _num_classes(config)
    seed_everything(config.train.seed)
    parts = build_training(config, num_classes, device)
    precision = parts.precision
    counts = parts.parameter_counts()
    batch = _make_batch(batch_size, config.data.image_size, num_classes, device)
    memory = train_step_memory(parts, batch) if counts["trainable"] else None
    if memory is None:
        logger.info("%s has no trainable parameters: no training-step memory", label or config.method)
    model = parts.model.eval()
    model.merge_lora()

    def autocast_encoder(encoder: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``encoder`` under the run's autocast, which the stored low-precision frozen weights need."""

        def run(inputs: torch.Tensor) -> torch.Tensor:
            with autocast(device, precision):
                return encoder(inputs)

        return run

    encode_image, encode_text = autocast_encoder(model.encode_image), autocast_encoder(model.encode_text)
    with full_towers():  # the architecture's FLOPs, as papers count them (training skips some: exact_shortcuts)
        image_flops = count_flops(encode_image, batch.images[:1])
        text_flops = count_flops(encode_text, batch.caption_ids[:1])

    def timed(encoder: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> Callable[[], Any]:
        def run() -> None:
            with torch.no_grad():
                encoder(inputs)

        return run

    image_seconds = _median_seconds(timed(encode_image, batch.images), device, steps, warmup)
    text_seconds = _median_seconds(timed(encode_text, batch.caption_ids), device, steps, warmup)
    return ProfileResult(
        label=label or config.method,
        method=config.method,
        backbone=config.backbone,
        image_size=tuple(config.data.image_size),
        batch_size=batch_size,
        device=str(device),
        precision=precision,
        trainable_parameters=counts["trainable"],
        total_parameters=counts["total"],
        gflops_per_image=image_flops / 1e9,
        gflops_per_text=text_flops / 1e9,
        train_peak_bytes=None if memory is None else memory.peak,
        train_step_bytes=None if memory is None else memory.delta,
        memory_exact=True if memory is None else memory.exact,
        images_per_s=batch_size / image_seconds,
        texts_per_s=batch_size / text_seconds,
    )


def _num_classes(config: RunConfig) -> int:
    if "id" not in config.train.losses:
        return 1  # no classifier is built
    try:
        return load_dataset(config.data.dataset, config.data.root).num_train_ids
    except (OSError, ValueError) as error:
        raise ValueError(
            f"train.losses has 'id', whose classifier size is the number of training identities: pass "
            f"--num-classes or set data.root to a readable {config.data.dataset} ({error})"
        ) from error


def format_profile_table(results: list[ProfileResult]) -> str:
    """Markdown table, one row per configuration (pure)."""
    lines = [
        "| Config | Trainable | Total | GFLOPs/image | GFLOPs/text | Train peak MiB | Step MiB | images/s | texts/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        lines.append(
            f"| {result.label} | {result.trainable_parameters:,} | {result.total_parameters:,} | "
            f"{result.gflops_per_image:.4g} | {result.gflops_per_text:.4g} | {_mib(result.train_peak_bytes)} | "
            f"{_mib(result.train_step_bytes)} | {result.images_per_s:.1f} | {result.texts_per_s:.1f} |"
        )
    if results:
        first = results[0]
        kind = "CUDA memory allocated" if first.device.startswith("cuda") else "process resident set (VmHWM)"
        lines += [
            "",
            f"{first.backbone} at {first.image_size[0]}x{first.image_size[1]}, batch {first.batch_size}, {first.device}, "
            f"{first.precision}. FLOPs = 2 x multiply-accumulates, LoRA merged. Memory: {kind} during one training "
            "step (forward, losses, backward, Adam step); 'Step' is the part above what was held before it.",
        ]
        if not all(result.memory_exact for result in results):
            lines.append("The resident-set high-water mark could not be reset here: CPU peaks include model set-up.")
    return "\n".join(lines) + "\n"


def _mib(n_bytes: int | None) -> str:
    return "n/a" if n_bytes is None else f"{n_bytes / 2**20:.0f}"
