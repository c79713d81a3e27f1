"""A gallery kept in a Milvus collection: for galleries past one machine (issue 17).

:class:`MilvusGallery` stores what a :class:`~upperson.retrieval.gallery.GalleryIndex` holds — one
L2-normalised feature per image with its stable row id and relative path — plus the image's metadata
(:mod:`upperson.retrieval.metadata`), in one Milvus collection, and searches it with the structured
filters of :mod:`upperson.retrieval.filters` evaluated by the server. It talks to Milvus through
pymilvus' ``MilvusClient`` only, so one code path serves Milvus Lite's gRPC server (the test stand-in),
Milvus standalone and Milvus distributed: only the URI changes.

A gallery is named by ``milvus://HOST:PORT/COLLECTION``. A token, where the server wants one
(``user:password`` or an API key), comes only from the environment variable
:data:`TOKEN_VARIABLE`, never from the URI, so it cannot leak into configs, logs or process lists.

The collection's schema:

* ``row``: ``INT64`` primary key, the caller's stable row id (not an auto id; an insert of a row that
  exists replaces it);
* ``vector``: ``FLOAT_VECTOR`` of the model's dimension, searched by inner product (``IP``), which
  is the cosine similarity of the L2-normalised features;
* ``path``: ``VARCHAR`` (at most 4096 bytes of UTF-8), the image path relative to the gallery root;
* one nullable field per metadata field: ``int`` → ``INT64``, ``float`` → ``DOUBLE``, ``string`` →
  ``VARCHAR``, ``timestamp`` → ``INT64`` microseconds since the epoch (UTC), each with an
  ``INVERTED`` scalar index.

The model's identity (:func:`~upperson.retrieval.gallery.index_metadata`) and the metadata schema are
collection properties holding JSON, so a reader rebuilds the query encoder from the collection alone
and a writer with another model is refused.

Filter values never become query text where the server can take them apart from it: with Milvus 2.5
or later the filter is an expression template (field names and placeholders) and the values travel
in ``filter_params``. Milvus Lite (3.2) has no templates; there each value is written as a literal
whose characters cannot end it: numbers are Python's ``repr`` of a checked int or finite float, and a
string is quoted with ``\\``, ``"``, newline, carriage return and tab escaped (every other character,
quotes of the other kind and any Unicode included, stands for itself inside double quotes).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Literal, Sequence, get_args

import numpy as np
import torch

from upperson.retrieval.filters import Filter, FilterError
from upperson.retrieval.gallery import _IDENTITY_KEYS
from upperson.retrieval.metadata import (
    MetadataError,
    MetadataSchema,
    MetadataTable,
    StringColumn,
    check_relative_path,
    format_timestamp,
)

logger = logging.getLogger(__name__)

TOKEN_VARIABLE = "UPPERSON_MILVUS_TOKEN"
"""Environment variable holding the Milvus token (``user:password`` or an API key), if the server needs one."""
URI_FORM = "milvus://HOST:PORT/COLLECTION"
STORE_FORMAT = "upperson-milvus-gallery"
STORE_FORMAT_VERSION = 1
ROW_FIELD, VECTOR_FIELD, PATH_FIELD = "row", "vector", "path"
"""The store's own fields: names :data:`~upperson.retrieval.metadata.RESERVED_NAMES` keeps from metadata."""
MAX_PATH_BYTES = 4096
MAX_STRING_BYTES = 65_535
"""Longest metadata string (UTF-8 bytes) a ``VARCHAR`` field holds."""
MAX_K = 16_384
"""Most hits Milvus returns per query (its ``topk`` limit)."""
TEMPLATE_VERSION = (2, 5)
"""First Milvus version that reads expression templates (``filter_params``)."""
VectorIndex = Literal["FLAT", "HNSW", "AUTOINDEX"]
VECTOR_INDEXES: tuple[VectorIndex, ...] = get_args(VectorIndex)

