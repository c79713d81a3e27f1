"""Search your own gallery with a trained adapter: an on-disk image-feature index and text queries.

``GalleryIndex.build`` encodes every image under a folder once (L2-normalised, merged model, test
transforms) and stores the features as float16 safetensors plus a JSON file of relative paths,
per-file size/mtime and the model's identity. Re-building the same folder is incremental: files
whose size and mtime are unchanged keep their features. ``GalleryIndex.search`` ranks the gallery
by cosine similarity to text queries, exactly (torch matmul in cache-sized blocks, or FAISS
``IndexFlatIP`` for large galleries when FAISS is installed); ``GalleryIndex.rank`` does the same for
query features from anywhere (an image, another row).

Features are stored in float16: half the disk of float32, and a cosine score of unit vectors moves
by ~1e-3 at most, which only reorders near-ties.

Every entry has a stable *row* id (:class:`RowIds`): re-indexing keeps the row of every path it finds
again, gives new paths new rows and never gives a removed path's row to another image.

The index never touches what it did not write: it refuses an index folder that holds anything but
its own two files (or that holds the images), replaces a previous index only by removing those two
files, and a lock file (``<index folder>.lock``, holding the writer's pid) keeps two processes from
writing one index. Only files inside the gallery root are read: symlinks that dangle, loop or lead
out of the root are skipped and listed, and folder symlinks are not followed. ``index.json`` is not
trusted to say where that root is: it must lie inside the folder that holds the index folder, or
inside the ``gallery_root`` the reader passes to :meth:`GalleryIndex.load`; paths that leave it, hidden
or non-image paths and control characters are refused as tampered, and so are malformed fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import reprlib
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from upperson.data.datasets import IMAGE_ERRORS, read_image
from upperson.config import MAX_IMAGE_SIDE
from upperson.data.transforms import build_transforms
from upperson.methods import METHODS, RetrievalModel
from upperson.retrieval.factory import build_inference_model, inference_config
from upperson.runtime import PRECISIONS, Progress, SilentProgress, autocast, resolve_precision
from upperson.tokenizer import dropped_tokens, tokenize
from upperson.version import __version__

logger = logging.getLogger(__name__)

FEATURES_FILE = "features.safetensors"
INDEX_FILE = "index.json"
INDEX_FORMAT = "upperson-gallery-index"
INDEX_FORMAT_VERSION = 2
"""2 added stable row ids (``rows``, ``next_row``) and ``feature_dim``; version 1 files still load (their rows
are their positions)."""
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
FAISS_THRESHOLD = 100_000
"""Galleries larger than this use FAISS (when importable); below it torch matmul is as fast."""
_SCORE_BLOCK = 2048
"""Gallery rows the torch path converts to float32 and multiplies at a time: a few MiB for CLIP-sized
features, which stays in the CPU cache between the conversion and the product. Converting into one reused
buffer matters: a fresh float32 copy per chunk (page faults on every new allocation) made ranking a
1M-row gallery ~5x slower than the products themselves."""
_SCORE_BUFFER = 1 << 24
"""Most query x gallery scores the torch path holds at once (64 MiB of float32); more queries are
ranked in groups."""
_INDEX_FILES = (INDEX_FILE, FEATURES_FILE)
"""Everything an index folder holds; nothing else in it is ever removed."""
_REBUILD = "rebuild the index with `upperson index`"
_FEATURE_CHECK_ROWS = 65_536
"""Rows checked for NaN/Inf at a time (a bounded temporary instead of one boolean per value)."""
_UNSAFE_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
"""Control characters (C0, DEL, C1) and lone surrogates: never in a name ``find_images`` records."""
_SHA256 = re.compile("[0-9a-f]{64}")


class GalleryIndexError(ValueError):
    """An index folder that cannot be written or read as it is; the message names the file and the fix."""


class MissingRowError(LookupError):
    """A row id the index does not hold: removed from the gallery (``gone``) or never given."""

    def __init__(self, message: str, gone: bool) -> None:
        super().__init__(message)
        self.gone = gone


@dataclass(frozen=True)
class RowIds:
    """The stable id ("row") of each index entry, by position, and the next id to give.

    A row, once given, means one relative path for as long as that path stays in the gallery:
    :meth:`reassign` keeps the row of every path found again, gives new paths ``next_row``,
    ``next_row + 1``, ... and lets removed paths take their rows with them (never given again).
    Format-1 indexes had no ids: their rows are their positions.
    """

    ids: tuple[int, ...]
    """Row of the entry at each position of ``GalleryIndex.paths``."""
    next_row: int
    """One more than the largest row ever given by this index."""
    _positions: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problem = rows_problem(self.ids, self.next_row)
        if problem is not None:
            raise ValueError(f"row ids must be {problem}")
        object.__setattr__(self, "_positions", {row: position for position, row in enumerate(self.ids)})

    @classmethod
    def positions(cls, count: int) -> RowIds:
        """Rows ``0 .. count - 1`` in order: a new index, or one of format 1."""
        return cls(tuple(range(count)), count)

    def position(self, row: int) -> int:
        """Where ``row`` is in the index's paths and features.

        Raises:
            MissingRowError: ``row`` was removed from the gallery (``gone``), or was never given.
        """
        position = self._positions.get(row)
        if position is not None:
            return position
        if 0 <= row < self.next_row:
            raise MissingRowError(f"row {row} was removed from the gallery (its image was gone when the folder was re-indexed)", gone=True)
        raise MissingRowError(f"no row {row}: never given (only rows below {self.next_row} were given)", gone=False)

    def reassign(self, old_paths: Sequence[str], new_paths: Sequence[str]) -> RowIds:
        """Rows for ``new_paths`` (the entries of a rebuilt index, whose previous entries were ``old_paths``)."""
        kept = dict(zip(old_paths, self.ids, strict=True))
        ids, next_row = [], self.next_row
        for path in new_paths:
            if path not in kept:
                kept[path], next_row = next_row, next_row + 1
            ids.append(kept[path])
        return RowIds(tuple(ids), next_row)


def rows_problem(ids: Sequence[Any], next_row: Any, count: int | None = None) -> str | None:
    """What is wrong with row ids (``None`` when nothing): the one check of :class:`RowIds` and ``index.json``."""
    if not _is_int(next_row):
        return "given with an integer next_row"
    if (count is not None and len(ids) != count) or not all(_is_int(row) for row in ids) or len(set(ids)) != len(ids):
        return "one distinct integer per path"
    if ids and not (min(ids) >= 0 and max(ids) < next_row):
        return f"in 0 <= row < next_row ({next_row})"
    return None


@dataclass(frozen=True)
class SearchHit:
    """One ranked gallery image."""

    path: Path
    """Absolute path of the image (index folder root + relative path)."""
    score: float
    """Cosine similarity to the query."""
    row: int
    """The image's stable row id (see :meth:`GalleryIndex.position`)."""


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
    """Unreadable images ``{"path", "error", "size", "mtime_ns"}``, retried only once they change, and
    symlinks not followed ``{"path", "error"}`` (dangling, looping, leaving the root, or folders)."""
    row_ids: RowIds | None = None
    """Stable row id of each entry; ``None`` gives rows ``0 .. N-1`` (a new index)."""

    def __post_init__(self) -> None:
        if self.row_ids is None:
            self.row_ids = RowIds.positions(len(self.paths))
        if len(self.row_ids.ids) != len(self.paths):
            raise ValueError(f"{len(self.row_ids.ids)} row ids for {len(self.paths)} paths")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def rows(self) -> list[int]:
        """The stable row id of each entry, by position (``rows[p]`` is the row of ``paths[p]``)."""
        return list(self.row_ids.ids)

    @property
    def next_row(self) -> int:
        """The row the next new image will get."""
        return self.row_ids.next_row

    def position(self, row: int) -> int:
        """The position of ``row`` in :attr:`paths` and :attr:`features`.

        Raises:
            MissingRowError: the row's image was removed from the gallery (``error.gone``), or the row was never given.
        """
        return self.row_ids.position(row)

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
        hashes, image size) is updated incrementally; one made by another model is re-encoded. Either
        way every image it held keeps its row id.

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
        _check_not_holding(out, root)
        if not root.is_relative_to(out.parent):
            logger.warning(
                "the images %s are not inside %s, the folder holding the index: readers must be given the gallery root "
                "(`upperson search/serve --gallery-root %s`); an index next to its images (the default %s) needs none",
                root, out.parent, root, root / ".upperson-index",
            )
        size = tuple(image_size or model.backbone_spec.image_size)
        precision = resolve_precision(precision, torch.device(device))
        metadata = index_metadata(model, size, adapter, config_path, precision)
        with _index_lock(out):
            _check_replaceable(out)
            found = find_images(root, exclude=out)
            current = {path: _file_stat(root / path) for path in found.images}
            old = _previous_index(out)
            previous, previous_skipped = _reusable_entries(old, out, root, metadata)
            reused = {path: features for path, (features, stat) in previous.items() if current.get(path) == stat}
            still_skipped = [entry for entry in previous_skipped if current.get(entry["path"]) == _stat_of(entry)]
            known = set(reused) | {entry["path"] for entry in still_skipped}
            to_encode = [path for path in current if path not in known]
            logger.info(
                "%d images: %d unchanged (features reused), %d unchanged and unreadable, %d to encode, %d dropped",
                len(current), len(reused), len(still_skipped), len(to_encode), len(set(previous) - set(current)),
            )
            encoded, unreadable = _encode_images(
                model, root, to_encode, size, torch.device(device), precision, batch_size, num_workers, progress
            )
            newly_skipped = [{**entry, **current[entry["path"]]} for entry in unreadable]
            skipped = sorted(found.skipped + still_skipped + newly_skipped, key=lambda entry: entry["path"])
            rows = reused | encoded
            paths = sorted(rows)
            dim = model.backbone_spec.embed_dim
            features = torch.stack([rows[path] for path in paths]) if paths else torch.zeros(0, dim, dtype=torch.float16)
            row_ids = _continued_rows(old, root, paths)
            index = cls(root, paths, features, {path: current[path] for path in paths}, metadata, skipped, row_ids)
            index._write(out)
        return index

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write the index to ``out_dir``: a new folder, an empty one, or a previous index (replaced).

        Raises:
            GalleryIndexError: ``out_dir`` holds other files, holds the images, or another process
                is writing it.
        """
        out = Path(out_dir).resolve()
        _check_not_holding(out, self.image_dir.resolve())
        with _index_lock(out):
            _check_replaceable(out)
            self._write(out)
        return out

    def _write(self, out: Path) -> None:
        """Write ``features.safetensors`` and ``index.json`` to a fresh folder, then swap it in, so
        that readers never see features and paths from two different builds. Call with the lock held."""
        staging = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
        staging.mkdir()  # not mkdtemp: the index folder should get the usual (umask) permissions
        previous = out.with_name(f".{out.name}.{uuid.uuid4().hex}.old") if out.exists() else None
        try:
            save_file({"features": self.features.to(torch.float16).contiguous()}, str(staging / FEATURES_FILE))
            payload = {
                "format": INDEX_FORMAT,
                "format_version": INDEX_FORMAT_VERSION,
                "image_dir": str(self.image_dir),
                "feature_dim": int(self.features.shape[1]),
                "metadata": self.metadata,
                "paths": self.paths,
                "rows": self.rows,
                "next_row": self.next_row,
                "files": self.files,
                "skipped": self.skipped,
            }
            (staging / INDEX_FILE).write_text(json.dumps(payload, indent=1))
            if previous is not None:
                os.replace(out, previous)
            try:
                os.replace(staging, out)
            except OSError:
                if previous is not None:
                    os.replace(previous, out)
                raise
        finally:
            for folder in (staging, previous):
                if folder is not None and folder.exists():
                    _remove_index_folder(folder)

    @classmethod
    def load(cls, out_dir: str | os.PathLike[str], *, gallery_root: str | os.PathLike[str] | None = None) -> GalleryIndex:
        """Read an index directory written by :meth:`build`, checking it thoroughly.

        Args:
            gallery_root: the folder the gallery's images may be read from; default the folder that
                holds the index folder (``IMAGES`` for the default ``IMAGES/.upperson-index``). The
                root ``index.json`` names must lie inside it: the file is never trusted to say so itself.

        Raises:
            FileNotFoundError: a file of the index is missing.
            GalleryIndexError: ``index.json`` is malformed, puts the gallery root outside the allowed
                one or names files outside that root (tampered), or the features file is corrupt, holds
                NaN/Inf or does not match it.
        """
        out = Path(out_dir)
        index_file, features_file = out / INDEX_FILE, out / FEATURES_FILE
        for required in (index_file, features_file):
            if not required.is_file():
                raise FileNotFoundError(f"{required} does not exist; build the index with `upperson index`")
        payload = _read_index_file(index_file)
        root = _gallery_root(payload["image_dir"], out, gallery_root, index_file)
        paths = payload["paths"]
        _check_entries(paths, root, index_file)
        features = _read_features(features_file, paths, payload.get("feature_dim"))
        row_ids = RowIds(tuple(payload["rows"]), payload["next_row"]) if payload["format_version"] >= 2 else RowIds.positions(len(paths))
        return cls(root, paths, features, payload["files"], payload["metadata"], payload.get("skipped", []), row_ids)

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
        query_features = encode_queries(model, queries, torch.device(device), precision)
        scores, positions = self.rank(query_features, top_k, faiss_threshold=faiss_threshold)
        ids = self.row_ids.ids
        return [
            [SearchHit(self.image_dir / self.paths[p], float(s), ids[p]) for s, p in zip(query_scores.tolist(), query_positions.tolist())]
            for query_scores, query_positions in zip(scores, positions)
        ]

    def rank(
        self, query_features: torch.Tensor, top_k: int, *, faiss_threshold: int = FAISS_THRESHOLD
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The entries most similar to each query feature by inner product (cosine for unit vectors), exactly.

        Args:
            query_features: ``[Q, D]`` L2-normalised features from the index's model (text or image).
            top_k: hits per query (fewer if the gallery is smaller).
            faiss_threshold: use FAISS (exact inner product) for galleries larger than this, if installed.

        Returns:
            ``(scores, positions)``, both ``[Q, min(top_k, len(self))]``, best first; positions index
            :attr:`paths` and :attr:`features`, and ``rows[position]`` is an entry's stable row id.
        """
        if top_k < 1:
            raise ValueError(f"search: top_k must be >= 1, got {top_k}")
        query_features = query_features.to("cpu", torch.float32)
        if query_features.dim() != 2 or query_features.shape[1] != self.features.shape[1]:
            raise GalleryIndexError(
                f"the index of {self.image_dir} has features of {self.features.shape[1]} dimensions but the model's "
                f"embeddings have {query_features.shape[-1]}: it was not built by this model; {_REBUILD}"
            )
        k = min(top_k, len(self))
        if k == 0:
            return torch.zeros(query_features.shape[0], 0), torch.zeros(query_features.shape[0], 0, dtype=torch.long)
        if len(self) > faiss_threshold and _faiss() is not None:
            return _rank_faiss(query_features, self.features, k)
        return _rank_torch(query_features, self.features, k)


