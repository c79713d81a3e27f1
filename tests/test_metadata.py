"""Gallery metadata files: typed columns from CSV and JSON Lines, refused where a row or name is unsafe.

Why: investigators filter camera crops by camera, time and track; a wrong type, a naive time read
in the wrong zone or a path that leaves the images folder would silently give wrong answers, so
every value is checked against an independent reading (``datetime.fromisoformat``) and every
refusal names the file, the line and the field.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from upperson.retrieval.metadata import (
    GalleryMetadata,
    MetadataError,
    MetadataSchema,
    MetadataTable,
    UnmatchedRow,
    format_timestamp,
    from_market1501,
    parse_timestamp,
    read_metadata,
)

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def micros(text: str) -> int:
    """Independent reference: Python's own ISO 8601 reader, exact integer microseconds."""
    delta = dt.datetime.fromisoformat(text) - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def records(metadata: GalleryMetadata) -> list[dict]:
    return [{"path": path, **metadata.table.record(row)} for row, path in enumerate(metadata.paths)]


def error(path: Path, **options) -> str:
    with pytest.raises(MetadataError) as caught:
        read_metadata(path, **options)
    return str(caught.value)


CSV = """path,camera,time,track,confidence,note
cam3/0001.jpg,c3,2026-12-01T15:00:00+01:00,17,0.5,yellow jacket
cam3/0002.jpg,c3,2026-12-01T14:05:30.25Z,17,1,
./cam4//0003.jpg,c4,2026-12-01 09:10:00-05:30,,0.75,"two, words"
cam5/0004.jpg,,,18,,
"""


def test_csv_types_are_inferred_and_values_read(tmp_path: Path) -> None:
    metadata = read_metadata(write(tmp_path, "meta.csv", CSV))
    assert metadata.schema.as_dict() == {"camera": "string", "time": "timestamp", "track": "int",
                                         "confidence": "float", "note": "string"}
    assert metadata.paths == ("cam3/0001.jpg", "cam3/0002.jpg", "cam4/0003.jpg", "cam5/0004.jpg")
    assert metadata.lines == (2, 3, 4, 5)
    assert records(metadata) == [
        {"path": "cam3/0001.jpg", "camera": "c3", "time": "2026-12-01T14:00:00Z", "track": 17, "confidence": 0.5,
         "note": "yellow jacket"},
        {"path": "cam3/0002.jpg", "camera": "c3", "time": "2026-12-01T14:05:30.250000Z", "track": 17,
         "confidence": 1.0, "note": None},
        {"path": "cam4/0003.jpg", "camera": "c4", "time": "2026-12-01T14:40:00Z", "track": None, "confidence": 0.75,
         "note": "two, words"},
        {"path": "cam5/0004.jpg", "camera": None, "time": None, "track": 18, "confidence": None, "note": None},
    ]


def test_columns_are_compact_typed_arrays(tmp_path: Path) -> None:
    table = read_metadata(write(tmp_path, "meta.csv", CSV)).table
    time, track, camera = table.columns["time"], table.columns["track"], table.columns["camera"]
    assert time.values.dtype == np.int64 and time.valid.tolist() == [True, True, True, False]
    assert time.values.tolist() == [micros("2026-12-01T15:00:00+01:00"), micros("2026-12-01T14:05:30.250+00:00"),
                                    micros("2026-12-01T09:10:00-05:30"), 0]
    assert track.values.tolist() == [17, 17, 0, 18] and track.valid.tolist() == [True, True, False, True]
    assert table.columns["confidence"].values.dtype == np.float64
    assert camera.vocabulary == ("c3", "c4") and camera.codes.dtype == np.int32
    assert camera.codes.tolist() == [0, 0, 1, -1]


def test_offsets_become_the_right_utc_instant() -> None:
    for text in ["2026-12-01T14:00:00Z", "2026-12-01T15:00:00+01:00", "2026-12-01T23:45:00+09:45",
                 "2026-11-30T23:00:00-15:00", "1969-07-20T20:17:40Z", "2026-12-01T14:00:00.000001+00:00",
                 "2024-02-29T12:00:00-08:00"]:
        assert parse_timestamp(text) == micros(text), text
    assert parse_timestamp("2026-12-01T14:00Z") == micros("2026-12-01T14:00:00+00:00")
    assert parse_timestamp("2026-12-01T15:00:00+0100") == micros("2026-12-01T14:00:00+00:00")
    assert parse_timestamp("2026-12-01T14:00:00.123456789Z") == micros("2026-12-01T14:00:00.123456+00:00")
    assert format_timestamp(micros("1969-07-20T20:17:40.5+00:00")) == "1969-07-20T20:17:40.500000Z"


