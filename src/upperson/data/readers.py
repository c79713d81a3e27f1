"""One reader per annotation format, turning the official json files into a `RetrievalDataset`.

Formats and id rules follow spec B.1: the three person sets (CUHK-PEDES, ICFG-PEDES, RSTPReid)
share one record schema; Flickr30k and MSCOCO use the ALBEF json files. Readers validate every
record with the same rules in two modes: loading stops at the first malformed record with a
`DatasetFormatError`, while the data check passes a list and gets every problem instead. Across
records they warn about an image used by several records, a person id in several splits and a
person id with a single image, and refuse an evaluation split left without queries (every caption
empty), which would otherwise pass and then break the final evaluation.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from upperson.data.records import EVAL_SPLITS, EvalSplit, Problem, ProblemKind, RetrievalDataset, TrainSample

logger = logging.getLogger(__name__)


class DatasetNotFoundError(FileNotFoundError):
    """The annotation file is not where the dataset layout puts it."""


class DatasetFormatError(ValueError):
    """An annotation file or one of its records does not have the documented format."""


class DatasetReader(Protocol):
    """Reads a dataset under ``root``; with ``problems`` given, collects problems instead of raising."""

    def __call__(self, root: str | Path, problems: list[Problem] | None = None) -> RetrievalDataset: ...


class _Sink:
    """Where readers send problems: raise on the first fatal one (loading) or collect them all (check)."""

    def __init__(self, name: str, root: Path, collected: list[Problem] | None) -> None:
        self.name, self.root, self.collected = name, root, collected
        self.warnings: list[Problem] = []

    def report(self, kind: ProblemKind, message: str) -> None:
        problem = Problem(kind, message)
        if self.collected is not None:
            self.collected.append(problem)
        elif problem.fatal:
            raise DatasetFormatError(
                f"{message}\n(dataset {self.name} under {self.root}; fix or remove the record, and run "
                f"`upperson data check {self.root} --dataset {self.name}` to list every problem at once)"
            )
        else:
            self.warnings.append(problem)

    def log_warnings(self) -> None:
        if self.warnings:
            logger.warning(
                "%s: %d data warnings (run `upperson data check` for the list); first: %s",
                self.name, len(self.warnings), self.warnings[0].message,
            )


def pre_caption(caption: str) -> str:
    """Clean a Flickr30k/MSCOCO caption the way UP-Person does, so that token ids match its runs.

    Lower case; delete ``, . ' ! ? " ( ) * # : ; ~``; ``-`` and ``/`` become spaces; ``<person>``
    becomes ``person``; whitespace runs collapse to one space.
    """
    caption = re.sub(r"[,.'!?\"()*#:;~]", "", caption.lower())
    caption = caption.replace("-", " ").replace("/", " ").replace("<person>", "person")
    return re.sub(r"\s+", " ", caption).strip()


# --------------------------------------------------------------------------------------------
# Locating and parsing annotation files


def _find(directory: Path, files: Sequence[Sequence[str]]) -> list[Path | None]:
    """For each annotation file, the first accepted name present in ``directory`` (None if absent)."""
    return [next((directory / name for name in names if (directory / name).is_file()), None) for names in files]


def _locate(name: str, root: str | Path, directories: Sequence[str], files: Sequence[Sequence[str]]) -> tuple[Path, list[Path]]:
    """The dataset directory, ``root/<directory>`` or ``root`` itself, holding every file in ``files``.

    Each entry of ``files`` lists the accepted names of one annotation file (first = documented name).
    """
    root = Path(root).expanduser().resolve()
    candidates = [root / directory for directory in directories] + [root]
    partial = []
    for candidate in candidates:
        found = _find(candidate, files)
        if all(found):
            return candidate, [path for path in found if path]
        if any(found):
            missing = [names[0] for names, path in zip(files, found) if path is None]
            partial.append(f"{candidate} lacks {', '.join(missing)}")
    where = "; ".join(partial) or (f"{root} does not exist" if not root.exists() else f"nothing found under {root}")
    expected = ", ".join(" or ".join(names) for names in files)
    raise DatasetNotFoundError(
        f"{name}: annotation file(s) {expected} not found ({where}). Expected the layout "
        f"<root>/{directories[0]}/{files[0][0]}; pass the directory that contains {directories[0]}/ "
        f"or the {directories[0]} folder itself as the root."
    )


def _load_records(path: Path, sink: _Sink) -> list[Any]:
    """The top-level json list of ``path``; a file that is not one is reported and read as empty."""
    try:
        with path.open(encoding="utf-8") as handle:
            records = json.load(handle)
    except json.JSONDecodeError as error:
        sink.report("malformed_file", f"{path.name}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})")
        return []
    except UnicodeDecodeError as error:
        sink.report("malformed_file", f"{path.name}: not UTF-8 text ({error.reason} at byte {error.start})")
        return []
    if not isinstance(records, list):
        sink.report("malformed_file", f"{path.name}: top level must be a JSON list of records, got {_describe(records)}")
        return []
    return records


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


_Check = tuple[str, Callable[[Any], bool], str]
"""(field, predicate, what the field must be)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _is_caption_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(caption, str) for caption in value)


