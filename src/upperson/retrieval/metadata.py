"""Per-image metadata of a gallery (camera, time, track, ...): typed, columnar, safe to store anywhere.

A metadata file has one row per image: ``path`` (relative to the images folder, POSIX form) plus any
columns. :func:`read_metadata` reads CSV or JSON Lines (chosen by suffix), gives every field one type
among ``int``, ``float``, ``string`` and ``timestamp`` (inferred from the values or declared), and
stores the values as columns compact enough for millions of rows:

* ``int`` and ``timestamp``: ``int64`` arrays, ``float``: ``float64``; each with a ``valid`` mask
  (``False`` = null, the value slot then holds 0);
* ``string``: dictionary-encoded, ``int32`` codes into a sorted vocabulary (``-1`` = null).

A timestamp is one instant: ``int64`` microseconds since 1970-01-01T00:00:00Z. Text must be ISO 8601
with a date and a time and a ``Z`` or a UTC offset; a naive time is an error unless a default
``timezone`` is given (``"UTC"``, ``"+02:00"`` or an IANA name such as ``"Europe/Berlin"``). Digits
beyond microseconds are truncated.

Field names match ``[A-Za-z_][A-Za-z0-9_]{0,63}`` and are neither reserved (``path``, ``row``,
``score``, ``id``, ``vector``) nor words of a filter expression (``and``, ``in``, ...), so they can be
used as Milvus scalar field names and placed in an expression as they are. Every error names the
file, the line and the field.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import re
import zoneinfo
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence, get_args

import numpy as np

FieldType = Literal["int", "float", "string", "timestamp"]
FIELD_TYPES: tuple[FieldType, ...] = get_args(FieldType)
SCHEMA_FORMAT = "upperson-metadata-schema"
SCHEMA_FORMAT_VERSION = 1
PATH_FIELD = "path"
RESERVED_NAMES = frozenset({"path", "row", "score", "id", "vector"})
"""Names the index, the search results and a vector store use for their own fields (compared
case-insensitively); ``path`` is only the image path column."""
EXPRESSION_WORDS = frozenset({"and", "or", "not", "in", "like", "is", "null", "true", "false", "exists"})
"""Words of Milvus' filter expressions, refused as field names (case-insensitively)."""
FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
METADATA_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_TIMESTAMP = re.compile(
    r"(?P<year>[0-9]{4})-(?P<month>[0-9]{2})-(?P<day>[0-9]{2})[T ]"
    r"(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2})(?::(?P<second>[0-9]{2})(?:[.,](?P<fraction>[0-9]+))?)?"
    r"(?P<zone>Z|z|[+-][0-9]{2}(?::?[0-9]{2})?)?"
)
_OFFSET = re.compile(r"(?P<sign>[+-])(?P<hours>[0-9]{2})(?::?(?P<minutes>[0-9]{2}))?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_MARKET1501 = re.compile(r"(?P<pid>-1|[0-9]+)_c(?P<camera>[0-9]+)s(?P<sequence>[0-9]+)_(?P<frame>[0-9]+)_[0-9]+\.[A-Za-z]+")


class MetadataError(ValueError):
    """A metadata file, schema or column set that cannot be used as it is; the message names where and why."""


# ---------------------------------------------------------------------------------------------- names


def show_value(value: Any) -> str:
    """A short, escaped JSON rendering of a user value for messages (at most 60 characters)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def check_field_name(name: object, where: str = "metadata") -> str:
    """Return ``name`` if it can be a metadata field, else raise :class:`MetadataError` saying why."""
    if not isinstance(name, str) or not FIELD_NAME.fullmatch(name):
        raise MetadataError(f"{where}: field name {show_value(name)} is not allowed; "
                            "use 1-64 letters, digits and _, not starting with a digit")
    if name.lower() in RESERVED_NAMES:
        raise MetadataError(f"{where}: field name {show_value(name)} is reserved "
                            f"({', '.join(sorted(RESERVED_NAMES))}); rename the column")
    if name.lower() in EXPRESSION_WORDS:
        raise MetadataError(f"{where}: field name {show_value(name)} is a filter-expression word; rename the column")
    return name


def check_relative_path(path: object, where: str) -> str:
    """The normalised relative POSIX form of an image path (``./`` and repeated ``/`` dropped).

    Raises:
        MetadataError: for a non-string, empty, absolute or backslash path, one with a ``..``
            part, or one holding NUL or other control characters.
    """
    if not isinstance(path, str) or not path:
        raise MetadataError(f"{where}: path must be a non-empty string, got {show_value(path)}")
    if _CONTROL.search(path):
        raise MetadataError(f"{where}: path {show_value(path)} holds a control character")
    if path.startswith("/") or re.match(r"[A-Za-z]:", path):
        raise MetadataError(f"{where}: path {show_value(path)} is absolute; give it relative to the images folder")
    if "\\" in path:
        raise MetadataError(f"{where}: path {show_value(path)} holds a backslash; use / between folders")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise MetadataError(f"{where}: path {show_value(path)} leaves the images folder (..)")
    if not parts:
        raise MetadataError(f"{where}: path {show_value(path)} names no file")
    return "/".join(parts)


# ------------------------------------------------------------------------------------------ timestamps


def resolve_timezone(timezone: str | dt.tzinfo | None) -> dt.tzinfo | None:
    """A default time zone for naive timestamps: ``"UTC"``/``"Z"``, ``"+02:00"``, an IANA name, or a tzinfo."""
    if timezone is None or isinstance(timezone, dt.tzinfo):
        return timezone
    if timezone in ("UTC", "utc", "Z", "z"):
        return dt.timezone.utc
    offset = _OFFSET.fullmatch(timezone)
    if offset:
        return _fixed_offset(offset)
    try:
        return zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise MetadataError(f"unknown time zone {show_value(timezone)}; give UTC, an offset such as +02:00 "
                            "or an IANA name such as Europe/Berlin") from exc


def _fixed_offset(match: re.Match[str]) -> dt.timezone:
    hours, minutes = int(match["hours"]), int(match["minutes"] or 0)
    if hours > 23 or minutes > 59:
        raise ValueError(f"UTC offset {match[0]} is out of range")
    sign = -1 if match["sign"] == "-" else 1
    return dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))


def looks_like_timestamp(text: str) -> bool:
    """Whether ``text`` has the shape of an ISO 8601 date and time (with or without a UTC offset)."""
    return _TIMESTAMP.fullmatch(text.strip()) is not None


def parse_timestamp(text: str, timezone: str | dt.tzinfo | None = None) -> int:
    """Microseconds since the epoch (UTC) of an ISO 8601 date and time.

    Args:
        text: e.g. ``2026-12-01T14:00:00Z``, ``2026-12-01 15:00:00.25+01:00``.
        timezone: zone of a time without ``Z`` or offset; without it such a time is an error.

    Raises:
        ValueError: saying what is wrong with ``text``.
    """
    match = _TIMESTAMP.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{show_value(text)} is not an ISO 8601 date and time such as 2026-12-01T14:00:00Z")
    zone = match["zone"]
    if zone in ("Z", "z"):
        tzinfo: dt.tzinfo | None = dt.timezone.utc
    elif zone:
        tzinfo = _fixed_offset(_OFFSET.fullmatch(zone))  # type: ignore[arg-type]
    else:
        tzinfo = resolve_timezone(timezone)
        if tzinfo is None:
            raise ValueError(f"{show_value(text)} has no UTC offset; add Z or an offset such as +01:00, "
                             "or give a default time zone")
    fraction = (match["fraction"] or "")[:6].ljust(6, "0")
    try:
        moment = dt.datetime(int(match["year"]), int(match["month"]), int(match["day"]), int(match["hour"]),
                             int(match["minute"]), int(match["second"] or 0), int(fraction), tzinfo=tzinfo)
    except ValueError as exc:
        raise ValueError(f"{show_value(text)} is not a valid date and time ({exc})") from exc
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def format_timestamp(micros: int) -> str:
    """ISO 8601 in UTC with a ``Z`` (microseconds only when not zero) of microseconds since the epoch."""
    moment = _EPOCH + dt.timedelta(microseconds=int(micros))
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{moment.microsecond:06d}Z" if moment.microsecond else f"{text}Z"


# --------------------------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class MetadataSchema:
    """The ordered fields of a gallery's metadata and their types.

    Its JSON form (:meth:`to_json`, read back strictly by :meth:`from_json`) is what an index or a
    segment manifest stores: ``{"format": "upperson-metadata-schema", "version": 1, "fields":
    [{"name": "camera", "type": "string"}, ...]}``.
    """

    fields: tuple[tuple[str, FieldType], ...] = ()
    """``(name, type)`` in file order; ``path`` is not a field."""

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for entry in self.fields:
            if not (isinstance(entry, tuple) and len(entry) == 2):
                raise MetadataError(f"metadata schema: a field is a (name, type) pair, got {entry!r:.60}")
            name, kind = entry
            check_field_name(name, "metadata schema")
            if kind not in FIELD_TYPES:
                raise MetadataError(f"metadata schema: field {show_value(name)} has unknown type {show_value(kind)}; "
                                    f"use one of {', '.join(FIELD_TYPES)}")
            if name.lower() in seen:
                raise MetadataError(f"metadata schema: field {show_value(name)} appears twice "
                                    "(names are compared case-insensitively)")
            seen.add(name.lower())

    @classmethod
    def of(cls, fields: Mapping[str, FieldType]) -> MetadataSchema:
        """A schema from an ordered ``{name: type}`` mapping."""
        return cls(tuple(fields.items()))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.fields)

    def as_dict(self) -> dict[str, FieldType]:
        """The ordered ``{name: type}`` mapping."""
        return dict(self.fields)

    def type_of(self, name: str) -> FieldType:
        """The type of field ``name``; :class:`KeyError` for a field the schema lacks."""
        return self.as_dict()[name]

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __len__(self) -> int:
        return len(self.fields)

    def to_json(self) -> dict[str, Any]:
        """The JSON-serialisable form (see the class docstring)."""
        return {"format": SCHEMA_FORMAT, "version": SCHEMA_FORMAT_VERSION,
                "fields": [{"name": name, "type": kind} for name, kind in self.fields]}

    @classmethod
    def from_json(cls, obj: Any, where: str = "metadata schema") -> MetadataSchema:
        """Read :meth:`to_json`'s form back; unknown or missing keys, another format or version are errors."""
        expected = {"format", "version", "fields"}
        if not isinstance(obj, dict) or set(obj) != expected:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise MetadataError(f"{where}: expected an object with keys {sorted(expected)}, got {keys}")
        if obj["format"] != SCHEMA_FORMAT or obj["version"] != SCHEMA_FORMAT_VERSION:
            raise MetadataError(f"{where}: format {show_value(obj['format'])} version {show_value(obj['version'])} is not "
                                f"{show_value(SCHEMA_FORMAT)} version {SCHEMA_FORMAT_VERSION}")
        if not isinstance(obj["fields"], list):
            raise MetadataError(f"{where}: fields must be a list")
        fields = []
        for entry in obj["fields"]:
            if not isinstance(entry, dict) or set(entry) != {"name", "type"}:
                raise MetadataError(f"{where}: each field is {{\"name\", \"type\"}}, got {show_value(entry)}")
            fields.append((entry["name"], entry["type"]))
        try:
            return cls(tuple(fields))
        except MetadataError as exc:
            raise MetadataError(str(exc).replace("metadata schema", where, 1)) from None


# -------------------------------------------------------------------------------------------- columns


@dataclass(frozen=True, eq=False)
class NumericColumn:
    """An ``int``, ``float`` or ``timestamp`` column: values and a validity mask."""

    values: np.ndarray
    """``int64`` (int, timestamp in microseconds since the epoch) or ``float64``; 0 where null."""
    valid: np.ndarray
    """``bool``; ``False`` = null."""

    def __len__(self) -> int:
        return len(self.values)

    def take(self, rows: np.ndarray, missing: np.ndarray | None = None) -> NumericColumn:
        """The column at ``rows`` (in range); rows flagged in ``missing`` (``bool``) become null."""
        values, valid = self.values[rows], self.valid[rows]
        if missing is not None:
            values[missing], valid[missing] = 0, False
        return NumericColumn(values, valid)


@dataclass(frozen=True, eq=False)
class StringColumn:
    """A ``string`` column, dictionary-encoded."""

    codes: np.ndarray
    """``int32`` index into ``vocabulary`` per row; ``-1`` = null."""
    vocabulary: tuple[str, ...]
    """The distinct values, sorted."""

    def __len__(self) -> int:
        return len(self.codes)

    @property
    def valid(self) -> np.ndarray:
        return self.codes >= 0

    @cached_property
    def code_of(self) -> dict[str, int]:
        """``{value: code}``, built once per column (filters look values up here)."""
        return {value: code for code, value in enumerate(self.vocabulary)}

    def take(self, rows: np.ndarray, missing: np.ndarray | None = None) -> StringColumn:
        """The column at ``rows`` (in range); rows flagged in ``missing`` (``bool``) become null."""
        codes = self.codes[rows]
        if missing is not None:
            codes[missing] = -1
        return StringColumn(codes, self.vocabulary)


Column = NumericColumn | StringColumn
_DTYPES: dict[FieldType, type] = {"int": np.int64, "float": np.float64, "timestamp": np.int64}


def _nulls(like: Column, count: int) -> Column:
    """A column of ``count`` nulls of the same type as ``like``."""
    if isinstance(like, StringColumn):
        return StringColumn(np.full(count, -1, np.int32), like.vocabulary)
    return NumericColumn(np.zeros(count, like.values.dtype), np.zeros(count, bool))


@dataclass(frozen=True, eq=False)
class MetadataTable:
    """Typed columns of ``num_rows`` rows, one per field of ``schema``, in schema order."""

    schema: MetadataSchema
    columns: Mapping[str, Column]
    num_rows: int

    def __post_init__(self) -> None:
        if tuple(self.columns) != self.schema.names:
            raise MetadataError(f"metadata columns {list(self.columns)} are not the schema's {list(self.schema.names)}")
        for name, kind in self.schema.fields:
            column = self.columns[name]
            if kind == "string":
                ok = isinstance(column, StringColumn) and column.codes.dtype == np.int32 and column.codes.ndim == 1
                ok = ok and bool(np.all((column.codes >= -1) & (column.codes < len(column.vocabulary))))
            else:
                ok = (isinstance(column, NumericColumn) and column.values.dtype == _DTYPES[kind]
                      and column.valid.dtype == np.bool_ and column.values.ndim == column.valid.ndim == 1
                      and len(column.valid) == len(column.values))
            if not ok or len(column) != self.num_rows:
                raise MetadataError(f"metadata column {show_value(name)} is not a valid {kind} column of {self.num_rows} rows")

    def __len__(self) -> int:
        return self.num_rows

    def take(self, rows: Sequence[int] | np.ndarray) -> MetadataTable:
        """The rows ``rows`` (``-1`` = a row of nulls), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.max() >= self.num_rows or rows.min() < -1):
            raise IndexError(f"rows must be -1 or in 0..{self.num_rows - 1}")
        missing = rows < 0
        if missing.any():
            if self.num_rows == 0:  # nothing to gather from: every row is null
                return MetadataTable(self.schema, {name: _nulls(column, len(rows)) for name, column in self.columns.items()},
                                     len(rows))
            rows = np.where(missing, 0, rows)
        else:
            missing = None
        columns = {name: column.take(rows, missing) for name, column in self.columns.items()}
        return MetadataTable(self.schema, columns, len(rows))

    def record(self, row: int) -> dict[str, int | float | str | None]:
        """Row ``row`` as JSON-ready values: timestamps as ISO 8601 UTC text, null as ``None``."""
        out: dict[str, int | float | str | None] = {}
        for name, kind in self.schema.fields:
            column = self.columns[name]
            if isinstance(column, StringColumn):
                code = int(column.codes[row])
                out[name] = column.vocabulary[code] if code >= 0 else None
            elif not column.valid[row]:
                out[name] = None
            elif kind == "timestamp":
                out[name] = format_timestamp(int(column.values[row]))
            else:
                out[name] = column.values[row].item()
        return out

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
        """The columns as flat arrays (safetensors-ready) and the string vocabularies (JSON-ready).

        Arrays are ``{name}.values`` + ``{name}.valid`` for numeric fields and ``{name}.codes`` for
        strings, whose vocabularies are the second result ``{name: [value, ...]}``.
        """
        arrays: dict[str, np.ndarray] = {}
        vocabularies: dict[str, list[str]] = {}
        for name, column in self.columns.items():
            if isinstance(column, StringColumn):
                arrays[f"{name}.codes"] = np.ascontiguousarray(column.codes)
                vocabularies[name] = list(column.vocabulary)
            else:
                arrays[f"{name}.values"] = np.ascontiguousarray(column.values)
                arrays[f"{name}.valid"] = np.ascontiguousarray(column.valid)
        return arrays, vocabularies

    @classmethod
    def from_arrays(cls, schema: MetadataSchema, arrays: Mapping[str, np.ndarray],
                    vocabularies: Mapping[str, Sequence[str]], num_rows: int) -> MetadataTable:
        """Read :meth:`to_arrays`' output back; any missing, extra or mistyped array is an error."""
        expected = {f"{name}.{part}" for name, kind in schema.fields
                    for part in (("codes",) if kind == "string" else ("values", "valid"))}
        if set(arrays) != expected:
            raise MetadataError(f"metadata arrays: expected {sorted(expected)}, got {sorted(arrays)}")
        strings = {name for name, kind in schema.fields if kind == "string"}
        if set(vocabularies) != strings:
            raise MetadataError(f"metadata vocabularies: expected {sorted(strings)}, got {sorted(vocabularies)}")
        columns: dict[str, Column] = {}
        for name, kind in schema.fields:
            if kind == "string":
                vocabulary = tuple(vocabularies[name])
                if not all(isinstance(v, str) for v in vocabulary) or len(set(vocabulary)) != len(vocabulary):
                    raise MetadataError(f"metadata vocabulary {show_value(name)} must be distinct strings")
                columns[name] = StringColumn(np.asarray(arrays[f"{name}.codes"]), vocabulary)
            else:
                columns[name] = NumericColumn(np.asarray(arrays[f"{name}.values"]), np.asarray(arrays[f"{name}.valid"]))
        return cls(schema, columns, num_rows)


# ------------------------------------------------------------------------------------------ metadata


@dataclass(frozen=True)
class UnmatchedRow:
    """A metadata row whose path is not an indexed image."""

    path: str
    line: int | None
    """Line of the metadata file it starts on (``None`` where it came from no file)."""


@dataclass(frozen=True, eq=False)
class AlignedMetadata:
    """Metadata aligned to an index: row ``i`` of ``table`` describes index row ``i``."""

    table: MetadataTable
    matched: np.ndarray
    """``bool`` per index row: whether a metadata row names it (its fields are null otherwise)."""
    unmatched: tuple[UnmatchedRow, ...]
    """Metadata rows that name no indexed image, in file order."""


@dataclass(frozen=True, eq=False)
class GalleryMetadata:
    """The rows of one metadata file: ``paths[i]`` is described by row ``i`` of ``table``."""

    paths: tuple[str, ...]
    """Normalised relative POSIX image paths, distinct."""
    table: MetadataTable
    lines: tuple[int | None, ...]
    """The line each row starts on in ``source``."""
    source: str | None = None
    """The file the rows were read from."""

    @property
    def schema(self) -> MetadataSchema:
        return self.table.schema

    def __len__(self) -> int:
        return len(self.paths)

    def values_for(self, paths: Sequence[str]) -> AlignedMetadata:
        """The metadata of each of ``paths`` (an index's relative paths), nulls where a row is missing."""
        position = {path: row for row, path in enumerate(self.paths)}
        rows = np.fromiter((position.get(path, -1) for path in paths), dtype=np.int64, count=len(paths))
        used = np.zeros(len(self.paths), bool)
        used[rows[rows >= 0]] = True
        unmatched = tuple(UnmatchedRow(self.paths[row], self.lines[row]) for row in np.flatnonzero(~used).tolist())
        return AlignedMetadata(self.table.take(rows), rows >= 0, unmatched)


def read_metadata(path: str | Path, *, declared: Mapping[str, FieldType] | None = None,
                  timezone: str | dt.tzinfo | None = None) -> GalleryMetadata:
    """Read a metadata file: CSV (``.csv``) or JSON Lines (``.jsonl``, ``.ndjson``), one row per image.

    Args:
        path: the file; a CSV has a header row naming ``path`` and the fields, a JSON Lines file one
            object per line with a ``path`` key. Empty cells, empty strings, missing keys and JSON
            ``null`` are null.
        declared: types for some fields (``{"camera": "string"}``); the others are inferred: all
            integers → ``int``; integers and decimals → ``float``; all ISO 8601 dates with times →
            ``timestamp``; anything else → ``string`` (an all-null field too).
        timezone: zone of timestamps written without ``Z`` or offset (else they are errors).

    Raises:
        MetadataError: naming the file, the line and the field: unknown suffix, bad header or
            field name, bad or duplicate path, a value that does not fit its field's type.
    """
    source = Path(path)
    kind = METADATA_SUFFIXES.get(source.suffix.lower())
    if kind is None:
        suffix = show_value(source.suffix) if source.suffix else "a name without one"
        raise MetadataError(f"{source}: metadata must be .csv, .jsonl or .ndjson, not {suffix}")
    zone = resolve_timezone(timezone)
    header: list[str] = []  # a CSV's columns, filled as it is read (they are fields even with no rows)
    records = _csv_records(source, header) if kind == "csv" else _jsonl_records(source)
    return _build(source, records, header, dict(declared or {}), zone, kind)


def from_market1501(paths: Sequence[str]) -> GalleryMetadata:
    """Metadata parsed from re-ID file names such as ``0002_c1s1_000451_03.jpg``.

    Fields ``pid``, ``camera``, ``sequence``, ``frame`` (all ``int``; pid ``-1`` marks junk images and
    is kept); a name that does not follow the pattern gets nulls.
    """
    schema = MetadataSchema.of({"pid": "int", "camera": "int", "sequence": "int", "frame": "int"})
    values = np.zeros((len(paths), 4), np.int64)
    valid = np.zeros(len(paths), bool)
    normalised = []
    for row, path in enumerate(paths):
        normalised.append(check_relative_path(path, f"image {row}"))
        match = _MARKET1501.fullmatch(normalised[-1].rsplit("/", 1)[-1])
        if match:
            values[row] = [int(match[name]) for name in schema.names]
            valid[row] = True
    _check_distinct(normalised, [None] * len(paths), "image paths")
    columns = {name: NumericColumn(np.where(valid, values[:, i], 0), valid.copy()) for i, name in enumerate(schema.names)}
    return GalleryMetadata(tuple(normalised), MetadataTable(schema, columns, len(paths)), (None,) * len(paths))


# ------------------------------------------------------------------------------------------- reading


class _JsonNumber(str):
    """The text of a JSON number (kept as written, so a string field stores it verbatim)."""

    integral = False


class _JsonInt(_JsonNumber):
    integral = True


Raw = str | None
"""A cell as read: CSV text, a JSON string, a :class:`_JsonNumber`, or ``None`` for null."""


def _csv_records(source: Path, header_out: list[str]) -> Iterator[tuple[int, dict[str, Raw]]]:
    with source.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                raise MetadataError(f"{source}: the file is empty; the first line names the columns (path, ...)")
            names = [name.strip() for name in header]
            _check_header(source, names, 1)
            header_out.extend(name for name in names if name != PATH_FIELD)
            start = reader.line_num + 1
            for cells in reader:
                line, start = start, reader.line_num + 1
                if not cells:
                    continue
                if len(cells) != len(names):
                    raise MetadataError(f"{source}, line {line}: {len(cells)} cells, the header has {len(names)}")
                yield line, {name: (cell if cell != "" else None) for name, cell in zip(names, cells)}
        except csv.Error as exc:
            raise MetadataError(f"{source}, line {reader.line_num}: not valid CSV ({exc})") from None
        except UnicodeDecodeError as exc:
            raise MetadataError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _check_header(source: Path, names: list[str], line: int) -> None:
    if PATH_FIELD not in names:
        raise MetadataError(f"{source}, line {line}: no 'path' column; the header names the columns (path, ...)")
    seen: dict[str, str] = {}
    for name in names:
        if name == PATH_FIELD and PATH_FIELD not in seen:
            seen[name] = name
            continue
        if name.lower() in seen:
            raise MetadataError(f"{source}, line {line}: column {show_value(name)} appears twice")
        check_field_name(name, f"{source}, line {line}")
        seen[name.lower()] = name


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number metadata can hold")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {show_value(key)} appears twice")
        out[key] = value
    return out


