"""Resident memory of `upperson serve` for 1 and 5 scenarios on ONE ViT-B/16 backbone (384x128).

The scenarios are five UP-Person adapters (random tensors, the paper's CUHK-PEDES configuration,
7.4M parameters each) with small random gallery indexes (see ``serve_fixtures.py``). Each
configuration is measured in a fresh subprocess: ``VmRSS`` from ``/proc/self/status`` after the
imports (the baseline), after loading the scenarios, and after one text query per scenario (which
swaps every adapter in once). For comparison the same scenarios are also loaded the way separate
``upperson search`` runs hold them: one merged model per scenario (``model_from_index``), in one
process.

glibc keeps part of what loading the checkpoint frees (its mmap threshold grows after the first large
free, so later buffers come from the heap): the shared configurations are measured with glibc's
defaults, as ``upperson serve`` runs, and once more with the threshold pinned
(``MALLOC_MMAP_THRESHOLD_=131072``), which shows what the process really holds.

    python benchmarks/serve_memory.py            # about a minute on 2 CPU cores, ~5 GB of memory
    python benchmarks/serve_memory.py --json serve_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from serve_fixtures import describe_cpu, random_adapters, random_index, vit_b16_checkpoint, write_json

RESULT_MARKER = "RESULT_JSON "
PINNED = {"MALLOC_MMAP_THRESHOLD_": "131072"}
MIB = 2**20
QUERY = "a young man in a black jacket, blue jeans and white sneakers carrying a grey backpack"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1000, help="gallery rows per scenario (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, help="keep the checkpoint, adapters and indexes here (default: a temporary folder)")
    parser.add_argument("--skip-separate", action="store_true", help="leave out the one-model-per-scenario comparison")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "COUNT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(workdir: Path, mode: str, count: int) -> dict[str, Any]:
    """Load ``count`` scenarios in this fresh process and report its resident memory at each step."""
    from upperson.retrieval.gallery import GalleryIndex, model_from_index
    from upperson.retrieval.scenarios import Scenarios, ScenarioSpec

    torch.set_num_threads(1)  # memory does not depend on it, and the machine may be busy
    folders = sorted(workdir.glob("index-*"))[:count]
    baseline = rss_bytes()
    started = time.perf_counter()
    if mode == "shared":
        scenarios = Scenarios([ScenarioSpec(folder.name, folder) for folder in folders])
        loaded = rss_bytes()
        for scenario in scenarios:
            scenario.search_text(QUERY, 10)
        counts = {"models": len(scenarios.models), "backbones": len(scenarios.backbones)}
        adapter_bytes = sum(scenario.adapter.num_bytes for scenario in scenarios)
    else:
        indexes = [GalleryIndex.load(folder) for folder in folders]
        models = [model_from_index(index) for index in indexes]
        loaded = rss_bytes()
        for index, model in zip(indexes, models):
            index.search(model, [QUERY], 10)
        counts = {"models": len(models), "backbones": len(models)}
        adapter_bytes = 0
    return {
        "mode": mode,
        "scenarios": count,
        **counts,
        "seconds": time.perf_counter() - started,
        "baseline": baseline,
        "loaded": loaded,
        "queried": rss_bytes(),
        "peak": rss_bytes("VmHWM"),
        "adapter_tensor_bytes": adapter_bytes,
    }


def run_worker(workdir: Path, mode: str, count: int, pinned: bool = False) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--workdir", str(workdir), "--worker", mode, str(count)]
    environment = os.environ | (PINNED if pinned else {}) | {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} x{count} worker failed (exit {completed.returncode}):\n{completed.stdout}\n{completed.stderr}")
    return {**json.loads(lines[-1].removeprefix(RESULT_MARKER)), "pinned": pinned}


def prepare(workdir: Path, rows: int) -> dict[str, int]:
    checkpoint = vit_b16_checkpoint(workdir)
    model, adapters = random_adapters(workdir, checkpoint, 5)
    for number, adapter in enumerate(adapters):
        random_index(workdir / f"index-{number}", model, adapter, rows, seed=number)
    return {
        "backbone_bytes": _bytes(model.backbone_state_dict()),
        "adapter_bytes": _bytes(model.trainable_state_dict()),
        "adapter_parameters": sum(tensor.numel() for tensor in model.trainable_state_dict().values()),
    }


def _bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())


def report(sizes: dict[str, int], results: list[dict[str, Any]]) -> str:
    lines = [
        f"ViT-B/16 at 384x128 (random weights): frozen backbone tensors {sizes['backbone_bytes'] / MIB:,.0f} MiB, "
        f"one UP-Person adapter {sizes['adapter_parameters'] / 1e6:.2f}M parameters = {sizes['adapter_bytes'] / MIB:.1f} MiB (fp32)",
        f"torch {torch.__version__}; {describe_cpu()}",
        "",
        "| how | glibc | scenarios | models / backbones in memory | RSS after imports MiB | + loading MiB | + one query each MiB | peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {"shared": "`upperson serve` (`Scenarios`)", "separate": "one merged model per scenario (`model_from_index`)"}
    for result in results:
        lines.append(
            f"| {labels[result['mode']]} | {'mmap threshold pinned' if result['pinned'] else 'default'} | {result['scenarios']} | {result['models']} / {result['backbones']} | "
            f"{result['baseline'] / MIB:,.0f} | {(result['loaded'] - result['baseline']) / MIB:,.0f} | "
            f"{(result['queried'] - result['baseline']) / MIB:,.0f} | {result['peak'] / MIB:,.0f} |"
        )
    shared = {result["scenarios"]: result for result in results if result["mode"] == "shared" and not result["pinned"]}
    if 1 in shared and 5 in shared:
        extra = (shared[5]["queried"] - shared[1]["queried"]) / 4
        lines += [
            "",
            f"each scenario beyond the first costs {extra / MIB:.1f} MiB "
            f"({extra / sizes['adapter_bytes']:.2f}x one adapter); 5 scenarios cost "
            f"{(shared[5]['queried'] - shared[5]['baseline']) / (shared[1]['queried'] - shared[1]['baseline']):.2f}x one",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_MARKER + json.dumps(worker(args.workdir, args.worker[0], int(args.worker[1]))))
        return
    with tempfile.TemporaryDirectory(prefix="upperson-serve-memory-") as temporary:
        workdir = (args.workdir or Path(temporary)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        print("preparing the checkpoint, 5 adapters and their indexes ...", file=sys.stderr)
        sizes = prepare(workdir, args.rows)
        runs = [("shared", 1, False), ("shared", 5, False), ("shared", 1, True), ("shared", 5, True)]
        runs += [] if args.skip_separate else [("separate", 1, False), ("separate", 5, False)]
        results = []
        for mode, count, pinned in runs:
            print(f"measuring {mode} x{count}{' (pinned mmap threshold)' if pinned else ''} in a fresh process ...", file=sys.stderr)
            results.append(run_worker(workdir, mode, count, pinned))
    print(report(sizes, results))
    write_json(args.json, {"sizes": sizes, "results": results})


if __name__ == "__main__":
    main()