def test_naive_times_need_a_default_zone(tmp_path: Path) -> None:
    path = write(tmp_path, "meta.csv", "path,time\na.jpg,2026-07-01T12:00:00\nb.jpg,2026-12-01T12:00:00\n")
    assert error(path) == (f'{path}, line 2, field "time": "2026-07-01T12:00:00" has no UTC offset; add Z or an '
                           "offset such as +01:00, or give a default time zone")
    berlin = read_metadata(path, timezone="Europe/Berlin").table.columns["time"].values.tolist()
    assert berlin == [micros("2026-07-01T10:00:00+00:00"), micros("2026-12-01T11:00:00+00:00")]  # summer, winter
    fixed = read_metadata(path, timezone="+02:00").table.columns["time"].values.tolist()
    assert fixed == [micros("2026-07-01T10:00:00+00:00"), micros("2026-12-01T10:00:00+00:00")]
    assert read_metadata(path, timezone="UTC").table.record(0)["time"] == "2026-07-01T12:00:00Z"
    assert error(path, timezone="Mars/Olympus") == ('unknown time zone "Mars/Olympus"; give UTC, an offset such as '
                                                    "+02:00 or an IANA name such as Europe/Berlin")


def test_jsonl_keeps_json_types(tmp_path: Path) -> None:
    path = write(tmp_path, "meta.jsonl", "\n".join([
        '{"path": "a.jpg", "camera": 3, "track": 17, "speed": 1.50, "label": "3.50", "time": "2026-12-01T14:00:00Z"}',
        "",
        '{"path": "b.jpg", "camera": "c4", "track": null, "speed": 2, "label": 3.50, "time": null}',
        '{"path": "c.jpg", "track": 4, "label": "", "extra": -1}',
    ]) + "\n")
    metadata = read_metadata(path)
    assert metadata.schema.as_dict() == {"camera": "string", "track": "int", "speed": "float", "label": "string",
                                         "time": "timestamp", "extra": "int"}
    assert metadata.lines == (1, 3, 4)
    assert records(metadata) == [
        {"path": "a.jpg", "camera": "3", "track": 17, "speed": 1.5, "label": "3.50", "time": "2026-12-01T14:00:00Z",
         "extra": None},
        {"path": "b.jpg", "camera": "c4", "track": None, "speed": 2.0, "label": "3.50", "time": None, "extra": None},
        {"path": "c.jpg", "camera": None, "track": 4, "speed": None, "label": None, "time": None, "extra": -1},
    ]


def test_declared_types_override_inference(tmp_path: Path) -> None:
    path = write(tmp_path, "meta.csv", "path,camera,track\na.jpg,3,17\nb.jpg,03,x17\n")
    metadata = read_metadata(path, declared={"camera": "string", "track": "string"})
    assert [metadata.table.record(row)["camera"] for row in range(2)] == ["3", "03"]
    assert read_metadata(path, declared={"camera": "float"}).table.record(1)["camera"] == 3.0
    assert error(path, declared={"track": "int"}) == f'{path}, line 3, field "track": expected an integer, got "x17"'
    assert error(path, declared={"camera": "timestamp"}) == (
        f'{path}, line 2, field "camera": "3" is not an ISO 8601 date and time such as 2026-12-01T14:00:00Z')
    assert error(path, declared={"Camera": "string"}) == f'{path}: declared field "Camera" is not in the file (the file has "camera")'
    assert error(path, declared={"camera": "bool"}) == (
        f'{path}: declared type "bool" of field "camera" is not one of int, float, string, timestamp')
    assert error(path, declared={"path": "string"}) == f"{path}: 'path' is the image path, not a field to declare"


