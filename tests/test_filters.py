"""Metadata filters: the vectorised mask equals a row-by-row Python reading, and no value reaches query text.

Why: a filter that drops a matching crop (or keeps a wrong one) misleads an investigation without
any visible error, and a string pasted into a Milvus expression lets a caller rewrite the query.
The masks are checked against a brute-force evaluation over random metadata written to a file
(nulls, hostile strings and times in many UTC offsets included); the Milvus expression is
tokenised back and must hold only field names, operators and placeholders.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from upperson.retrieval.filters import MAX_IN_VALUES, Condition, Filter, FilterError, parse_filter
from upperson.retrieval.metadata import GalleryMetadata, MetadataSchema, read_metadata

HOSTILE = ['" or 1==1 or "', "' or ''='", "a\\", "\\\" or true or \\\"", "new\nline", "tab\there", "ünïcödé 北京",
           "{p0}", "c3) or (camera != ''", "\u2028", "$meta", "`camera`", "%_like%"]
CAMERAS = [f"c{i}" for i in range(1, 10)] + HOSTILE
START = dt.datetime(2026, 12, 1, 12, tzinfo=dt.timezone.utc)
FIELDS = ("camera", "track", "confidence", "time")


def iso(moment: dt.datetime, rng: random.Random) -> str:
    """``moment`` written in a random UTC offset (whole quarter hours from -12:00 to +14:00)."""
    offset = dt.timezone(dt.timedelta(minutes=15 * rng.randint(-48, 56)))
    text = moment.astimezone(offset).isoformat()
    return text.replace("+00:00", "Z") if rng.random() < 0.5 else text


def random_rows(rng: random.Random, count: int) -> list[dict]:
    """Python reference values per row (``None`` = null); ``time`` as aware datetimes."""
    def maybe(value):
        return None if rng.random() < 0.15 else value
    return [{
        "path": f"cam{rng.randint(1, 9)}/{row:06d}.jpg",
        "camera": maybe(rng.choice(CAMERAS)),
        "track": maybe(rng.choice([rng.randint(-5, 40), 2**62, -(2**62)])),
        "confidence": maybe(round(rng.uniform(-1, 1), rng.choice([0, 1, 3]))),
        "time": maybe(START + dt.timedelta(seconds=rng.randint(0, 4 * 3600), microseconds=rng.choice([0, 1, 250_000]))),
    } for row in range(count)]


def write_jsonl(path: Path, rows: list[dict], rng: random.Random) -> GalleryMetadata:
    lines = []
    for row in rows:
        record = {key: value for key, value in row.items() if value is not None or rng.random() < 0.5}
        if row["time"] is not None:
            record["time"] = iso(row["time"], rng)
        lines.append(json.dumps(record, ensure_ascii=rng.random() < 0.5))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    metadata = read_metadata(path)
    assert metadata.schema.as_dict() == {"camera": "string", "track": "int", "confidence": "float", "time": "timestamp"}
    return metadata


def random_filter(rng: random.Random, rows: list[dict]) -> tuple[dict, dict]:
    """A filter's JSON object and the same conditions as Python values (``(op, value)`` per field)."""
    def existing(field):
        present = [row[field] for row in rows if row[field] is not None]
        return rng.choice(present)

    def sample(field):
        if field == "camera":
            return rng.choice([existing(field), "absent", rng.choice(HOSTILE)])
        if field == "track":
            return rng.choice([existing(field), rng.randint(-10, 50)])
        if field == "confidence":
            return rng.choice([existing(field), round(rng.uniform(-1.2, 1.2), 2), rng.randint(-1, 1)])
        return rng.choice([existing(field), START + dt.timedelta(seconds=rng.randint(-600, 5 * 3600))])

    def as_json(value):
        return iso(value, rng) if isinstance(value, dt.datetime) else value

    obj, reference = {}, {}
    for field in rng.sample(FIELDS, rng.randint(0, len(FIELDS))):
        kind = rng.choice(["eq", "in"] if field == "camera" else ["eq", "in", "range", "range"])
        if kind == "eq":
            value = sample(field)
            obj[field], reference[field] = as_json(value), [("eq", value)]
        elif kind == "in":
            values = [sample(field) for _ in range(rng.randint(1, 6))]
            obj[field], reference[field] = [as_json(value) for value in values], [("in", values)]
        else:
            ops = rng.sample(["gte", "gt", "lte", "lt"], rng.randint(1, 4))
            bounds = {op: sample(field) for op in ops}
            obj[field] = {op: as_json(value) for op, value in bounds.items()}
            reference[field] = list(bounds.items())
    return obj, reference


