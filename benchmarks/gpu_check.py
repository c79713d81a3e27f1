"""Verify and measure upperson on a CUDA GPU in one command (``make gpu-check``), within a time budget.

A GPU is lent to a session by chance, for minutes, so this one script does everything a GPU is
needed for, most important first, and writes ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``
(rewritten after every item, so a run cut short still leaves its results):

1. the machine: GPU, capability, memory, driver, torch / CUDA / cuDNN versions, CPU and its flags;
2. correctness: ``pytest -m cuda tests/test_cuda.py`` in a subprocess, its JUnit XML parsed into the
   report (outcome, message and the errors each test measured);
3. speed of one UP-Person training step (forward, SDM loss, backward, Adam step, as the Trainer
   takes it: ``build_training``, ``loss_terms``, ``backward``, ``optimizer_step``) on ViT-B/16 at
   384x128 with random weights (nothing is downloaded), for each batch size and path:

   (a) the default: ``train.precision: auto`` (bf16 on GPUs with bf16), fused SDPA, frozen
       matmul weights stored in that dtype;
   (b) fused SDPA in fp32;
   (c) the official-style path: explicit attention (the attention matrix and the LoRA-updated
       in-projection materialised) with every weight and activation in fp16 and no autocast, as
       the official code trains its fp16-converted CLIP;
   (c-fp32) the same explicit path in fp32, ``benchmarks/train_step.py``'s (c);

   reporting images/s, the peak of ``torch.cuda.max_memory_allocated`` over one step, and the
   implied time of one CUHK-PEDES epoch;
4. evaluation throughput of the default path's model with LoRA merged (images/s, texts/s);
5. ``torch.compile`` of path (a), in a subprocess: compile time apart from the step time; a
   failure is recorded with its error, not raised.

Items that do not fit in ``--time-budget-s`` are skipped and listed with the reason. ``--smoke``
runs the same code on the CPU with the tiny backbone in well under a minute (CPU precisions only,
``torch.compile`` with the quick ``eager`` backend), so every commit exercises the kit
(``tests/test_gpu_check_smoke.py``).
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
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal
from xml.etree import ElementTree

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # this checkout's upperson, installed or not (GPU machines run it from src/)

from official_style import make_official_style, official_step  # noqa: E402
from train_step import SPEED_TARGET, Batch, device_name, log, make_batch, mib, verdict  # noqa: E402

import upperson  # noqa: E402
from upperson.config import DataConfig, EvalConfig, RunConfig, TrainConfig  # noqa: E402
from upperson.data.check import PAPER_STATISTICS  # noqa: E402
from upperson.experiments.profile import PeakMemory, synchronized_seconds  # noqa: E402
from upperson.petl.attention import AttentionBackend  # noqa: E402
from upperson.runtime import autocast, cpu_flags, native_bf16, resolve_device, seed_everything  # noqa: E402
from upperson.training.step import TrainingParts, backward, build_training, loss_terms, optimizer_step  # noqa: E402

CUDA_TESTS = REPO / "tests" / "test_cuda.py"
RESULT_MARKER = "RESULT_JSON "
SCHEMA_VERSION = 1

EPOCH_PAIRS = PAPER_STATISTICS["cuhk-pedes"]["train"][2]
"""Image-caption pairs in one CUHK-PEDES training epoch (68,126)."""
MEMORY_TARGET = 0.5
"""(a) peak memory must be at most this fraction of (c)'s at the target batch size."""
TARGET_BATCH = 128
"""Batch size the targets are judged at (the largest measured one when it is not measured)."""
CPU_FLAGS_OF_NOTE = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class SpeedPath:
    key: str
    label: str
    attention_backend: AttentionBackend
    precision: Literal["auto", "fp32"]
    """``train.precision`` asked for (``auto`` is resolved for the device by ``build_training``)."""
    half_model: bool = False
    """Official style: every weight and the images in fp16, no autocast (losses still upcast to fp32)."""
    official: bool = False
    """The official step as ``official_style`` reproduces it: full towers, open_clip's QuickGELU."""