_NON_EMPTY_PATH = "a non-empty string (image path)"
_CAPTION_LIST = "a non-empty list of strings"


def _valid(record: Any, checks: Sequence[_Check], where: str, sink: _Sink) -> bool:
    """Report every field of ``record`` that breaks ``checks``; True if there was none."""
    if not isinstance(record, dict):
        fields = ", ".join(f"'{name}'" for name, _, _ in checks)
        sink.report("malformed_record", f"{where}: must be a JSON object with fields {fields}, got {_describe(record)}")
        return False
    ok = True
    for name, predicate, expectation in checks:
        if name not in record:
            sink.report("malformed_record", f"{where}: missing field '{name}' ({expectation})")
            ok = False
        elif not predicate(record[name]):
            sink.report("malformed_record", f"{where}: field '{name}' must be {expectation}, got {_describe(record[name])}")
            ok = False
    return ok


def _kept_captions(captions: list[str], where: str, sink: _Sink) -> list[str]:
    """Captions with text; empty ones are reported and left out (they would train on SOT/EOT only)."""
    kept = []
    for number, caption in enumerate(captions):
        if caption.strip():
            kept.append(caption)
        else:
            sink.report("empty_caption", f"{where}: caption {number} is empty")
    return kept


def _contiguous(raw_ids: Sequence[int | str]) -> list[int]:
    """Training labels ``0..N-1``: raw ids that already are exactly that are kept (the official
    numbering); otherwise ids are numbered in order of first appearance."""
    unique = set(raw_ids)
    if unique == set(range(len(unique))):
        return [int(raw) for raw in raw_ids]
    numbering: dict[int | str, int] = {}
    return [numbering.setdefault(raw, len(numbering)) for raw in raw_ids]


@dataclass(frozen=True)
class _ImageRecord:
    """Where an image occurs, for the checks across records and splits."""

    split: str
    identity: int | str | None
    """Raw person id; None where every image is its own identity (Flickr30k, MSCOCO)."""
    path: Path
    file: str
    """Annotation file name."""
    index: int
    """Record index in ``file``."""


def _relative(path: Path, directory: Path) -> str:
    return path.relative_to(directory).as_posix() if path.is_relative_to(directory) else str(path)


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _occurrences(records: Sequence[_ImageRecord], with_split: bool) -> str:
    """``reid_raw.json records 4 (test) and 5 (test)``: record indexes grouped by file."""
    by_file: dict[str, list[str]] = defaultdict(list)
    for record in records:
        by_file[record.file].append(f"{record.index} ({record.split})" if with_split else str(record.index))
    return _join([f"{file} record{'s' if len(items) > 1 else ''} {_join(items)}" for file, items in by_file.items()])


_SPLIT_ORDER = ("train", *EVAL_SPLITS)


