"""Benchmark ``upperson export``: ONNX fp32 vs int8 vs torch speed on a ViT-B/16, and what int8 costs in R@1/mAP.

Two parts, one table each, every int8 scheme of ``SCHEMES`` side by side (``--quantize int8``
writes the first; the others are what it was chosen against):

1. **Speed** of a ViT-B/16-shaped UP-Person (``--backbone``, random weights: speed does not depend
   on them) at ``--image-size``, LoRA merged: ``encode_image`` and ``encode_text`` of one batch
   in torch fp32, onnxruntime fp32 and onnxruntime int8, all on the CPU with ``--threads``
   threads. Paths are timed round-robin (one call of each per round, order rotated) so background
   load hits them alike; the median of ``--repeats`` rounds after one warm-up round. Plus each
   scheme's parity with ONNX fp32 on the export's own random check inputs.
2. **Retrieval** on the synthetic CUHK-format test split (100 ids, 400 images, 800 captions) with
   the demo's pre-trained tiny CLIP (cached under ``--data-dir``) and an UP-Person adapter trained
   briefly here (the demo's config, ``--epochs`` epochs): R@1/mAP from torch, ONNX fp32 and each
   int8 scheme's features, plus the parity (max abs difference, min cosine) of ONNX fp32 vs torch
   and int8 vs fp32 on those test images and captions.

The CPU's model name, the /proc/cpuinfo flags relevant to int8 (VNNI, AMX, AVX-512) and whether
onnxruntime's uint8 x int8 kernel saturates here (x86 without VNNI) are printed.

``--replay WORK_DIR`` reruns the parity and retrieval parts on the files a run with ``--work-dir
WORK_DIR`` left, with onnxruntime only (no export, no torch model). onnxruntime has no switch
that forces its kernels to AVX2, so to measure an AVX2-only CPU, replay under an emulated one:

    python benchmarks/export.py                       # both parts, ~15 minutes on 2 busy cores
    python benchmarks/export.py --skip-retrieval --json export-bench.json
    python benchmarks/export.py --work-dir /tmp/export-bench
    qemu-x86_64 -cpu EPYC-Rome .venv/bin/python benchmarks/export.py --replay /tmp/export-bench
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
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
from upperson.retrieval.export import (
    DEFAULT_INT8_SCHEME,
    PARITY_SAMPLES,
    Int8Scheme,
    OnnxEncoders,
    compare_features,
    encoder_file,
    export_onnx,
    fp32_weights,
    machine_description,
    measure_parity,
    nodes_of_weights,
    quantize_int8,
    random_inputs_of_size,
    read_manifest,
    u8s8_saturates,
)
from upperson.retrieval.factory import build_inference_model
from upperson.runtime import seed_everything
from upperson.training.loop import Trainer

SCHEMES: dict[str, Int8Scheme] = {
    "int8": DEFAULT_INT8_SCHEME,
    "int8 7-bit, all": Int8Scheme(fp32_first_blocks=0, fp32_projections=False),
    "int8 8-bit, all": Int8Scheme(reduce_range=False, fp32_first_blocks=0, fp32_projections=False),
}
"""The int8 schemes compared: ``--quantize int8``'s, then everything quantised with 7-bit and (as before 2026-12-07) 8-bit weights."""
CAPTION = "a woman with long black hair wearing a red coat, blue jeans and white shoes, carrying a black backpack"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="ViT-B-16-quickgelu", help="backbone of the speed part (random weights)")
    parser.add_argument("--image-size", nargs=2, type=int, default=(384, 128), metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--batch", type=int, default=8, help="images / captions per timed call")
    parser.add_argument("--seed", type=int, default=0, help="seed of the speed part's random weights")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and onnxruntime intra-op threads")
    parser.add_argument("--data-dir", type=Path, default=Path(".cache/upperson-synthetic"), help="synthetic dataset and pre-trained tiny CLIP cache")
    parser.add_argument("--epochs", type=int, default=3, help="UP-Person training epochs of the retrieval part")
    parser.add_argument("--work-dir", type=Path, help="where exports and the run go (default: a temporary directory)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-retrieval", action="store_true")
    parser.add_argument("--replay", type=Path, metavar="WORK_DIR", help="only rerun parity and retrieval on a --work-dir's files, onnxruntime only")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_description() -> dict[str, Any]:
    return {**machine_description(), "u8s8_saturates": u8s8_saturates(), "load_average_1min": os.getloadavg()[0]}


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


def scheme_files(export_dir: Path) -> dict[str, tuple[Path, Path]]:
    """(image, text) int8 files of every scheme: ``--quantize int8``'s in the export, the others beside it."""
    return {
        name: tuple(
            (export_dir if scheme == DEFAULT_INT8_SCHEME else export_dir.parent / f"{export_dir.name}-scheme{index}") / encoder_file(tower, "int8")
            for tower in ("image", "text")
        )
        for index, (name, scheme) in enumerate(SCHEMES.items())
    }


def write_schemes(model: upperson.RetrievalModel, export_dir: Path, threads: int) -> dict[str, OnnxEncoders]:
    """Quantise the export's fp32 files with every scheme it lacks; all schemes' runtimes, fp32 first."""
    files = scheme_files(export_dir)
    for name, scheme in SCHEMES.items():
        for tower, target in zip(("image", "text"), files[name]):
            if not target.exists():
                source = export_dir / encoder_file(tower)
                target.parent.mkdir(parents=True, exist_ok=True)
                quantize_int8(source, target, scheme, nodes_of_weights(source, fp32_weights(model, tower, scheme)))
    return load_runtimes(export_dir, threads)


def load_runtimes(export_dir: Path, threads: int) -> dict[str, OnnxEncoders]:
    """``{"fp32": ..., scheme name: ...}`` for an export and its schemes' files."""
    return {"fp32": OnnxEncoders.load(export_dir, threads=threads)} | {
        name: OnnxEncoders(*paths, threads=threads) for name, paths in scheme_files(export_dir).items()
    }


def file_sizes(export_dir: Path) -> dict[str, float]:
    sizes = {f"{tower} onnx fp32": file_mb(export_dir / encoder_file(tower)) for tower in ("image", "text")}
    for name, paths in scheme_files(export_dir).items():
        sizes |= {f"{tower} onnx {name}": file_mb(path) for tower, path in zip(("image", "text"), paths)}
    return sizes


def speed(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    image_size = tuple(args.image_size)
    log(f"building UP-Person on {args.backbone} (random weights, seed {args.seed}) at {image_size[0]}x{image_size[1]}")
    seed_everything(args.seed)
    model = upperson.create_model("up-person", backbone=args.backbone, image_size=image_size)
    model.merge_lora()
    model.eval()
    out = work / "vit-b16-onnx"
    log("exporting fp32 + int8 (the exporter takes a few minutes at this size)")
    start = time.perf_counter()
    report = export_onnx(model, out, quantize="int8", overwrite=True)
    export_seconds = time.perf_counter() - start
    log(f"quantising the other schemes: {', '.join(name for name in SCHEMES if SCHEMES[name] != DEFAULT_INT8_SCHEME)}")
    runtimes = write_schemes(model, out, args.threads)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, *image_size, generator=generator)
    token_ids = upperson.tokenize([CAPTION] * args.batch)
    jobs: dict[str, Callable[[], None]] = {}
    for tower, inputs in (("image", images), ("text", token_ids)):
        jobs[f"{tower} torch fp32"] = bind(model.encode_image if tower == "image" else model.encode_text, inputs)
        for name, runtime in runtimes.items():
            jobs[f"{tower} onnx {name}"] = bind(runtime.encode_image if tower == "image" else runtime.encode_text, inputs.numpy())
    log(f"timing {len(jobs)} paths, batch {args.batch}, {args.repeats} rounds, {args.threads} threads")
    with torch.no_grad():
        times = round_robin(jobs, args.repeats)
    median = {name: statistics.median(values) for name, values in times.items()}
    parity = measure_parity(model, runtimes, *random_inputs_of_size(image_size, model.backbone_spec.context_length, PARITY_SAMPLES), inputs="random")
    return {
        "backbone": args.backbone, "seed": args.seed, "image_size": list(image_size), "batch": args.batch, "threads": args.threads,
        "export_seconds": export_seconds, "median_seconds": median, "file_mb": file_sizes(out),
        "export_check": [dataclasses.asdict(item) for item in report.parity],
        "parity_random": [dataclasses.asdict(item) for item in parity],
    }


def onnx_parity(runtimes: dict[str, OnnxEncoders], images: np.ndarray, token_ids: np.ndarray, inputs: str) -> list[dict[str, Any]]:
    """Every int8 runtime against ``runtimes["fp32"]`` (no torch), as :func:`measure_parity` reports it."""
    rows = []
    for tower, batch in (("image", images), ("text", token_ids)):
        features = {name: np.concatenate([encode(runtime, tower, chunk) for chunk in np.array_split(batch, max(1, len(batch) // 64))]) for name, runtime in runtimes.items()}
        for name in (name for name in runtimes if name != "fp32"):
            max_abs, min_cos, mean_cos = compare_features(features[name], features["fp32"])
            rows.append({"tower": tower, "candidate": f"onnx {name}", "reference": "onnx fp32", "inputs": inputs, "samples": len(batch),
                         "max_abs_diff": max_abs, "min_cosine": min_cos, "mean_cosine": mean_cos})
    return rows


def encode(runtime: OnnxEncoders, tower: str, inputs: np.ndarray) -> np.ndarray:
    return runtime.encode_image(inputs) if tower == "image" else runtime.encode_text(inputs)


def encode_split_with_onnx(runtime: OnnxEncoders, split: Any, image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    images = ImageDataset(split.image_paths, split.image_pids, build_transforms(image_size, train=False))
    image_features = [runtime.encode_image(batch["images"].numpy()) for batch in DataLoader(images, batch_size=64, collate_fn=collate_skip_none)]
    token_ids = upperson.tokenize(split.captions)
    text_features = [runtime.encode_text(chunk.numpy()) for chunk in token_ids.split(64)]
    return np.concatenate(image_features), np.concatenate(text_features)


def t2i_metrics(image_features: torch.Tensor, text_features: torch.Tensor, split: Any) -> dict[str, float]:
    similarity = F.normalize(text_features, dim=-1) @ F.normalize(image_features, dim=-1).t()
    return retrieval_metrics(similarity, torch.tensor(split.caption_pids), torch.tensor(split.image_pids))


def split_images(split: Any, image_size: tuple[int, int]) -> torch.Tensor:
    images = ImageDataset(split.image_paths, split.image_pids, build_transforms(image_size, train=False))
    return torch.stack([images[index]["images"] for index in range(len(images))])


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
    export_onnx(model, out, adapter=result.best_adapter, quantize="int8", overwrite=True)
    runtimes = write_schemes(model, out, args.threads)
    split = load_dataset(config.data.dataset, config.data.root).split("test")
    image_size = tuple(config.data.image_size)
    log("encoding the synthetic test split with torch, ONNX fp32 and every int8 scheme")
    image_batch = split_images(split, image_size)
    token_ids = upperson.tokenize(split.captions)
    with torch.no_grad():
        features = {"torch fp32": (model.encode_image(image_batch), model.encode_text(token_ids))}
    for name, runtime in runtimes.items():
        image_features, text_features = encode_split_with_onnx(runtime, split, image_size)
        features[f"onnx {name}"] = (torch.from_numpy(image_features), torch.from_numpy(text_features))
    metrics = {name: t2i_metrics(image_features, text_features, split) for name, (image_features, text_features) in features.items()}
    parity = measure_parity(model, runtimes, image_batch, token_ids, inputs="synthetic test split")
    return {
        "backbone": str(backbone), "adapter_epochs": args.epochs, "test_images": len(split.image_paths),
        "test_captions": len(split.captions), "metrics": metrics, "parity": [dataclasses.asdict(item) for item in parity],
        "file_mb": file_sizes(out),
    }


def replay(args: argparse.Namespace) -> dict[str, Any]:
    """The parity (and, for the tiny export, retrieval) of a ``--work-dir``'s files on this CPU, onnxruntime only."""
    results: dict[str, Any] = {}
    vit = args.replay / "vit-b16-onnx"
    if vit.is_dir():
        log(f"replaying {vit}")
        manifest = read_manifest(vit)
        image_size = (manifest["image"]["height"], manifest["image"]["width"])
        images, token_ids = random_inputs_of_size(image_size, manifest["text"]["context_length"], PARITY_SAMPLES)
        results["speed"] = {
            "backbone": args.backbone, "image_size": list(image_size),
            "parity_random": onnx_parity(load_runtimes(vit, args.threads), images.numpy(), token_ids.numpy(), inputs="random"),
        }
    tiny = args.replay / "tiny-onnx"
    if tiny.is_dir():
        log(f"replaying {tiny} on the synthetic test split of {args.data_dir}")
        manifest = read_manifest(tiny)
        image_size = (manifest["image"]["height"], manifest["image"]["width"])
        split = load_dataset("cuhk-pedes", args.data_dir).split("test")
        runtimes = load_runtimes(tiny, args.threads)
        features = {f"onnx {name}": encode_split_with_onnx(runtime, split, image_size) for name, runtime in runtimes.items()}
        metrics = {name: t2i_metrics(torch.from_numpy(image), torch.from_numpy(text), split) for name, (image, text) in features.items()}
        token_ids = upperson.tokenize(split.captions).numpy()
        results["retrieval"] = {
            "backbone": manifest["backbone_source"], "adapter_epochs": None, "test_images": len(split.image_paths),
            "test_captions": len(split.captions), "metrics": metrics,
            "parity": onnx_parity(runtimes, split_images(split, image_size).numpy(), token_ids, inputs="synthetic test split"),
        }
    if not results:
        raise SystemExit(f"--replay {args.replay}: neither vit-b16-onnx/ nor tiny-onnx/ there; run with --work-dir {args.replay} first")
    return results


def render(results: dict[str, Any]) -> str:
    cpu = results["cpu"]
    flags = ", ".join(f"{flag} {'yes' if present else 'no'}" for flag, present in cpu["int8_flags"].items())
    kernel = "saturates int16 pairs (x86 without VNNI)" if cpu["u8s8_saturates"] else "exact (VNNI, or no pairwise int16 step)"
    lines = [
        f"CPU: {cpu['cpu']} ({cpu['cores']} cores visible); /proc/cpuinfo flags: {flags}",
        f"onnxruntime {results['onnxruntime']} uint8 x int8 kernel here: {kernel}; torch {results['torch']}",
        f"load average before / after: {cpu['load_average_1min']:.1f} / {results['load_average_after']:.1f} (other processes share the cores)",
        "",
    ]
    paths = ["torch fp32", "onnx fp32", *(f"onnx {name}" for name in SCHEMES)]
    if "median_seconds" in results.get("speed", {}):
        s = results["speed"]
        lines += [
            (
                f"Speed: UP-Person on {s['backbone']} (random weights, seed {s['seed']}) {s['image_size'][0]}x{s['image_size'][1]}, "
                f"LoRA merged, batch {s['batch']}, {s['threads']} thread(s), median of the timed rounds; export took {s['export_seconds']:.0f} s"
            ),
            "",
            "| encoder | path | ms / batch | items/s | vs torch fp32 | vs ONNX fp32 | file MB |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for tower in ("image", "text"):
            base = s["median_seconds"][f"{tower} torch fp32"]
            onnx = s["median_seconds"][f"{tower} onnx fp32"]
            for path in paths:
                seconds = s["median_seconds"][f"{tower} {path}"]
                size = f"{s['file_mb'][f'{tower} {path}']:.0f}" if f"{tower} {path}" in s["file_mb"] else ""
                lines.append(
                    f"| {tower} | {path} | {seconds * 1e3:.0f} | {s['batch'] / seconds:.1f} | {base / seconds:.2f}x | "
                    f"{onnx / seconds:.2f}x | {size} |"
                )
        lines.append("")
    if "retrieval" in results:
        r = results["retrieval"]
        base_name = "torch fp32" if "torch fp32" in r["metrics"] else "onnx fp32"
        trained = f" trained {r['adapter_epochs']} epochs" if r["adapter_epochs"] else ""
        lines += [
            (
                f"Retrieval: synthetic test split ({r['test_images']} images, {r['test_captions']} captions), pre-trained tiny CLIP + "
                f"UP-Person{trained}, text-to-image"
            ),
            "",
            f"| features | R@1 | R@5 | mAP | ΔR@1 vs {base_name} | ΔmAP vs {base_name} |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        base = r["metrics"][base_name]
        for name, values in r["metrics"].items():
            lines.append(
                f"| {name} | {values['R1']:.2f} | {values['R5']:.2f} | {values['mAP']:.2f} | "
                f"{values['R1'] - base['R1']:+.2f} | {values['mAP'] - base['mAP']:+.2f} |"
            )
        lines += ["", "Parity on the synthetic test split (tiny model above):", "", parity_table(r["parity"])]
    if "speed" in results:
        s = results["speed"]
        lines += ["", f"Parity on random inputs ({s['backbone']}, random weights, the export's own check inputs):", "", parity_table(s["parity_random"])]
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
    if args.replay:
        results |= replay(args)
    else:
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