_COLLECTION = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
_URI = re.compile(r"milvus://(?P<host>[^/:@\s]+|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,5})/(?P<collection>[^/]*)")
_VERSION = re.compile(r"v?(?P<major>[0-9]+)\.(?P<minor>[0-9]+)")
_PLACEHOLDER = re.compile(r"\{(p[0-9]+)\}")
_STRING_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})
_PROPERTY_FORMAT, _PROPERTY_IDENTITY, _PROPERTY_SCHEMA = "upperson.format", "upperson.identity", "upperson.metadata_schema"
_PROPERTY_DIM, _PROPERTY_INDEX = "upperson.dim", "upperson.vector_index"
_MILVUS_TYPES = {"int": "INT64", "float": "DOUBLE", "string": "VARCHAR", "timestamp": "INT64"}
_FORMAT = f"{STORE_FORMAT}/{STORE_FORMAT_VERSION}"
_MATCH_KEYS = ("method", "backbone_sha256", "adapter_sha256")
"""Identity keys named first in a mismatch: the method, then the weights."""
_NORM_TOLERANCE = 1e-2
"""How far a stored feature's norm may be from 1: float16 features are within ~1e-3 of it."""


class MilvusStoreError(ValueError):
    """A Milvus gallery that cannot be used as asked; the one-line message names the URI or field and the fix."""


def parse_milvus_uri(uri: str) -> tuple[str, str]:
    """The server address (``http://HOST:PORT``) and collection of ``milvus://HOST:PORT/COLLECTION``.

    Raises:
        MilvusStoreError: for any other form, a port out of range, a collection name that is not
            ``[A-Za-z_][A-Za-z0-9_]{0,254}``, or credentials in the URI (they go in the environment).
    """
    shown = json.dumps(uri) if isinstance(uri, str) else type(uri).__name__
    if isinstance(uri, str) and uri.startswith("milvus://") and "@" in uri.split("/", 3)[2]:
        raise MilvusStoreError(f"Milvus URI {shown} holds credentials; remove them and set {TOKEN_VARIABLE} "
                               "(user:password or an API key) instead")
    match = _URI.fullmatch(uri) if isinstance(uri, str) else None
    if match is None:
        raise MilvusStoreError(f"Milvus URI {shown} is not of the form {URI_FORM}")
    if not 1 <= int(match["port"]) <= 65_535:
        raise MilvusStoreError(f"Milvus URI {shown}: port {match['port']} is not in 1-65535")
    if not _COLLECTION.fullmatch(match["collection"]):
        raise MilvusStoreError(f"Milvus URI {shown}: collection {json.dumps(match['collection'])} is not allowed; "
                               "use 1-255 letters, digits and _, not starting with a digit")
    return f"http://{match['host']}:{int(match['port'])}", match["collection"]


@dataclass(frozen=True)
class MilvusHit:
    """One ranked gallery image of a :meth:`MilvusGallery.search`."""

    row: int
    """The image's stable row id."""
    score: float
    """Inner product of the query and image features (their cosine similarity)."""
    path: str
    """Image path relative to the gallery root."""
    metadata: dict[str, int | float | str | None]
    """The image's metadata, as :meth:`MetadataTable.record` gives it (timestamps ISO 8601 UTC, null = ``None``)."""