def _check_across_records(records: Sequence[_ImageRecord], directory: Path, sink: _Sink) -> None:
    """Warn about images of several records, identities in several splits and identities with one image."""
    by_path: dict[Path, list[_ImageRecord]] = defaultdict(list)
    by_identity: dict[int | str, dict[str, list[_ImageRecord]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        by_path[record.path].append(record)
        if record.identity is not None:
            by_identity[record.identity][record.split].append(record)
    for path, same in by_path.items():
        if len(same) > 1:
            sink.report("duplicate_image", f"{_relative(path, directory)} is the image of {_occurrences(same, with_split=True)}")
    for identity, splits in by_identity.items():
        if len(splits) > 1:
            names = sorted(splits, key=_SPLIT_ORDER.index)
            held = sorted((record for split_records in splits.values() for record in split_records), key=lambda record: record.index)
            sink.report(
                "shared_identity",
                f"id {identity} is in the {_join(names)} splits ({_occurrences(held, with_split=False)}); "
                f"{names[-1]} scores would count a person seen in {names[0]}",
            )
        for split, split_records in splits.items():
            images = {record.path for record in split_records}
            if len(images) == 1:
                sink.report("single_image_identity", f"{split} split: id {identity} has a single image ({_relative(images.pop(), directory)})")


def _check_queries(splits: dict[str, EvalSplit], files: dict[str, str], empty: dict[str, int], sink: _Sink) -> None:
    """An evaluation split with images but no caption left has no queries: evaluation would fail."""
    for split, data in splits.items():
        if data.image_paths and not data.captions:
            count = len(data.image_paths)
            sink.report(
                "empty_split",
                f"{files[split]}: the {split} split has {count} image{'s' if count > 1 else ''} but no caption "
                f"(all {empty[split]} are empty): no queries to evaluate with; give its records captions",
            )


# --------------------------------------------------------------------------------------------
# CUHK-PEDES, ICFG-PEDES, RSTPReid


@dataclass(frozen=True)
class _PersonFormat:
    name: str
    directory: str
    annotation_names: tuple[str, ...]
    path_field: str
    splits: tuple[str, ...]
    train_id_offset: int
    """Added to raw ids of training records (CUHK ids are 1-based)."""


def _read_person_dataset(spec: _PersonFormat, root: str | Path, problems: list[Problem] | None) -> RetrievalDataset:
    directory, (path,) = _locate(spec.name, root, (spec.directory,), (spec.annotation_names,))
    sink = _Sink(spec.name, directory, problems)
    image_dir = directory / "imgs"
    checks: list[_Check] = [
        ("split", lambda value: isinstance(value, str), "one of " + ", ".join(repr(s) for s in spec.splits)),
        ("captions", _is_caption_list, _CAPTION_LIST),
        (spec.path_field, _is_path, _NON_EMPTY_PATH),
        ("id", _is_int, "an integer person id"),
    ]
    train_raw: list[tuple[int, int, Path, str]] = []
    train_images = 0
    evaluation = {split: EvalSplit([], [], [], []) for split in spec.splits if split != "train"}
    images: list[_ImageRecord] = []
    empty_captions: dict[str, int] = defaultdict(int)
    for index, record in enumerate(_load_records(path, sink)):
        where = f"{path.name} record {index}"
        if not _valid(record, checks, where, sink):
            continue
        split = record["split"]
        if split not in spec.splits:
            allowed = ", ".join(repr(s) for s in spec.splits)
            sink.report("unknown_split", f"{where}: field 'split' must be one of {allowed}, got {split!r}")
            continue
        image_path = image_dir / record[spec.path_field]
        captions = _kept_captions(record["captions"], where, sink)
        images.append(_ImageRecord(split, record["id"], image_path, path.name, index))
        if split == "train":
            train_raw.extend((record["id"] + spec.train_id_offset, train_images, image_path, caption) for caption in captions)
            train_images += 1
            continue
        empty_captions[split] += len(record["captions"]) - len(captions)
        target = evaluation[split]
        target.image_paths.append(image_path)
        target.image_pids.append(record["id"])
        target.captions.extend(captions)
        target.caption_pids.extend([record["id"]] * len(captions))
    splits = {split: data for split, data in evaluation.items() if data.image_paths}
    _check_across_records(images, directory, sink)
    _check_queries(splits, dict.fromkeys(splits, path.name), empty_captions, sink)
    sink.log_warnings()
    pids = _contiguous([raw for raw, _, _, _ in train_raw])
    train = [TrainSample(pid, image_id, image_path, caption) for pid, (_, image_id, image_path, caption) in zip(pids, train_raw)]
    return RetrievalDataset(spec.name, directory, train, splits, (path,))


# --------------------------------------------------------------------------------------------
# Flickr30k, MSCOCO (ALBEF json files)


@dataclass(frozen=True)
class _CaptionFormat:
    name: str
    directory: str
    prefix: str
    """Annotation files are ``<prefix>_{train,val,test}.json``."""


_TRAIN_CHECKS: list[_Check] = [
    ("image", _is_path, _NON_EMPTY_PATH),
    ("caption", lambda value: isinstance(value, str), "a string"),
    ("image_id", lambda value: _is_int(value) or _is_path(value), "an integer or a string such as 'coco_391895'"),
]
_EVAL_CHECKS: list[_Check] = [
    ("image", _is_path, _NON_EMPTY_PATH),
    ("caption", _is_caption_list, _CAPTION_LIST),
]


def _image_key(image_id: int | str) -> int | str:
    """``"coco_391895"`` and ``"391895"`` → 391895; other strings are kept as they are."""
    if isinstance(image_id, str):
        digits = image_id.removeprefix("coco_")
        return int(digits) if digits.isdigit() else image_id
    return image_id


def _read_caption_dataset(spec: _CaptionFormat, root: str | Path, problems: list[Problem] | None) -> RetrievalDataset:
    files = [(f"{spec.prefix}_{split}.json",) for split in ("train", *EVAL_SPLITS)]
    directory, paths = _locate(spec.name, root, (spec.directory,), files)
    sink = _Sink(spec.name, directory, problems)
    train_path, *eval_paths = paths

    train_raw: list[tuple[int | str, Path, str]] = []
    images: dict[Path, _ImageRecord] = {}  # one per train image: its records share it by design (one caption each)
    for index, record in enumerate(_load_records(train_path, sink)):
        where = f"{train_path.name} record {index}"
        if _valid(record, _TRAIN_CHECKS, where, sink):
            image_path = directory / record["image"]
            images.setdefault(image_path, _ImageRecord("train", None, image_path, train_path.name, index))
            for caption in _kept_captions([pre_caption(record["caption"])], where, sink):
                train_raw.append((_image_key(record["image_id"]), image_path, caption))
    pids = _contiguous([key for key, _, _ in train_raw])
    train = [TrainSample(pid, pid, image_path, caption) for pid, (_, image_path, caption) in zip(pids, train_raw)]

    splits = {}
    eval_images: list[_ImageRecord] = []
    empty_captions: dict[str, int] = defaultdict(int)
    for split, path in zip(EVAL_SPLITS, eval_paths):
        data = EvalSplit([], [], [], [])
        for index, record in enumerate(_load_records(path, sink)):
            where = f"{path.name} record {index}"
            if not _valid(record, _EVAL_CHECKS, where, sink):
                continue
            pid = len(data.image_paths)
            captions = _kept_captions([pre_caption(caption) for caption in record["caption"]], where, sink)
            empty_captions[split] += len(record["caption"]) - len(captions)
            eval_images.append(_ImageRecord(split, None, directory / record["image"], path.name, index))
            data.image_paths.append(directory / record["image"])
            data.image_pids.append(pid)
            data.captions.extend(captions)
            data.caption_pids.extend([pid] * len(captions))
        if data.image_paths:
            splits[split] = data
    _check_across_records([*images.values(), *eval_images], directory, sink)
    _check_queries(splits, {split: path.name for split, path in zip(EVAL_SPLITS, eval_paths, strict=True)}, empty_captions, sink)
    sink.log_warnings()
    return RetrievalDataset(spec.name, directory, train, splits, tuple(paths))


# --------------------------------------------------------------------------------------------
# Registry


def _person_reader(spec: _PersonFormat) -> DatasetReader:
    def read(root: str | Path, problems: list[Problem] | None = None) -> RetrievalDataset:
        return _read_person_dataset(spec, root, problems)

    read.__doc__ = f"Read {spec.directory}/{spec.annotation_names[0]} (spec B.1)."
    return read


def _caption_reader(spec: _CaptionFormat) -> DatasetReader:
    def read(root: str | Path, problems: list[Problem] | None = None) -> RetrievalDataset:
        return _read_caption_dataset(spec, root, problems)

    read.__doc__ = f"Read {spec.directory}/{spec.prefix}_{{train,val,test}}.json (ALBEF format, spec B.1)."
    return read


DATASETS: dict[str, DatasetReader] = {
    "cuhk-pedes": _person_reader(
        _PersonFormat("cuhk-pedes", "CUHK-PEDES", ("reid_raw.json",), "file_path", ("train", "val", "test"), train_id_offset=-1)
    ),
    "icfg-pedes": _person_reader(
        _PersonFormat("icfg-pedes", "ICFG-PEDES", ("ICFG-PEDES.json", "ICFG_PEDES.json"), "file_path", ("train", "test"), train_id_offset=0)
    ),
    "rstpreid": _person_reader(
        _PersonFormat("rstpreid", "RSTPReid", ("data_captions.json",), "img_path", ("train", "val", "test"), train_id_offset=0)
    ),
    "flickr30k": _caption_reader(_CaptionFormat("flickr30k", "flickr30k", "flickr30k")),
    "mscoco": _caption_reader(_CaptionFormat("mscoco", "MSCOCO", "coco")),
}
"""Dataset name → reader. Names are matched case-insensitively, so the official keys work too."""


def get_reader(name: str) -> tuple[str, DatasetReader]:
    """The registry name and reader for ``name`` (``CUHK-PEDES`` and ``cuhk-pedes`` both work)."""
    key = name.strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return key, DATASETS[key]


def load_dataset(name: str, root: str | Path) -> RetrievalDataset:
    """Read dataset ``name`` from ``root`` (the folder holding e.g. ``CUHK-PEDES/``, or that folder).

    Raises:
        DatasetNotFoundError: the annotation file is missing; the message lists the expected names.
        DatasetFormatError: a record is malformed; the message names the file, record and field.
    """
    key, reader = get_reader(name)
    dataset = reader(root)
    logger.info(
        "%s: %d training captions of %d ids; %s",
        key, len(dataset.train), dataset.num_train_ids,
        ", ".join(f"{split} {len(data.image_paths)} images / {len(data.captions)} captions" for split, data in dataset.splits.items()),
    )
    return dataset