def brute_force(row: dict, reference: dict) -> bool:
    """Independent row-by-row reading: null never passes; conditions and fields are ANDed."""
    for field, tests in reference.items():
        value = row[field]
        if value is None:
            return False
        for op, operand in tests:
            passed = {"eq": lambda: value == operand, "in": lambda: value in operand, "gte": lambda: value >= operand,
                      "gt": lambda: value > operand, "lte": lambda: value <= operand, "lt": lambda: value < operand}[op]()
            if not passed:
                return False
    return True


def test_masks_equal_brute_force_over_random_metadata(tmp_path: Path) -> None:
    rng = random.Random(17)
    rows = random_rows(rng, 3000)
    for row, index in zip(rows, rng.sample(range(len(rows)), len(rows))):
        row["path"] = f"cam{index % 9}/{index:06d}.jpg"  # distinct paths, in shuffled order
    metadata = write_jsonl(tmp_path / "meta.jsonl", rows, rng)
    # the index holds most of the described images plus some the file does not name
    index_paths = [row["path"] for row in rows if rng.random() < 0.9] + [f"new/{i}.jpg" for i in range(200)]
    rng.shuffle(index_paths)
    by_path = {row["path"]: row for row in rows}
    nulls = {field: None for field in FIELDS}
    aligned_rows = [by_path.get(path, nulls) for path in index_paths]
    aligned = metadata.values_for(index_paths)
    used = {"eq": 0, "in": 0, "gte": 0, "gt": 0, "lte": 0, "lt": 0}
    matched = 0
    for _ in range(400):
        obj, reference = random_filter(rng, rows)
        flt = parse_filter(json.loads(json.dumps(obj)), metadata.schema)
        expected = np.array([brute_force(row, reference) for row in rows])
        assert np.array_equal(flt.mask(metadata.table), expected), obj
        aligned_expected = np.array([brute_force(row, reference) for row in aligned_rows])
        assert np.array_equal(flt.mask(aligned.table), aligned_expected), obj
        assert parse_filter(json.loads(json.dumps(flt.to_json())), metadata.schema) == flt
        matched += int(expected.sum())
        for tests in reference.values():
            for op, _ in tests:
                used[op] += 1
    assert min(used.values()) > 50, used  # every operator was exercised, often
    assert 0 < matched < 400 * len(rows)


def test_the_documented_example(tmp_path: Path) -> None:
    path = tmp_path / "meta.csv"
    path.write_text("path,camera,time,track\n"
                    "a.jpg,c3,2026-12-01T14:00:00Z,17\n"           # the start is included
                    "b.jpg,c4,2026-12-01T15:59:59.999999+01:00,17\n"  # 14:59:59.999999Z
                    "c.jpg,c4,2026-12-01T15:00:00Z,17\n"           # the end is excluded
                    "d.jpg,c5,2026-12-01T14:30:00Z,17\n"
                    "e.jpg,c3,2026-12-01T14:30:00Z,18\n"
                    "f.jpg,c3,,17\n", encoding="utf-8")
    metadata = read_metadata(path, declared={"track": "int"})
    flt = parse_filter({"camera": ["c3", "c4"], "time": {"gte": "2026-12-01T14:00:00Z", "lt": "2026-12-01T15:00:00Z"},
                        "track": 17}, metadata.schema)
    assert flt.mask(metadata.table).tolist() == [True, True, False, False, False, False]
    assert flt.describe() == ('camera in ["c3", "c4"] and time >= 2026-12-01T14:00:00Z and '
                              "time < 2026-12-01T15:00:00Z and track == 17")
    start = dt.datetime(2026, 12, 1, 14, tzinfo=dt.timezone.utc)
    start_us = int((start - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)).total_seconds()) * 1_000_000
    assert flt.to_milvus_expression() == (
        "camera in {p0} and time >= {p1} and time < {p2} and track == {p3}",
        {"p0": ["c3", "c4"], "p1": start_us, "p2": start_us + 3600 * 1_000_000, "p3": 17})
    assert flt.to_json() == {"camera": ["c3", "c4"], "time": {"gte": "2026-12-01T14:00:00Z", "lt": "2026-12-01T15:00:00Z"},
                             "track": 17}