def _jsonl_records(source: Path) -> Iterator[tuple[int, dict[str, Raw]]]:
    seen: dict[str, str] = {PATH_FIELD: PATH_FIELD}
    try:
        with source.open(encoding="utf-8-sig") as handle:
            for line, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text, parse_int=_JsonInt, parse_float=_JsonNumber,
                                     parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
                except ValueError as exc:
                    raise MetadataError(f"{source}, line {line}: not a JSON object ({exc})") from None
                if not isinstance(obj, dict):
                    raise MetadataError(f"{source}, line {line}: expected a JSON object with a \"path\", got {text.strip()[:40]}")
                for key, value in obj.items():
                    if seen.get(key.lower(), key) != key:
                        raise MetadataError(f"{source}, line {line}: field {show_value(key)} differs only in case "
                                            f"from {show_value(seen[key.lower()])}")
                    if key.lower() not in seen:
                        check_field_name(key, f"{source}, line {line}")
                        seen[key.lower()] = key
                    if value is not None and not isinstance(value, str):
                        kind = {bool: "true/false", dict: "an object", list: "an array"}[type(value)]
                        raise MetadataError(f"{source}, line {line}, field {show_value(key)}: {kind} is not a metadata value; "
                                            "use a number, a string or null")
                yield line, {key: (value if value != "" else None) for key, value in obj.items()}
    except UnicodeDecodeError as exc:
        raise MetadataError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _build(source: Path, records: Iterable[tuple[int, dict[str, Raw]]], header: list[str], declared: dict[str, FieldType],
           zone: dt.tzinfo | None, kind: str) -> GalleryMetadata:
    paths: list[str] = []
    lines: list[int] = []
    raw: dict[str, list[Raw]] = {}
    for line, record in records:
        where = f"{source}, line {line}"
        if record.get(PATH_FIELD) is None:
            raise MetadataError(f"{where}: no path")
        if isinstance(record[PATH_FIELD], _JsonNumber):
            raise MetadataError(f"{where}: path must be a string, got {record[PATH_FIELD]}")
        for name in record:
            if name != PATH_FIELD and name not in raw:  # a field first seen here: null in the earlier rows
                raw[name] = [None] * len(paths)
        paths.append(check_relative_path(record[PATH_FIELD], where))
        for name, column in raw.items():
            column.append(record.get(name))
        lines.append(line)
    for name in header:
        raw.setdefault(name, [None] * len(paths))
    _check_distinct(paths, lines, str(source))
    names = {name.lower(): name for name in raw}
    for name, field_type in declared.items():
        if name == PATH_FIELD:
            raise MetadataError(f"{source}: 'path' is the image path, not a field to declare")
        if field_type not in FIELD_TYPES:
            raise MetadataError(f"{source}: declared type {show_value(field_type)} of field {show_value(name)} is not one of "
                                f"{', '.join(FIELD_TYPES)}")
        if name not in raw:
            hint = f" (the file has {show_value(names[name.lower()])})" if name.lower() in names else ""
            raise MetadataError(f"{source}: declared field {show_value(name)} is not in the file{hint}")
    fields: dict[str, FieldType] = {}
    columns: dict[str, Column] = {}
    for name, values in raw.items():
        fields[name] = declared.get(name) or _infer(values, kind == "jsonl")
        columns[name] = _convert(values, fields[name], zone, kind == "jsonl",
                                 lambda row: f"{source}, line {lines[row]}, field {show_value(name)}")
    table = MetadataTable(MetadataSchema.of(fields), columns, len(paths))
    return GalleryMetadata(tuple(paths), table, tuple(lines), str(source))


