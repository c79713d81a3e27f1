"""Search your own gallery with a trained adapter: an on-disk image-feature index and text queries.

``GalleryIndex.build`` encodes every image under a folder once (L2-normalised, merged model, test
transforms) and stores the features as float16 safetensors plus a JSON file of relative paths,
per-file size/mtime and the model's identity. Re-building the same folder is incremental: files
whose size and mtime are unchanged keep their features. ``GalleryIndex.search`` ranks the gallery
by cosine similarity to text queries, exactly (torch matmul in chunks, or FAISS ``IndexFlatIP`` for
large galleries when FAISS is installed).

Features are stored in float16: half the disk of float32, and a cosine score of unit vectors moves
by ~1e-3 at most, which only reorders near-ties.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from upperson.data.datasets import IMAGE_ERRORS, read_image
from upperson.data.transforms import build_transforms
from upperson.methods import RetrievalModel
from upperson.retrieval.factory import build_inference_model, inference_config
from upperson.runtime import Progress, SilentProgress, autocast, resolve_precision
from upperson.tokenizer import tokenize
from upperson.version import __version__

logger = logging.getLogger(__name__)

FEATURES_FILE = "features.safetensors"
INDEX_FILE = "index.json"
INDEX_FORMAT = "upperson-gallery-index"
INDEX_FORMAT_VERSION = 1
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
FAISS_THRESHOLD = 100_000
"""Galleries larger than this use FAISS (when importable); below it torch matmul is as fast."""
_GALLERY_CHUNK = 65_536
"""Gallery rows scored at a time by the torch path (bounds memory to chunk x queries floats)."""


@dataclass(frozen=True)
class SearchHit:
    """One ranked gallery image."""

    path: Path
    """Absolute path of the image (index folder root + relative path)."""
    score: float
    """Cosine similarity to the query."""


@dataclass
class GalleryIndex:
    """Normalised image features of a folder, with what is needed to rebuild the model that made them."""

    image_dir: Path
    """Absolute root of the gallery; ``paths`` are relative to it."""
    paths: list[str]
    """Relative POSIX paths, one per feature row."""
    features: torch.Tensor
    """``[N, D]`` float16, L2-normalised."""
    files: dict[str, dict[str, int]]
    """Per relative path: ``{"size": bytes, "mtime_ns": ...}`` at encoding time (incremental re-indexing)."""
    metadata: dict[str, Any]
    """Model identity (see :func:`index_metadata`)."""
    skipped: list[dict[str, Any]] = field(default_factory=list)
    """Unreadable images: ``{"path", "error", "size", "mtime_ns"}``; retried only once they change."""

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def build(
        cls,
        model: RetrievalModel,
        image_dir: str | os.PathLike[str],
        out_dir: str | os.PathLike[str],
        *,
        adapter: str | os.PathLike[str] | None = None,
        config_path: str | os.PathLike[str] | None = None,
        image_size: tuple[int, int] | None = None,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        batch_size: int = 256,
        num_workers: int = 0,
        progress: Progress | None = None,
    ) -> GalleryIndex:
        """Encode the images under ``image_dir`` (recursively) and write the index to ``out_dir``.

        An existing index in ``out_dir`` made by the same model (method, config, backbone and adapter
        hashes, image size) is updated incrementally; one made by another model is rebuilt.

        Args:
            model: the (merged) model the features come from; put on ``device`` by the caller.
            image_dir: gallery root; hidden files and folders (and ``out_dir``) are ignored.
            out_dir: index directory, replaced atomically.
            adapter: the adapter file loaded onto ``model``, recorded (path + SHA-256) for search.
            config_path: the run config, recorded for reference.
            image_size: ``(height, width)`` of the test transform; default the backbone's.
            precision: autocast for encoding, ``fp32``/``bf16``/``fp16``, or ``auto`` (resolved for
                ``device``; the index records the precision used).
        """
        root = Path(image_dir).resolve()
        out = Path(out_dir).resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        size = tuple(image_size or model.backbone_spec.image_size)
        precision = resolve_precision(precision, torch.device(device))
        metadata = index_metadata(model, size, adapter, config_path, precision)
        current = {path: _file_stat(root / path) for path in find_images(root, exclude=out)}
        previous, previous_skipped = _reusable_entries(out, root, metadata)
        reused = {path: features for path, (features, stat) in previous.items() if current.get(path) == stat}
        still_skipped = [entry for entry in previous_skipped if current.get(entry["path"]) == _stat_of(entry)]
        known = set(reused) | {entry["path"] for entry in still_skipped}
        to_encode = [path for path in current if path not in known]
        logger.info(
            "%d images: %d unchanged (features reused), %d unchanged and unreadable, %d to encode, %d dropped",
            len(current), len(reused), len(still_skipped), len(to_encode), len(set(previous) - set(current)),
        )
        encoded, skipped = _encode_images(model, root, to_encode, size, torch.device(device), precision, batch_size, num_workers, progress)
        skipped = sorted(still_skipped + [{**entry, **current[entry["path"]]} for entry in skipped], key=lambda entry: entry["path"])
        rows = reused | encoded
        paths = sorted(rows)
        dim = model.backbone_spec.embed_dim
        features = torch.stack([rows[path] for path in paths]) if paths else torch.zeros(0, dim, dtype=torch.float16)
        index = cls(root, paths, features, {path: current[path] for path in paths}, metadata, skipped)
        index.save(out)
        return index

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write ``features.safetensors`` and ``index.json`` to a fresh folder, then swap it in,
        so that readers never see features and paths from two different builds."""
        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
        staging.mkdir()  # not mkdtemp: the index folder should get the usual (umask) permissions
        try:
            save_file({"features": self.features.to(torch.float16).contiguous()}, str(staging / FEATURES_FILE))
            payload = {
                "format": INDEX_FORMAT,
                "format_version": INDEX_FORMAT_VERSION,
                "image_dir": str(self.image_dir),
                "metadata": self.metadata,
                "paths": self.paths,
                "files": self.files,
                "skipped": self.skipped,
            }
            (staging / INDEX_FILE).write_text(json.dumps(payload, indent=1))
            previous = out.with_name(f".{out.name}.old")
            if out.exists():
                shutil.rmtree(previous, ignore_errors=True)
                os.replace(out, previous)
            os.replace(staging, out)
            shutil.rmtree(previous, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return out

    @classmethod
    def load(cls, out_dir: str | os.PathLike[str]) -> GalleryIndex:
        """Read an index directory written by :meth:`build`."""
        out = Path(out_dir)
        index_file, features_file = out / INDEX_FILE, out / FEATURES_FILE
        for required in (index_file, features_file):
            if not required.is_file():
                raise FileNotFoundError(f"{required} does not exist; build the index with `upperson index`")
        try:
            payload = json.loads(index_file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{index_file}: not valid JSON ({error}); rebuild the index") from error
        if payload.get("format") != INDEX_FORMAT:
            raise ValueError(f"{index_file}: not an upperson gallery index (format {payload.get('format')!r})")
        features = load_file(str(features_file))["features"]
        if features.shape[0] != len(payload["paths"]):
            raise ValueError(f"{out}: {features.shape[0]} feature rows but {len(payload['paths'])} paths; rebuild the index")
        return cls(
            Path(payload["image_dir"]), payload["paths"], features, payload["files"], payload["metadata"], payload.get("skipped", [])
        )

    def search(
        self,
        model: RetrievalModel,
        queries: Sequence[str],
        top_k: int = 10,
        *,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        faiss_threshold: int = FAISS_THRESHOLD,
    ) -> list[list[SearchHit]]:
        """Rank the gallery for each text query by cosine similarity, best first.

        Args:
            model: the model the index was built with (see :func:`model_from_index`), on ``device``.
            top_k: hits per query (fewer if the gallery is smaller).
            faiss_threshold: use FAISS (exact inner product) for galleries larger than this, if installed.
        """
        if not queries:
            raise ValueError("search: give at least one query")
        if top_k < 1:
            raise ValueError(f"search: top_k must be >= 1, got {top_k}")
        query_features = encode_queries(model, queries, torch.device(device), precision).cpu()
        k = min(top_k, len(self))
        if k == 0:
            return [[] for _ in queries]
        if len(self) > faiss_threshold and _faiss() is not None:
            scores, indices = _rank_faiss(query_features, self.features, k)
        else:
            scores, indices = _rank_torch(query_features, self.features, k)
        return [
            [SearchHit(self.image_dir / self.paths[i], float(s)) for s, i in zip(row_scores.tolist(), row_indices.tolist())]
            for row_scores, row_indices in zip(scores, indices)
        ]


def find_images(root: Path, exclude: Path | None = None) -> list[str]:
    """Relative POSIX paths of the images under ``root`` (by suffix, any case), sorted.

    Hidden files and folders are skipped: they hold atomic-write temporaries, OS thumbnails and the
    default index folder, never gallery images.
    """
    found = []
    for folder, folders, files in os.walk(root):
        here = Path(folder)
        folders[:] = sorted(name for name in folders if not name.startswith(".") and (exclude is None or here / name != exclude))
        found += [
            (here / name).relative_to(root).as_posix()
            for name in files
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES
        ]
    return sorted(found)


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def index_metadata(
    model: RetrievalModel,
    image_size: tuple[int, int],
    adapter: str | os.PathLike[str] | None,
    config_path: str | os.PathLike[str] | None,
    precision: str,
) -> dict[str, Any]:
    """What made the features: enough to rebuild the query encoder and to detect a different model."""
    source = model.backbone_source
    if Path(source).expanduser().is_file():
        source = str(Path(source).expanduser().resolve())  # search may run from another directory
    metadata = {
        "method": model.method,
        "config": dataclasses.asdict(model.config),
        "backbone_source": source,
        "backbone_sha256": model.backbone_sha256,
        "adapter": str(Path(adapter).resolve()) if adapter is not None else None,
        "adapter_sha256": file_sha256(adapter) if adapter is not None else None,
        "config_path": str(Path(config_path).resolve()) if config_path is not None else None,
        "image_size": list(image_size),
        "precision": precision,
        "upperson_version": __version__,
    }
    return json.loads(json.dumps(metadata))  # tuples → lists, as they read back from index.json


_IDENTITY_KEYS = ("method", "config", "backbone_sha256", "adapter_sha256", "image_size")
"""Metadata that decides the features; paths, precision and version do not invalidate an index."""


Reusable = tuple[dict[str, tuple[torch.Tensor, dict[str, int]]], list[dict[str, Any]]]


def _reusable_entries(out: Path, root: Path, metadata: dict[str, Any]) -> Reusable:
    """Features (with file stats) and skipped entries of an existing index that a new build may reuse."""
    if not (out / INDEX_FILE).exists():
        return {}, []
    try:
        old = GalleryIndex.load(out)
    except (OSError, ValueError, KeyError) as error:
        logger.warning("existing index in %s is unreadable (%s); rebuilding from scratch", out, error)
        return {}, []
    changed = [key for key in _IDENTITY_KEYS if old.metadata.get(key) != metadata[key]]
    if changed:
        logger.info("existing index in %s was built with a different %s; rebuilding from scratch", out, ", ".join(changed))
        return {}, []
    if old.image_dir != root:
        logger.info("existing index in %s is of another folder (%s); rebuilding from scratch", out, old.image_dir)
        return {}, []
    return {path: (old.features[row], old.files[path]) for row, path in enumerate(old.paths)}, old.skipped


def _file_stat(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _stat_of(entry: dict[str, Any]) -> dict[str, int | None]:
    return {"size": entry.get("size"), "mtime_ns": entry.get("mtime_ns")}


class _GalleryImages(Dataset):
    """``{"images", "row"}`` per readable image, ``{"row", "error"}`` per unreadable one."""

    def __init__(self, paths: list[Path], transform: Callable[[Any], torch.Tensor]) -> None:
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int) -> dict[str, Any]:
        try:
            return {"images": self.transform(read_image(self.paths[row])), "row": row}
        except IMAGE_ERRORS as error:
            return {"row": row, "error": f"{type(error).__name__}: {error}"}


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    good = [item for item in items if "error" not in item]
    return {
        "images": torch.stack([item["images"] for item in good]) if good else None,
        "rows": [item["row"] for item in good],
        "errors": [(item["row"], item["error"]) for item in items if "error" in item],
    }


@torch.no_grad()
def _encode_images(
    model: RetrievalModel,
    root: Path,
    paths: list[str],
    image_size: tuple[int, int],
    device: torch.device,
    precision: str,
    batch_size: int,
    num_workers: int,
    progress: Progress | None,
) -> tuple[dict[str, torch.Tensor], list[dict[str, str]]]:
    """Normalised float16 features of ``paths``; unreadable files are logged and returned as skipped."""
    if not paths:
        return {}, []
    was_training = model.training
    model.eval()
    dataset = _GalleryImages([root / path for path in paths], build_transforms(image_size, train=False))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    features: dict[str, torch.Tensor] = {}
    skipped: list[dict[str, str]] = []
    bar = (progress or SilentProgress)(total=len(paths), desc="gallery images", unit="image", leave=False)
    for batch in loader:
        for row, error in batch["errors"]:
            logger.warning("skipping unreadable image %s (%s)", root / paths[row], error)
            skipped.append({"path": paths[row], "error": error})
        if batch["images"] is not None:
            with autocast(device, precision):
                encoded = model.encode_image(batch["images"].to(device))
            encoded = F.normalize(encoded.float(), dim=-1).to("cpu", torch.float16)  # [B, D]
            features.update(zip((paths[row] for row in batch["rows"]), encoded))
        bar.update(len(batch["rows"]) + len(batch["errors"]))
    bar.close()
    model.train(was_training)
    return features, skipped


@torch.no_grad()
def encode_queries(model: RetrievalModel, queries: Sequence[str], device: torch.device, precision: str = "fp32") -> torch.Tensor:
    """``[Q, D]`` L2-normalised float32 text features."""
    was_training = model.training
    model.eval()
    with autocast(device, precision):
        features = model.encode_text(tokenize(list(queries)).to(device))
    model.train(was_training)
    return F.normalize(features.float(), dim=-1)


def _rank_torch(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product, scoring the gallery in chunks and merging the running best."""
    best_scores = torch.full((queries.shape[0], 0), float("-inf"))
    best_indices = torch.zeros((queries.shape[0], 0), dtype=torch.long)
    for start in range(0, gallery.shape[0], _GALLERY_CHUNK):
        chunk = gallery[start : start + _GALLERY_CHUNK].float()
        scores = queries @ chunk.t()  # [Q, chunk]
        chunk_scores, chunk_indices = scores.topk(min(k, chunk.shape[0]), dim=1)
        merged_scores = torch.cat([best_scores, chunk_scores], dim=1)
        merged_indices = torch.cat([best_indices, chunk_indices + start], dim=1)
        best_scores, order = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
        best_indices = merged_indices.gather(1, order)
    return best_scores, best_indices


def _rank_faiss(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k with a FAISS flat inner-product index (multi-threaded BLAS for huge galleries)."""
    faiss = _faiss()
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery.float().numpy())
    scores, indices = index.search(queries.float().numpy(), k)
    return torch.from_numpy(scores), torch.from_numpy(indices).long()


def _faiss() -> Any:
    """The faiss module, or None: FAISS is optional (``pip install upperson[search]``)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def model_from_index(
    index: GalleryIndex, adapter: str | os.PathLike[str] | None = None, device: torch.device | str = "cpu"
) -> RetrievalModel:
    """Rebuild the model that made ``index`` from its metadata, so that queries land in the same space.

    Args:
        adapter: use this adapter file instead of the recorded path (e.g. after moving the run); it
            must be the same file (same SHA-256) the index was built with.
        device: where the model goes.
    """
    metadata = index.metadata
    recorded = metadata.get("adapter")
    path = Path(adapter) if adapter is not None else (Path(recorded) if recorded else None)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(
                f"adapter file {path} does not exist (the index records {recorded}); pass --adapter with its new location"
            )
        digest = file_sha256(path)
        if digest != metadata.get("adapter_sha256"):
            raise ValueError(
                f"adapter {path} (sha256 {digest[:12]}…) is not the one the index was built with "
                f"({str(metadata.get('adapter_sha256'))[:12]}…); re-run `upperson index` with it"
            )
    config = inference_config(metadata["method"], metadata["backbone_source"], tuple(metadata["image_size"]), metadata["config"])
    model = build_inference_model(config, path, device=torch.device(device))
    if model.backbone_sha256 != metadata["backbone_sha256"]:
        raise ValueError(
            f"backbone {metadata['backbone_source']} now has other weights than when the index was built; re-run `upperson index`"
        )
    return model