class MilvusGallery:
    """A gallery in one Milvus collection. Make one with :meth:`create` or :meth:`open`."""

    def __init__(self, connection: _Connection, uri: str, collection: str, dim: int, identity: dict[str, Any],
                 schema: MetadataSchema, vector_index: VectorIndex) -> None:
        self._connection = connection
        self.uri = uri
        self.collection = collection
        self.dim = dim
        self._identity = json.loads(json.dumps(identity))
        self._schema = schema
        self.vector_index = vector_index
        self._templates = _reads_templates(connection)

    @property
    def identity(self) -> dict[str, Any]:
        """The model that made the features (:func:`~upperson.retrieval.gallery.index_metadata`'s dict), a copy."""
        return json.loads(json.dumps(self._identity))

    @property
    def schema(self) -> MetadataSchema:
        """The metadata fields stored beside each feature."""
        return self._schema

    # ------------------------------------------------------------------------------------- opening

    @classmethod
    def create(cls, uri: str, dim: int, identity: dict[str, Any], schema: MetadataSchema, *,
               overwrite: bool = False, vector_index: VectorIndex = "FLAT", timeout: float = 5.0) -> MilvusGallery:
        """Create the collection ``uri`` names, or reuse it where it holds this model's gallery.

        Args:
            dim: feature dimension (the model's embedding width).
            identity: :func:`~upperson.retrieval.gallery.index_metadata` of the model.
            schema: the metadata fields.
            overwrite: drop an upperson gallery of another model, dimension or schema and start anew
                (a collection that is not an upperson gallery is never dropped).
            vector_index: ``FLAT`` (exact; the default), ``HNSW`` (approximate, for millions of
                images; searched with ``ef = max(k, 64)``) or ``AUTOINDEX`` (the server's choice).
            timeout: seconds to wait for the server on each call.

        Raises:
            MilvusStoreError: an existing collection of another model, dimension or schema (without
                ``overwrite``), a foreign collection, or the server out of reach.
        """
        address, collection = parse_milvus_uri(uri)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise MilvusStoreError(f"Milvus gallery {uri}: dim must be a positive integer, got {dim!r}")
        if vector_index not in VECTOR_INDEXES:
            raise MilvusStoreError(f"Milvus gallery {uri}: vector_index {vector_index!r} is not one of {', '.join(VECTOR_INDEXES)}")
        missing = [key for key in _IDENTITY_KEYS if key not in identity]
        if missing:
            raise MilvusStoreError(f"Milvus gallery {uri}: the identity lacks {', '.join(missing)}; pass index_metadata(...)")
        connection = _Connection.open(address, uri, timeout)
        if connection.call("has_collection", collection):
            existing = cls._from_collection(connection, uri, collection)
            problem = existing._difference(dim, identity, schema)
            if problem is None:
                connection.call("load_collection", collection)
                logger.info("reusing Milvus gallery %s (%d images)", uri, existing.count())
                return existing
            if not overwrite:
                raise MilvusStoreError(f"Milvus gallery {uri} already holds {problem}; pass overwrite=True to replace it")
            logger.info("dropping Milvus gallery %s: it held %s", uri, problem)
            connection.call("drop_collection", collection)
        connection.call("create_collection", collection, schema=_collection_schema(dim, schema),
                        index_params=_index_params(connection.client, schema, vector_index), consistency_level="Strong",
                        properties={_PROPERTY_FORMAT: _FORMAT, _PROPERTY_IDENTITY: json.dumps(identity, sort_keys=True),
                                    _PROPERTY_SCHEMA: json.dumps(schema.to_json()), _PROPERTY_DIM: str(dim),
                                    _PROPERTY_INDEX: vector_index})
        connection.call("load_collection", collection)
        logger.info("created Milvus gallery %s (dim %d, %s index, metadata %s)", uri, dim, vector_index,
                    ", ".join(schema.names) or "none")
        return cls(connection, uri, collection, dim, identity, schema, vector_index)

    @classmethod
    def open(cls, uri: str, *, identity: dict[str, Any] | None = None, timeout: float = 5.0) -> MilvusGallery:
        """Open the gallery ``uri`` names.

        Args:
            identity: where given, the model the caller will query with; another model is refused.
            timeout: seconds to wait for the server on each call.

        Raises:
            MilvusStoreError: no such collection, a collection that is not an upperson gallery,
                another model, or the server out of reach.
        """
        address, collection = parse_milvus_uri(uri)
        connection = _Connection.open(address, uri, timeout)
        if not connection.call("has_collection", collection):
            raise MilvusStoreError(f"Milvus gallery {uri}: the server at {address} has no collection {collection}; "
                                   "create it with MilvusGallery.create (or check the name)")
        gallery = cls._from_collection(connection, uri, collection)
        if identity is not None:
            gallery.check_identity(identity)
        connection.call("load_collection", collection)
        return gallery

    @classmethod
    def _from_collection(cls, connection: _Connection, uri: str, collection: str) -> MilvusGallery:
        """The gallery an existing collection holds, read from its properties."""
        properties = connection.call("describe_collection", collection).get("properties", {})
        if properties.get(_PROPERTY_FORMAT) != _FORMAT:
            raise MilvusStoreError(f"Milvus collection {uri} is not an upperson gallery (its {_PROPERTY_FORMAT} is "
                                   f"{_short(properties.get(_PROPERTY_FORMAT))}, not {_FORMAT}); use another collection name")
        try:
            identity = json.loads(properties[_PROPERTY_IDENTITY])
            schema = MetadataSchema.from_json(json.loads(properties[_PROPERTY_SCHEMA]), f"Milvus gallery {uri}")
            dim, vector_index = int(properties[_PROPERTY_DIM]), properties[_PROPERTY_INDEX]
        except (KeyError, ValueError, MetadataError) as exc:
            raise MilvusStoreError(f"Milvus gallery {uri}: unreadable upperson properties ({exc}); "
                                   "recreate it with overwrite=True") from None
        if not isinstance(identity, dict) or vector_index not in VECTOR_INDEXES:
            raise MilvusStoreError(f"Milvus gallery {uri}: unreadable upperson properties; recreate it with overwrite=True")
        return cls(connection, uri, collection, dim, identity, schema, vector_index)

    def check_identity(self, identity: dict[str, Any]) -> None:
        """Refuse a model other than the one that made the stored features (one line naming both)."""
        problem = _identity_difference(self._identity, identity)
        if problem is not None:
            raise MilvusStoreError(f"Milvus gallery {self.uri} was made with {problem}; "
                                   "query with that model or index into another collection")

    def _difference(self, dim: int, identity: dict[str, Any], schema: MetadataSchema) -> str | None:
        """What the stored gallery has that a gallery of ``dim``, ``identity`` and ``schema`` would not."""
        if dim != self.dim:
            return f"features of dimension {self.dim}, not {dim}"
        problem = _identity_difference(self._identity, identity)
        if problem is not None:
            return f"another model's features ({problem})"
        if schema != self._schema:
            return f"metadata fields {dict(self._schema.fields)}, not {dict(schema.fields)}"
        return None

    # ------------------------------------------------------------------------------------- writing

    def insert(self, rows: Sequence[int] | np.ndarray, features: torch.Tensor | np.ndarray, paths: Sequence[str],
               metadata: MetadataTable | None = None, *, batch_rows: int = 2048) -> int:
        """Insert or replace (by row id) images, ``batch_rows`` at a time.

        Args:
            rows: distinct non-negative stable row ids, one per image.
            features: ``[N, D]`` L2-normalised image features (any float dtype).
            paths: image paths relative to the gallery root.
            metadata: ``N`` rows of this gallery's schema (``None`` only for a schema without fields).

        Returns:
            The number of images written.

        Raises:
            MilvusStoreError: naming the first row or field that does not fit.
        """
        row_ids = np.asarray(rows, dtype=np.int64).reshape(-1)
        vectors = _as_matrix(features, self.dim, f"Milvus gallery {self.uri}: features")
        count = len(row_ids)
        if len(vectors) != count or len(paths) != count:
            raise MilvusStoreError(f"Milvus gallery {self.uri}: {count} rows, {len(vectors)} features and "
                                   f"{len(paths)} paths; give one of each per image")
        if count and (row_ids.min() < 0 or len(np.unique(row_ids)) != count):
            raise MilvusStoreError(f"Milvus gallery {self.uri}: row ids must be distinct and non-negative")
        norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
        bad = np.flatnonzero(np.abs(norms - 1.0) > _NORM_TOLERANCE)
        if len(bad):
            raise MilvusStoreError(f"Milvus gallery {self.uri}: features of row {int(row_ids[bad[0]])} have norm "
                                   f"{norms[bad[0]]:.4g}; store L2-normalised features")
        columns = self._metadata_columns(metadata, count)
        checked = [_stored_path(path, row, self.uri) for row, path in zip(row_ids.tolist(), paths)]
        for start in range(0, count, batch_rows):
            batch = [{ROW_FIELD: int(row_ids[i]), VECTOR_FIELD: vectors[i].tolist(), PATH_FIELD: checked[i],
                      **{name: values[i] for name, values in columns.items()}} for i in range(start, min(start + batch_rows, count))]
            self._connection.call("upsert", self.collection, batch)
        logger.info("wrote %d images to Milvus gallery %s", count, self.uri)
        return count

    def _metadata_columns(self, metadata: MetadataTable | None, count: int) -> dict[str, list[Any]]:
        """Per field, the ``count`` values Milvus stores (``None`` = null)."""
        if metadata is None:
            if len(self._schema):
                raise MilvusStoreError(f"Milvus gallery {self.uri}: metadata for {', '.join(self._schema.names)} is required")
            return {}
        if metadata.schema != self._schema or len(metadata) != count:
            raise MilvusStoreError(f"Milvus gallery {self.uri}: metadata of fields {dict(metadata.schema.fields)} "
                                   f"and {len(metadata)} rows does not fit the gallery's {dict(self._schema.fields)} "
                                   f"and {count} images")
        out: dict[str, list[Any]] = {}
        for name, column in metadata.columns.items():
            if isinstance(column, StringColumn):
                if any(len(value.encode()) > MAX_STRING_BYTES for value in column.vocabulary):
                    raise MilvusStoreError(f"Milvus gallery {self.uri}: a {name} value is over {MAX_STRING_BYTES} bytes")
                out[name] = np.asarray([*column.vocabulary, None], dtype=object)[column.codes].tolist()  # -1 → None
            else:
                out[name] = [value if valid else None for value, valid in zip(column.values.tolist(), column.valid.tolist())]
        return out

    def delete(self, rows: Sequence[int] | np.ndarray) -> None:
        """Remove images by row id (ids not stored are ignored)."""
        ids = np.asarray(rows, dtype=np.int64).reshape(-1).tolist()
        if ids:
            self._connection.call("delete", self.collection, ids=ids)

    def count(self) -> int:
        """The number of images stored."""
        result = self._connection.call("query", self.collection, filter="", output_fields=["count(*)"])
        return int(result[0]["count(*)"])

    # ------------------------------------------------------------------------------------- reading

    def search(self, queries: torch.Tensor | np.ndarray, k: int = 10, filter: Filter | None = None) -> list[list[MilvusHit]]:
        """The ``k`` images of highest inner product with each query, among those that pass ``filter``.

        Args:
            queries: ``[Q, D]`` query features (L2-normalised, from the gallery's model).
            k: hits per query, 1 to :data:`MAX_K`.
            filter: a :func:`~upperson.retrieval.filters.parse_filter` result for this gallery's schema.

        Returns:
            Per query, up to ``k`` hits, best first.
        """
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise MilvusStoreError(f"Milvus gallery {self.uri}: k must be an integer in 1-{MAX_K}, got {k!r}")
        vectors = _as_matrix(queries, self.dim, f"Milvus gallery {self.uri}: queries")
        if not len(vectors):
            return []
        expression, params = self._expression(filter)
        search_params: dict[str, Any] = {"metric_type": "IP"}
        if self.vector_index == "HNSW":
            search_params["params"] = {"ef": max(k, 64)}
        templated = {"filter_params": params} if params else {}
        found = self._connection.call("search", self.collection, data=vectors.tolist(), limit=k, filter=expression,
                                      output_fields=[PATH_FIELD, *self._schema.names], search_params=search_params,
                                      anns_field=VECTOR_FIELD, **templated)
        return [[self._hit(hit) for hit in hits] for hits in found]

    def _expression(self, filter: Filter | None) -> tuple[str, dict[str, Any]]:
        """The filter as this server takes it: a template and its values, or (without templates) escaped literals."""
        if not filter:
            return "", {}
        for condition in filter.conditions:
            if condition.field not in self._schema or self._schema.type_of(condition.field) != condition.type:
                raise FilterError(f"filter field {json.dumps(condition.field)}: the filter is for a {condition.type} field "
                                  f"but Milvus gallery {self.uri} has {dict(self._schema.fields)}; parse it against the "
                                  "gallery's schema")
        expression, params = filter.to_milvus_expression()
        if self._templates:
            return expression, params
        return _PLACEHOLDER.sub(lambda match: _literal(params[match[1]]), expression), {}

    def _hit(self, hit: Any) -> MilvusHit:
        entity = hit["entity"]
        metadata: dict[str, int | float | str | None] = {}
        for name, kind in self._schema.fields:
            value = entity.get(name)
            metadata[name] = format_timestamp(value) if kind == "timestamp" and value is not None else value
        return MilvusHit(int(hit[ROW_FIELD]), float(hit["distance"]), entity[PATH_FIELD], metadata)

    def close(self) -> None:
        """Close the connection to the server."""
        self._connection.client.close()


