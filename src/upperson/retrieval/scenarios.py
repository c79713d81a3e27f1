"""Named gallery indexes served side by side, with one frozen backbone in memory however many share it.

A *scenario* is a gallery index written by ``upperson index`` plus the adapter that made it. Each
index records its model (method and config, backbone SHA-256, image size, adapter SHA-256), so
scenarios group themselves:

* Scenarios on the same backbone weights (SHA-256) at the same image size share ONE copy of the
  frozen CLIP tensors: every model on that backbone is a structural copy of one loaded CLIP whose
  parameters and buffers are the very same tensor objects (:func:`_structural_copy`).
* Scenarios whose method configs also agree on every structural field (the fields an adapter file
  must match, :attr:`MethodEntry.structural_fields`) share ONE model (:class:`SharedModel`); each
  scenario keeps only its adapter tensors, which are copied into the model under the model's lock
  when a request for another scenario than the last one comes (a few ms for ViT-B/16 UP-Person).

LoRA stays a side branch (never merged). Merging writes the update into the frozen in-projections,
which the models of a backbone share, and swapping adapters by unmerge → load → merge cannot restore
those weights exactly in floating point (DoRA and WoRA even divide by norms), so every swap would
move the shared backbone a little. With the side branch the frozen tensors are never written, an
adapter swap is one copy of its tensors, and every scenario computes exactly what its own unmerged
model computes (equal to the merged model of ``upperson search`` within float32 rounding).
``benchmarks/serve.py`` measures what the side branch costs per query.

Images are named by their index's stable row ids (:meth:`GalleryIndex.position`), never by positions: a
row keeps its image when the folder is re-indexed with images added or removed, and a removed image's
row is gone rather than another image's.

A scenario is immutable once loaded; :meth:`Scenarios.reload` builds a new one completely (index,
model group, adapter) and then replaces the reference, so a request sees either the old or the new
scenario, never a mixture, and a failed reload leaves the old one serving.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
import stat
import threading
import time
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from upperson.adapter_file import read_adapter_for
from upperson.backbone.loading import Backbone, BackboneLoadError, load_backbone
from upperson.config import ConfigError, read_yaml
from upperson.data.datasets import IMAGE_ERRORS
from upperson.methods import RetrievalModel, build_method_config, build_model, get_method
from upperson.retrieval.gallery import (
    INDEX_FILE,
    GalleryIndex,
    MissingRowError,
    encode_images,
    encode_queries,
    file_sha256,
    index_adapter,
)
from upperson.runtime import resolve_precision

logger = logging.getLogger(__name__)

SCENARIO_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""Scenario names appear in URLs: letters, digits, ``_``, ``.`` and ``-``, at most 64 characters."""
_SCENARIO_FILE_KEYS = frozenset({"name", "index", "adapter", "gallery_root"})


def display_path(path: str) -> str:
    """``path`` as text any JSON encoder and any screen show as it is: nothing hidden, nothing reordered.

    Bytes that are not UTF-8 (which Python decodes from file names as surrogate escapes) become
    ``\\xNN``; control and format characters (NUL, escape sequences, line separators, zero-width and
    bidi controls such as U+202E, which would show ``gnp.exe`` reversed) become ``\\xNN`` or
    ``\\uNNNN``. It is for showing only: the server finds a file by its row, never by this text.
    """
    return "".join(_shown(char) for char in path)


_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
"""Unicode categories shown escaped: controls, format (bidi, zero-width), surrogates, line and paragraph separators."""