def test_values_that_do_not_fit_name_file_line_and_field(tmp_path: Path) -> None:
    jsonl = write(tmp_path, "m.jsonl", '{"path": "a.jpg", "track": 1}\n{"path": "b.jpg", "track": "2"}\n')
    assert error(jsonl, declared={"track": "int"}) == f'{jsonl}, line 2, field "track": expected an integer, got the string "2"'
    floats = write(tmp_path, "f.jsonl", '{"path": "a.jpg", "track": 1}\n{"path": "b.jpg", "track": 2.5}\n')
    assert error(floats, declared={"track": "int"}) == f'{floats}, line 2, field "track": expected an integer, got 2.5'
    boolean = write(tmp_path, "b.jsonl", '{"path": "a.jpg", "seen": true}\n')
    assert error(boolean) == (f'{boolean}, line 1, field "seen": true/false is not a metadata value; '
                              "use a number, a string or null")
    nested = write(tmp_path, "n.jsonl", '{"path": "a.jpg", "box": [1, 2]}\n')
    assert error(nested) == f'{nested}, line 1, field "box": an array is not a metadata value; use a number, a string or null'
    nan = write(tmp_path, "nan.jsonl", '{"path": "a.jpg", "x": NaN}\n')
    assert error(nan) == f"{nan}, line 1: not a JSON object (NaN is not a number metadata can hold)"
    twice = write(tmp_path, "k.jsonl", '{"path": "a.jpg", "x": 1, "x": 2}\n')
    assert error(twice) == f'{twice}, line 1: not a JSON object (key "x" appears twice)'
    big = write(tmp_path, "big.csv", "path,n\na.jpg,9223372036854775807\nb.jpg,9223372036854775808\n")
    assert error(big) == f'{big}, line 3, field "n": 9223372036854775808 does not fit a 64-bit integer'
    time = write(tmp_path, "t.csv", "path,time\na.jpg,2026-13-01T00:00:00Z\n")
    assert error(time, declared={"time": "timestamp"}) == (
        f'{time}, line 2, field "time": "2026-13-01T00:00:00Z" is not a valid date and time (month must be in 1..12)')
    mixed = write(tmp_path, "x.csv", "path,time\na.jpg,2026-12-01T00:00:00Z\nb.jpg,soon\n")
    assert read_metadata(mixed).schema.as_dict() == {"time": "string"}  # not all timestamps: kept as text


@pytest.mark.parametrize(("cell", "why"), [
    ("/data/a.jpg", 'path "/data/a.jpg" is absolute; give it relative to the images folder'),
    ("C:/data/a.jpg", 'path "C:/data/a.jpg" is absolute; give it relative to the images folder'),
    ("cam3/../../etc/passwd", 'path "cam3/../../etc/passwd" leaves the images folder (..)'),
    ("cam3\\\\a.jpg", 'path "cam3\\\\a.jpg" holds a backslash; use / between folders'),
    ("a\\u0000.jpg", 'path "a\\u0000.jpg" holds a control character'),
    ("a\\n.jpg", 'path "a\\n.jpg" holds a control character'),
    ("./", 'path "./" names no file'),
])
def test_unsafe_paths_are_refused(tmp_path: Path, cell: str, why: str) -> None:
    path = write(tmp_path, "m.jsonl", '{"path": "ok.jpg"}\n' + json.dumps({"path": json.loads(f'"{cell}"')}) + "\n")
    assert error(path) == f"{path}, line 2: {why}"


def test_paths_are_normalised_and_duplicates_name_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "m.csv", "path,n\ncam3/a.jpg,1\nb.jpg,2\n./cam3//a.jpg,3\n")
    assert error(path) == f'{path}: path "cam3/a.jpg" appears twice (lines 2 and 4); give one row per image'
    numeric = write(tmp_path, "p.jsonl", '{"path": 12}\n')
    assert error(numeric) == f"{numeric}, line 1: path must be a string, got 12"
    missing = write(tmp_path, "q.jsonl", '{"camera": "c3"}\n')
    assert error(missing) == f"{missing}, line 1: no path"


