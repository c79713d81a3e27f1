"""Random ViT-B/16 UP-Person scenarios for the serve benchmarks (nothing is downloaded, no image is encoded).

A scenario here is what ``upperson index`` leaves behind, made directly: an adapter file (random
PETL tensors of the paper's CUHK-PEDES configuration: prefix 10, LoRA rank 32, L-Adapter) and an
index folder whose features are random unit vectors stored in float16, as the index stores them.
The backbone is a random-weight ViT-B/16 CLIP (open_clip's architecture) saved as a checkpoint
file, so every process loads the very same weights (same SHA-256) as real scenarios would.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

import upperson
from upperson.backbone import load_backbone
from upperson.retrieval.gallery import GalleryIndex, index_metadata

IMAGE_SIZE = (384, 128)
CHECKPOINT_NAME = "ViT-B-16-random.pt"


def vit_b16_checkpoint(folder: Path) -> Path:
    """A seeded random ViT-B/16 CLIP state dict at 224x224 (OpenAI/open_clip key layout), written once."""
    path = folder / CHECKPOINT_NAME
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            clip = load_backbone("ViT-B-16", (224, 224)).clip
        torch.save(clip.state_dict(), path)
    return path


def random_adapters(folder: Path, checkpoint: Path, count: int) -> tuple[upperson.RetrievalModel, list[Path]]:
    """``count`` adapter files of different random PETL tensors (files already there are kept: their
    bytes, and so the SHA-256 an index records, differ between writes because safetensors orders the
    metadata differently per process), and the model they were written from."""
    model = upperson.create_model("up-person", backbone=str(checkpoint), image_size=IMAGE_SIZE)
    adapters = []
    for seed in range(count):
        path = folder / f"adapter-{seed}.safetensors"
        if not path.is_file():
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for tensor in model.trainable_state_dict().values():
                    noise = torch.randn(tensor.shape, generator=generator)
                    tensor.copy_(1.0 + 0.1 * noise if tensor.dim() == 0 else 0.02 * noise)
            upperson.save_adapter(model, path)
        adapters.append(path)
    return model, adapters


def random_index(out: Path, model: upperson.RetrievalModel, adapter: Path, rows: int, seed: int = 0) -> Path:
    """An index folder of ``rows`` random unit float16 features (made in chunks) recorded as made by ``adapter``."""
    generator = torch.Generator().manual_seed(seed)
    dim = model.backbone_spec.embed_dim
    chunks = [
        F.normalize(torch.randn(min(65_536, rows - start), dim, generator=generator), dim=1).half()
        for start in range(0, rows, 65_536)
    ]
    features = torch.cat(chunks) if chunks else torch.zeros(0, dim, dtype=torch.float16)
    gallery = out.parent / "images" / out.name
    gallery.mkdir(parents=True, exist_ok=True)  # the benchmark never reads an image: the folder stays empty
    paths = [f"person{row:07d}.jpg" for row in range(rows)]
    files = {path: {"size": 0, "mtime_ns": 0} for path in paths}
    metadata = index_metadata(model, IMAGE_SIZE, adapter, None, "fp32")
    GalleryIndex(gallery.resolve(), paths, features, files, metadata).save(out)
    return out


def describe_cpu() -> str:
    """Model name, logical CPUs and the SIMD flags that matter for float32/16 matrix products."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = [flag for flag in flags if flag.startswith(("avx", "amx", "fma", "f16c", "sse4"))]
    return f"{name}, {info.count('processor')} logical CPUs, flags: {' '.join(sorted(wanted)) or 'n/a'}"


def write_json(path: Path | None, payload: object) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2))