@dataclass(frozen=True)
class GalleryFiles:
    """What :func:`find_images` found under a gallery root."""

    images: list[str]
    """Relative POSIX paths of the images to index, sorted."""
    skipped: list[dict[str, str]]
    """``{"path", "error"}`` of the symlinks not followed and special files, sorted by path."""


def find_images(root: Path, exclude: Path | None = None) -> GalleryFiles:
    """The images under the resolved folder ``root`` (by suffix, any case), and the symlinks not followed.

    Hidden files and folders are skipped: they hold atomic-write temporaries, OS thumbnails and the
    default index folder, never gallery images. Folder symlinks are never followed (one inside the
    gallery would index its images twice, or loop; one outside reads outside the gallery); file
    symlinks are indexed when they resolve to a regular file inside ``root``. The others, and
    special files such as pipes, are listed as skipped.
    """
    images: list[str] = []
    skipped: list[dict[str, str]] = []
    for folder, folders, files in os.walk(root):  # followlinks=False: folder symlinks are listed, not entered
        here = Path(folder)
        visible = sorted(name for name in folders if not name.startswith(".") and (exclude is None or here / name != exclude))
        links = [name for name in visible if (here / name).is_symlink()]
        folders[:] = [name for name in visible if name not in links]
        for name in links:
            target = (here / name).resolve()
            reason = (
                f"folder symlink to {target}, not followed (the images there are indexed under their own folder)"
                if target.is_relative_to(root)
                else f"symlink to {target}, outside the gallery"
            )
            logger.warning("skipping %s: %s", here / name, reason)
            skipped.append({"path": (here / name).relative_to(root).as_posix(), "error": reason})
        for name in files:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            path = here / name
            relative = path.relative_to(root).as_posix()
            problem = _file_problem(path, root)
            if problem is None:
                images.append(relative)
            else:
                logger.warning("skipping %s: %s", path, problem)
                skipped.append({"path": relative, "error": problem})
    return GalleryFiles(sorted(images), sorted(skipped, key=lambda entry: entry["path"]))


