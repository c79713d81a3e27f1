"""Benchmark an UP-Person training step and LoRA-merged inference against plain CLIP.

Part 1, one training step (encode_image + encode_text, SDM loss, backward) for three paths:

    (a) fused attention (``attention_backend="sdpa"``) under bf16 autocast, with the frozen matmul
        weights stored in bf16 as the Trainer does (bit-identical outputs, no per-step casts);
    (b) fused attention in fp32;
    (c) the naive reference (``attention_backend="explicit"``) in fp32: it materialises the attention
        matrix and the LoRA-updated in-projection weight, as the official code does.

Part 2, inference ``encode_image`` under ``torch.no_grad``: UP-Person with merged LoRA vs the same
backbone without PETL vs raw open_clip.

Timing: every path is timed in this process, round-robin (one step of each path per round), so
background load drifts over all paths alike; the median of the timed rounds is reported.

Peak memory: each training path runs in a fresh subprocess whose very first step is measured with
``upperson profile``'s :class:`~upperson.experiments.profile.PeakMemory`, so no allocation left
over from another path or an earlier step is counted. Precision, autocast and the bf16 frozen
weights come from :mod:`upperson.runtime`, as in training.

Run ``python benchmarks/train_step.py --help`` for the options; the default takes a few minutes
on a 2-core CPU. Backbone weights are random (no download); speed and memory do not depend on them.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

import upperson
from upperson.experiments.profile import PeakMemory
from upperson.runtime import LOW_PRECISION, Precision, autocast, native_bf16

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
"""(a) images/s must be at least this multiple of (c)."""
MEMORY_TARGET = 0.7
"""(a) peak step memory must be at most this fraction of (c)."""
OVERHEAD_TARGET_PERCENT = 15.0
"""Merged UP-Person encode_image may be at most this much slower than raw open_clip."""
RESULT_MARKER = "RESULT_JSON "


@dataclass(frozen=True)
class TrainPath:
    key: str
    label: str
    backend: str
    precision: Precision


PATHS: dict[str, TrainPath] = {
    "a": TrainPath("a", "fused (sdpa), bf16 autocast", "sdpa", "bf16"),
    "b": TrainPath("b", "fused (sdpa), fp32", "sdpa", "fp32"),
    "c": TrainPath("c", "explicit (reference), fp32", "explicit", "fp32"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (and inference batches) per path")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps per path")
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


def build_path_model(args: argparse.Namespace, path: TrainPath) -> upperson.RetrievalModel:
    """The model a path trains: under bf16 the frozen matmul weights are stored in bf16, exactly as
    ``upperson train`` does (autocast would cast them at every use; outputs are bit-identical)."""
    model = build_up_person(args, path.backend)
    if path.precision in LOW_PRECISION:
        model.store_frozen_matmul_weights(LOW_PRECISION[path.precision])
    return model


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


def train_step(model: upperson.RetrievalModel, batch: Batch, path: TrainPath, device: str) -> float:
    """One forward/SDM/backward step; returns its wall time in seconds."""
    model.zero_grad(set_to_none=True)
    synchronize(device)
    start = time.perf_counter()
    with autocast(torch.device(device), path.precision):
        image_features = model.encode_image(batch.images)
        text_features = model.encode_text(batch.token_ids)
        loss = upperson.losses.sdm_loss(image_features, text_features, batch.pids, temperature=0.02)
    loss.backward()
    synchronize(device)
    return time.perf_counter() - start


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
    """Subprocess entry: measure the first training step of one path and print it as JSON."""
    path = PATHS[args.memory_worker]
    model = build_path_model(args, path)
    batch = make_batch(args)
    with PeakMemory(torch.device(args.device)) as memory, saved_activation_bytes(model) as saved:
        seconds = train_step(model, batch, path, args.device)
    result = {
        "peak_bytes": memory.delta,
        "peak_exact": memory.exact,
        "saved_activation_bytes": sum(saved.values()),
        "first_step_s": seconds,
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
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
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


def time_training(args: argparse.Namespace, keys: list[str]) -> dict[str, list[float]]:
    """Seconds per step for each path, each on its own model built as that path trains."""
    batch = make_batch(args)
    jobs = {key: _step_job(build_path_model(args, PATHS[key]), batch, PATHS[key], args.device) for key in keys}
    return round_robin(jobs, args.warmup, args.steps, "train")


def _step_job(model: upperson.RetrievalModel, batch: Batch, path: TrainPath, device: str) -> Callable[[], float]:
    return lambda: train_step(model, batch, path, device)


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
            **memory[key],
        }

    def ratio(key: str, num: str, den: str) -> float | None:
        if num not in train or den not in train:
            return None
        return train[num][key] / train[den][key]

    ratios = {
        f"({num})/({den}) {kind}": ratio(field, num, den)
        for num, den in (("a", "c"), ("b", "c"), ("a", "b"))
        for kind, field in (("speed", "images_per_s"), ("peak memory", "peak_bytes"))
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
        f"(a) speed >= {SPEED_TARGET:g}x (c)": verdict(ratios["(a)/(c) speed"], SPEED_TARGET, at_least=True),
        f"(a) peak memory <= {MEMORY_TARGET:g}x (c)": verdict(
            ratios["(a)/(c) peak memory"], MEMORY_TARGET, at_least=False
        ),
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
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "upperson": upperson.__version__,
            "native_bf16": has_native_bf16(args.device),
            "bf16_paths_skipped": skipped_bf16,
        },
        "train": train,
        "ratios": ratios,
        "inference": inference,
        "targets": targets,
    }


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
        f"Median of {config['steps']} timed steps after {config['warmup']} warm-up step(s); "
        f"{memory_kind} = first step in a fresh process, above the memory held before it.",
        "",
        f"| path | images/s | step s (median) | {memory_kind} MiB | saved activations MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, row in summary["train"].items():
        lines.append(
            f"| ({key}) {row['label']} | {row['images_per_s']:.3f} | {row['step_s_median']:.2f} | "
            f"{mib(row['peak_bytes']):.0f} | {mib(row['saved_activation_bytes']):.0f} |"
        )
    if config["bf16_paths_skipped"]:
        lines += [
            "",
            f"(a) not run: {config['device_name']} has no native bf16 matmul (no AVX512-BF16/AMX), where "
            "PyTorch's bf16 GEMM fallback is far slower than fp32; force it with `--bf16 on`.",
        ]
    lines += ["", "| ratio | value |", "|---|---:|"]
    for name, value in summary["ratios"].items():
        lines.append(f"| {name} | {'n/a' if value is None else f'{value:.2f}x'} |")
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
    use_bf16 = bf16_enabled(args)
    train_keys = [key for key in PATHS if use_bf16 or PATHS[key].precision != "bf16"]
    memory = measure_memory(args, train_keys)
    train_times = time_training(args, train_keys)
    gc.collect()
    inference_times = {} if args.skip_inference else time_inference(args, ["fp32", "bf16"] if use_bf16 else ["fp32"])
    summary = summarise(args, train_keys, memory, train_times, inference_times, skipped_bf16=not use_bf16)
    summary["total_wall_s"] = time.perf_counter() - started
    print(render(summary))
    print(f"\nTotal wall time: {summary['total_wall_s']:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
