"""Loading a frozen CLIP backbone from any source a TPR user has on disk, built on open_clip.

Sources:
    * ``"tiny"``: a small random CLIP (tests, demo, CI); seeded, so it is the same everywhere.
    * a checkpoint file: OpenAI TorchScript archive (``ViT-B-16.pt``), a ``torch.save``d state dict
      in the OpenAI / open_clip key layout (read with ``weights_only=True``), or safetensors.
    * ``"<open_clip model name>[:<pretrained tag or file>]"``, e.g. ``"ViT-B-16:laion2b_s34b_b88k"``.

Whatever the source, the model is rebuilt at the requested image size and the checkpoint's visual
positional embedding is resized with :func:`resize_visual_pos_embed` (the official interpolation).
"""

from __future__ import annotations

import hashlib
import logging
import re
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.transformer import ResidualAttentionBlock

from upperson.backbone.activations import use_lean_quick_gelu
from upperson.backbone.pos_embed import resize_visual_pos_embed

logger = logging.getLogger(__name__)

OPENAI_HEAD_WIDTH = 64
"""OpenAI CLIP models all use 64-dim heads; the head count is not stored in their checkpoints."""

TINY_SEED = 0

TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"layers": 3, "width": 192, "patch_size": 16, "head_width": OPENAI_HEAD_WIDTH},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
    "quick_gelu": True,
}
"""A random CLIP small enough for CPU tests but shaped like the real one (64-dim heads, 77 tokens,
the full BPE vocabulary) and with different vision/text widths and depths so that swaps show."""

_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
"""Entries of OpenAI / TorchScript state dicts that are metadata or buffers, not weights."""
_REQUIRED_OPENAI_KEYS = (
    "visual.conv1.weight",
    "visual.class_embedding",
    "visual.positional_embedding",
    "visual.proj",
    "token_embedding.weight",
    "positional_embedding",
    "ln_final.weight",
    "text_projection",
)


class BackboneLoadError(RuntimeError):
    """A checkpoint could not be read or does not describe a supported CLIP ViT."""


@dataclass(frozen=True)
class BackboneSpec:
    """Architecture facts read from a built CLIP; everything sized by the PETL code comes from here."""

    embed_dim: int
    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    vision_width: int
    vision_layers: int
    vision_heads: int
    text_width: int
    text_layers: int
    text_heads: int
    context_length: int
    vocab_size: int

    @classmethod
    def from_clip(cls, clip: CLIP) -> BackboneSpec:
        visual_block = clip.visual.transformer.resblocks[0]
        text_block = clip.transformer.resblocks[0]
        return cls(
            embed_dim=clip.text_projection.shape[1],
            image_size=tuple(clip.visual.image_size),
            patch_size=tuple(clip.visual.patch_size),
            vision_width=clip.visual.transformer.width,
            vision_layers=len(clip.visual.transformer.resblocks),
            vision_heads=visual_block.attn.num_heads,
            text_width=clip.transformer.width,
            text_layers=len(clip.transformer.resblocks),
            text_heads=text_block.attn.num_heads,
            context_length=clip.context_length,
            vocab_size=clip.vocab_size,
        )

    def to_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


@dataclass
class Backbone:
    """A loaded, frozen CLIP plus where it came from and a fingerprint of its weights."""

    clip: CLIP
    spec: BackboneSpec
    source: str
    weights_sha256: str


def load_backbone(source: str, image_size: int | tuple[int, int] = (384, 128)) -> Backbone:
    """Build a frozen open_clip CLIP from ``source`` at ``image_size`` (height, width).

    Raises:
        BackboneLoadError: the source cannot be read or is not a CLIP ViT; the message names the
            file and what was expected.
    """
    size = _as_hw(image_size)
    if source == "tiny":
        clip = _build_tiny(size)
    elif Path(source).expanduser().is_file():
        clip = _build_from_checkpoint_file(Path(source).expanduser(), size)
    else:
        clip = _build_from_open_clip_name(source, size)
    return _finish(clip, source)