def speed_paths(device: torch.device) -> dict[str, SpeedPath]:
    """The training paths measured on ``device``: fp16 weights need CUDA, so the CPU has no fp16 (c)."""
    paths = [
        SpeedPath("a", "default: precision auto, fused SDPA, frozen weights in that dtype", "sdpa", "auto"),
        SpeedPath("b", "fused SDPA, fp32", "sdpa", "fp32"),
    ]
    if device.type == "cuda":
        paths += [
            SpeedPath("c", "official-style: explicit attention, full towers, fp16 weights and activations", "explicit", "fp32", half_model=True, official=True),
            SpeedPath("c-fp32", "official-style in fp32 (train_step.py's official)", "explicit", "fp32", official=True),
        ]
    else:
        paths.append(SpeedPath("c", "official-style in fp32 (fp16 weights need CUDA)", "explicit", "fp32", official=True))
    return {path.key: path for path in paths}


@dataclass(frozen=True)
class Mode:
    """The defaults of a full (GPU) or smoke (CPU) run."""

    backbone: str
    image_size: tuple[int, int]
    batch_sizes: tuple[int, ...]
    steps: int
    """Timed steps per measurement."""
    warmup: int
    """Untimed steps before them, the first one included."""
    time_budget_s: float
    compile_backend: str
    measure_cap_s: float
    """Timed steps of one measurement stop after this long (at least two are taken)."""
    tests_timeout_s: float
    """Most the correctness tests may take."""
    estimated_s: dict[str, float]
    """Least time each kind of item needs (train, eval, compile): it is skipped when less is left;
    ``tests_reserve`` is kept for the speed items when the tests' timeout is set."""


FULL = Mode(
    backbone="ViT-B-16-quickgelu", image_size=(384, 128), batch_sizes=(64, 128), steps=10, warmup=3, time_budget_s=480.0,
    compile_backend="inductor", measure_cap_s=20.0, tests_timeout_s=240.0,
    estimated_s={"train": 25.0, "eval": 20.0, "compile": 90.0, "tests_reserve": 150.0},
)
"""The GPU run: OpenAI's ViT-B/16 architecture (QuickGELU) with random weights, as train_step.py builds it."""
SMOKE = Mode(
    backbone="tiny", image_size=(64, 32), batch_sizes=(4,), steps=2, warmup=1, time_budget_s=120.0,
    compile_backend="eager", measure_cap_s=5.0, tests_timeout_s=120.0,
    estimated_s={"train": 5.0, "eval": 5.0, "compile": 20.0, "tests_reserve": 20.0},
)
"""The CPU smoke run: the same code on the tiny backbone; inductor would take minutes to compile on a CPU."""


@dataclass(frozen=True)
class Setup:
    """What this run measures, and how."""

    smoke: bool
    device: torch.device
    backbone: str
    image_size: tuple[int, int]
    batch_sizes: tuple[int, ...]
    eval_batch_size: int
    steps: int
    warmup: int
    compile_backend: str
    measure_cap_s: float

    @property
    def mode(self) -> Mode:
        return SMOKE if self.smoke else FULL

    @property
    def target_batch(self) -> int:
        return TARGET_BATCH if TARGET_BATCH in self.batch_sizes else max(self.batch_sizes)


