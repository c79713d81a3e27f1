"""Structured filters over gallery metadata: validated against the schema, evaluated vectorised, compiled for Milvus.

A filter is a JSON object, one key per metadata field, all of them combined with AND::

    {"camera": ["c3", "c4"], "time": {"gte": "2026-12-01T14:00:00Z", "lt": "2026-12-01T15:00:00Z"}, "track": 17}

* a scalar is equality (``"track": 17``);
* a list is membership (``"camera": ["c3", "c4"]``): 1 to :data:`MAX_IN_VALUES` values;
* an object with keys among ``gte``, ``gt``, ``lte``, ``lt`` is a range (``int``, ``float`` and
  ``timestamp`` fields only; at least one key; several are combined with AND).

A null metadata value never matches a condition. Timestamps are ISO 8601 text with ``Z`` or an
offset (naive only with a default ``timezone``). No value is ever interpolated into query text:
:meth:`Filter.to_milvus_expression` returns an expression that holds only schema field names
(identifiers, checked) and placeholders, with the values in the separate ``filter_params`` mapping
of Milvus' expression templates.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from upperson.retrieval.metadata import (
    INT64_MAX,
    INT64_MIN,
    FieldType,
    MetadataError,
    MetadataSchema,
    MetadataTable,
    NumericColumn,
    check_field_name,
    format_timestamp,
    parse_timestamp,
    show_value,
)

Operator = Literal["eq", "in", "gte", "gt", "lte", "lt"]
RANGE_OPERATORS: tuple[Operator, ...] = ("gte", "gt", "lte", "lt")
MAX_IN_VALUES = 1024
"""Most values one list (``in``) condition may hold."""
_SYMBOLS: dict[Operator, str] = {"eq": "==", "in": "in", "gte": ">=", "gt": ">", "lte": "<=", "lt": "<"}
_RANGED: frozenset[FieldType] = frozenset({"int", "float", "timestamp"})
Value = int | float | str
"""A condition value: ``int`` (timestamps as microseconds since the epoch, UTC), ``float`` or ``str``."""


class FilterError(ValueError):
    """A filter that does not fit the gallery's metadata; the message names the field and what is wrong."""


@dataclass(frozen=True)
class Condition:
    """One test of one field: ``field <op> value``; ``in`` holds a tuple of values."""

    field: str
    type: FieldType
    op: Operator
    value: Value | tuple[Value, ...]

    def __post_init__(self) -> None:
        try:
            check_field_name(self.field, "filter")
        except MetadataError as exc:
            raise FilterError(str(exc)) from None
        if self.op not in _SYMBOLS:
            raise FilterError(f"filter field {show_value(self.field)}: unknown operator {show_value(self.op)}")
        if self.op in RANGE_OPERATORS and self.type not in _RANGED:
            raise FilterError(f"filter field {show_value(self.field)}: a range needs an int, float or timestamp field, "
                              f"not {self.type}")
        values = self.value if self.op == "in" else (self.value,)
        if self.op == "in" and not (isinstance(values, tuple) and 1 <= len(values) <= MAX_IN_VALUES):
            raise FilterError(f"filter field {show_value(self.field)}: a list holds 1 to {MAX_IN_VALUES} values")
        for value in values:
            if not _is_internal(value, self.type):
                raise FilterError(f"filter field {show_value(self.field)}: {show_value(value)} is not {_a(self.type)} value")

    @property
    def values(self) -> tuple[Value, ...]:
        """The value(s) tested: one for a comparison, the list for ``in``."""
        return self.value if isinstance(self.value, tuple) else (self.value,)

    def check(self, schema: MetadataSchema) -> None:
        """Raise :class:`FilterError` unless ``schema`` has this field with this type."""
        have = schema.as_dict().get(self.field)
        if have != self.type:
            raise FilterError(f"filter field {show_value(self.field)}: the filter is for {_a(self.type)} field but the "
                              f"metadata {'has no such field' if have is None else f'holds {_a(have)} field'}; "
                              "parse the filter against this gallery's schema")

    def mask(self, table: MetadataTable) -> np.ndarray:
        """``bool`` per row of ``table``: whether the row's value passes (null never does)."""
        self.check(table.schema)
        column = table.columns[self.field]
        if not isinstance(column, NumericColumn):
            known = [column.code_of[value] for value in self.values if value in column.code_of]
            return np.isin(column.codes, np.asarray(known, np.int32)) if known else np.zeros(len(column), bool)
        data = column.values
        if self.op == "in":
            passed = np.isin(data, np.asarray(self.values, data.dtype))
        else:
            passed = {"eq": np.equal, "gte": np.greater_equal, "gt": np.greater,
                      "lte": np.less_equal, "lt": np.less}[self.op](data, self.value)
        return passed & column.valid

    def describe(self) -> str:
        """``field op value`` for logs (strings JSON-escaped, timestamps in ISO 8601 UTC)."""
        shown = [_render(value, self.type) for value in self.values]
        text = f"[{', '.join(shown)}]" if self.op == "in" else shown[0]
        return f"{self.field} {_SYMBOLS[self.op]} {text}"


