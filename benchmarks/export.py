"""Benchmark ``upperson export``: ONNX fp32 vs int8 vs torch speed on a ViT-B/16, and what int8 costs in R@1/mAP.

Two parts, one table each:

1. **Speed** of a ViT-B/16-shaped UP-Person (``--backbone``, random weights: speed does not depend
   on them) at ``--image-size``, LoRA merged: ``encode_image`` and ``encode_text`` of one batch
   in torch fp32, onnxruntime fp32 and onnxruntime int8 (dynamic quantisation), all on the CPU with
   ``--threads`` threads. Paths are timed round-robin (one call of each per round, order rotated)
   so background load hits them alike; the median of ``--repeats`` rounds after one warm-up round.
2. **Retrieval** on the synthetic CUHK-format test split (100 ids, 400 images, 800 captions) with
   the demo's pre-trained tiny CLIP (cached under ``--data-dir``) and an UP-Person adapter trained
   briefly here (the demo's config, ``--epochs`` epochs): R@1/mAP from torch, ONNX fp32 and ONNX
   int8 features, plus the parity (max abs difference, min cosine) of ONNX fp32 vs torch and int8
   vs fp32 on those test images and captions.

The CPU's model name and /proc/cpuinfo flags relevant to int8 (VNNI, AMX, AVX-512) are printed:
int8 speed-ups depend on them.

    python benchmarks/export.py                       # both parts, a few minutes on 2 cores
    python benchmarks/export.py --skip-retrieval --json export-bench.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import upperson
from upperson.data import load_dataset
from upperson.data.datasets import ImageDataset, collate_skip_none
from upperson.data.synthetic import generate_synthetic_cuhk
from upperson.data.transforms import build_transforms
from upperson.evaluation import retrieval_metrics
from upperson.experiments.demo import demo_config
from upperson.experiments.pretraining import pretrained_tiny_clip
from upperson.retrieval.export import OnnxEncoders, export_onnx, measure_parity
from upperson.retrieval.factory import build_inference_model
from upperson.runtime import cpu_flags
from upperson.training.loop import Trainer

INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile", "avx512_bf16")
"""cpuinfo flags that decide how fast onnxruntime's int8 kernels (MatMulInteger / DynamicQuantizeMatMul) run."""
CAPTION = "a woman with long black hair wearing a red coat, blue jeans and white shoes, carrying a black backpack"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="ViT-B-16-quickgelu", help="backbone of the speed part (random weights)")
    parser.add_argument("--image-size", nargs=2, type=int, default=(384, 128), metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--batch", type=int, default=8, help="images / captions per timed call")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and onnxruntime intra-op threads")
    parser.add_argument("--data-dir", type=Path, default=Path(".cache/upperson-synthetic"), help="synthetic dataset and pre-trained tiny CLIP cache")
    parser.add_argument("--epochs", type=int, default=3, help="UP-Person training epochs of the retrieval part")
    parser.add_argument("--work-dir", type=Path, help="where exports and the run go (default: a temporary directory)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-retrieval", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_description() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    flags = cpu_flags()
    return {"model": model, "cores": os.cpu_count(), "int8_flags": {flag: flag in flags for flag in INT8_FLAGS}, "load_average_1min": os.getloadavg()[0]}


def file_mb(path: Path) -> float:
    return path.stat().st_size / 2**20


def round_robin(jobs: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of every job: one warm-up round, then ``repeats`` rounds, order rotated each round."""
    names = list(jobs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats + 1):
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        for name in order:
            start = time.perf_counter()
            jobs[name]()
            if round_index:
                times[name].append(time.perf_counter() - start)
    return times


def bind(encode: Callable[[Any], Any], inputs: Any) -> Callable[[], None]:
    """A timed job: one call of ``encode`` on ``inputs``."""

    def job() -> None:
        encode(inputs)

    return job


def speed(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    image_size = tuple(args.image_size)
    log(f"building UP-Person on {args.backbone} (random weights) at {image_size[0]}x{image_size[1]}")
    model = upperson.create_model("up-person", backbone=args.backbone, image_size=image_size)
    model.merge_lora()
    model.eval()
    out = work / "vit-b16-onnx"
    log("exporting fp32 + int8 (the exporter takes a few minutes at this size)")
    start = time.perf_counter()
    report = export_onnx(model, out, quantize="int8", parity_samples=2)
    export_seconds = time.perf_counter() - start
    runtimes = {precision: OnnxEncoders.load(out, precision, threads=args.threads) for precision in ("fp32", "int8")}
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, *image_size, generator=generator)
    token_ids = upperson.tokenize([CAPTION] * args.batch)
    jobs: dict[str, Callable[[], None]] = {}
    for tower, inputs in (("image", images), ("text", token_ids)):
        jobs[f"{tower} torch fp32"] = bind(model.encode_image if tower == "image" else model.encode_text, inputs)
        for precision, runtime in runtimes.items():
            jobs[f"{tower} onnx {precision}"] = bind(runtime.encode_image if tower == "image" else runtime.encode_text, inputs.numpy())
    log(f"timing {len(jobs)} paths, batch {args.batch}, {args.repeats} rounds, {args.threads} threads")
    with torch.no_grad():
        times = round_robin(jobs, args.repeats)
    median = {name: statistics.median(values) for name, values in times.items()}
    sizes = {name: file_mb(out / name) for name in report.files}
    return {
        "backbone": args.backbone, "image_size": list(image_size), "batch": args.batch, "threads": args.threads,
        "export_seconds": export_seconds, "median_seconds": median, "file_mb": sizes,
        "parity_random": [dataclasses.asdict(item) for item in report.parity],
    }


def encode_split_with_onnx(runtime: OnnxEncoders, split: Any, image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    images = ImageDataset(split.image_paths, split.image_pids, build_transforms(image_size, train=False))
    image_features = [runtime.encode_image(batch["images"].numpy()) for batch in DataLoader(images, batch_size=64, collate_fn=collate_skip_none)]
    token_ids = upperson.tokenize(split.captions)
    text_features = [runtime.encode_text(chunk.numpy()) for chunk in token_ids.split(64)]
    return np.concatenate(image_features), np.concatenate(text_features)


def t2i_metrics(image_features: torch.Tensor, text_features: torch.Tensor, split: Any) -> dict[str, float]:
    similarity = F.normalize(text_features, dim=-1) @ F.normalize(image_features, dim=-1).t()
    return retrieval_metrics(similarity, torch.tensor(split.caption_pids), torch.tensor(split.image_pids))


def retrieval(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    generate_synthetic_cuhk(args.data_dir)
    log("pre-trained tiny CLIP (cached after the first run)")
    backbone = pretrained_tiny_clip(args.data_dir)
    run_dir = work / "run"
    config = demo_config(args.data_dir, run_dir, args.epochs, backbone=str(backbone))
    log(f"training UP-Person on the synthetic train split for {args.epochs} epochs")
    result = Trainer(config, run_dir).fit(overwrite=True)
    model = build_inference_model(config, result.best_adapter, "cpu")
    out = work / "tiny-onnx"
    export_onnx(model, out, adapter=result.best_adapter, quantize="int8")
    split = load_dataset(config.data.dataset, config.data.root).split("test")
    image_size = tuple(config.data.image_size)
    runtimes = {precision: OnnxEncoders.load(out, precision) for precision in ("fp32", "int8")}
    log("encoding the synthetic test split with torch, ONNX fp32 and ONNX int8")
    images = ImageDataset(split.image_paths, split.image_pids, build_transforms(image_size, train=False))
    image_batch = torch.stack([images[index]["images"] for index in range(len(images))])
    token_ids = upperson.tokenize(split.captions)
    with torch.no_grad():
        features = {"torch fp32": (model.encode_image(image_batch), model.encode_text(token_ids))}
    for precision, runtime in runtimes.items():
        image_features, text_features = encode_split_with_onnx(runtime, split, image_size)
        features[f"onnx {precision}"] = (torch.from_numpy(image_features), torch.from_numpy(text_features))
    metrics = {name: t2i_metrics(image_features, text_features, split) for name, (image_features, text_features) in features.items()}
    parity = measure_parity(model, runtimes, image_batch, token_ids, inputs="synthetic test split")
    return {
        "backbone": str(backbone), "adapter_epochs": args.epochs, "test_images": len(split.image_paths),
        "test_captions": len(split.captions), "metrics": metrics, "parity": [dataclasses.asdict(item) for item in parity],
        "file_mb": {path.name: file_mb(path) for path in sorted(out.glob("*.onnx"))},
    }


def render(results: dict[str, Any]) -> str:
    cpu = results["cpu"]
    flags = ", ".join(f"{flag} {'yes' if present else 'no'}" for flag, present in cpu["int8_flags"].items())
    lines = [
        f"CPU: {cpu['model']} ({cpu['cores']} cores visible); flags: {flags}",
        f"load average before / after: {cpu['load_average_1min']:.1f} / {results['load_average_after']:.1f} (other processes share the cores)",
        "",
    ]
    if "speed" in results:
        s = results["speed"]
        lines += [
            (
                f"Speed: UP-Person on {s['backbone']} (random weights) {s['image_size'][0]}x{s['image_size'][1]}, LoRA merged, "
                f"batch {s['batch']}, {s['threads']} threads, median of the timed rounds; export took {s['export_seconds']:.0f} s"
            ),
            "",
            "| encoder | path | ms / batch | items/s | vs torch fp32 | vs ONNX fp32 | file MB |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for tower in ("image", "text"):
            base = s["median_seconds"][f"{tower} torch fp32"]
            onnx = s["median_seconds"][f"{tower} onnx fp32"]
            for path in ("torch fp32", "onnx fp32", "onnx int8"):
                seconds = s["median_seconds"][f"{tower} {path}"]
                file_name = {"onnx fp32": f"{tower}_encoder.onnx", "onnx int8": f"{tower}_encoder.int8.onnx"}.get(path)
                size = f"{s['file_mb'][file_name]:.0f}" if file_name else ""
                lines.append(
                    f"| {tower} | {path} | {seconds * 1e3:.0f} | {s['batch'] / seconds:.1f} | {base / seconds:.2f}x | "
                    f"{onnx / seconds:.2f}x | {size} |"
                )
        lines.append("")
    if "retrieval" in results:
        r = results["retrieval"]
        lines += [
            (
                f"Retrieval: synthetic test split ({r['test_images']} images, {r['test_captions']} captions), pre-trained tiny CLIP + "
                f"UP-Person trained {r['adapter_epochs']} epochs, text-to-image"
            ),
            "",
            "| features | R@1 | R@5 | mAP | ΔR@1 vs torch | ΔmAP vs torch |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        base = r["metrics"]["torch fp32"]
        for name, values in r["metrics"].items():
            lines.append(
                f"| {name} | {values['R1']:.2f} | {values['R5']:.2f} | {values['mAP']:.2f} | "
                f"{values['R1'] - base['R1']:+.2f} | {values['mAP'] - base['mAP']:+.2f} |"
            )
        lines += ["", "Parity on the synthetic test split (tiny model above):", "", parity_table(r["parity"])]
    if "speed" in results:
        s = results["speed"]
        lines += ["", f"Parity on random inputs ({s['backbone']}, random weights, the export's own check):", "", parity_table(s["parity_random"])]
    return "\n".join(lines)


def parity_table(parity: list[dict[str, Any]]) -> str:
    lines = ["| encoder | runtime | vs | inputs (n) | max abs diff | min cosine | 1 − min cosine | mean cosine |", "|---|---|---|---|---:|---:|---:|---:|"]
    for item in parity:
        lines.append(
            f"| {item['tower']} | {item['candidate']} | {item['reference']} | {item['inputs']} ({item['samples']}) | "
            f"{item['max_abs_diff']:.2e} | {item['min_cosine']:.7f} | {1 - item['min_cosine']:.1e} | {item['mean_cosine']:.7f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"cpu": cpu_description(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "upperson": upperson.__version__}
    with tempfile.TemporaryDirectory(prefix="upperson-export-bench-") as temporary:
        work = args.work_dir or Path(temporary)
        if not args.skip_speed:
            results["speed"] = speed(args, work)
        if not args.skip_retrieval:
            results["retrieval"] = retrieval(args, work)
    results["load_average_after"] = os.getloadavg()[0]
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