# ------------------------------------------------------------------------------------------ helpers


def _pymilvus() -> Any:
    try:
        import pymilvus
    except ImportError:
        raise MilvusStoreError("Milvus galleries need pymilvus; install upperson[milvus]") from None
    return pymilvus


@dataclass(frozen=True)
class _Connection:
    """A ``MilvusClient`` of one server, its address and the timeout of every call."""

    client: Any
    address: str
    timeout: float

    @classmethod
    def open(cls, address: str, uri: str, timeout: float) -> _Connection:
        """Connect to ``address`` (the token from :data:`TOKEN_VARIABLE`); one line naming it where that fails."""
        pymilvus = _pymilvus()
        try:
            client = pymilvus.MilvusClient(uri=address, token=os.environ.get(TOKEN_VARIABLE, ""), timeout=timeout)
        except pymilvus.exceptions.MilvusException as exc:
            hint = "" if TOKEN_VARIABLE in os.environ else f" (or set {TOKEN_VARIABLE})"
            raise MilvusStoreError(f"cannot reach Milvus at {address} for {uri} within {timeout:g} s ({_reason(exc)}); "
                                   f"start the server or fix the URI{hint}") from None
        return cls(client, address, timeout)

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """``client.<name>(*args, **kwargs)``; a server error becomes one line naming the address."""
        pymilvus = _pymilvus()
        try:
            return getattr(self.client, name)(*args, timeout=self.timeout, **kwargs)
        except pymilvus.exceptions.MilvusException as exc:
            raise MilvusStoreError(f"Milvus at {self.address}: {name} failed ({_reason(exc)})") from None