@dataclass(frozen=True)
class Item:
    """One measurement of the plan."""

    kind: Literal["train", "eval", "compile"]
    path: str | None = None
    batch_size: int | None = None

    @property
    def name(self) -> str:
        return f"{self.kind} ({self.path}) batch {self.batch_size}" if self.path else self.kind


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, gpu_check.md and the test logs")
    parser.add_argument("--smoke", action="store_true", help="the same code paths on the CPU with the tiny model (under a minute)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help=f"training batch sizes (default {' '.join(map(str, FULL.batch_sizes))}; smoke {' '.join(map(str, SMOKE.batch_sizes))})")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help=f"wall-clock budget of the whole run (default {FULL.time_budget_s:g}; smoke {SMOKE.time_budget_s:g})")
    parser.add_argument("--steps", type=int, default=None, help=f"timed steps per measurement (default {FULL.steps}; smoke {SMOKE.steps})")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed steps first, the first one included (default {FULL.warmup}; smoke {SMOKE.warmup})")
    parser.add_argument("--compile-backend", default=None,
                        help=f"torch.compile backend (default {FULL.compile_backend}; smoke {SMOKE.compile_backend})")
    parser.add_argument("--compile-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_sizes is not None and min(args.batch_sizes) < 2:
        parser.error("--batch-sizes: SDM needs at least 2 samples per batch")
    return args


def make_setup(args: argparse.Namespace) -> Setup:
    mode = SMOKE if args.smoke else FULL
    batch_sizes = tuple(sorted(set(args.batch_sizes or mode.batch_sizes)))
    return Setup(
        smoke=args.smoke,
        device=torch.device("cpu") if args.smoke else resolve_device("auto"),
        backbone=mode.backbone,
        image_size=mode.image_size,
        batch_sizes=batch_sizes,
        eval_batch_size=max(batch_sizes) if args.smoke else EvalConfig().batch_size,
        steps=args.steps or mode.steps,
        warmup=max(1, args.warmup or mode.warmup),
        compile_backend=args.compile_backend or mode.compile_backend,
        measure_cap_s=mode.measure_cap_s,
    )


# --- the machine ----------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict[str, Any]:
    flags = cpu_flags()
    info: dict[str, Any] = {
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "upperson": upperson.__version__,
        "platform": platform.platform(),
        "cpu": device_name("cpu"),
        "cpu_count": os.cpu_count(),
        "cpu_flags_of_note": [flag for flag in CPU_FLAGS_OF_NOTE if flag in flags],
        "cpu_flags": sorted(flags),
        "native_bf16": native_bf16(device)[1],
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "gpus": [],
        "driver": nvidia_driver(),
    }
    if device.type == "cuda":
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            info["gpus"].append({
                "name": properties.name,
                "capability": f"{properties.major}.{properties.minor}",
                "memory_bytes": properties.total_memory,
                "multiprocessors": properties.multi_processor_count,
            })
    return info


def nvidia_driver() -> str | None:
    """The NVIDIA driver version nvidia-smi reports; None where there is no nvidia-smi."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=False,
        )
    except FileNotFoundError:
        return None
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown (nvidia-smi: {error})"
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else f"unknown (nvidia-smi exit {done.returncode})"


# --- correctness: the cuda-marked tests -----------------------------------------------------------


def child_environment() -> dict[str, str]:
    """The environment of subprocesses: they import this checkout's upperson too."""
    source = str(REPO / "src")
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": source if not path else f"{source}{os.pathsep}{path}"}


def run_cuda_tests(out: Path, timeout_s: float) -> dict[str, Any]:
    """``pytest -m cuda tests/test_cuda.py`` in a subprocess; the JUnit XML summarised."""
    junit, log_file = out / "cuda_tests.xml", out / "cuda_tests.log"
    junit.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "pytest", "-m", "cuda", str(CUDA_TESTS.relative_to(REPO)), "-q", "-rs", "-p", "no:cacheprovider",
        f"--junitxml={junit}", "-o", "junit_family=xunit1",  # xunit1 keeps the errors the tests record
    ]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, env=child_environment(), capture_output=True, text=True, timeout=timeout_s, check=False)
        output, status = done.stdout + done.stderr, f"exit {done.returncode}"
    except subprocess.TimeoutExpired as expired:
        output = _text(expired.stdout) + _text(expired.stderr)
        status = f"timed out after {timeout_s:.0f} s"
    log_file.write_text(output)
    summary = parse_junit(junit) if junit.exists() else {"cases": []}
    counts = {outcome: sum(case["outcome"] == outcome for case in summary["cases"]) for outcome in ("passed", "failed", "error", "skipped")}
    return {"command": " ".join(["python", *command[1:]]), "status": status, "wall_s": time.perf_counter() - started, **counts,
            "cases": summary["cases"], "output_tail": output[-3000:]}