@pytest.mark.parametrize(("name", "why"), [
    ("score", 'field name "score" is reserved (id, path, row, score, vector); rename the column'),
    ("Row", 'field name "Row" is reserved (id, path, row, score, vector); rename the column'),
    ("in", 'field name "in" is a filter-expression word; rename the column'),
    ("1camera", 'field name "1camera" is not allowed; use 1-64 letters, digits and _, not starting with a digit'),
    ("camera id", 'field name "camera id" is not allowed; use 1-64 letters, digits and _, not starting with a digit'),
    ("x" * 65, f'field name "{"x" * 56}... is not allowed; use 1-64 letters, digits and _, not starting with a digit'),
    ("café", 'field name "caf\\u00e9" is not allowed; use 1-64 letters, digits and _, not starting with a digit'),
])
def test_unsafe_field_names_are_refused(tmp_path: Path, name: str, why: str) -> None:
    path = write(tmp_path, "m.csv", f"path,{name}\na.jpg,1\n")
    assert error(path) == f"{path}, line 1: {why}"
    jsonl = write(tmp_path, "m.jsonl", json.dumps({"path": "a.jpg", name: 1}) + "\n")
    assert error(jsonl) == f"{jsonl}, line 1: {why}"


def test_file_shape_errors_are_one_line(tmp_path: Path) -> None:
    other = write(tmp_path, "meta.parquet", "")
    assert error(other) == f'{other}: metadata must be .csv, .jsonl or .ndjson, not ".parquet"'
    empty = write(tmp_path, "e.csv", "")
    assert error(empty) == f"{empty}: the file is empty; the first line names the columns (path, ...)"
    no_path = write(tmp_path, "n.csv", "file,camera\na.jpg,c3\n")
    assert error(no_path) == f"{no_path}, line 1: no 'path' column; the header names the columns (path, ...)"
    twice = write(tmp_path, "t.csv", "path,camera,Camera\na.jpg,c3,c4\n")
    assert error(twice) == f'{twice}, line 1: column "Camera" appears twice'
    short = write(tmp_path, "s.csv", 'path,camera,note\na.jpg,c3,"a\nlong note"\nb.jpg,c4\n')
    assert error(short) == f"{short}, line 4: 2 cells, the header has 3"  # the quoted note spans lines 2-3
    case = write(tmp_path, "c.jsonl", '{"path": "a.jpg", "camera": 1}\n{"path": "b.jpg", "Camera": 2}\n')
    assert error(case) == f'{case}, line 2: field "Camera" differs only in case from "camera"'
    array = write(tmp_path, "a.ndjson", '["a.jpg"]\n')
    assert error(array) == f'{array}, line 1: expected a JSON object with a "path", got ["a.jpg"]'


def test_values_for_aligns_to_index_rows_and_lists_unmatched(tmp_path: Path) -> None:
    metadata = read_metadata(write(tmp_path, "meta.csv", CSV))
    index_paths = ["cam4/0003.jpg", "cam9/unknown.jpg", "cam3/0001.jpg"]
    aligned = metadata.values_for(index_paths)
    assert len(aligned.table) == 3 and aligned.matched.tolist() == [True, False, True]
    assert aligned.table.record(0) == metadata.table.record(2)
    assert aligned.table.record(1) == {name: None for name in metadata.schema.names}
    assert aligned.table.record(2) == metadata.table.record(0)
    assert aligned.unmatched == (UnmatchedRow("cam3/0002.jpg", 3), UnmatchedRow("cam5/0004.jpg", 5))
    assert aligned.table.columns["camera"].vocabulary == metadata.table.columns["camera"].vocabulary
    none = metadata.values_for([])
    assert len(none.table) == 0 and len(none.unmatched) == 4
    header_only = read_metadata(write(tmp_path, "empty.csv", "path,camera,track\n"))
    assert header_only.schema.as_dict() == {"camera": "string", "track": "string"}  # no values: nothing to infer from
    assert header_only.values_for(["a.jpg"]).table.record(0) == {"camera": None, "track": None}
    with pytest.raises(IndexError, match=r"rows must be -1 or in 0\.\.3"):
        metadata.table.take([4])