def _file_problem(path: Path, root: Path) -> str | None:
    """Why the walked file ``path`` is not indexed, or None when it is (or leads to) a regular file inside ``root``."""
    if path.is_symlink():
        try:
            target = path.resolve(strict=True)
        except FileNotFoundError:
            return f"dangling symlink to {os.readlink(path)}"
        except (OSError, RuntimeError):  # ELOOP; Python < 3.13 raises RuntimeError for symlink loops
            return f"symlink loop ({path.name} -> {os.readlink(path)})"
        if not target.is_relative_to(root):
            return f"symlink to {target}, outside the gallery"
    if not path.is_file():
        return "not a regular file (a pipe or device would block reading)"
    return None


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


def _previous_index(out: Path) -> GalleryIndex | None:
    """The index ``out`` holds before a rebuild, or ``None`` (none, or unreadable).

    It is read with the file system root as its gallery root: the build reads only its features and row
    ids, never a file through its paths, so a root far from the index folder is fine here.
    """
    if not (out / INDEX_FILE).exists():
        return None
    try:
        return GalleryIndex.load(out, gallery_root=Path(out.anchor))
    except (OSError, ValueError) as error:
        logger.warning("existing index in %s is unreadable (%s); rebuilding from scratch, rows numbered anew", out, error)
        return None