def _finish(clip: CLIP, source: str) -> Backbone:
    _check_supported(clip, source)
    use_lean_quick_gelu(clip)
    clip.requires_grad_(False)
    clip.eval()
    return Backbone(
        clip=clip,
        spec=BackboneSpec.from_clip(clip),
        source=source,
        weights_sha256=state_dict_sha256(clip.state_dict()),
    )


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes: identifies backbone weights across copies."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_checkpoint_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors from a CLIP checkpoint without executing pickled code.

    TorchScript archives (the OpenAI release files) are read with ``torch.jit.load``, which uses
    TorchScript's own restricted unpickler; everything else goes through safetensors or
    ``torch.load(weights_only=True)``. Nested ``state_dict`` / ``model`` entries and ``module.``
    prefixes are unwrapped.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except OSError:
            raise  # missing or unreadable file: the CLI names the path and the OS reason
        except Exception as error:  # safetensors raises its own SafetensorError for bad headers and short files
            raise BackboneLoadError(f"{path}: not a valid safetensors file ({_one_line(error)}); {_safetensors_hint(path)}") from error
    elif _is_torchscript_archive(path):
        try:
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        except RuntimeError as error:
            raise BackboneLoadError(f"{path}: TorchScript archive could not be loaded ({_one_line(error)}); re-download the file") from error
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except OSError:
            raise  # missing or unreadable file: the CLI names the path and the OS reason
        except Exception as error:  # torch raises several types for unreadable or unsafe files
            raise BackboneLoadError(f"{path}: {_torch_load_problem(error)}") from error
    return _unwrap_state_dict(state, path)


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def _one_line(error: BaseException) -> str:
    """An exception's message on one line (torch and safetensors messages span several, with colours)."""
    return " ".join(_ANSI_ESCAPE.sub("", str(error)).split()) or type(error).__name__