def _text(data: str | bytes | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def parse_junit(path: Path) -> dict[str, Any]:
    """Each test case of a JUnit XML file: name, outcome, message, time and recorded properties."""
    cases = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            element = case.find(kind)
            if element is not None:
                outcome, message = name, element.get("message", "")
                break
        properties = {item.get("name"): item.get("value") for item in case.iter("property")}
        cases.append({"name": case.get("name"), "outcome": outcome, "message": message,
                      "time_s": float(case.get("time", 0.0)), "properties": properties})
    return {"cases": cases}


# --- speed ----------------------------------------------------------------------------------------


def build_parts(path: SpeedPath, setup: Setup) -> TrainingParts:
    """The model, loss and optimizer of ``path`` exactly as the Trainer builds them (paper sizes: prefix 10, LoRA rank 32)."""
    config = RunConfig(
        backbone=setup.backbone,
        model={"attention_backend": path.attention_backend},
        data=DataConfig(image_size=setup.image_size),
        train=TrainConfig(precision=path.precision),
        device=str(setup.device),
    )
    seed_everything(0)
    parts = build_training(config, num_train_ids=1, device=setup.device)
    if path.official:
        make_official_style(parts.model)
    if path.half_model:
        parts.model.half()
    return parts


def batch_of(setup: Setup, batch_size: int) -> Batch:
    """train_step.py's batch: random images, captions of varied lengths, person ids in pairs."""
    return make_batch(argparse.Namespace(batch_size=batch_size, image_size=setup.image_size, device=str(setup.device)))


def training_step(parts: TrainingParts, batch: Batch, half_model: bool, official: bool = False) -> None:
    images = batch.images.half() if half_model else batch.images
    with official_step() if official else contextlib.nullcontext():
        terms = loss_terms(parts, images, batch.token_ids, batch.pids, parts.precision)
    backward(parts, sum(terms.values()))
    optimizer_step(parts)


def timed(function: Callable[[], Any], device: torch.device) -> float:
    return synchronized_seconds(function, device)


def repeat_timed(function: Callable[[], Any], setup: Setup) -> list[float]:
    """``setup.steps`` timings, fewer (at least two) when they pass ``setup.measure_cap_s``."""
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < setup.steps and (len(times) < 2 or time.perf_counter() - started < setup.measure_cap_s):
        times.append(timed(function, setup.device))
    return times


def measure_training(path: SpeedPath, setup: Setup, batch_size: int, compile_backend: str | None = None) -> dict[str, Any]:
    """Warm-up steps (the first timed apart), the peak memory of one step, then the timed steps."""
    parts = build_parts(path, setup)
    if compile_backend is not None:
        parts.model.compile(backend=compile_backend)
    batch = batch_of(setup, batch_size)
    parts.model.train()

    def step() -> None:
        training_step(parts, batch, path.half_model, path.official)

    first_s = timed(step, setup.device)
    for _ in range(setup.warmup - 1):
        timed(step, setup.device)
    with PeakMemory(setup.device) as memory:
        step()
    times = repeat_timed(step, setup)
    median = statistics.median(times)
    precision = "fp16 (weights and activations)" if path.half_model else parts.precision
    return {
        "path": path.key,
        "label": path.label,
        "batch_size": batch_size,
        "precision": precision,
        "attention_backend": path.attention_backend,
        "images_per_s": batch_size / median,
        "step_s_median": median,
        "step_s": times,
        "first_step_s": first_s,
        "peak_bytes": memory.peak,
        "step_bytes": memory.delta,
        "memory_exact": memory.exact,
        "epoch_s": EPOCH_PAIRS * median / batch_size,
    }


def measure_evaluation(setup: Setup) -> dict[str, Any]:
    """Encoder throughput of the default path's model with LoRA merged, under its autocast, without gradients."""
    parts = build_parts(speed_paths(setup.device)["a"], setup)
    model = parts.model.eval()
    model.merge_lora()
    batch = batch_of(setup, setup.eval_batch_size)

    def encode(encoder: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), autocast(setup.device, parts.precision):
                encoder(inputs)

        return run

    results = {"batch_size": setup.eval_batch_size, "precision": parts.precision}
    for name, encoder, inputs in (("images", model.encode_image, batch.images), ("texts", model.encode_text, batch.token_ids)):
        run = encode(encoder, inputs)
        for _ in range(setup.warmup):
            timed(run, setup.device)
        median = statistics.median(repeat_timed(run, setup))
        results[f"{name}_per_s"] = setup.eval_batch_size / median
    return results


def release_memory(device: torch.device) -> None:
    """Free what the last measurement left (its model went out of scope), so the next one starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compile_worker(setup: Setup) -> None:
    """Subprocess entry: path (a) under ``torch.compile`` at the target batch; one JSON line on stdout."""
    path = speed_paths(setup.device)["a"]
    try:
        result = measure_training(path, setup, setup.target_batch, compile_backend=setup.compile_backend)
    except Exception as error:  # any compiler failure is a result to report, not a crash of the kit
        result = {"error": f"{type(error).__name__}: {' '.join(str(error).split())[:2000]}"}
    print(RESULT_MARKER + json.dumps(result), flush=True)


def run_compile(args: argparse.Namespace, setup: Setup, timeout_s: float) -> dict[str, Any]:
    """:func:`compile_worker` in a fresh process with a timeout: a hung or crashed compiler costs only its budget."""
    command = [sys.executable, str(Path(__file__).resolve()), "--compile-worker", "--out", str(args.out),
               "--batch-sizes", str(setup.target_batch), "--steps", str(setup.steps), "--warmup", str(setup.warmup),
               "--compile-backend", setup.compile_backend]
    if setup.smoke:
        command.append("--smoke")
    base = {"backend": setup.compile_backend, "batch_size": setup.target_batch}
    try:
        done = subprocess.run(command, env=child_environment(), capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {**base, "status": "skipped", "error": f"did not finish within the {timeout_s:.0f} s left of the budget"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if not lines:
        return {**base, "status": "failed", "error": f"worker exit {done.returncode}: {done.stderr[-2000:]}"}
    result = json.loads(lines[-1].removeprefix(RESULT_MARKER))
    if "error" in result:
        return {**base, "status": "failed", "error": result["error"]}
    return {**base, "status": "ok", "compile_s": max(0.0, result["first_step_s"] - result["step_s_median"]), **result}


# --- the run --------------------------------------------------------------------------------------


@dataclass
class Report:
    """Everything measured so far; written after every item."""

    mode: str
    setup: dict[str, Any]
    machine: dict[str, Any]
    time_budget_s: float
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    wall_s: float = 0.0
    tests: dict[str, Any] | None = None
    train: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None
    compile: dict[str, Any] | None = None
    ratios: dict[str, float | None] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    """Items left out for time, with the reason."""
    failed: list[dict[str, str]] = field(default_factory=list)
    """Measurements that raised, with the error (the run goes on with the next one)."""
    error: str | None = None
    """Why nothing was measured (no GPU)."""
    schema: int = SCHEMA_VERSION

    def row(self, path: str, batch_size: int) -> dict[str, Any] | None:
        return next((row for row in self.train if row["path"] == path and row["batch_size"] == batch_size), None)


def plan(setup: Setup) -> list[Item]:
    """The items in priority order: the targets' rows first, then the other batch sizes, compile last."""
    paths = speed_paths(setup.device)
    order = [key for key in ("a", "c", "b", "c-fp32") if key in paths]
    items = [Item("train", key, setup.target_batch) for key in order[:3]]
    items.append(Item("eval"))
    items += [Item("train", key, setup.target_batch) for key in order[3:]]
    for batch_size in sorted(set(setup.batch_sizes) - {setup.target_batch}, reverse=True):
        items += [Item("train", key, batch_size) for key in order]
    items.append(Item("compile", "a", setup.target_batch))
    return items


def fill_comparisons(report: Report, setup: Setup) -> None:
    """Ratios between paths at the target batch, the targets, and compiled vs eager speed."""
    batch = setup.target_batch

    def ratio(num: str, den: str, key: str) -> float | None:
        a, b = report.row(num, batch), report.row(den, batch)
        return None if a is None or b is None else a[key] / b[key]

    report.ratios = {
        f"({num})/({den}) {name} at batch {batch}": ratio(num, den, key)
        for num, den in (("a", "c"), ("a", "b"), ("a", "c-fp32"), ("b", "c-fp32"))
        for name, key in (("speed", "images_per_s"), ("peak memory", "peak_bytes"))
        if num in speed_paths(setup.device) and den in speed_paths(setup.device)
    }
    speed, memory = ratio("a", "c", "images_per_s"), ratio("a", "c", "peak_bytes")
    report.targets = [
        {"target": f"(a) images/s >= {SPEED_TARGET:g}x (c) at batch {batch}", "value": speed, "verdict": verdict(speed, SPEED_TARGET, at_least=True)},
        {"target": f"(a) peak memory <= {MEMORY_TARGET:g}x (c) at batch {batch}", "value": memory, "verdict": verdict(memory, MEMORY_TARGET, at_least=False)},
    ]
    eager = report.row("a", batch)
    if report.compile and report.compile.get("status") == "ok" and eager is not None:
        report.compile["speedup_vs_eager"] = report.compile["images_per_s"] / eager["images_per_s"]


def write_report(report: Report, setup: Setup, out: Path, started: float) -> None:
    report.wall_s = time.perf_counter() - started
    fill_comparisons(report, setup)
    for name, text in (("gpu_check.json", json.dumps(asdict(report), indent=2) + "\n"), ("gpu_check.md", render(report))):
        temporary = out / f".{name}.tmp"
        temporary.write_text(text)
        temporary.replace(out / name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup = make_setup(args)
    logging.getLogger().setLevel(logging.ERROR)  # "random weights" warnings are expected here
    if args.compile_worker:
        compile_worker(setup)
        return 0
    started = time.perf_counter()
    mode = setup.mode
    budget_s = args.time_budget_s or mode.time_budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(
        mode="smoke" if setup.smoke else "full",
        setup={**asdict(setup), "device": str(setup.device), "target_batch": setup.target_batch, "epoch_pairs": EPOCH_PAIRS},
        machine=machine_info(setup.device),
        time_budget_s=budget_s,
    )
    if not setup.smoke and setup.device.type != "cuda":
        driver = report.machine["driver"]
        seen = (f"nvidia-smi reports driver {driver}, so this torch cannot use it: a CPU build, or CUDA {torch.version.cuda} "
                "needs a newer driver (install a torch built for the driver's CUDA)" if driver else "no NVIDIA driver found")
        report.error = f"torch {torch.__version__} sees no CUDA GPU: {seen}. On a CPU, --smoke checks the kit itself"
        write_report(report, setup, args.out, started)
        log(report.error)
        return 2

    def left() -> float:
        return budget_s - (time.perf_counter() - started)

    tests_timeout = max(10.0, min(mode.tests_timeout_s, left() - mode.estimated_s["tests_reserve"]))
    log(f"correctness: pytest -m cuda {CUDA_TESTS.relative_to(REPO)} (timeout {tests_timeout:.0f} s)")
    report.tests = run_cuda_tests(args.out, tests_timeout)
    write_report(report, setup, args.out, started)

    paths = speed_paths(setup.device)
    longest_train = 0.0
    for item in plan(setup):
        need = max(mode.estimated_s["train"], 1.5 * longest_train) if item.kind == "train" else mode.estimated_s[item.kind]
        if left() < need:
            report.skipped.append({"item": item.name, "reason": f"time budget: {left():.0f} s left, needs about {need:.0f} s"})
            log(f"skipped {item.name}: {report.skipped[-1]['reason']}")
            continue
        log(f"{item.name} ({left():.0f} s of the budget left)")
        item_started = time.perf_counter()
        try:
            if item.kind == "train":
                report.train.append(measure_training(paths[item.path], setup, item.batch_size))
                longest_train = max(longest_train, time.perf_counter() - item_started)
            elif item.kind == "eval":
                report.evaluation = measure_evaluation(setup)
            else:
                report.compile = run_compile(args, setup, timeout_s=left())
        except Exception as error:  # one failed measurement (out of memory, a kernel error) must not cost the rest
            report.failed.append({"item": item.name, "error": f"{type(error).__name__}: {' '.join(str(error).split())[:2000]}"})
            log(f"{item.name} failed: {report.failed[-1]['error']}")
        release_memory(setup.device)
        write_report(report, setup, args.out, started)
    write_report(report, setup, args.out, started)  # the skipped items since the last measurement, the final wall time
    print(render(report))
    tests = report.tests
    passed = tests["status"] == "exit 0" and not tests["failed"] and not tests["error"] and not report.failed
    return 0 if passed else 1


# --- the markdown report --------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{rest:02d}s"


def render(report: Report) -> str:
    setup, machine = report.setup, report.machine
    lines = [
        f"# upperson GPU check ({report.mode}): {report.started}",
        "",
        f"{setup['backbone']} at {setup['image_size'][0]}x{setup['image_size'][1]}, random weights; "
        f"wall time {report.wall_s:.0f} s of a {report.time_budget_s:.0f} s budget.",
        "",
        *(["**Smoke run**: the tiny model on the CPU exercises the code paths of the GPU run; its numbers measure "
           "nothing (the targets are meant for ViT-B/16 at batch 128 on a GPU).", ""] if report.mode == "smoke" else []),
        "## Machine",
        "",
        "| | |",
        "|---|---|",
    ]
    for index, gpu in enumerate(machine["gpus"]):
        lines.append(f"| GPU {index} | {gpu['name']}, capability {gpu['capability']}, {gpu['memory_bytes'] / 2**30:.0f} GiB, "
                     f"{gpu['multiprocessors']} SMs |")
    if not machine["gpus"]:
        lines.append(f"| GPU | none ({machine['device']}) |")
    lines += [
        f"| driver | {machine['driver'] or 'n/a'} |",
        f"| torch | {machine['torch']} (CUDA {machine['torch_cuda'] or 'none'}, cuDNN {machine['cudnn'] or 'none'}), TF32 matmul {machine['tf32_matmul']} |",
        f"| CPU | {machine['cpu']}, {machine['cpu_count']} logical cores |",
        f"| CPU flags | {' '.join(machine['cpu_flags_of_note']) or 'none of ' + ', '.join(CPU_FLAGS_OF_NOTE)} |",
        f"| bf16 | {machine['native_bf16']} |",
        f"| python, upperson | {machine['python']}, {machine['upperson']} |",
    ]
    if report.error:
        lines += ["", f"**Error:** {report.error}"]
    if report.tests is not None:
        tests = report.tests
        lines += [
            "",
            "## Correctness on CUDA",
            "",
            f"`{tests['command']}`: {tests['status']}, {tests['wall_s']:.0f} s: **{tests['passed']} passed, "
            f"{tests['failed']} failed, {tests['error']} errors, {tests['skipped']} skipped**.",
            "",
            "| test | outcome | measured | message |",
            "|---|---|---|---|",
        ]
        for case in tests["cases"]:
            measured = "; ".join(f"{key}: {value}" for key, value in case["properties"].items())
            message = " ".join(case["message"].split())[:200].replace("|", "\\|")
            lines.append(f"| {case['name']} | {case['outcome']} | {measured} | {message} |")
    if report.train:
        lines += [
            "",
            f"## Training step (forward, SDM, backward, Adam step); CUHK-PEDES epoch = {setup['epoch_pairs']:,} pairs",
            "",
            f"Median of up to {setup['steps']} steps after {setup['warmup']} warm-up step(s); peak = "
            f"{'torch.cuda.max_memory_allocated' if machine['gpus'] else 'process resident set (VmHWM)'} during one step "
            "(model, optimizer and batch included); step = the part above what was held before it.",
            "",
            "| path | batch | precision | attention | images/s | step ms | first step s | peak MiB | step MiB | epoch |",
            "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in report.train:
            lines.append(
                f"| ({row['path']}) {row['label']} | {row['batch_size']} | {row['precision']} | {row['attention_backend']} | "
                f"{row['images_per_s']:.1f} | {_ms(row['step_s_median'])} | {row['first_step_s']:.2f} | "
                f"{mib(row['peak_bytes']):.0f} | {mib(row['step_bytes']):.0f} | {_duration(row['epoch_s'])} |"
            )
    if report.targets:
        lines += ["", "## Targets", "", "| target | value | verdict |", "|---|---:|---|"]
        for target in report.targets:
            value = "n/a" if target["value"] is None else f"{target['value']:.2f}x"
            lines.append(f"| {target['target']} | {value} | {target['verdict']} |")
        lines += ["", "| ratio | value |", "|---|---:|"]
        lines += [f"| {name} | {'n/a' if value is None else f'{value:.2f}x'} |" for name, value in report.ratios.items()]
    if report.evaluation:
        evaluation = report.evaluation
        lines += [
            "",
            "## Evaluation (path (a)'s model, LoRA merged, no gradients)",
            "",
            "| batch | precision | images/s | texts/s |",
            "|---:|---|---:|---:|",
            f"| {evaluation['batch_size']} | {evaluation['precision']} | {evaluation['images_per_s']:.1f} | {evaluation['texts_per_s']:.1f} |",
        ]
    if report.compile:
        compiled = report.compile
        lines += ["", f"## torch.compile of path (a), backend {compiled['backend']}, batch {compiled['batch_size']}", ""]
        if compiled["status"] == "ok":
            speedup = compiled.get("speedup_vs_eager")
            lines += [
                "| compile s | images/s compiled | vs eager | peak MiB |",
                "|---:|---:|---:|---:|",
                f"| {compiled['compile_s']:.1f} | {compiled['images_per_s']:.1f} | "
                f"{'n/a' if speedup is None else f'{speedup:.2f}x'} | {mib(compiled['peak_bytes']):.0f} |",
            ]
        else:
            lines.append(f"{compiled['status']}: {compiled['error'][:1000]}")
    if report.failed:
        lines += ["", "## Failed measurements", ""]
        lines += [f"- {item['item']}: {item['error'][:1000]}" for item in report.failed]
    if report.skipped:
        lines += ["", "## Skipped", ""]
        lines += [f"- {item['item']}: {item['reason']}" for item in report.skipped]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