def _continued_rows(old: GalleryIndex | None, root: Path, paths: list[str]) -> RowIds:
    """Row ids of the rebuilt index of ``root``: the previous index's rows carried over if it was of ``root``;
    if it was of another folder, none of its rows is kept and none is given again either."""
    if old is None:
        return RowIds.positions(len(paths))
    if old.image_dir != root:
        return RowIds((), old.next_row).reassign([], paths)
    return old.row_ids.reassign(old.paths, paths)


def _reusable_entries(old: GalleryIndex | None, out: Path, root: Path, metadata: dict[str, Any]) -> Reusable:
    """Features (with file stats) and skipped entries of the previous index that a new build may reuse."""
    if old is None:
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


def _check_not_holding(out: Path, root: Path) -> None:
    """Refuse an index folder that is the image folder or one of its parents: replacing it would
    replace the images."""
    if root.is_relative_to(out):
        raise GalleryIndexError(
            f"index folder {out} is or contains the image folder {root}; writing the index there would replace "
            f"the images; choose another folder, e.g. {root / '.upperson-index'} (the default)"
        )


def _is_index_folder(folder: Path) -> bool:
    """Whether ``folder/index.json`` carries the upperson gallery-index format marker."""
    try:
        payload = json.loads((folder / INDEX_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(payload, dict) and payload.get("format") == INDEX_FORMAT


def _check_replaceable(out: Path) -> None:
    """Refuse to write over ``out`` unless it is absent, empty, or an index holding only its own files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise GalleryIndexError(f"index folder {out} exists and is not a folder; choose a new or empty folder for the index")
    names = sorted(entry.name for entry in out.iterdir())
    if not names:
        return
    if not _is_index_folder(out):
        raise GalleryIndexError(
            f"index folder {out} is not empty and is not an upperson index (no {INDEX_FILE} of format "
            f"{INDEX_FORMAT!r}); choose a new or empty folder for the index"
        )
    foreign = [name for name in names if name not in _INDEX_FILES]
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise GalleryIndexError(
            f"index folder {out} holds {listed}, not written by upperson; move them out or choose another folder for the index"
        )


def _remove_index_folder(folder: Path) -> None:
    """Delete the index files in ``folder`` and then the folder if that left it empty; nothing else."""
    for name in _INDEX_FILES:
        (folder / name).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError as error:
        logger.warning("left %s in place: it holds files upperson did not write (%s)", folder, error)


@contextmanager
def _index_lock(out: Path) -> Iterator[None]:
    """Hold ``<out>.lock`` (created exclusively, holding this pid) while writing the index ``out``.

    A lock whose pid is no longer running on this machine was left by a crash and is taken over.
    """
    lock = out.with_name(f"{out.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        holder = _lock_holder(lock)
        if holder is None or _running(holder):
            who = f"another process (pid {holder})" if holder is not None else "another process"
            raise GalleryIndexError(
                f"{who} is writing the index {out} (lock file {lock}); wait for it to finish, "
                f"or delete {lock} if no `upperson index` is running"
            ) from None
        logger.warning("taking over the stale lock %s: its process %d is not running", lock, holder)
        lock.unlink(missing_ok=True)
        handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(handle, "w") as file:
        file.write(f"{os.getpid()}\n")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _lock_holder(lock: Path) -> int | None:
    try:
        return int(lock.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _running(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # running, as another user
        return True
    return True


def _gallery_root(stored: str, out: Path, gallery_root: str | os.PathLike[str] | None, index_file: Path) -> Path:
    """The resolved root ``index.json`` names, refused unless it lies inside the allowed root: ``gallery_root``
    when given, else the folder holding the index folder (never a folder the file itself names)."""
    root = Path(stored).resolve()
    if gallery_root is not None:
        allowed, what = Path(gallery_root).resolve(), "the allowed gallery root"
    else:
        allowed, what = out.resolve().parent, "the folder holding the index"
    if root.is_relative_to(allowed):
        return root
    fix = (
        f"if the images really are in {root}, load the index with gallery_root={root} (`--gallery-root {root}`), else {_REBUILD}"
        if gallery_root is None
        else f"give the --gallery-root (gallery_root) that holds the images, or {_REBUILD}"
    )
    raise GalleryIndexError(f"tampered or invalid {index_file}: its gallery root {root} is outside {allowed} ({what}); {fix}")


def _read_index_file(index_file: Path) -> dict[str, Any]:
    """``index.json`` as a dict whose fields have the types and bounds :meth:`GalleryIndex._write` gives them."""
    try:
        payload = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GalleryIndexError(f"{index_file}: not valid JSON ({error}); {_REBUILD}") from error
    except RecursionError:
        raise GalleryIndexError(f"{index_file}: nested too deeply to be an index (not written by upperson); {_REBUILD}") from None
    if not isinstance(payload, dict):
        raise GalleryIndexError(f"{index_file}: must be a JSON object, got {type(payload).__name__}; {_REBUILD}")
    if payload.get("format") != INDEX_FORMAT:
        raise GalleryIndexError(f"{index_file}: not an upperson gallery index (format {reprlib.repr(payload.get('format'))})")
    version = payload.get("format_version")
    if not _is_int(version) or not 1 <= version <= INDEX_FORMAT_VERSION:
        raise GalleryIndexError(
            f"{index_file}: format version {reprlib.repr(version)} is not one this upperson reads (1 to {INDEX_FORMAT_VERSION}): "
            f"written by a newer upperson? upgrade upperson or {_REBUILD}"
        )
    paths, files, skipped = payload.get("paths"), payload.get("files"), payload.get("skipped", [])
    image_dir = payload.get("image_dir")
    checks = [
        ("image_dir", isinstance(image_dir, str) and Path(image_dir).is_absolute() and not _UNSAFE_CHARACTER.search(image_dir), "be an absolute path"),
        ("metadata", isinstance(payload.get("metadata"), dict), "be an object"),
        ("paths", isinstance(paths, list) and all(isinstance(path, str) for path in paths), "be a list of strings"),
        ("files", isinstance(files, dict), "be an object"),
        (
            "files",
            isinstance(files, dict) and isinstance(paths, list) and set(files) == set(paths)
            and all(isinstance(stat, dict) and _is_int(stat.get("size")) and _is_int(stat.get("mtime_ns")) for stat in files.values()),
            "map each path to its size and mtime_ns (integers)",
        ),
        (
            "skipped",
            isinstance(skipped, list)
            and all(isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("error"), str) for entry in skipped),
            'be a list of {"path", "error"} objects',
        ),
    ]
    if version >= 2:
        rows, next_row = payload.get("rows"), payload.get("next_row")
        checks += [
            ("feature_dim", _is_int(payload.get("feature_dim")) and payload["feature_dim"] >= 1, "be an integer >= 1"),
            ("next_row", _is_int(next_row) and next_row >= 0, "be an integer >= 0"),
            ("rows", isinstance(rows, list), "be a list of integers"),
        ]
    for name, ok, expectation in checks:
        if not ok:
            raise GalleryIndexError(f"{index_file}: field '{name}' must {expectation}; {_REBUILD}")
    if version >= 2:
        problem = rows_problem(payload["rows"], payload["next_row"], len(paths))
        if problem is not None:
            raise GalleryIndexError(f"{index_file}: field 'rows' must be {problem}; {_REBUILD}")
    _check_metadata(payload["metadata"], index_file)
    return payload


def _check_metadata(metadata: dict[str, Any], index_file: Path) -> None:
    """The model identity :func:`model_from_index` and serve rebuild the query encoder from: every field
    present, typed, and ``image_size`` within what a model can be built at."""
    size = metadata.get("image_size")
    checks = [
        ("method", metadata.get("method") in METHODS, f"be a method name ({', '.join(sorted(METHODS))})"),
        ("config", metadata.get("config") is None or isinstance(metadata.get("config"), dict), "be an object or null"),
        ("backbone_source", isinstance(metadata.get("backbone_source"), str), "be a string"),
        ("backbone_sha256", _is_sha256(metadata.get("backbone_sha256")), "be a SHA-256 (64 hex digits)"),
        ("adapter", metadata.get("adapter") is None or isinstance(metadata.get("adapter"), str), "be a string or null"),
        ("adapter_sha256", metadata.get("adapter_sha256") is None or _is_sha256(metadata.get("adapter_sha256")), "be a SHA-256 or null"),
        (
            "image_size",
            isinstance(size, list) and len(size) == 2 and all(_is_int(side) and 1 <= side <= MAX_IMAGE_SIDE for side in size),
            f"be two integers in 1..{MAX_IMAGE_SIDE} (height, width)",
        ),
        ("precision", metadata.get("precision") in PRECISIONS, f"be one of {', '.join(PRECISIONS)}"),
    ]
    for name, ok, expectation in checks:
        if not ok:
            shown = reprlib.repr(metadata.get(name)) if name in metadata else "nothing (missing)"
            raise GalleryIndexError(f"{index_file}: field 'metadata.{name}' must {expectation}, got {shown}; {_REBUILD}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def _check_entries(paths: list[str], root: Path, index_file: Path) -> None:
    """Every path must be what :func:`find_images` records: relative, normalised, free of ``..``, hidden
    parts and control characters, with an image suffix, and resolve (symlinks followed) inside ``root``.

    Each folder is resolved once and each file only when it is a symlink: one ``lstat`` per image.
    """
    real_root = root.resolve()
    folder_inside: dict[str, bool] = {}
    suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
    for number, path in enumerate(paths):
        problem = None
        unsafe = _UNSAFE_CHARACTER.search(path)
        parts = path.replace(os.sep, "/").split("/")
        if not path:
            problem = "is empty"
        elif unsafe is not None:
            surrogate = "\ud800" <= unsafe.group() <= "\udfff"
            problem = "contains an unpaired surrogate" if surrogate else f"contains a control character ({unsafe.group()!r})"
        elif path.startswith("/") or os.path.isabs(path):
            problem = "is absolute"
        elif ".." in parts:
            problem = "contains '..'"
        elif any(part.startswith(".") or not part for part in parts):
            problem = "has a hidden component or an empty one (the index never records those)"
        elif Path(path).suffix.lower() not in IMAGE_SUFFIXES:
            problem = f"is not an image file ({suffixes})"
        else:
            folder = path.rpartition("/")[0]
            if folder not in folder_inside:
                folder_inside[folder] = (real_root / folder).resolve().is_relative_to(real_root)
            file = os.path.join(real_root, path)
            if not folder_inside[folder] or (os.path.islink(file) and not Path(file).resolve().is_relative_to(real_root)):
                problem = f"resolves outside the gallery {real_root} (a symlink?)"
        if problem is not None:
            raise GalleryIndexError(f"tampered or invalid {index_file}: entry {number} path {reprlib.repr(path)} {problem}; {_REBUILD}")


def _read_features(features_file: Path, paths: list[str], feature_dim: int | None) -> torch.Tensor:
    """The ``[N, D]`` features, one finite row per path (and ``D`` = ``feature_dim`` when index.json records it)."""
    try:
        tensors = load_file(str(features_file))
    except (SafetensorError, OSError, ValueError) as error:
        raise GalleryIndexError(f"{features_file}: not a readable safetensors file ({error}); {_REBUILD}") from error
    if "features" not in tensors:
        raise GalleryIndexError(f"{features_file}: holds no 'features' tensor; {_REBUILD}")
    features = tensors["features"]
    if features.dim() != 2 or not features.is_floating_point():
        raise GalleryIndexError(
            f"{features_file}: 'features' must be a [N, D] matrix, got shape {tuple(features.shape)} of {features.dtype}; {_REBUILD}"
        )
    if features.shape[0] != len(paths):
        raise GalleryIndexError(f"{features_file}: {features.shape[0]} feature rows but {len(paths)} paths in {INDEX_FILE}; {_REBUILD}")
    if feature_dim is not None and features.shape[1] != feature_dim:
        raise GalleryIndexError(
            f"{features_file}: features of {features.shape[1]} dimensions but {INDEX_FILE} records {feature_dim}; {_REBUILD}"
        )
    for start in range(0, len(features), _FEATURE_CHECK_ROWS):
        finite = torch.isfinite(features[start : start + _FEATURE_CHECK_ROWS]).all(dim=1)
        if not finite.all():
            entry = start + int((~finite).nonzero()[0, 0])
            raise GalleryIndexError(
                f"{features_file}: the features of entry {entry} ({paths[entry]!r}) hold NaN or infinite values; {_REBUILD}"
            )
    return features


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
    queries = list(queries)
    for query, dropped in zip(queries, dropped_tokens(queries), strict=True):
        if dropped:
            shown = query if len(query) <= 60 else query[:60] + "..."
            logger.warning("query %r is too long for the text encoder: its last %d tokens were dropped; shorten it", shown, dropped)
    was_training = model.training
    model.eval()
    with autocast(device, precision):
        features = model.encode_text(tokenize(queries).to(device))
    model.train(was_training)
    return F.normalize(features.float(), dim=-1)


@torch.no_grad()
def encode_images(
    model: RetrievalModel,
    images: Sequence[Image.Image],
    image_size: tuple[int, int],
    device: torch.device,
    precision: str = "fp32",
) -> torch.Tensor:
    """``[N, D]`` L2-normalised float32 features of RGB images (e.g. from ``read_image``), through the
    test transform the gallery's images went through."""
    transform = build_transforms(image_size, train=False)
    batch = torch.stack([transform(image) for image in images]).to(device)  # [N, 3, H, W]
    was_training = model.training
    model.eval()
    with autocast(device, precision):
        features = model.encode_image(batch)
    model.train(was_training)
    return F.normalize(features.float(), dim=-1)


def _rank_torch(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product: every float32 score of a group of queries, then one top-k.

    The (float16) gallery is converted to float32 one cache-sized block at a time into a reused
    buffer and multiplied there, so each group of queries reads it from memory once.
    """
    rows = gallery.shape[0]
    buffer = torch.empty(min(_SCORE_BLOCK, rows), gallery.shape[1])
    group = max(1, _SCORE_BUFFER // rows)
    best_scores, best_rows = [], []
    for first in range(0, queries.shape[0], group):
        transposed = queries[first : first + group].t().contiguous()  # [D, q]
        scores = torch.empty(rows, transposed.shape[1])  # [N, q]
        for start in range(0, rows, _SCORE_BLOCK):
            stop = min(rows, start + _SCORE_BLOCK)
            block = buffer[: stop - start].copy_(gallery[start:stop])  # [block, D] float32
            torch.mm(block, transposed, out=scores[start:stop])
        top_scores, top_rows = scores.topk(k, dim=0)  # [k, q]
        best_scores.append(top_scores.t())
        best_rows.append(top_rows.t())
    return torch.cat(best_scores), torch.cat(best_rows)


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


def index_adapter(index: GalleryIndex, adapter: str | os.PathLike[str] | None = None) -> Path | None:
    """The adapter file that made ``index``: ``adapter`` if given, else the recorded path; ``None`` for
    an index made without one (zero-shot).

    Raises:
        FileNotFoundError: the file is not there (moved since indexing?).
        ValueError: the file is not the one the index was built with (SHA-256 differs).
    """
    recorded = index.metadata.get("adapter")
    path = Path(adapter) if adapter is not None else (Path(recorded) if recorded else None)
    if path is None:
        return None
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} does not exist (the index records {recorded}); pass --adapter with its new location")
    digest = file_sha256(path)
    if digest != index.metadata.get("adapter_sha256"):
        raise ValueError(
            f"adapter {path} (sha256 {digest[:12]}…) is not the one the index was built with "
            f"({str(index.metadata.get('adapter_sha256'))[:12]}…); re-run `upperson index` with it"
        )
    return path


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
    path = index_adapter(index, adapter)
    config = inference_config(metadata["method"], metadata["backbone_source"], tuple(metadata["image_size"]), metadata["config"])
    model = build_inference_model(config, path, device=torch.device(device))
    if model.backbone_sha256 != metadata["backbone_sha256"]:
        raise ValueError(
            f"backbone {metadata['backbone_source']} now has other weights than when the index was built; re-run `upperson index`"
        )
    return model