def _shown(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's escape of the undecodable byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    if unicodedata.category(char) in _HIDDEN_CATEGORIES:
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return char


class ScenarioError(ValueError):
    """A scenario cannot be loaded as configured; the message names the scenario, the file and the fix."""


class UnknownScenarioError(LookupError):
    """No scenario of that name is served."""


class MissingImageError(LookupError):
    """The indexed image of a row is no longer a file inside the gallery."""


@dataclass(frozen=True)
class ScenarioSpec:
    """What to serve under a name: an index folder and, optionally, where its adapter file is now and where its
    images may be read from."""

    name: str
    """URL-safe name (:data:`SCENARIO_NAME`)."""
    index: Path
    """Folder written by ``upperson index``."""
    adapter: Path | None = None
    """The adapter file, if it moved since indexing (must be the same file); default: the recorded path."""
    gallery_root: Path | None = None
    """The folder the gallery's images may be read from (:meth:`GalleryIndex.load`); default: the folder holding
    the index folder. Needed when the index lies elsewhere than beside its images."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not SCENARIO_NAME.fullmatch(self.name):
            raise ScenarioError(
                f"scenario name {self.name!r} is not allowed: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
            )

    @classmethod
    def parse(cls, text: str, gallery_root: Path | None = None) -> ScenarioSpec:
        """``NAME=INDEX_DIR`` (the command line's ``--scenario``), its images read inside ``gallery_root`` if given."""
        name, separator, index = text.partition("=")
        if not separator or not index:
            raise ScenarioError(f"--scenario {text!r}: expected NAME=INDEX_DIR, e.g. street=/data/street/.upperson-index")
        return cls(name, Path(index), gallery_root=gallery_root)


def read_scenario_file(path: str | os.PathLike[str]) -> list[ScenarioSpec]:
    """Scenarios from a YAML list of ``{name, index, adapter (optional), gallery_root (optional)}`` mappings.

    Relative paths are relative to the file's folder. Unknown keys and keys written twice are errors; values
    follow the config value syntax (:mod:`upperson.config`).
    """
    path = Path(path)
    try:
        entries = read_yaml(path)  # the training configs' reader: a key written twice is an error, not the last one wins
    except ConfigError as error:
        raise ScenarioError(" ".join(line.strip() for line in str(error).splitlines() if line.strip())) from error
    example = "- {name: street, index: /data/street/.upperson-index}"
    if not isinstance(entries, list) or not entries:
        raise ScenarioError(f"{path}: expected a YAML list of scenarios, e.g. '{example}'")
    specs = []
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise ScenarioError(f"{path}: scenario {number} must be a mapping like '{example}', got {entry!r}")
        unknown = sorted(set(entry) - _SCENARIO_FILE_KEYS)
        if unknown:
            raise ScenarioError(f"{path}: scenario {number} has unknown key(s) {unknown}; allowed: {sorted(_SCENARIO_FILE_KEYS)}")
        for key in ("name", "index"):
            if not isinstance(entry.get(key), str):
                raise ScenarioError(f"{path}: scenario {number} needs '{key}' (a string), e.g. '{example}'")
        optional = {}
        for key, what in (("adapter", "a file path"), ("gallery_root", "a folder path")):
            value = entry.get(key)
            if value is not None and not isinstance(value, str):
                raise ScenarioError(f"{path}: scenario {number} '{key}' must be {what} (a string)")
            optional[key] = path.parent / value if value is not None else None
        specs.append(ScenarioSpec(entry["name"], path.parent / entry["index"], **optional))
    return specs


@dataclass(frozen=True)
class Adapter:
    """One scenario's adapter tensors, kept apart from the model they are copied into."""

    path: Path | None
    """``None`` for a method with nothing trained (zero-shot)."""
    sha256: str | None
    tensors: dict[str, torch.Tensor]
    """By model key (:meth:`RetrievalModel.trainable_state_dict`), on the model's device."""

    @property
    def num_bytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for tensor in self.tensors.values())


@dataclass(frozen=True)
class _GroupKey:
    """What makes two scenarios able to share a model."""

    backbone_sha256: str
    image_size: tuple[int, int]
    method: str
    structure: tuple[tuple[str, str], ...]
    """``(field, repr(value))`` of the method config's structural fields."""


class SharedModel:
    """One model serving every scenario of a group: a scenario's adapter is swapped in under the lock."""

    def __init__(self, model: RetrievalModel, key: _GroupKey, device: torch.device) -> None:
        self.model = model.eval()
        self.key = key
        self.device = device
        self.lock = threading.Lock()
        self._targets = model.trainable_state_dict()
        self._active: Adapter | None = None
        self.swaps = 0
        """Adapter swaps so far (a scenario other than the previous one was asked for)."""

    @contextmanager
    def using(self, adapter: Adapter) -> Iterator[RetrievalModel]:
        """The model with ``adapter`` loaded, for exclusive use inside the ``with`` block (inference mode)."""
        with self.lock:
            if self._active is not adapter:
                self._active = None  # a failed copy must not leave a half-loaded adapter marked as loaded
                with torch.no_grad():
                    for name, tensor in adapter.tensors.items():
                        self._targets[name].copy_(tensor)
                self._active = adapter
                self.swaps += 1
            with torch.inference_mode():
                yield self.model


@dataclass(frozen=True)
class Hit:
    """One ranked gallery image."""

    row: int
    """The image's stable row id in the index (its id in the API; :meth:`GalleryIndex.position`)."""
    score: float
    """Cosine similarity to the query."""
    path: str
    """Relative POSIX path inside the gallery root."""


@dataclass(frozen=True)
class Scenario:
    """A loaded scenario: its index, the shared model it runs on and its own adapter."""

    spec: ScenarioSpec
    index: GalleryIndex
    model: SharedModel
    adapter: Adapter
    precision: str
    """Autocast precision of its encoders (fp32 on CPU; the index's on GPUs)."""
    loaded_at: float = field(default_factory=time.time)
    _real_root: Path = field(init=False, repr=False)
    _sizes: dict[int, tuple[int, int] | None] = field(default_factory=dict, repr=False)
    """``(width, height)`` per row id, read from the image header on first use."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_real_root", self.index.image_dir.resolve())

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` the model encodes images at."""
        return tuple(self.index.metadata["image_size"])  # type: ignore[return-value]

    def describe(self) -> dict[str, Any]:
        """What ``GET /api/scenarios`` shows (file names, not the server's folders)."""
        metadata = self.index.metadata
        source = metadata["backbone_source"]
        return {
            "name": self.name,
            "images": len(self.index),
            "method": metadata["method"],
            "backbone": display_path(Path(source).name if Path(source).is_absolute() else source),
            "backbone_sha256": metadata["backbone_sha256"],
            "adapter": display_path(self.adapter.path.name) if self.adapter.path is not None else None,
            "adapter_sha256": self.adapter.sha256,
            "image_size": list(self.image_size),
            "loaded_at": self.loaded_at,
        }

    def encode_text(self, queries: Sequence[str]) -> torch.Tensor:
        """``[Q, D]`` normalised float32 features of text queries, with this scenario's adapter."""
        with self.model.using(self.adapter) as model:
            return encode_queries(model, queries, self.model.device, self.precision).cpu()

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[N, D]`` normalised float32 features of RGB images, as the gallery's images were encoded."""
        with self.model.using(self.adapter) as model:
            return encode_images(model, images, self.image_size, self.model.device, self.precision).cpu()

    def search_text(self, query: str, top_k: int) -> list[Hit]:
        """The gallery ranked for a text query (what ``upperson search`` gives for it)."""
        return self._hits(self.encode_text([query]), top_k)[0]

    def search_image(self, image: Image.Image, top_k: int) -> list[Hit]:
        """The gallery ranked by similarity to an image from outside it."""
        return self._hits(self.encode_images([image]), top_k)[0]

    def search_row(self, row: int, top_k: int) -> list[Hit]:
        """More like the indexed image of row id ``row``: its stored feature against the gallery, itself left out.

        Raises:
            MissingRowError: no such row (:meth:`position`).
        """
        position = self.position(row)
        query = F.normalize(self.index.features[position : position + 1].float(), dim=-1)  # [1, D]
        return self._hits(query, top_k + 1, leave_out=position)[0][:top_k]

    def position(self, row: int) -> int:
        """Where the image of row id ``row`` is in the index's paths and features.

        Raises:
            MissingRowError: naming the scenario; ``gone`` for a row whose image was removed from the gallery
                when it was re-indexed, else the row was never given.
        """
        try:
            return self.index.position(row)
        except MissingRowError as error:
            raise MissingRowError(f"scenario {self.name!r}: {error}", gone=error.gone) from None

    def image_file(self, row: int) -> Path:
        """The resolved file of row id ``row``, which must (still) be a regular file inside the gallery root.

        Raises:
            MissingRowError: no such row (:meth:`position`).
            MissingImageError: the file is gone, now resolves outside the gallery (a symlink swapped in), or the
                index's path has control characters (NUL, newline, escapes), which no path to serve has.
        """
        relative = self.index.paths[self.position(row)]
        shown = display_path(relative)
        if any(unicodedata.category(char) == "Cc" for char in relative):
            raise MissingImageError(f"the index path of row {row} ({shown}) has control characters; rename the file and rebuild the index")
        try:
            path = (self._real_root / relative).resolve(strict=True)
        except (OSError, RuntimeError):  # missing, or a symlink loop (RuntimeError before Python 3.13)
            raise MissingImageError(f"the image of row {row} ({shown}) is no longer in the gallery; rebuild the index") from None
        if not path.is_relative_to(self._real_root) or not path.is_file():
            raise MissingImageError(f"the image of row {row} ({shown}) no longer resolves to a file inside the gallery")
        return path

    def open_image(self, row: int) -> BinaryIO:
        """The file of ``row`` (:meth:`image_file`) opened for reading; what is read is the file that was checked.

        The last path component is not followed again (``O_NOFOLLOW``), a pipe swapped in does not block
        (``O_NONBLOCK``), and a file deleted since the check is a :class:`MissingImageError` like one deleted before.
        """
        path = self.image_file(row)
        shown = display_path(self.index.paths[self.position(row)])
        try:
            descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise MissingImageError(f"the image of row {row} ({shown}) is no longer in the gallery; rebuild the index") from None
        except OSError:  # ELOOP: a symlink swapped in since the check
            raise MissingImageError(f"the image of row {row} ({shown}) no longer resolves to a file inside the gallery") from None
        file = os.fdopen(descriptor, "rb")
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            file.close()
            raise MissingImageError(f"the image of row {row} ({shown}) is no longer a regular file")
        return file

    def image_dimensions(self, row: int) -> tuple[int, int] | None:
        """``(width, height)`` of the image of row id ``row`` from its header, or ``None`` when it cannot be read."""
        if row not in self._sizes:
            try:
                with Image.open(self.image_file(row)) as image:
                    self._sizes[row] = image.size
            except (MissingImageError, *IMAGE_ERRORS):
                self._sizes[row] = None
        return self._sizes[row]

    def _hits(self, query_features: torch.Tensor, top_k: int, leave_out: int | None = None) -> list[list[Hit]]:
        """The best ``top_k`` per query as hits named by row id, the entry at position ``leave_out`` dropped."""
        # always the torch path: FAISS would copy the whole gallery into a new index for every query
        scores, positions = self.index.rank(query_features, top_k, faiss_threshold=len(self.index))
        rows, paths = self.index.row_ids.ids, self.index.paths
        return [
            [
                Hit(rows[position], score, paths[position])
                for score, position in zip(query_scores.tolist(), query_positions.tolist())
                if position != leave_out
            ]
            for query_scores, query_positions in zip(scores, positions)
        ]


class Scenarios:
    """The served scenarios by name, and the backbones and shared models they run on.

    Args:
        specs: what to serve; names must be unique.
        device: where the models go.
    """

    def __init__(self, specs: Sequence[ScenarioSpec], device: torch.device | str = "cpu") -> None:
        names = [spec.name for spec in specs]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ScenarioError(f"scenario name(s) {duplicates} given more than once; give each scenario its own name")
        if not specs:
            raise ScenarioError("no scenarios to serve: give at least one NAME=INDEX_DIR")
        self.device = torch.device(device)
        self._backbones: dict[tuple[str, tuple[int, int]], Backbone] = {}
        self._models: dict[_GroupKey, SharedModel] = {}
        self._scenarios: dict[str, Scenario] = {}
        self._loading = threading.Lock()
        with self._loading:
            for spec in specs:
                self._scenarios[spec.name] = self._load(spec)

    def __getitem__(self, name: str) -> Scenario:
        scenario = self._scenarios.get(name)
        if scenario is None:
            raise UnknownScenarioError(f"unknown scenario {name!r}; served: {', '.join(self._scenarios)}")
        return scenario

    def __iter__(self) -> Iterator[Scenario]:
        return iter(list(self._scenarios.values()))

    def __len__(self) -> int:
        return len(self._scenarios)

    @property
    def models(self) -> list[SharedModel]:
        """The distinct models in memory (one per backbone and method structure)."""
        return list(self._models.values())

    @property
    def backbones(self) -> list[Backbone]:
        """The distinct frozen backbones in memory (one per weights SHA-256 and image size)."""
        return list(self._backbones.values())

    def reload(self, name: str) -> Scenario:
        """Read ``name``'s index (and adapter) from disk again and serve the result.

        The new scenario is built completely before it replaces the old one; if building fails, the
        old one keeps serving and the error says why.

        Raises:
            UnknownScenarioError: no such scenario.
            ScenarioError: the index or adapter on disk cannot be served (the old one still is).
        """
        old = self[name]
        with self._loading:
            try:
                scenario = self._load(old.spec)
                self._scenarios[name] = scenario
            finally:
                self._drop_unused()
        logger.info("reloaded scenario %r: %d images (was %d)", name, len(scenario.index), len(old.index))
        return scenario

    def _load(self, spec: ScenarioSpec) -> Scenario:
        """Build one scenario (call with ``_loading`` held); every failure to read the index or adapter is a
        :class:`ScenarioError` in one line naming the scenario and the file."""
        index_file = spec.index / INDEX_FILE
        prefix = f"scenario {spec.name!r}"
        try:
            index = GalleryIndex.load(spec.index, gallery_root=spec.gallery_root)  # checks image_size too
            adapter_path = index_adapter(index, spec.adapter)
            shared = self._model_for(index.metadata)
            adapter = self._read_adapter(shared, adapter_path)
        except ScenarioError as error:
            if str(error).startswith(prefix):
                raise
            raise ScenarioError(f"{prefix}: {error}") from error
        except (OSError, ValueError, TypeError, BackboneLoadError) as error:  # the library's errors name the file and the fix
            raise ScenarioError(f"{prefix} ({spec.index}): {error}") from error
        except (KeyError, IndexError) as error:  # the index's metadata lacks a field the model needs
            raise ScenarioError(f"{prefix}: {index_file} metadata lacks {error} ({type(error).__name__}); rebuild the index") from error
        except RecursionError as error:  # JSON nested deeper than Python's parser recurses
            raise ScenarioError(f"{prefix}: {index_file} (or the adapter's metadata) is nested too deeply to read; rebuild the index") from error
        except MemoryError as error:
            raise ScenarioError(f"{prefix} ({spec.index}): too large to load (MemoryError); rebuild the index") from error
        precision = resolve_precision(index.metadata.get("precision", "fp32"), self.device) if self.device.type != "cpu" else "fp32"
        logger.info(
            "scenario %r: %d images, %s on %s, adapter %s (%.1f MB)",
            spec.name, len(index), index.metadata["method"], index.metadata["backbone_source"], adapter.path, adapter.num_bytes / 1e6,
        )
        return Scenario(spec, index, shared, adapter, precision)

    def _model_for(self, metadata: dict[str, Any]) -> SharedModel:
        """The shared model of an index's group, built (on the group's shared backbone) if it is the first."""
        method = metadata["method"]
        entry = get_method(method)
        config = build_method_config(method, metadata["config"])
        image_size = (int(metadata["image_size"][0]), int(metadata["image_size"][1]))
        structure = tuple((name, repr(getattr(config, name))) for name in sorted(entry.structural_fields))
        key = _GroupKey(metadata["backbone_sha256"], image_size, method, structure)
        if key not in self._models:
            backbone = self._backbone_for(metadata["backbone_source"], image_size, metadata["backbone_sha256"])
            # full fine-tuning trains (and its adapter file replaces) every backbone tensor: those cannot be shared
            clip = copy.deepcopy(backbone.clip) if entry.trains_backbone else _structural_copy(backbone.clip)
            model = build_model(dataclasses.replace(backbone, clip=clip), method, config)
            # the shared tensors are on the device already (and stay the same objects); this moves the method's own
            self._models[key] = SharedModel(model.to(self.device), key, self.device)
        return self._models[key]

    def _backbone_for(self, source: str, image_size: tuple[int, int], sha256: str) -> Backbone:
        """The frozen backbone with these weights at this size, loaded once (on the device)."""
        key = (sha256, image_size)
        if key not in self._backbones:
            backbone = load_backbone(source, image_size)
            if backbone.weights_sha256 != sha256:
                raise ScenarioError(
                    f"backbone {source} now has other weights (sha256 {backbone.weights_sha256[:12]}…) than when the index "
                    f"was built ({sha256[:12]}…); re-run `upperson index`"
                )
            backbone.clip.to(self.device)
            self._backbones[key] = backbone
        return self._backbones[key]

    def _read_adapter(self, shared: SharedModel, path: Path | None) -> Adapter:
        if path is None:
            if shared.model.trainable_state_dict():
                raise ScenarioError(
                    f"the index was built without an adapter file, but method {shared.model.method!r} needs one; re-run `upperson index --adapter`"
                )
            return Adapter(None, None, {})
        tensors, _ = read_adapter_for(shared.model, path)
        return Adapter(path.resolve(), file_sha256(path), {name: tensor.to(self.device) for name, tensor in tensors.items()})

    def _drop_unused(self) -> None:
        """Forget models and backbones no scenario uses any more (after a reload changed a scenario's model)."""
        used = {scenario.model.key for scenario in self._scenarios.values()}
        self._models = {key: model for key, model in self._models.items() if key in used}
        backbones = {(key.backbone_sha256, key.image_size) for key in used}
        self._backbones = {key: backbone for key, backbone in self._backbones.items() if key in backbones}


def _structural_copy(clip: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``clip``'s modules whose parameters and buffers are ``clip``'s own tensor objects.

    Injecting a method into the copy replaces modules of the copy only, so several methods can be
    injected on one backbone while its frozen tensors exist once. Nothing may write to them: the
    models built on the copies never merge LoRA.
    """
    shared = {id(tensor): tensor for tensor in [*clip.parameters(), *clip.buffers()]}
    return copy.deepcopy(clip, memo=shared)