def _check_distinct(paths: Sequence[str], lines: Sequence[int | None], where: str) -> None:
    first: dict[str, int] = {}
    for row, path in enumerate(paths):
        if path in first:
            earlier = first[path]
            at = f"lines {lines[earlier]} and {lines[row]}" if lines[row] is not None else f"rows {earlier} and {row}"
            raise MetadataError(f"{where}: path {show_value(path)} appears twice ({at}); give one row per image")
        first[path] = row


def _infer(values: list[Raw], typed_json: bool) -> FieldType:
    """The type every non-null value fits, preferring int, then float, then timestamp, then string."""
    present = [value for value in values if value is not None]
    if not present:
        return "string"
    if typed_json and all(isinstance(value, _JsonNumber) for value in present):
        return "int" if all(value.integral for value in present) else "float"
    if not typed_json:
        text = [value.strip() for value in present]
        if all(_INT.fullmatch(value) for value in text):
            return "int"
        if all(_FLOAT.fullmatch(value) for value in text):
            return "float"
    if all(not isinstance(value, _JsonNumber) and looks_like_timestamp(value) for value in present):
        return "timestamp"
    return "string"


def _convert(values: list[Raw], kind: FieldType, zone: dt.tzinfo | None, typed_json: bool, where: Any) -> Column:
    """Typed column of ``values``; ``where(row)`` names a row in errors."""
    if kind == "string":
        return _encode_strings(values)
    out = np.zeros(len(values), _DTYPES[kind])
    valid = np.zeros(len(values), bool)
    for row, value in enumerate(values):
        if value is None:
            continue
        try:
            out[row] = _scalar(value, kind, zone, typed_json)
        except ValueError as exc:
            raise MetadataError(f"{where(row)}: {exc}") from None
        valid[row] = True
    return NumericColumn(out, valid)


