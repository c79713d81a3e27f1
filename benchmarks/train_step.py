"""Benchmark an UP-Person training step against the official-style step, and LoRA-merged inference.

Part 1, one training step (encode_image + encode_text, SDM loss, backward), ViT-B/16 at 384x128:

    official   the official code's step as :mod:`official_style` reproduces it, fp32: explicit
               attention (attention matrix and LoRA-updated weight materialised), every token
               through every block of both towers, open_clip's QuickGELU;
    fp32       upperson's default step in fp32 (fused SDPA, LoRA as a side branch, the exact
               shortcuts of ``upperson.methods.exact_shortcuts``, one-tensor QuickGELU);
    bf16       the same under bf16 autocast with the frozen matmul weights stored in bf16, as
               ``upperson train`` does with ``precision: auto`` on a CPU with native bf16;
    *-math, *-flash  SDPA restricted to its math or flash kernel (the default paths use the kernel
               ``upperson.runtime.training_attention`` picks for the Trainer: math for bf16 on
               AVX512-BF16 CPUs without AMX, SDPA's own choice, flash on CPUs, elsewhere);
    *-channels-last  images and the patch convolution in channels-last memory format;
    *-compile  ``torch.compile`` (inductor) of both encoders; its compile time is reported apart.

bf16 paths run only where bf16 matmuls are native (CUDA, AVX512-BF16, AMX) unless ``--bf16 on``.

Part 2, inference ``encode_image`` under ``torch.no_grad``: UP-Person with merged LoRA vs the same
backbone without PETL vs raw open_clip.

Timing: every path is timed in this process, round-robin (one step of each path per round), so
background load drifts over all paths alike; the median of the timed rounds is reported.

Peak memory: each training path runs in a fresh subprocess whose first step (second for compiled
paths, after compiling) is measured with ``upperson profile``'s
:class:`~upperson.experiments.profile.PeakMemory`, so no allocation left over from another path is
counted.

Run ``python benchmarks/train_step.py --help`` for the options; the default takes about ten
minutes on a 2-core CPU (compiling is most of it; ``--no-compile`` skips it). Backbone weights are
random (no download); speed and memory do not depend on them.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from official_style import make_official_style, official_step
from torch.nn.attention import SDPBackend, sdpa_kernel

import upperson
from upperson.experiments.profile import PeakMemory
from upperson.runtime import LOW_PRECISION, Precision, autocast, native_bf16, training_attention

CAPTIONS = (
    "a woman in a red coat",
    "a man wearing a black jacket, blue jeans and white sneakers, carrying a brown backpack",
    "the girl has long hair and wears a yellow dress",
    "a young man in a grey hoodie and dark trousers is walking while looking at his phone, "
    "with a black bag over his left shoulder",
    "an older man with glasses, a white shirt and black trousers",
    "a woman with a ponytail wears a pink top, a short denim skirt and sandals and holds a white umbrella",
    "a boy in a green t-shirt and shorts",
    "a person in a long dark blue coat, a red scarf and black boots walks across the street holding "
    "a cup of coffee in the right hand and a shopping bag in the left",
)
"""Realistic captions of varied lengths (CUHK-PEDES style); cycled to the batch size."""

SPEED_TARGET = 3.0
"""bf16 images/s must be at least this multiple of the official fp32 step (CPUs with native bf16)."""
FP32_SPEED_TARGET = 1.5
"""Our fp32 step must be at least this much faster than the official fp32 step."""
MEMORY_TARGET = 0.7
"""Our fp32 step's peak memory must be at most this fraction of the official fp32 step's."""
OVERHEAD_TARGET_PERCENT = 15.0
"""Merged UP-Person encode_image may be at most this much slower than raw open_clip."""
RESULT_MARKER = "RESULT_JSON "


@dataclass(frozen=True)
class TrainPath:
    key: str
    label: str
    precision: Precision
    official: bool = False
    attention: str = "default"
    """``default`` = the Trainer's choice (``upperson.runtime.training_attention``), or ``math`` / ``flash`` forced."""
    channels_last: bool = False
    compiled: bool = False