SCHEMA = MetadataSchema.of({"camera": "string", "time": "timestamp", "track": "int", "confidence": "float"})


@pytest.mark.parametrize(("obj", "message"), [
    ({"cam": "c3"}, 'filter: unknown field "cam"; the fields are camera, time, track, confidence'),
    ({"track": "17"}, 'filter field "track" (int): expected an integer, got "17"'),
    ({"track": True}, 'filter field "track" (int): expected an integer, got true'),
    ({"track": 17.0}, 'filter field "track" (int): expected an integer, got 17.0'),
    ({"track": 2**63}, 'filter field "track" (int): 9223372036854775808 does not fit a 64-bit integer'),
    ({"confidence": False}, 'filter field "confidence" (float): expected a number, got false'),
    ({"confidence": float("nan")}, 'filter field "confidence" (float): expected a finite number, got NaN'),
    ({"confidence": {"lt": float("inf")}}, 'filter field "confidence" (float): expected a finite number, got Infinity'),
    ({"confidence": 10**400}, 'filter field "confidence" (float): 1000000000000000000000000000000000000000000000000000000'
                              '00... is too large for a 64-bit float'),
    ({"camera": 3}, 'filter field "camera" (string): expected a string, got 3'),
    ({"camera": ["c3", None]}, 'filter field "camera" (string): null is not a value to filter on (null never matches)'),
    ({"camera": ""}, 'filter field "camera" (string): the empty string never matches (empty metadata values are null)'),
    ({"camera": []}, 'filter field "camera": a list holds 1 to 1024 values, got 0'),
    ({"camera": ["c"] * (MAX_IN_VALUES + 1)}, 'filter field "camera": a list holds 1 to 1024 values, got 1025'),
    ({"camera": {"gte": "c3"}}, 'filter field "camera": a range needs an int, float or timestamp field, not string'),
    ({"track": {}}, 'filter field "track": a range needs at least one of gte, gt, lte, lt'),
    ({"track": {"gte": 1, "between": [1, 2]}}, 'filter field "track": unknown operator "between"; a range uses gte, gt, lte, lt'),
    ({"track": {"eq": 1}}, 'filter field "track": unknown operator "eq"; a range uses gte, gt, lte, lt'),
    ({"time": "yesterday"}, 'filter field "time" (timestamp): "yesterday" is not an ISO 8601 date and time such as '
                            "2026-12-01T14:00:00Z"),
    ({"time": "2026-12-01"}, 'filter field "time" (timestamp): "2026-12-01" is not an ISO 8601 date and time such as '
                             "2026-12-01T14:00:00Z"),
    ({"time": {"gte": "2026-12-01T14:00:00"}}, 'filter field "time" (timestamp): "2026-12-01T14:00:00" has no UTC '
                                               "offset; add Z or an offset such as +01:00, or give a default time zone"),
    ({"time": "2026-02-30T14:00:00Z"}, 'filter field "time" (timestamp): "2026-02-30T14:00:00Z" is not a valid date '
                                       "and time (day is out of range for month)"),
    ({"time": 1796133600000000}, 'filter field "time" (timestamp): expected an ISO 8601 date and time such as '
                                 "2026-12-01T14:00:00Z, got 1796133600000000"),
    (["camera", "c3"], 'filter: expected a JSON object {field: condition}, got ["camera", "c3"]'),
    ("camera == 'c3'", "filter: expected a JSON object {field: condition}, got \"camera == 'c3'\""),
])
def test_bad_filters_say_which_field_and_what(obj, message: str) -> None:
    with pytest.raises(FilterError) as caught:
        parse_filter(obj, SCHEMA)
    assert str(caught.value) == message
    assert isinstance(caught.value, ValueError) and "\n" not in message


def test_values_are_normalised() -> None:
    flt = parse_filter({"confidence": [1, 0.5, 1.0], "time": "2026-12-01T09:00:00-05:00", "track": {"gte": 3}}, SCHEMA)
    assert flt.to_json() == {"confidence": [1.0, 0.5], "time": "2026-12-01T14:00:00Z", "track": {"gte": 3}}
    naive = parse_filter({"time": "2026-12-01T15:00:00"}, SCHEMA, timezone="Europe/Berlin")
    assert naive.to_json() == {"time": "2026-12-01T14:00:00Z"}
    assert parse_filter({}, SCHEMA) == Filter() and not Filter()


