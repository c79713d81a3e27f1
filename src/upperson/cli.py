"""Command line: ``upperson info`` and ``upperson convert`` (more commands come with the pipeline)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import upperson
from upperson.backbone import BackboneLoadError, backbone_from_state_dict, load_backbone, read_checkpoint_state_dict
from upperson.methods import METHODS, RetrievalModel, build_model
from upperson.official import import_official_state_dict, official_backbone_state_dict, official_config_from_state_dict

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="upperson", description="Parameter-efficient text-based person retrieval on CLIP.")
    parser.add_argument("--version", action="version", version=f"upperson {upperson.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="parameter counts of a method on a backbone, per encoder and component")
    info.add_argument("--method", default="up-person", choices=sorted(METHODS))
    info.add_argument("--backbone", default="tiny", help="'tiny', a CLIP checkpoint file, or '<open_clip name>[:<tag or file>]'")
    info.add_argument("--image-size", nargs=2, type=int, default=(384, 128), metavar=("HEIGHT", "WIDTH"))
    info.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="method option, e.g. prefix_length=10")

    convert = commands.add_parser("convert", help="official UP-Person checkpoint → upperson adapter file")
    convert.add_argument("checkpoint", type=Path, help="official .pth (the model's state_dict, optionally under 'model')")
    convert.add_argument("--out", type=Path, required=True, help="adapter file to write (.safetensors)")
    convert.add_argument("--backbone", help="CLIP the adapter will run on (default: the CLIP weights inside the checkpoint)")
    convert.add_argument("--image-size", nargs=2, type=int, default=(384, 128), metavar=("HEIGHT", "WIDTH"))
    convert.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field read from the file")
    return parser


def _parse_options(pairs: Sequence[str]) -> dict[str, object]:
    options: dict[str, object] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep:
            raise ValueError(f"--set expects FIELD=VALUE, got {pair!r}")
        lowered = raw.lower()
        if lowered in ("true", "false"):
            options[name] = lowered == "true"
        elif lowered in ("none", "null"):
            options[name] = None
        else:
            try:
                options[name] = int(raw)
            except ValueError:
                try:
                    options[name] = float(raw)
                except ValueError:
                    options[name] = raw
    return options


def format_parameter_report(model: RetrievalModel) -> str:
    """A table of trainable parameters per encoder and component, then trainable/total."""
    report = model.parameter_report()
    components = list(next(iter(report.breakdown.values())))
    lines = [f"{'encoder':<8}" + "".join(f"{name:>14}" for name in components) + f"{'sum':>14}"]
    for encoder, counts in report.breakdown.items():
        lines.append(f"{encoder:<8}" + "".join(f"{counts[name]:>14,}" for name in components) + f"{sum(counts.values()):>14,}")
    lines.append(f"trainable {report.trainable:,} of {report.total:,} ({report.percent:.2f} %)")
    return "\n".join(lines)


def _info(args: argparse.Namespace) -> int:
    model = upperson.create_model(args.method, backbone=args.backbone, image_size=tuple(args.image_size), **_parse_options(args.set))
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
    state_dict = read_checkpoint_state_dict(args.checkpoint)
    config = official_config_from_state_dict(state_dict, **_parse_options(args.set))
    image_size = tuple(args.image_size)
    if args.backbone:
        backbone = load_backbone(args.backbone, image_size)
    else:
        backbone = backbone_from_state_dict(official_backbone_state_dict(state_dict), image_size, f"{args.checkpoint} (base_model)")
    model = build_model(backbone, "up-person", config)
    report = import_official_state_dict(model, state_dict, load_backbone=not args.backbone)
    upperson.save_adapter(model, args.out)
    size_mb = args.out.stat().st_size / 1e6
    print(f"wrote {args.out} ({report.petl_tensors} tensors, {size_mb:.1f} MB; {report.ignored_aliases} alias keys ignored)")
    print(format_parameter_report(model))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failure, 2 usage) so tests can call it."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    handlers = {"info": _info, "convert": _convert}
    try:
        return handlers[args.command](args)
    except (BackboneLoadError, upperson.AdapterMismatchError, FileNotFoundError, ValueError, TypeError) as error:
        print(f"upperson {args.command}: error: {error}", file=sys.stderr)
        return EXIT_FAILURE


def entry_point() -> None:
    sys.exit(main())