PATHS: dict[str, TrainPath] = {
    path.key: path
    for path in (
        TrainPath("official", "official-style: explicit attention, full towers, fp32", "fp32", official=True),
        TrainPath("fp32", "upperson default (as upperson train), fp32", "fp32"),
        TrainPath("fp32-math", "upperson, fp32, SDPA math kernel", "fp32", attention="math"),
        TrainPath("fp32-channels-last", "upperson, fp32, channels-last images", "fp32", channels_last=True),
        TrainPath("fp32-compile", "upperson, fp32, torch.compile", "fp32", compiled=True),
        TrainPath("bf16", "upperson default (as upperson train), bf16 autocast, bf16 frozen weights", "bf16"),
        TrainPath("bf16-math", "upperson, bf16, SDPA math kernel", "bf16", attention="math"),
        TrainPath("bf16-flash", "upperson, bf16, SDPA flash kernel", "bf16", attention="flash"),
        TrainPath("bf16-compile", "upperson, bf16, torch.compile", "bf16", compiled=True),
    )
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (and inference batches) per path")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps per path (after a compiled path's compiling step)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backbone", default="ViT-B-16-quickgelu", help="upperson backbone source")
    parser.add_argument("--image-size", type=int, nargs=2, default=(384, 128), metavar=("H", "W"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--bf16",
        choices=("auto", "on", "off"),
        default="auto",
        help="bf16 autocast paths: auto = only where the device has native bf16 matmuls "
        "(CUDA, or a CPU with AVX512-BF16/AMX); on = always; off = never",
    )
    parser.add_argument("--paths", nargs="+", choices=sorted(PATHS), default=None, help="training paths (default: all that apply)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile paths")
    parser.add_argument("--skip-inference", action="store_true", help="only benchmark the training step")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--memory-worker", choices=sorted(PATHS), default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def has_native_bf16(device: str) -> bool:
    """Whether bf16 matmuls run on native hardware support rather than a slow fallback.

    On a CPU without AVX512-BF16 or AMX, PyTorch runs bf16 GEMMs on a scalar reference kernel
    (pytorch/pytorch#146508), which is one to two orders of magnitude slower than fp32.
    """
    return native_bf16(torch.device(device))[0]


def bf16_enabled(args: argparse.Namespace) -> bool:
    return args.bf16 == "on" or (args.bf16 == "auto" and has_native_bf16(args.device))


def selected_paths(args: argparse.Namespace) -> list[str]:
    keys = args.paths or list(PATHS)
    use_bf16 = bf16_enabled(args)
    return [
        key for key in keys
        if (use_bf16 or PATHS[key].precision != "bf16") and not (args.no_compile and PATHS[key].compiled)
    ]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_up_person(args: argparse.Namespace, backend: str = "sdpa", **options: Any) -> upperson.RetrievalModel:
    """UP-Person with the paper's CUHK-PEDES sizes (prefix 10, LoRA rank 32) on the backbone."""
    torch.manual_seed(0)
    model = upperson.create_model(
        "up-person",
        backbone=args.backbone,
        image_size=tuple(args.image_size),
        prefix_length=10,
        lora_rank=32,
        attention_backend=backend,
        **options,
    )
    return model.to(args.device)


@dataclass
class Batch:
    images: torch.Tensor
    token_ids: torch.Tensor
    pids: torch.Tensor


def make_batch(args: argparse.Namespace) -> Batch:
    """Random normalised images, cycled captions, and person ids in pairs ([0, 0, 1, 1, ...])."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, *args.image_size, generator=generator)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch_size)]
    pids = torch.arange(args.batch_size) // 2
    return Batch(images.to(args.device), upperson.tokenize(captions).to(args.device), pids.to(args.device))


@dataclass
class PathRunner:
    """One path's model and batch, ready to run training steps."""

    path: TrainPath
    model: upperson.RetrievalModel
    batch: Batch
    device: str

    def __call__(self) -> float:
        """One forward/SDM/backward step; returns its wall time in seconds."""
        model, batch = self.model, self.batch
        model.zero_grad(set_to_none=True)
        synchronize(self.device)
        start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            stack.enter_context(autocast(torch.device(self.device), self.path.precision))
            if self.path.official:
                stack.enter_context(official_step())
            if self.path.attention == "default" and not self.path.official:
                stack.enter_context(training_attention(torch.device(self.device), self.path.precision))
            elif self.path.attention != "default":
                kernel = SDPBackend.MATH if self.path.attention == "math" else SDPBackend.FLASH_ATTENTION
                stack.enter_context(sdpa_kernel([kernel]))
            image_features = model.encode_image(batch.images)
            text_features = model.encode_text(batch.token_ids)
            loss = upperson.losses.sdm_loss(image_features, text_features, batch.pids, temperature=0.02)
        loss.backward()
        synchronize(self.device)
        return time.perf_counter() - start


def build_runner(args: argparse.Namespace, path: TrainPath) -> PathRunner:
    """The model a path trains, built as ``upperson train`` builds it for that precision."""
    model = build_up_person(args, "explicit" if path.official else "sdpa")
    if path.official:
        make_official_style(model)
    if path.precision in LOW_PRECISION:
        model.store_frozen_matmul_weights(LOW_PRECISION[path.precision])
    batch = make_batch(args)
    if path.channels_last:
        model.clip.visual.conv1.to(memory_format=torch.channels_last)
        batch = Batch(batch.images.contiguous(memory_format=torch.channels_last), batch.token_ids, batch.pids)
    if path.compiled:
        model.encode_image = torch.compile(model.encode_image)
        model.encode_text = torch.compile(model.encode_text)
    return PathRunner(path, model, batch, args.device)


@contextlib.contextmanager
def saved_activation_bytes(model: torch.nn.Module) -> Iterator[dict[int, int]]:
    """Bytes of the distinct storages autograd saves for backward, parameters excluded.

    A deterministic cross-check of :class:`PeakMemory` (it ignores backward temporaries).
    """
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield storages


def memory_worker(args: argparse.Namespace) -> None:
    """Subprocess entry: measure the first training step of one path (the second when compiled) as JSON."""
    runner = build_runner(args, PATHS[args.memory_worker])
    compile_s = runner() if runner.path.compiled else None
    with PeakMemory(torch.device(args.device)) as memory, saved_activation_bytes(runner.model) as saved:
        seconds = runner()
    result = {
        "peak_bytes": memory.delta,
        "peak_exact": memory.exact,
        "saved_activation_bytes": sum(saved.values()),
        "measured_step_s": seconds,
        "memory_step": 2 if runner.path.compiled else 1,
        "first_step_s_fresh_process": compile_s if compile_s is not None else seconds,
    }
    print(RESULT_MARKER + json.dumps(result), flush=True)


def measure_memory(args: argparse.Namespace, keys: list[str]) -> dict[str, dict[str, Any]]:
    """Run :func:`memory_worker` for each path in a fresh interpreter."""
    results = {}
    for key in keys:
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--memory-worker", key,
            "--batch-size", str(args.batch_size),
            "--backbone", args.backbone,
            "--image-size", *map(str, args.image_size),
            "--device", args.device,
        ]
        if args.threads is not None:
            command += ["--threads", str(args.threads)]
        log(f"memory ({key}) {PATHS[key].label}: fresh subprocess")
        with tempfile.TemporaryDirectory(prefix="upperson-inductor-") as cache:  # a cold compile, like a user's first
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            completed = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_MARKER)]
        if completed.returncode != 0 or not lines:
            raise RuntimeError(f"memory worker for path {key} failed:\n{completed.stdout}\n{completed.stderr}")
        results[key] = json.loads(lines[-1].removeprefix(RESULT_MARKER))
    return results