def _reason(exc: Any) -> str:
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return " ".join(str(message).split())[:300]


def _reads_templates(connection: _Connection) -> bool:
    """Whether the server takes expression templates: Milvus 2.5 or later (not Milvus Lite 3.2)."""
    version = str(connection.call("get_server_version"))
    match = _VERSION.match(version)
    templates = match is not None and (int(match["major"]), int(match["minor"])) >= TEMPLATE_VERSION
    if not templates:
        logger.info("Milvus at %s (%s) has no expression templates; filter values are sent as escaped literals",
                    connection.address, version)
    return templates


def _literal(value: Any) -> str:
    """A Milvus expression literal of a checked filter value (or list of them) whose characters cannot end it."""
    if isinstance(value, list):
        return "[" + ", ".join(_literal(item) for item in value) + "]"
    if isinstance(value, str):
        return '"' + value.translate(_STRING_ESCAPES) + '"'
    if type(value) is int or (type(value) is float and math.isfinite(value)):
        return repr(value)
    raise FilterError(f"filter value {value!r:.60} is not a string, integer or finite number")


def _collection_schema(dim: int, schema: MetadataSchema) -> Any:
    pymilvus = _pymilvus()
    DataType = pymilvus.DataType
    fields = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                                description=f"{STORE_FORMAT} {STORE_FORMAT_VERSION}")
    fields.add_field(ROW_FIELD, DataType.INT64, is_primary=True)
    fields.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dim)
    fields.add_field(PATH_FIELD, DataType.VARCHAR, max_length=MAX_PATH_BYTES)
    for name, kind in schema.fields:
        extra = {"max_length": MAX_STRING_BYTES} if kind == "string" else {}
        fields.add_field(name, getattr(DataType, _MILVUS_TYPES[kind]), nullable=True, **extra)
    return fields