def test_schema_json_round_trip_and_strict_loader() -> None:
    schema = MetadataSchema.of({"camera": "string", "time": "timestamp", "track": "int", "confidence": "float"})
    stored = json.loads(json.dumps(schema.to_json()))
    assert stored == {"format": "upperson-metadata-schema", "version": 1, "fields": [
        {"name": "camera", "type": "string"}, {"name": "time", "type": "timestamp"},
        {"name": "track", "type": "int"}, {"name": "confidence", "type": "float"}]}
    assert MetadataSchema.from_json(stored) == schema
    bad = [
        ({**stored, "extra": 1}, "expected an object with keys ['fields', 'format', 'version'], got ['extra', 'fields', 'format', 'version']"),
        ({**stored, "version": 2}, 'format "upperson-metadata-schema" version 2 is not "upperson-metadata-schema" version 1'),
        ({**stored, "fields": [{"name": "camera", "type": "str"}]},
         'field "camera" has unknown type "str"; use one of int, float, string, timestamp'),
        ({**stored, "fields": [{"name": "score", "type": "float"}]},
         'field name "score" is reserved (id, path, row, score, vector); rename the column'),
        ({**stored, "fields": [{"name": "a", "type": "int"}, {"name": "A", "type": "int"}]},
         'field "A" appears twice (names are compared case-insensitively)'),
        ({**stored, "fields": [{"name": "a", "type": "int", "unit": "s"}]},
         'each field is {"name", "type"}, got {"name": "a", "type": "int", "unit": "s"}'),
    ]
    for obj, why in bad:
        with pytest.raises(MetadataError) as caught:
            MetadataSchema.from_json(obj, "index.json")
        assert str(caught.value) == f"index.json: {why}"


def test_columns_round_trip_through_safetensors(tmp_path: Path) -> None:
    table = read_metadata(write(tmp_path, "meta.csv", CSV)).table
    arrays, vocabularies = table.to_arrays()
    assert sorted(arrays) == ["camera.codes", "confidence.valid", "confidence.values", "note.codes", "time.valid",
                              "time.values", "track.valid", "track.values"]
    save_file(arrays, str(tmp_path / "metadata.safetensors"))
    (tmp_path / "vocabularies.json").write_text(json.dumps(vocabularies))
    loaded = MetadataTable.from_arrays(table.schema, load_file(str(tmp_path / "metadata.safetensors")),
                                       json.loads((tmp_path / "vocabularies.json").read_text()), len(table))
    assert [loaded.record(row) for row in range(len(table))] == [table.record(row) for row in range(len(table))]
    with pytest.raises(MetadataError, match=r"metadata arrays: expected \[.*\], got \[.*\]"):
        MetadataTable.from_arrays(table.schema, {k: v for k, v in arrays.items() if k != "time.valid"}, vocabularies, 4)
    with pytest.raises(MetadataError, match='metadata column "track" is not a valid int column of 4 rows'):
        MetadataTable.from_arrays(table.schema, {**arrays, "track.values": arrays["track.values"].astype(np.int32)},
                                  vocabularies, 4)
    with pytest.raises(MetadataError, match='metadata column "camera" is not a valid string column of 4 rows'):
        MetadataTable.from_arrays(table.schema, arrays, {**vocabularies, "camera": ["c3"]}, 4)


def test_market1501_names() -> None:
    metadata = from_market1501(["bounding_box_test/0002_c1s1_000451_03.jpg", "-1_c3s2_012345_00.jpg",
                                "0000_c6s4_002202_01.png", "query/readme.txt", "cam3/frame_17.jpg"])
    assert metadata.schema.as_dict() == {"pid": "int", "camera": "int", "sequence": "int", "frame": "int"}
    assert records(metadata) == [
        {"path": "bounding_box_test/0002_c1s1_000451_03.jpg", "pid": 2, "camera": 1, "sequence": 1, "frame": 451},
        {"path": "-1_c3s2_012345_00.jpg", "pid": -1, "camera": 3, "sequence": 2, "frame": 12345},
        {"path": "0000_c6s4_002202_01.png", "pid": 0, "camera": 6, "sequence": 4, "frame": 2202},
        {"path": "query/readme.txt", "pid": None, "camera": None, "sequence": None, "frame": None},
        {"path": "cam3/frame_17.jpg", "pid": None, "camera": None, "sequence": None, "frame": None},
    ]
    assert metadata.values_for(["-1_c3s2_012345_00.jpg"]).unmatched[0] == UnmatchedRow(
        "bounding_box_test/0002_c1s1_000451_03.jpg", None)