def round_robin(
    jobs: dict[str, Callable[[], float]], warmup: int, rounds: int, label: str
) -> dict[str, list[float]]:
    """Warm each job up, then time ``rounds`` rounds of one call per job, rotating the order."""
    names = list(jobs)
    for name in names:
        for _ in range(warmup):
            jobs[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(jobs[name]())
        log(f"{label}: round {index + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names))
    return times


def time_training(args: argparse.Namespace, keys: list[str]) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per step for each path, each on its own model; and each path's first (compiling) step."""
    runners = {}
    first_steps = {}
    for key in keys:
        runners[key] = build_runner(args, PATHS[key])
        first_steps[key] = runners[key]()
        log(f"train: {key} first step {first_steps[key]:.2f}s")
    return round_robin(runners, args.warmup, args.steps, "train"), first_steps


INFERENCE_MODELS = {
    "upperson_merged": "UP-Person, LoRA merged (prefix + adapters kept)",
    "upperson_no_petl": "upperson attention, no PETL",
    "open_clip": "raw open_clip CLIP",
}


def time_inference(args: argparse.Namespace, precisions: list[str]) -> dict[str, dict[str, list[float]]]:
    """Seconds per ``encode_image`` batch for each model, per precision ("fp32", "bf16")."""
    merged = build_up_person(args).eval()
    merged.merge_lora()
    no_petl = build_up_person(args, prefix=False, lora=False, adapter=False).eval()
    torch.manual_seed(0)
    clip = upperson.load_backbone(args.backbone, tuple(args.image_size)).clip.to(args.device).eval()
    encoders: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "upperson_merged": merged.encode_image,
        "upperson_no_petl": no_petl.encode_image,
        "open_clip": clip.encode_image,
    }
    images = make_batch(args).images
    results = {}
    for precision in precisions:
        jobs = {name: _encode_job(fn, images, precision, args.device) for name, fn in encoders.items()}
        results[precision] = round_robin(jobs, args.warmup, args.steps, f"inference {precision}")
    return results


def _encode_job(
    encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, precision: Precision, device: str
) -> Callable[[], float]:
    def job() -> float:
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad(), autocast(torch.device(device), precision):
            encode(images)
        synchronize(device)
        return time.perf_counter() - start

    return job


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20


def verdict(value: float | None, target: float, at_least: bool) -> str:
    if value is None:
        return "not measured"
    ok = value >= target if at_least else value <= target
    return "PASS" if ok else "FAIL"


def summarise(
    args: argparse.Namespace,
    train_keys: list[str],
    memory: dict[str, dict[str, Any]],
    train_times: dict[str, list[float]],
    first_steps: dict[str, float],
    inference_times: dict[str, dict[str, list[float]]],
    skipped_bf16: bool,
) -> dict[str, Any]:
    """All numbers in one dict (the JSON output); ratios are None where a path was not run."""
    train = {}
    for key in train_keys:
        median = statistics.median(train_times[key])
        train[key] = {
            "label": PATHS[key].label,
            "step_s_median": median,
            "step_s_all": train_times[key],
            "images_per_s": args.batch_size / median,
            "first_step_s": first_steps[key],
            "compile_s": first_steps[key] - median if PATHS[key].compiled else None,
            **memory[key],
        }

    def ratio(field: str, num: str, den: str = "official") -> float | None:
        if num not in train or den not in train:
            return None
        return train[num][field] / train[den][field]

    ratios = {
        f"{key} / official {kind}": ratio(field, key)
        for key in train_keys if key != "official"
        for kind, field in (("speed", "images_per_s"), ("peak memory", "peak_bytes"))
    }
    fastest = {
        precision: min((key for key in train_keys if PATHS[key].precision == precision and key != "official"),
                       key=lambda key: train[key]["step_s_median"], default=None)
        for precision in ("fp32", "bf16")
    }
    inference = {}
    for precision, times in inference_times.items():
        medians = {name: statistics.median(values) for name, values in times.items()}
        inference[precision] = {
            name: {
                "batch_s_median": medians[name],
                "batch_s_all": times[name],
                "images_per_s": args.batch_size / medians[name],
                "overhead_percent_vs_open_clip": (medians[name] / medians["open_clip"] - 1) * 100,
            }
            for name in times
        }
    targets = {
        f"fp32 speed >= {FP32_SPEED_TARGET:g}x official": verdict(ratio("images_per_s", "fp32"), FP32_SPEED_TARGET, at_least=True),
        f"fp32 peak memory <= {MEMORY_TARGET:g}x official": verdict(ratio("peak_bytes", "fp32"), MEMORY_TARGET, at_least=False),
        f"bf16 speed >= {SPEED_TARGET:g}x official fp32": verdict(ratio("images_per_s", "bf16"), SPEED_TARGET, at_least=True),
    }
    for precision, models in inference.items():
        overhead = models["upperson_merged"]["overhead_percent_vs_open_clip"]
        key = f"merged encode_image overhead ({precision}) <= {OVERHEAD_TARGET_PERCENT:g}%"
        targets[key] = verdict(overhead, OVERHEAD_TARGET_PERCENT, at_least=False)
    return {
        "config": {
            "backbone": args.backbone,
            "image_size": list(args.image_size),
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "device": args.device,
            "device_name": device_name(args.device),
            "cpu_flags": cpu_flags(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "upperson": upperson.__version__,
            "native_bf16": has_native_bf16(args.device),
            "bf16_paths_skipped": skipped_bf16,
        },
        "train": train,
        "ratios": ratios,
        "fastest": fastest,
        "inference": inference,
        "targets": targets,
    }


def cpu_flags() -> str:
    """The /proc/cpuinfo flags that decide matmul speed here (fp32 FMA width, native bf16, AMX)."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = set()
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
    return " ".join(flag for flag in wanted if flag in flags) or "unknown"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    capability = torch.backends.cpu.get_cpu_capability()
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{names[0] if names else platform.processor() or platform.machine()} ({capability})"


def render(summary: dict[str, Any]) -> str:
    """The results as markdown tables."""
    config = summary["config"]
    memory_kind = "peak CUDA alloc" if config["device"].startswith("cuda") else "peak RSS"
    lines = [
        f"## UP-Person training step: {config['backbone']} {config['image_size'][0]}x{config['image_size'][1]}, "
        f"batch {config['batch_size']}, {config['device_name']}, {config['threads']} threads, torch {config['torch']}",
        "",
        f"CPU flags: {config['cpu_flags']}. Median of {config['steps']} timed steps after {config['warmup']} warm-up "
        f"step(s), round-robin; {memory_kind} = one step in a fresh process (the first; the second for compiled "
        "paths), above the memory held before it.",
        "",
        f"| path | images/s | step s (median) | first step s | compile s | {memory_kind} MiB | saved activations MiB | speed vs official | memory vs official |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    official = summary["train"].get("official")
    for key, row in summary["train"].items():
        compile_s = "" if row["compile_s"] is None else f"{row['compile_s']:.0f}"
        speed = f"{row['images_per_s'] / official['images_per_s']:.2f}x" if official else "n/a"
        memory = f"{row['peak_bytes'] / official['peak_bytes']:.2f}x" if official else "n/a"
        lines.append(
            f"| {key}: {row['label']} | {row['images_per_s']:.3f} | {row['step_s_median']:.2f} | {row['first_step_s']:.1f} | "
            f"{compile_s} | {mib(row['peak_bytes']):.0f} | {mib(row['saved_activation_bytes']):.0f} | {speed} | {memory} |"
        )
    if config["bf16_paths_skipped"]:
        lines += [
            "",
            f"bf16 not run: {config['device_name']} has no native bf16 matmul (no AVX512-BF16/AMX), where "
            "PyTorch's bf16 GEMM fallback is far slower than fp32; force it with `--bf16 on`.",
        ]
    lines += ["", "Fastest measured per precision: " + ", ".join(
        f"{precision}: {key}" for precision, key in summary["fastest"].items() if key is not None
    )]
    for precision, models in summary["inference"].items():
        lines += [
            "",
            f"## Inference encode_image ({precision}, torch.no_grad), batch {config['batch_size']}",
            "",
            "| model | ms/batch (median) | images/s | overhead vs open_clip |",
            "|---|---:|---:|---:|",
        ]
        for name, row in models.items():
            lines.append(
                f"| {INFERENCE_MODELS[name]} | {row['batch_s_median'] * 1000:.0f} | {row['images_per_s']:.2f} | "
                f"{row['overhead_percent_vs_open_clip']:+.1f}% |"
            )
    lines += ["", "## Targets", "", "| target | result |", "|---|---|"]
    lines += [f"| {name} | {result} |" for name, result in summary["targets"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # silences "random weights" warnings (expected here)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_worker is not None:
        memory_worker(args)
        return
    started = time.perf_counter()
    # compile times are those of a first compile: inductor's on-disk cache starts empty in this process too
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="upperson-inductor-")
    use_bf16 = bf16_enabled(args)
    train_keys = selected_paths(args)
    memory = measure_memory(args, train_keys)
    train_times, first_steps = time_training(args, train_keys)
    gc.collect()
    inference_times = {} if args.skip_inference else time_inference(args, ["fp32", "bf16"] if use_bf16 else ["fp32"])
    summary = summarise(args, train_keys, memory, train_times, first_steps, inference_times, skipped_bf16=not use_bf16)
    summary["total_wall_s"] = time.perf_counter() - started
    print(render(summary))
    print(f"\nTotal wall time: {summary['total_wall_s']:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