def _index_params(client: Any, schema: MetadataSchema, vector_index: VectorIndex) -> Any:
    params = client.prepare_index_params()
    vector_params = {"M": 16, "efConstruction": 200} if vector_index == "HNSW" else {}
    params.add_index(VECTOR_FIELD, index_type=vector_index, metric_type="IP", params=vector_params)
    for name in schema.names:
        params.add_index(name, index_type="INVERTED")
    return params


def _as_matrix(features: torch.Tensor | np.ndarray, dim: int, where: str) -> np.ndarray:
    """``features`` as a finite ``[N, dim]`` float32 array."""
    if isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float32).numpy()
    array = np.asarray(features, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] != dim:
        raise MilvusStoreError(f"{where} have shape {list(array.shape)}; expected [N, {dim}]")
    if not np.isfinite(array).all():
        raise MilvusStoreError(f"{where} hold NaN or infinite values")
    return array


def _stored_path(path: str, row: int, uri: str) -> str:
    try:
        checked = check_relative_path(path, f"Milvus gallery {uri}, row {row}")
    except MetadataError as exc:
        raise MilvusStoreError(str(exc)) from None
    if len(checked.encode()) > MAX_PATH_BYTES:
        raise MilvusStoreError(f"Milvus gallery {uri}, row {row}: path is over {MAX_PATH_BYTES} bytes")
    return checked


def _identity_difference(stored: dict[str, Any], given: dict[str, Any]) -> str | None:
    """``key <stored>, not <given>`` for the first identity key that differs (method and hashes first), or ``None``."""
    for key in dict.fromkeys((*_MATCH_KEYS, *_IDENTITY_KEYS)):
        if stored.get(key) != given.get(key):
            return f"{key} {_short(stored.get(key))}, not {_short(given.get(key))}"
    return None


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


__all__ = ["MAX_K", "TOKEN_VARIABLE", "MilvusGallery", "MilvusHit", "MilvusStoreError", "VECTOR_INDEXES", "VectorIndex", "parse_milvus_uri"]