def _scalar(value: str, kind: FieldType, zone: dt.tzinfo | None, typed_json: bool) -> int | float:
    """One CSV cell or JSON value as a ``kind`` value; :class:`ValueError` saying why it does not fit.

    In JSON Lines numbers must be JSON numbers and timestamps JSON strings; in CSV every cell is text.
    """
    number = isinstance(value, _JsonNumber)
    shown = str(value)[:60] if number else show_value(value)
    if kind == "timestamp":
        if number:
            raise ValueError(f"expected an ISO 8601 date and time (a string), got the number {shown}")
        return parse_timestamp(value, zone)
    if typed_json and not number:
        raise ValueError(f"expected {'an integer' if kind == 'int' else 'a number'}, got the string {shown}")
    text = value.strip()
    if kind == "int":
        if not _INT.fullmatch(text):
            raise ValueError(f"expected an integer, got {shown}")
        integer = int(text)
        if not INT64_MIN <= integer <= INT64_MAX:
            raise ValueError(f"{text} does not fit a 64-bit integer")
        return integer
    if not _FLOAT.fullmatch(text):
        raise ValueError(f"expected a number, got {shown}")
    real = float(text)
    if not math.isfinite(real):
        raise ValueError(f"{text} is too large for a 64-bit float")
    return real


def _encode_strings(values: list[Raw]) -> StringColumn:
    """Dictionary-encode ``values`` (JSON numbers keep their text) with a sorted vocabulary."""
    first: dict[str, int] = {}
    codes = np.fromiter((-1 if value is None else first.setdefault(str(value), len(first)) for value in values),
                        dtype=np.int32, count=len(values))
    vocabulary = sorted(first)
    remap = np.empty(len(first) + 1, np.int32)
    remap[-1] = -1
    remap[[first[value] for value in vocabulary]] = np.arange(len(vocabulary), dtype=np.int32)
    return StringColumn(remap[codes], tuple(vocabulary))


__all__ = [
    "FIELD_TYPES", "RESERVED_NAMES", "AlignedMetadata", "Column", "FieldType", "GalleryMetadata", "MetadataError",
    "MetadataSchema", "MetadataTable", "NumericColumn", "StringColumn", "UnmatchedRow", "check_field_name",
    "check_relative_path", "format_timestamp", "from_market1501", "parse_timestamp", "read_metadata",
    "resolve_timezone", "show_value",
]