def _torch_load_problem(error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in one line with what to do."""
    unsafe = _UNSAFE_GLOBAL.search(str(error))
    if unsafe:
        return (
            f"refused: unpickling it would call {unsafe.group(1).rstrip('.,')}, and upperson never runs code from a "
            "checkpoint. If you trust the file, re-save its weights with torch.save(model.state_dict(), path)"
        )
    return (
        f"not readable as a weights-only checkpoint ({type(error).__name__}: {_one_line(error)}). Expected an OpenAI "
        "CLIP .pt file, a torch.save'd state dict or a .safetensors file; re-download it if it is truncated"
    )


def _safetensors_hint(path: Path) -> str:
    """What to do about a ``.safetensors`` file safetensors cannot read; pickles under that name are common."""
    with path.open("rb") as handle:
        head = handle.read(4)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "it is a torch.save/pickle file with a .safetensors name: rename it to .pt"
    return "it is truncated or not a safetensors file; re-download or re-export it"


def _unwrap_state_dict(state: Any, path: Path) -> dict[str, torch.Tensor]:
    for wrapper_key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper_key), dict):
            state = state[wrapper_key]
    if not isinstance(state, dict):
        raise BackboneLoadError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    tensors = {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            tensors[name.removeprefix("module.")] = value
    return tensors


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def _as_hw(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return (image_size, image_size)
    height, width = image_size
    return (int(height), int(width))


def _check_image_size(image_size: tuple[int, int], patch: int, origin: str) -> None:
    """Refuse sizes the positional embedding cannot serve (it is resized to a whole patch grid) before any build."""
    height, width = image_size
    if height >= patch and width >= patch and not height % patch and not width % patch:
        return

    def nearest(side: int) -> int:
        return max(patch, round(side / patch) * patch)

    raise BackboneLoadError(
        f"{origin}: image size {height}x{width} does not fit the backbone's patch size {patch}; height and width must be "
        f"positive multiples of {patch} (e.g. {nearest(height)}x{nearest(width)}): set data.image_size or --image-size"
    )


def _build_tiny(image_size: tuple[int, int]) -> CLIP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return _build_clip(TINY_CONFIG, image_size, "'tiny'")


def _build_clip(model_config: dict[str, Any], image_size: tuple[int, int], origin: str) -> CLIP:
    vision_cfg = dict(model_config["vision_cfg"])
    _check_image_size(image_size, vision_cfg["patch_size"], origin)
    vision_cfg["image_size"] = image_size
    return CLIP(
        embed_dim=model_config["embed_dim"],
        vision_cfg=CLIPVisionCfg(**vision_cfg),
        text_cfg=CLIPTextCfg(**model_config["text_cfg"]),
        quick_gelu=model_config.get("quick_gelu", False),
    )


def _openai_config(state_dict: dict[str, torch.Tensor], path: Path | str) -> dict[str, Any]:
    """Read the architecture of an OpenAI-layout CLIP ViT from its tensor shapes."""
    missing = [key for key in _REQUIRED_OPENAI_KEYS if key not in state_dict]
    if missing:
        raise BackboneLoadError(
            f"{path}: not a CLIP ViT checkpoint in the OpenAI/open_clip key layout; missing {missing}. "
            "Expected e.g. OpenAI's ViT-B-16.pt or an open_clip CLIP state dict (ResNet CLIPs are not supported)."
        )
    vision_width, _, patch, _ = state_dict["visual.conv1.weight"].shape
    text_width = state_dict["ln_final.weight"].shape[0]
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)

    def count_layers(prefix: str) -> int:
        return len({key[len(prefix) :].split(".")[0] for key in state_dict if key.startswith(prefix)})

    return {
        "embed_dim": state_dict["text_projection"].shape[1],
        "vision_cfg": {
            "layers": count_layers("visual.transformer.resblocks."),
            "width": vision_width,
            "patch_size": patch,
            "head_width": OPENAI_HEAD_WIDTH,
            "image_size": grid * patch,
        },
        "text_cfg": {
            "context_length": state_dict["positional_embedding"].shape[0],
            "vocab_size": state_dict["token_embedding.weight"].shape[0],
            "width": text_width,
            "heads": text_width // OPENAI_HEAD_WIDTH,
            "layers": count_layers("transformer.resblocks."),
        },
        "quick_gelu": True,
    }


def _build_from_checkpoint_file(path: Path, image_size: tuple[int, int]) -> CLIP:
    return _build_from_openai_state_dict(read_checkpoint_state_dict(path), image_size, str(path))


def _build_from_openai_state_dict(state_dict: dict[str, torch.Tensor], image_size: tuple[int, int], origin: str) -> CLIP:
    state_dict = {key: value for key, value in state_dict.items() if key not in _NON_WEIGHT_KEYS}
    clip = _build_clip(_openai_config(state_dict, origin), image_size, origin)
    _load_resized(clip, state_dict, origin)
    return clip


def backbone_from_state_dict(
    state_dict: dict[str, torch.Tensor], image_size: int | tuple[int, int], source: str
) -> Backbone:
    """A frozen backbone from in-memory OpenAI-layout weights (e.g. those inside an official checkpoint)."""
    return _finish(_build_from_openai_state_dict(state_dict, _as_hw(image_size), source), source)


def _build_from_open_clip_name(source: str, image_size: tuple[int, int]) -> CLIP:
    name, _, pretrained = source.partition(":")
    if name not in open_clip.list_models():
        raise BackboneLoadError(
            f"backbone {source!r} is neither an existing checkpoint file, 'tiny', nor an open_clip model "
            "name (e.g. 'ViT-B-16:openai', 'ViT-B-16:laion2b_s34b_b88k', 'ViT-L-14:/path/weights.bin')"
        )
    patch = (open_clip.get_model_config(name) or {}).get("vision_cfg", {}).get("patch_size")
    if isinstance(patch, int):  # ResNet CLIPs have none; they are refused once built
        _check_image_size(image_size, patch, repr(source))
    force_quick_gelu = pretrained == "openai"
    clip = open_clip.create_model(name, force_image_size=image_size, force_quick_gelu=force_quick_gelu)
    if not isinstance(clip, CLIP):
        raise BackboneLoadError(f"{source!r} is a {type(clip).__name__}; only CLIP ViT backbones are supported")
    if not pretrained:
        logger.warning("backbone %r has no pretrained tag or file: its weights are random", source)
        return clip
    try:
        source_model = open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=force_quick_gelu)
    except Exception as error:  # open_clip raises RuntimeError/OSError/ValueError depending on the source
        raise BackboneLoadError(f"open_clip could not load {source!r}: {error}") from error
    _load_resized(clip, source_model.state_dict(), source)
    return clip


def _load_resized(clip: CLIP, state_dict: dict[str, torch.Tensor], origin: str) -> None:
    state_dict = dict(state_dict)
    pos_key = "visual.positional_embedding"
    if state_dict[pos_key].shape != clip.visual.positional_embedding.shape:
        try:
            state_dict[pos_key] = resize_visual_pos_embed(state_dict[pos_key].float(), clip.visual.grid_size)
        except ValueError as error:  # not a CLS + square grid table
            raise BackboneLoadError(f"{origin}: {error}") from error
    try:
        result = clip.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise BackboneLoadError(f"{origin}: checkpoint tensors do not fit the CLIP architecture: {_one_line(error)}") from error
    if result.missing_keys or result.unexpected_keys:
        raise BackboneLoadError(
            f"{origin}: checkpoint does not match the CLIP architecture read from it; "
            f"missing {result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}"
        )


def _check_supported(clip: CLIP, source: str) -> None:
    for tower in (clip.visual.transformer, clip.transformer):
        for block in tower.resblocks:
            if type(block) is not ResidualAttentionBlock or not isinstance(block.attn, torch.nn.MultiheadAttention):
                raise BackboneLoadError(
                    f"{source!r}: blocks of type {type(block).__name__} are not supported; PETL injection "
                    "needs open_clip's standard ResidualAttentionBlock (OpenAI-style CLIP ViTs)"
                )