def _a(kind: FieldType) -> str:
    return f"an {kind}" if kind == "int" else f"a {kind}"


def _is_internal(value: Any, kind: FieldType) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "float":
        return type(value) is float and math.isfinite(value)
    return type(value) is int and INT64_MIN <= value <= INT64_MAX


def _render(value: Value, kind: FieldType) -> str:
    return format_timestamp(value) if kind == "timestamp" else json.dumps(value)  # type: ignore[arg-type]


def _external(value: Value, kind: FieldType) -> Value:
    return format_timestamp(value) if kind == "timestamp" else value  # type: ignore[arg-type]


@dataclass(frozen=True)
class Filter:
    """Conditions combined with AND; no condition matches every row. Build it with :func:`parse_filter`."""

    conditions: tuple[Condition, ...] = ()

    def __post_init__(self) -> None:
        ops: dict[str, list[Operator]] = {}
        for condition in self.conditions:
            ops.setdefault(condition.field, []).append(condition.op)
        for field, used in ops.items():
            alone = len(used) == 1 and used[0] in ("eq", "in")
            if not alone and not (set(used) <= set(RANGE_OPERATORS) and len(set(used)) == len(used)):
                raise FilterError(f"filter field {show_value(field)}: one equality, one list or one range per field, got {used}")

    def __bool__(self) -> bool:
        return bool(self.conditions)

    @property
    def fields(self) -> tuple[str, ...]:
        """The fields tested, in order."""
        return tuple(dict.fromkeys(condition.field for condition in self.conditions))

    def check(self, schema: MetadataSchema) -> None:
        """Raise :class:`FilterError` unless every field tested is in ``schema`` with its parsed type.

        Catches a filter parsed for one gallery and used on another; :meth:`mask` calls it.
        """
        for condition in self.conditions:
            condition.check(schema)

    def mask(self, table: MetadataTable) -> np.ndarray:
        """``bool`` per row of ``table``: the rows that pass every condition (vectorised over the columns)."""
        passed = np.ones(len(table), bool)
        for condition in self.conditions:
            passed &= condition.mask(table)
        return passed

    def to_milvus_expression(self) -> tuple[str, dict[str, Value | list[Value]]]:
        """A Milvus boolean expression template and its ``filter_params``.

        ``camera in {p0} and time >= {p1} and time < {p2}`` with ``{"p0": ["c3", "c4"], "p1":
        1796133600000000, "p2": 1796137200000000}``: pass both to ``search``/``query``
        (``filter=expression, filter_params=params``). The text holds only field names and
        placeholders, so no value can change its structure. Timestamps are int64 microseconds since
        the epoch, as the columns store them. An empty filter gives ``("", {})``.
        """
        parts, params = [], {}
        for index, condition in enumerate(self.conditions):
            name = f"p{index}"
            parts.append(f"{condition.field} {_SYMBOLS[condition.op]} {{{name}}}")
            params[name] = list(condition.values) if condition.op == "in" else condition.value
        return " and ".join(parts), params

    def describe(self) -> str:
        """A one-line human reading for logs: ``camera in ["c3", "c4"] and track == 17``."""
        return " and ".join(condition.describe() for condition in self.conditions) or "no filter (every image)"

    def to_json(self) -> dict[str, Any]:
        """The filter's JSON object (timestamps as ISO 8601 UTC text); :func:`parse_filter` reads it back."""
        out: dict[str, Any] = {}
        for condition in self.conditions:
            if condition.op == "in":
                out[condition.field] = [_external(value, condition.type) for value in condition.values]
            elif condition.op == "eq":
                out[condition.field] = _external(condition.value, condition.type)  # type: ignore[arg-type]
            else:
                out.setdefault(condition.field, {})[condition.op] = _external(condition.value, condition.type)  # type: ignore[arg-type]
        return out