def test_empty_filter_matches_everything_including_nulls(tmp_path: Path) -> None:
    path = tmp_path / "meta.csv"
    path.write_text("path,camera\na.jpg,c3\nb.jpg,\n", encoding="utf-8")
    metadata = read_metadata(path)
    flt = parse_filter({}, metadata.schema)
    assert flt.mask(metadata.table).tolist() == [True, True]
    assert flt.to_milvus_expression() == ("", {}) and flt.describe() == "no filter (every image)"
    assert flt.mask(metadata.values_for(["z.jpg"]).table).tolist() == [True]


def test_a_filter_for_another_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "meta.csv"
    path.write_text("path,track\na.jpg,x1\n", encoding="utf-8")
    metadata = read_metadata(path)  # track is a string here
    with pytest.raises(FilterError, match=r'^filter field "track": the filter is for an int field but the metadata holds a '
                                          r"string field; parse the filter against this gallery's schema$"):
        parse_filter({"track": 1}, SCHEMA).mask(metadata.table)
    with pytest.raises(FilterError, match='^filter field "confidence": .* has no such field;'):
        parse_filter({"confidence": 1}, SCHEMA).mask(metadata.table)
    with pytest.raises(FilterError, match='^filter field "confidence": .* has no such field;'):
        parse_filter({"confidence": 1}, SCHEMA).check(metadata.schema)
    parse_filter({"track": 1}, SCHEMA).check(SCHEMA)


def test_hand_built_conditions_are_checked() -> None:
    with pytest.raises(FilterError, match=r'^filter: field name "camera or 1" is not allowed'):
        Condition("camera or 1", "string", "eq", "c3")
    with pytest.raises(FilterError, match=r'^filter field "camera": a range needs'):
        Condition("camera", "string", "gte", "c3")
    with pytest.raises(FilterError, match=r'^filter field "track": 1.5 is not an int value$'):
        Condition("track", "int", "eq", 1.5)
    with pytest.raises(FilterError, match=r'^filter field "track": one equality, one list or one range per field'):
        Filter((Condition("track", "int", "eq", 1), Condition("track", "int", "gte", 0)))


TOKEN = re.compile(r"\s*(?:(?P<placeholder>\{[A-Za-z_][A-Za-z0-9_]*\})|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<op>==|>=|<=|>|<))")


def tokens(expression: str) -> list[str]:
    """Split a Milvus expression; anything but names, comparison operators and placeholders fails."""
    out, position = [], 0
    while position < len(expression):
        match = TOKEN.match(expression, position)
        assert match and match.end() > position, f"unexpected text at {position}: {expression[position:]!r}"
        out.append(match.group().strip())
        position = match.end()
    return out


def test_hostile_strings_never_reach_the_milvus_expression() -> None:
    for hostile in HOSTILE + ['"', "\\", "\x00", "\r\n", "and", "camera", "}{"]:
        flt = parse_filter({"camera": [hostile, "c3"], "track": {"gte": 1, "lt": 9}, "time": "2026-12-01T14:00:00Z"},
                           SCHEMA)
        expression, params = flt.to_milvus_expression()
        assert tokens(expression) == ["camera", "in", "{p0}", "and", "track", ">=", "{p1}", "and", "track", "<", "{p2}",
                                      "and", "time", "==", "{p3}"]
        assert params == {"p0": [hostile, "c3"], "p1": 1, "p2": 9, "p3": 1796133600000000}
        assert json.loads(json.dumps(params)) == params
        assert "\n" not in flt.describe() and "\r" not in flt.describe()  # one log line, whatever the value


def test_random_filters_compile_to_names_operators_and_placeholders(tmp_path: Path) -> None:
    rng = random.Random(3)
    rows = random_rows(rng, 300)
    for _ in range(200):
        obj, _ = random_filter(rng, rows)
        expression, params = parse_filter(obj, SCHEMA).to_milvus_expression()
        words = tokens(expression)
        clauses = [words[i:i + 3] for i in range(0, len(words), 4)]
        assert all(word == "and" for word in words[3::4])
        assert [clause[0] for clause in clauses] == [field for field, spec in obj.items()
                                                    for _ in (spec if isinstance(spec, dict) else [spec])]
        assert [clause[2] for clause in clauses] == [f"{{p{i}}}" for i in range(len(clauses))] == [f"{{{k}}}" for k in params]
