"""Command line: argument parsing, progress bars and printing; the work happens in the library."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from tqdm import tqdm

import upperson
from upperson.backbone import BackboneLoadError, backbone_from_state_dict, load_backbone, read_checkpoint_state_dict
from upperson.config import load_config, override_fields
from upperson.data import check_dataset, load_dataset
from upperson.data.records import MissingSplitError
from upperson.evaluation.evaluate import evaluate_with_config
from upperson.methods import METHODS, RetrievalModel, build_model
from upperson.methods.official import import_official_state_dict, official_backbone_state_dict, official_method, read_official_config
from upperson.retrieval.factory import build_inference_model
from upperson.retrieval.gallery import FAISS_THRESHOLD, GalleryIndex, SearchHit, model_from_index
from upperson.retrieval.scenarios import display_path
from upperson.runtime import resolve_device, resolve_precision
from upperson.training.distributed import DistributedEnv
from upperson.training.history import CONFIG_FILE
from upperson.training.loop import DatasetValidationError, Trainer, default_run_dir

if TYPE_CHECKING:
    import torch

    from upperson.retrieval.export import Parity  # the export extra (onnx) is imported only by `upperson export`

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_INDEX_DIR = ".upperson-index"
"""``upperson index`` writes here inside the image folder unless --out is given (hidden: never scanned)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="upperson", description="Parameter-efficient text-based person retrieval on CLIP.")
    parser.add_argument("--version", action="version", version=f"upperson {upperson.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="parameter counts of a method on a backbone, per encoder and component")
    info.add_argument("--method", default="up-person", choices=sorted(METHODS))
    info.add_argument("--backbone", default="tiny", help="'tiny', a CLIP checkpoint file, or '<open_clip name>[:<tag or file>]'")
    info.add_argument("--image-size", nargs=2, type=int, default=(384, 128), metavar=("HEIGHT", "WIDTH"))
    info.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="method option, e.g. prefix_length=10 or model.prefix_length=10 (value syntax as train --set)")

    convert = commands.add_parser("convert", help="official UP-Person or CSKT checkpoint → upperson adapter file")
    convert.add_argument("checkpoint", type=Path, help="official .pth (the model's state_dict, optionally under 'model')")
    convert.add_argument("--out", type=Path, required=True, help="adapter file to write (.safetensors)")
    convert.add_argument("--overwrite", action="store_true", help="replace --out if it exists (refused otherwise)")
    convert.add_argument("--backbone", help="CLIP the adapter will run on (default: the CLIP weights inside the checkpoint)")
    convert.add_argument("--image-size", nargs=2, type=int, default=(384, 128), metavar=("HEIGHT", "WIDTH"))
    convert.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a method option read from the file, e.g. lambda_init=100 (value syntax as train --set)")
    train = commands.add_parser("train", help="train a method on a dataset (progress bar, logs, checkpoints)")
    train.add_argument("--config", type=Path, help="YAML config (configs/up-person/*.yaml); defaults if omitted")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. data.root=/data or backbone=ViT-B-16.pt")
    train.add_argument("--seed", type=int, help="shortcut for --set train.seed=SEED (giving both is an error)")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run after its last completed epoch")
    train.add_argument("--run-dir", type=Path, help="where to write the run (default: output_dir/run_name)")
    train.add_argument(
        "--overwrite", action="store_true",
        help="start over in a run directory that holds a run: the old run is moved to RUN_DIR.replaced-<time> (never deleted)",
    )

    evaluate = commands.add_parser("eval", help="evaluate an adapter on a dataset split (also cross-domain)")
    evaluate.add_argument("--config", type=Path, help="the config the adapter was trained with (run_dir/config.yaml)")
    evaluate.add_argument("--adapter", type=Path, help="adapter file (.safetensors); not used by method zero-shot")
    evaluate.add_argument("--dataset", help="evaluate on another dataset than the config's (cross-domain)")
    evaluate.add_argument("--root", help="data root for --dataset")
    evaluate.add_argument("--split", default="test", help="split to evaluate (test or val)")
    evaluate.add_argument("--i2t", action="store_true", help="also report image-to-text retrieval")
    evaluate.add_argument("--json", type=Path, help="write the metrics as JSON here")
    evaluate.add_argument("--allow-other-backbone", action="store_true", help="accept other weights of the same backbone architecture")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")

    data = commands.add_parser("data", help="dataset tools")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    check = data_commands.add_parser("check", help="validate a dataset on disk; exit 1 if training would break")
    check.add_argument("root", type=Path, help="directory holding the dataset folder (or the folder itself)")
    check.add_argument("--dataset", required=True, help="cuhk-pedes, icfg-pedes, rstpreid, flickr30k or mscoco")
    check.add_argument("--no-verify-images", action="store_true", help="skip opening every image")

    ablate = commands.add_parser(
        "ablate",
        help="train and evaluate variants of a config, then write ablation.md/.json (paper Tables V, X)",
        description="Train every variant of VARIANTS.yaml on top of the base config, evaluate each on the test split, "
        "and tabulate them. VARIANTS.yaml is a YAML list of {name: NAME, set: {dotted.key: value, ...}} entries, e.g. "
        "'- {name: sdm+itc, set: {train.losses: [sdm, itc]}}'. Each variant runs in OUT/NAME (with --seeds N > 1: "
        "OUT/NAME/seed-S for S = train.seed ... train.seed+N-1); finished runs (metrics.json present) are skipped "
        "and interrupted ones resume, so re-running finishes a study.",
    )
    ablate.add_argument("--base", type=Path, help="base YAML config (defaults if omitted)")
    ablate.add_argument("--variants", type=Path, required=True, help="YAML list of {name, set} entries")
    ablate.add_argument("--out", type=Path, help="study directory (default: <output_dir>/<variants file name>)")
    ablate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override applied to every variant, before the variant's own")
    ablate.add_argument(
        "--seeds", type=int, default=1, metavar="N",
        help="train each variant with N seeds (train.seed, train.seed+1, ...); the table shows mean ± sample std "
        "(ddof=1), ablation.json every seed's values too (default: %(default)s, one run in OUT/NAME)",
    )

    cross = commands.add_parser(
        "cross-domain",
        help="evaluate trained runs on other datasets; source x target R@1/mAP matrix (paper Table XI)",
        description="For each run directory (config.yaml + best.safetensors from `upperson train`) evaluate text-to-image "
        "retrieval on every target dataset's split and write cross_domain.md and cross_domain.json.",
    )
    cross.add_argument("--runs", type=Path, nargs="+", required=True, metavar="RUN_DIR", help="trained run directories")
    cross.add_argument(
        "--datasets", nargs="+", default=[], metavar="NAME=ROOT",
        help="target datasets, e.g. rstpreid=/data icfg-pedes=/data (default: the runs' own training datasets)",
    )
    cross.add_argument("--split", default="test", help="split evaluated on every target (default: test)")
    cross.add_argument("--adapter", choices=("best", "last"), default="best", help="which adapter of each run")
    cross.add_argument("--out", type=Path, default=Path("runs/cross-domain"), help="where to write the matrix")
    cross.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run's config, e.g. device=cpu")

    profile = commands.add_parser(
        "profile",
        help="parameters, GFLOPs per image/text, training-step peak memory and throughput (paper Table IV)",
        description="Profile a method configuration on the current device: trainable/total parameters, forward GFLOPs "
        "per image and per caption (LoRA merged), peak memory of one training step at --batch-size, and inference "
        "images/s and texts/s. Backbone weights do not change the numbers; 'tiny' needs no download.",
    )
    profile.add_argument("--config", type=Path, help="YAML config (defaults if omitted)")
    profile.add_argument("--method", choices=sorted(METHODS), help="method (overrides the config's)")
    profile.add_argument("--backbone", help="'tiny', a CLIP checkpoint file, or '<open_clip name>[:<tag or file>]'")
    profile.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. model.lora_rank=16")
    profile.add_argument("--variants", type=Path, help="also profile each entry of a variants file (format of `ablate`)")
    profile.add_argument("--batch-size", type=int, help="training and inference batch (default: train.batch_size)")
    profile.add_argument("--image-size", nargs=2, type=int, metavar=("HEIGHT", "WIDTH"), help="default: data.image_size")
    profile.add_argument("--device", help="cpu, cuda, cuda:1 (default: the config's device)")
    profile.add_argument("--num-classes", type=int, help="training identities for the ID classifier (default: read the dataset)")
    profile.add_argument("--steps", type=int, default=5, help="timed inference batches per encoder (median)")
    profile.add_argument("--json", type=Path, help="also write the results as JSON here")

    index = commands.add_parser(
        "index",
        help="encode your own image folder with a trained adapter (incremental; for `upperson search`)",
        description="Recursively encode the images (jpg, jpeg, png, bmp, webp) under --images with the run's adapter "
        "(LoRA merged, test transforms) and write features.safetensors + index.json to --out. Re-running updates "
        "the index: unchanged files keep their features; an index of another adapter or config is rebuilt.",
    )
    index.add_argument("--config", type=Path, required=True, help="the run's config (RUN_DIR/config.yaml)")
    index.add_argument("--adapter", type=Path, required=True, help="adapter file (RUN_DIR/best.safetensors)")
    index.add_argument("--images", type=Path, required=True, help="image folder, searched recursively (hidden entries ignored)")
    index.add_argument("--out", type=Path, help="index directory (default: IMAGES/.upperson-index)")
    index.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. train.precision=fp32")
    index.add_argument("--batch-size", type=int, help="images per encoder call (default: eval.batch_size)")
    index.add_argument("--device", help="cpu, cuda, cuda:1 (default: the config's device)")

    search = commands.add_parser("search", help="rank an indexed gallery for text queries (table, JSON, figure)")
    search.add_argument("index", type=Path, metavar="INDEX_DIR", help="directory written by `upperson index`")
    search.add_argument("queries", nargs="+", metavar="QUERY", help="text descriptions of the person")
    search.add_argument("--top-k", type=int, default=10, help="hits per query")
    search.add_argument("--json", type=Path, help="write the hits as JSON here")
    search.add_argument("--figure", type=Path, help="write a PNG of each query's top-k images here")
    search.add_argument("--adapter", type=Path, help="the adapter file, if it moved since indexing (must be the same file)")
    search.add_argument(
        "--gallery-root", type=Path, metavar="DIR",
        help="read images only inside DIR (default: the folder holding INDEX_DIR); needed when the images are elsewhere",
    )
    search.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (default: cuda if available)")
    search.add_argument(
        "--faiss-threshold", type=int, default=FAISS_THRESHOLD,
        help="use FAISS (exact, if installed) for galleries larger than this (default: %(default)s)",
    )

    serve = commands.add_parser(
        "serve",
        help="search API and page over indexed galleries (FastAPI on uvicorn; needs upperson[serve])",
        description="Serve one or more gallery indexes (`upperson index`) as named scenarios: a JSON API under /api "
        "(its OpenAPI schema at /openapi.json; no docs UI, which would load a CDN) and a search page at /. Scenarios on "
        "the same backbone share one copy of it in memory; each keeps only its adapter. Host, port, device and token are "
        "checked before any model loads.",
    )
    serve.add_argument("--scenario", action="append", default=[], metavar="NAME=INDEX_DIR", help="a scenario (repeatable)")
    serve.add_argument(
        "--gallery-root", type=Path, metavar="DIR",
        help="read the images of every --scenario only inside DIR (default: the folder holding each INDEX_DIR); needed "
        "when the images are elsewhere (SERVE_YAML entries take gallery_root: instead)",
    )
    serve.add_argument(
        "--config", type=Path, metavar="SERVE_YAML",
        help="YAML list of scenarios: '- {name: NAME, index: INDEX_DIR, adapter: FILE, gallery_root: DIR}' (adapter and "
        "gallery_root optional; paths relative to the file)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="1 to 65535, free on --host (default: %(default)s)")
    serve.add_argument(
        "--token",
        help="require 'Authorization: Bearer TOKEN' on /api: printable ASCII without spaces, never empty "
        "(default: $UPPERSON_TOKEN; the variable keeps it out of `ps`)",
    )
    serve.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (default: cuda if available)")
    serve.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    export = commands.add_parser(
        "export",
        help="write a trained model's encoders as ONNX files plus export.json, for runtimes without torch",
        description="Export the image and text encoders of a run (LoRA merged, dynamic batch) to --out: image_encoder.onnx "
        "(images [N,3,H,W] float32) and text_encoder.onnx (token_ids [N,77] int64), each giving 'features' (unnormalised) "
        "and 'normalized_features' (L2); export.json holds the preprocessing, tokenizer settings, hashes and the parity "
        "with torch measured on random inputs, which is printed at the end.",
    )
    export.add_argument("--config", type=Path, required=True, help="the run's config (RUN_DIR/config.yaml)")
    export.add_argument("--adapter", type=Path, help="adapter file (RUN_DIR/best.safetensors); not used by method zero-shot")
    export.add_argument("--format", choices=("onnx",), default="onnx", help="file format (only onnx)")
    export.add_argument("--out", type=Path, required=True, help="a new or empty directory")
    export.add_argument("--opset", type=int, help="ONNX opset (default: 18; 14-17 go through torch's TorchScript exporter)")
    export.add_argument("--quantize", choices=("int8",), help="also write onnxruntime dynamically quantised *.int8.onnx encoders")
    export.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out (a directory holding anything else is refused)")
    export.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")

    demo = commands.add_parser("demo", help="generate synthetic pedestrians, train UP-Person on a tiny CLIP, evaluate, draw results")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory")
    demo.add_argument("--data-dir", type=Path, default=Path(".cache/upperson-synthetic"), help="synthetic dataset cache")
    demo.add_argument("--epochs", type=int, default=None, help="override the demo's epoch count")
    return parser


def _method_overrides(pairs: Sequence[str]) -> list[str]:
    """``info``/``convert`` take method options with or without the ``model.`` prefix of ``train --set``."""
    return [pair if pair.startswith("model.") else f"model.{pair}" for pair in pairs]


def format_parameter_report(model: RetrievalModel) -> str:
    """A table of trainable parameters per encoder and component, then trainable/total."""
    report = model.parameter_report()
    components = list(dict.fromkeys(name for counts in report.breakdown.values() for name in counts))
    lines = [f"{'encoder':<8}" + "".join(f"{name:>14}" for name in components) + f"{'sum':>14}"]
    for encoder, counts in report.breakdown.items():
        lines.append(f"{encoder:<8}" + "".join(f"{counts.get(name, 0):>14,}" for name in components) + f"{sum(counts.values()):>14,}")
    lines.append(f"trainable {report.trainable:,} of {report.total:,} ({report.percent:.2f} %)")
    return "\n".join(lines)


def _info(args: argparse.Namespace) -> int:
    config = load_config(None, [f"method={args.method}", *_method_overrides(args.set)])
    model = upperson.create_model(config.method, backbone=args.backbone, image_size=tuple(args.image_size), config=config.model)
    spec = model.backbone_spec
    print(f"method    {model.method}  {model.config}")
    print(
        f"backbone  {model.backbone_source}: vision {spec.vision_layers}x{spec.vision_width} ({spec.vision_heads} heads, "
        f"patch {spec.patch_size[0]}), text {spec.text_layers}x{spec.text_width} ({spec.text_heads} heads), "
        f"embed {spec.embed_dim}, image {spec.image_size[0]}x{spec.image_size[1]}"
    )
    print(format_parameter_report(model))
    return EXIT_OK


def _convert(args: argparse.Namespace) -> int:
    if args.out.is_dir():
        raise ValueError(f"--out {args.out} is a directory; give the adapter file to write, e.g. {args.out / 'adapter.safetensors'}")
    if args.out.exists() and not args.overwrite:  # checked before the slow import, and never replaced silently
        raise ValueError(f"{args.out} exists; pass --overwrite to replace it")
    state_dict = read_checkpoint_state_dict(args.checkpoint)
    method = official_method(state_dict)
    config = override_fields(read_official_config(state_dict, method), [pair.removeprefix("model.") for pair in args.set])
    image_size = tuple(args.image_size)
    if args.backbone:
        backbone = load_backbone(args.backbone, image_size)
    else:
        backbone = backbone_from_state_dict(official_backbone_state_dict(state_dict), image_size, f"{args.checkpoint} (base_model)")
    model = build_model(backbone, method, config)
    report = import_official_state_dict(model, state_dict, load_backbone=not args.backbone)
    upperson.save_adapter(model, args.out)
    size_mb = args.out.stat().st_size / 1e6
    print(f"wrote {args.out} ({report.petl_tensors} tensors, {size_mb:.1f} MB; {report.ignored_aliases} alias keys ignored)")
    print(format_parameter_report(model))
    return EXIT_OK


def _progress(**kwargs: object) -> tqdm:
    """A live bar on a terminal; in a log file (not a TTY) at most one line per 30 s per bar."""
    return tqdm(dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30.0, **kwargs)


def _train_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` pairs, then ``--seed`` as ``train.seed=SEED`` (refused next to a ``--set train.seed=``)."""
    if args.seed is None:
        return list(args.set)
    if any(pair.partition("=")[0].strip() == "train.seed" for pair in args.set):
        raise ValueError("--seed and --set train.seed=... both set the seed; give one of them")
    return [*args.set, f"train.seed={args.seed}"]


def _train(args: argparse.Namespace) -> int:
    overrides = _train_overrides(args)
    if args.resume:
        config = load_config(args.resume / CONFIG_FILE, overrides)
        run_dir = args.resume
    else:
        config = load_config(args.config, overrides)
        run_dir = args.run_dir or default_run_dir(config)
    distributed = DistributedEnv.from_environment()
    if distributed.enabled and not args.resume and not args.run_dir and not config.run_name:
        raise ValueError("under torchrun give --run-dir or run_name: the default (timestamped) name can differ between processes")
    args.run_dir = run_dir  # main's Ctrl-C message names it in its resume hint
    if not distributed.is_main:  # under torchrun only rank 0 reports; the others show warnings and errors
        logging.getLogger().setLevel(logging.WARNING)
        Trainer(config, run_dir, distributed=distributed).fit(resume=bool(args.resume), overwrite=args.overwrite)
        return EXIT_OK
    print(f"run directory: {run_dir}")
    result = Trainer(config, run_dir, progress=_progress, distributed=distributed).fit(resume=bool(args.resume), overwrite=args.overwrite)
    print(f"test metrics ({result.selection}, epoch {result.best_epoch}):")
    print(format_metrics_table(result.test_metrics))
    print(f"adapter: {result.best_adapter}")
    return EXIT_OK


def _eval(args: argparse.Namespace) -> int:
    overrides = list(args.set)
    if args.dataset:
        overrides.append(f"data.dataset={args.dataset}")
    if args.root:
        overrides.append(f"data.root={args.root}")
    config = load_config(args.config, overrides)
    device = resolve_device(config.device)
    model = build_inference_model(config, args.adapter, device, allow_other_backbone_weights=args.allow_other_backbone)
    dataset = load_dataset(config.data.dataset, config.data.root)
    metrics = evaluate_with_config(model, dataset.split(args.split), config, device, i2t=args.i2t or config.eval.i2t, progress=_progress)
    print(f"{config.data.dataset} {args.split} with {args.adapter or 'the frozen backbone (zero-shot)'}:")
    print(format_metrics_table(metrics))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"dataset": config.data.dataset, "split": args.split, "adapter": str(args.adapter) if args.adapter else None, **metrics}, indent=2))
    return EXIT_OK


def _data(args: argparse.Namespace) -> int:
    report = check_dataset(args.dataset, args.root, verify_images=not args.no_verify_images)
    print(report.format())
    return EXIT_OK if report.ok else EXIT_FAILURE


def _demo(args: argparse.Namespace) -> int:
    from upperson.experiments.demo import run_demo  # drawing and data generation are only needed here

    result = run_demo(args.out, args.data_dir, epochs=args.epochs, progress=_progress)
    print("synthetic test split, text-to-image:")
    print(format_metrics_table({"zero-shot": result.zero_shot_metrics["t2i"], "UP-Person": result.metrics["t2i"]}, label="model"))
    ratio = result.metrics["t2i"]["R1"] / result.chance_r1
    print(f"chance R@1: {result.chance_r1:.2f} %; UP-Person R@1 = {ratio:.1f}x chance")
    print(f"retrieval figure: {result.figure}")
    print(f"adapter: {result.adapter}")
    print(f"held-out gallery (val + test images) indexed in {result.gallery_index}; search it by text: upperson search {result.gallery_index} \"a person in a red top\"")
    print(f"or serve it as a web page: upperson serve --scenario demo={result.gallery_index}")
    return EXIT_OK


def _ablate(args: argparse.Namespace) -> int:
    from upperson.experiments.ablate import ABLATION_JSON, ABLATION_MARKDOWN, format_ablation_table, run_ablation

    out = args.out or Path(load_config(args.base, args.set).output_dir) / args.variants.stem
    print(f"study directory: {out}")
    rows = run_ablation(args.base, args.variants, out, args.set, progress=_progress, seeds=args.seeds)
    print(format_ablation_table(rows))
    print(f"wrote {out / ABLATION_MARKDOWN} and {out / ABLATION_JSON}")
    return EXIT_OK


def _cross_domain(args: argparse.Namespace) -> int:
    from upperson.experiments.cross_domain import Target, default_targets, evaluate_cross_domain, format_cross_domain, load_runs, write_cross_domain

    runs = load_runs(args.runs, args.set, adapter_name=f"{args.adapter}.safetensors")
    targets = [Target.parse(text) for text in args.datasets] or default_targets(runs)
    result = evaluate_cross_domain(runs, targets, args.split, progress=_progress)
    markdown, payload = write_cross_domain(args.out, result)
    print(format_cross_domain(result))
    print(f"wrote {markdown} and {payload}")
    return EXIT_OK


def _profile(args: argparse.Namespace) -> int:
    from upperson.experiments.ablate import read_variants, variant_config
    from upperson.experiments.profile import format_profile_table, profile_config

    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    overrides = []
    if args.method:
        overrides.append(f"method={args.method}")
    if args.backbone:
        overrides.append(f"backbone={args.backbone}")
    if args.image_size:
        overrides.append(f"data.image_size=[{args.image_size[0]},{args.image_size[1]}]")
    if args.device:
        overrides.append(f"device={args.device}")
    overrides += args.set
    base = load_config(args.config, overrides)
    configs = [(base.method, base)]
    if args.variants:
        configs += [(variant.name, variant_config(args.config, overrides, variant, Path(base.output_dir))) for variant in read_variants(args.variants)]
    results = []
    for label, config in configs:
        print(f"profiling {label} ...", file=sys.stderr)
        results.append(profile_config(config, label, batch_size=args.batch_size, num_classes=args.num_classes, steps=args.steps))
    print(format_profile_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([dataclasses.asdict(result) for result in results], indent=2))
    return EXIT_OK


def _index(args: argparse.Namespace) -> int:
    overrides = list(args.set)
    if args.device:
        overrides.append(f"device={args.device}")
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        overrides.append(f"eval.batch_size={args.batch_size}")
    config = load_config(args.config, overrides)
    device = resolve_device(config.device)
    model = build_inference_model(config, args.adapter, device)
    out = args.out or args.images / DEFAULT_INDEX_DIR
    gallery = GalleryIndex.build(
        model,
        args.images,
        out,
        adapter=args.adapter,
        config_path=args.config,
        image_size=config.data.image_size,
        device=device,
        precision=config.train.precision,
        batch_size=config.eval.batch_size,
        num_workers=config.data.num_workers,
        progress=_progress,
    )
    skipped = f"{len(gallery.skipped)} skipped: unreadable, or symlinks not followed; listed in index.json"
    print(f"indexed {len(gallery)} images of {gallery.image_dir} ({skipped}) into {out}")
    return EXIT_OK


def _search(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    gallery = GalleryIndex.load(args.index, gallery_root=args.gallery_root)
    device = resolve_device(args.device)
    model = model_from_index(gallery, adapter=args.adapter, device=device)
    precision = resolve_precision(gallery.metadata["precision"], device) if device.type != "cpu" else "fp32"
    hits = gallery.search(model, args.queries, args.top_k, device=device, precision=precision, faiss_threshold=args.faiss_threshold)
    for query, ranked in zip(args.queries, hits, strict=True):
        print(f"query: {query}")
        print(format_hits_table(ranked, gallery.image_dir))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = [
            {"query": query, "hits": [{"rank": rank, "score": hit.score, "row": hit.row, "path": str(hit.path)} for rank, hit in enumerate(ranked, 1)]}
            for query, ranked in zip(args.queries, hits, strict=True)
        ]
        args.json.write_text(json.dumps(payload, indent=2))
    if args.figure:
        from upperson.visualize import save_retrieval_figure  # drawing is only needed here

        ranked_paths = [[hit.path for hit in ranked] for ranked in hits]
        save_retrieval_figure(args.figure, list(args.queries), ranked_paths, top_k=args.top_k, root=gallery.image_dir)
        print(f"figure: {args.figure}")
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    try:
        from upperson.retrieval.serve import check_token, create_app, run_server
    except ImportError as error:  # FastAPI and uvicorn are the optional `serve` extra
        raise ValueError(f"upperson serve needs FastAPI and uvicorn: pip install 'upperson[serve]' ({error})") from error
    from upperson.retrieval.scenarios import ScenarioSpec, Scenarios, read_scenario_file

    # every flag is checked before the models load (minutes for a large gallery on a real backbone)
    token = _serve_token(args.token, check_token)
    device = _serve_device(args.device)
    _check_listen_address(args.host, args.port)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.gallery_root is not None and not args.scenario:
        raise ValueError("--gallery-root applies to --scenario entries; give each SERVE_YAML entry its own 'gallery_root:'")
    specs = [ScenarioSpec.parse(text, args.gallery_root) for text in args.scenario]
    if args.config:
        specs += read_scenario_file(args.config)
    if not specs:
        raise ValueError("give at least one --scenario NAME=INDEX_DIR or --config SERVE_YAML")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    scenarios = Scenarios(specs, device=device)
    for scenario in scenarios:
        print(f"scenario {scenario.name}: {len(scenario.index)} images of {scenario.index.image_dir}")
    print(f"{len(scenarios)} scenario(s) on {len(scenarios.models)} model(s), {len(scenarios.backbones)} backbone(s) in memory")
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"search page: http://{host}:{args.port}/  API schema: http://{host}:{args.port}/openapi.json" + ("  (token required)" if token else ""))
    run_server(create_app(scenarios, token=token), args.host, args.port)
    return EXIT_OK


def _serve_token(flag: str | None, check: Callable[[str, str], None]) -> str | None:
    """``--token``, else ``$UPPERSON_TOKEN``, else none; an empty or unsendable one is refused, naming where it came from."""
    import os

    token, source = (flag, "--token") if flag is not None else (os.environ.get("UPPERSON_TOKEN"), "UPPERSON_TOKEN")
    if token is not None:
        check(token, source)
    return token


def _serve_device(name: str) -> torch.device:
    """``--device`` as a device serve runs on (the CPU or a CUDA GPU that exists)."""
    import torch

    try:
        device = resolve_device(name)
    except (RuntimeError, ValueError) as error:  # torch.device("tpu") raises RuntimeError
        raise ValueError(f"--device {name!r}: {_one_line(str(error))}") from error
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: serve runs on cpu or cuda (cuda:N); got a {device.type!r} device")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and device.index is not None and device.index >= count:
        raise ValueError(f"--device {name!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def _check_listen_address(host: str, port: int) -> None:
    """Refuse a --host/--port uvicorn could not listen on: the port range, a host that does not resolve, a port in use."""
    import socket

    if not 1 <= port <= 65535:
        raise ValueError(f"--port {port}: must be 1 to 65535")
    if not host.strip():
        raise ValueError("--host '': give an interface to bind, e.g. 127.0.0.1 (this machine) or 0.0.0.0 (every interface)")
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError) as error:  # socket.gaierror is an OSError
        raise ValueError(f"--host {host!r}: not an address or a name this machine resolves ({error}); e.g. 127.0.0.1") from error
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as error:
            raise ValueError(f"cannot listen on {host}:{port} ({error.strerror}); choose another --port or --host") from error


def _export(args: argparse.Namespace) -> int:
    try:
        from upperson.retrieval.export import check_export_dir, export_onnx
    except ImportError as error:
        raise ValueError(f"export needs onnx, onnxruntime and onnxscript ({error}): pip install 'upperson[export]'") from error

    check_export_dir(args.out, args.overwrite)  # before the slow model build
    config = load_config(args.config, args.set)
    model = build_inference_model(config, args.adapter, "cpu")
    report = export_onnx(model, args.out, adapter=args.adapter, opset=args.opset, quantize=args.quantize, overwrite=args.overwrite)
    print(f"wrote {report.out_dir}:")
    for name in [*report.files, "export.json"]:
        size = (report.out_dir / name).stat().st_size / 1e6
        print(f"  {name:<26}{size:>9.1f} MB")
    print("parity check on random inputs (features, unnormalised):")
    print(format_parity_table(report.parity))
    return EXIT_OK


def format_parity_table(parity: Sequence[Parity]) -> str:
    """encoder | runtime | reference | inputs | samples | max abs diff | min cosine."""
    lines = [f"{'encoder':<8}{'runtime':<11}{'vs':<11}{'inputs':<10}{'samples':>8}{'max abs diff':>14}{'min cosine':>12}"]
    for item in parity:
        lines.append(
            f"{item.tower:<8}{item.candidate:<11}{item.reference:<11}{item.inputs:<10}{item.samples:>8}"
            f"{item.max_abs_diff:>14.3g}{item.min_cosine:>12.7f}"
        )
    return "\n".join(lines)


def format_hits_table(hits: Sequence[SearchHit], root: Path) -> str:
    """rank | score | row (the image's stable id) | path (relative to the gallery root, in
    :func:`~upperson.retrieval.scenarios.display_path` form: bidi controls and undecodable bytes escaped)."""
    lines = [f"{'rank':>4}  {'score':>7}  {'row':>6}  path"]
    for rank, hit in enumerate(hits, 1):
        path = hit.path.relative_to(root) if hit.path.is_relative_to(root) else hit.path
        lines.append(f"{rank:>4}  {hit.score:>7.4f}  {hit.row:>6}  {display_path(str(path))}")
    return "\n".join(lines)


def format_metrics_table(metrics: dict[str, dict[str, float]], label: str = "task") -> str:
    """The papers' table: task | R1 | R5 | R10 | mAP | mINP | rSum."""
    columns = ("R1", "R5", "R10", "mAP", "mINP", "rSum")
    width = max(6, *(len(task) + 1 for task in metrics))
    lines = [f"{label:<{width}}" + "".join(f"{name:>9}" for name in columns)]
    for task, values in metrics.items():
        lines.append(f"{task:<{width}}" + "".join(f"{values[name]:>9.2f}" for name in columns))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failure, 2 usage, 130 Ctrl-C) so tests can call it.

    Every error ends in one line ``upperson COMMAND: error: ...`` (or ``internal error`` for a bug); ``-v`` adds
    the traceback above it.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    handlers = {
        "info": _info, "convert": _convert, "train": _train, "eval": _eval, "data": _data, "demo": _demo,
        "ablate": _ablate, "cross-domain": _cross_domain, "profile": _profile, "index": _index, "search": _search,
        "serve": _serve,
        "export": _export,
    }
    prefix = f"upperson {args.command}"
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        _print_traceback_if(args.verbose)
        print(f"{prefix}: interrupted{_resume_hint(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DatasetValidationError as error:
        _print_traceback_if(args.verbose)
        print(f"{prefix}: the dataset would break training:\n{error}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as error:  # before ValueError & co.: FileNotFoundError is one too
        _print_traceback_if(args.verbose)
        print(f"{prefix}: error: {_os_error_line(error)}", file=sys.stderr)
        return EXIT_FAILURE
    except (BackboneLoadError, upperson.AdapterMismatchError, ValueError, TypeError, MissingSplitError) as error:
        _print_traceback_if(args.verbose)
        print(f"{prefix}: error: {_one_line(str(error))}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as error:  # a bug, not a bad input: say so, and how to see where
        _print_traceback_if(args.verbose)
        hint = "" if args.verbose else " (run with -v for the traceback)"
        print(f"{prefix}: internal error: {type(error).__name__}: {_one_line(str(error))}{hint}", file=sys.stderr)
        return EXIT_FAILURE


_OS_ERROR_HINTS = {
    errno.ENOSPC: "free disk space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded; free space or write elsewhere",
    errno.EACCES: "check its permissions or write elsewhere",
    errno.EPERM: "check its permissions or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.ENOENT: "check the path",
    errno.EISDIR: "give a file, not a directory",
    errno.ENOTDIR: "a parent of the path is a file, not a directory",
}


def _os_error_line(error: OSError) -> str:
    """``PATH: OS message; what to do`` for errors with a path, the message itself for the library's own."""
    if error.filename is None or error.strerror is None:
        return _one_line(str(error))
    hint = _OS_ERROR_HINTS.get(error.errno, "check the path")
    return f"{error.filename}: {error.strerror}; {hint}"


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _print_traceback_if(verbose: bool) -> None:
    if verbose:
        traceback.print_exc(file=sys.stderr)


def _resume_hint(args: argparse.Namespace) -> str:
    """How to continue an interrupted ``train``: known once ``_train`` has chosen the run directory and the
    run has written its config there (``--resume`` reads it); empty for other commands."""
    run_dir = getattr(args, "resume", None) or getattr(args, "run_dir", None)
    if args.command != "train" or run_dir is None or not (Path(run_dir) / CONFIG_FILE).is_file():
        return ""
    return f"; resume with: upperson train --resume {run_dir}"


def entry_point() -> None:
    sys.exit(main())