def parse_filter(obj: Any, schema: MetadataSchema, *, timezone: str | dt.tzinfo | None = None) -> Filter:
    """Validate a filter's JSON object against a gallery's metadata schema.

    Args:
        obj: ``{field: value | [values] | {"gte"|"gt"|"lte"|"lt": value}}`` (see the module docstring).
        schema: the gallery's fields and types.
        timezone: zone of timestamps written without ``Z`` or offset (else they are errors).

    Raises:
        FilterError: naming the field and what is wrong: unknown field, a value of the wrong type
            (a bool is not a number; NaN and infinities are refused), an unparsable time, an empty or
            too long list, an unknown operator, a range on a string field, a null.
    """
    if not isinstance(obj, dict):
        raise FilterError(f"filter: expected a JSON object {{field: condition}}, got {show_value(obj)}")
    fields = schema.as_dict()
    conditions: list[Condition] = []
    for field, spec in obj.items():
        if field not in fields:
            known = ", ".join(fields) if fields else "none: the gallery has no metadata"
            raise FilterError(f"filter: unknown field {show_value(field)}; the fields are {known}")
        kind = fields[field]
        if isinstance(spec, dict):
            unknown = [key for key in spec if key not in RANGE_OPERATORS]
            if unknown:
                raise FilterError(f"filter field {show_value(field)}: unknown operator {show_value(unknown[0])}; "
                                  "a range uses gte, gt, lte, lt")
            if not spec:
                raise FilterError(f"filter field {show_value(field)}: a range needs at least one of gte, gt, lte, lt")
            if kind not in _RANGED:
                raise FilterError(f"filter field {show_value(field)}: a range needs an int, float or timestamp field, not {kind}")
            conditions += [Condition(field, kind, op, _coerce(field, kind, value, timezone)) for op, value in spec.items()]
        elif isinstance(spec, list):
            if not 1 <= len(spec) <= MAX_IN_VALUES:
                raise FilterError(f"filter field {show_value(field)}: a list holds 1 to {MAX_IN_VALUES} values, got {len(spec)}")
            values = tuple(dict.fromkeys(_coerce(field, kind, value, timezone) for value in spec))
            conditions.append(Condition(field, kind, "in", values))
        else:
            conditions.append(Condition(field, kind, "eq", _coerce(field, kind, spec, timezone)))
    return Filter(tuple(conditions))


def _coerce(field: str, kind: FieldType, value: Any, timezone: str | dt.tzinfo | None) -> Value:
    """One JSON value as the internal value of a ``kind`` field, or :class:`FilterError` saying why not."""
    where = f"filter field {show_value(field)} ({kind})"
    if value is None:
        raise FilterError(f"{where}: null is not a value to filter on (null never matches)")
    if kind == "string":
        if not isinstance(value, str):
            raise FilterError(f"{where}: expected a string, got {show_value(value)}")
        if not value:
            raise FilterError(f"{where}: the empty string never matches (empty metadata values are null)")
        return value
    if kind == "timestamp":
        if not isinstance(value, str):
            raise FilterError(f"{where}: expected an ISO 8601 date and time such as 2026-12-01T14:00:00Z, "
                              f"got {show_value(value)}")
        try:
            return parse_timestamp(value, timezone)
        except ValueError as exc:
            raise FilterError(f"{where}: {exc}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FilterError(f"{where}: expected {'an integer' if kind == 'int' else 'a number'}, got {show_value(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise FilterError(f"{where}: expected a finite number, got {show_value(value)}")
    if kind == "int":
        if not isinstance(value, int):
            raise FilterError(f"{where}: expected an integer, got {show_value(value)}")
        if not INT64_MIN <= value <= INT64_MAX:
            raise FilterError(f"{where}: {value} does not fit a 64-bit integer")
        return int(value)
    try:
        return float(value)
    except OverflowError:
        raise FilterError(f"{where}: {show_value(value)} is too large for a 64-bit float") from None


__all__ = ["MAX_IN_VALUES", "RANGE_OPERATORS", "Condition", "Filter", "FilterError", "Operator", "parse_filter"]
