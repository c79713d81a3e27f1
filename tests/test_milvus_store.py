"""A gallery in Milvus: a real Milvus Lite server (``milvus-lite server``) against exact brute force."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="the Milvus store needs pymilvus (pip install upperson[milvus])")

from conftest import SMALL_IMAGE, make_model  # noqa: E402
from milvus_server import free_port, milvus_lite_command, milvus_lite_server  # noqa: E402

from upperson.retrieval.filters import FilterError, parse_filter  # noqa: E402
from upperson.retrieval.gallery import index_metadata  # noqa: E402
from upperson.retrieval.metadata import (  # noqa: E402
    RESERVED_NAMES,
    MetadataSchema,
    MetadataTable,
    NumericColumn,
    StringColumn,
    parse_timestamp,
)
from upperson.retrieval.milvus_store import (  # noqa: E402
    PATH_FIELD,
    ROW_FIELD,
    TOKEN_VARIABLE,
    VECTOR_FIELD,
    MilvusGallery,
    MilvusStoreError,
    _reads_templates,
    parse_milvus_uri,
)

ROWS, DIM, K = 3000, 48, 10
SCHEMA = MetadataSchema.of({"camera": "string", "time": "timestamp", "track": "int", "weight": "float"})
START = parse_timestamp("2026-12-01T14:00:00Z")
HOSTILE = ['"', "\\", "'", '" or 1==1 or "', "' or 1==1 or '", 'c3" or camera != "', "c3\\", "\\\" or true or \\\"",
           "a\nb", "line\r\nbreak", "tab\there", "{p0}", "c3' || '", "κάμερα 東京 🎥", "\u202e3c", "camera == camera", "%", "[]"]
"""Camera names that would change a filter's meaning if pasted into its text unescaped."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    if milvus_lite_command() is None:
        pytest.skip("milvus_lite is not installed (pip install upperson[milvus]); the Milvus store tests need its server")
    with milvus_lite_server(tmp_path_factory.mktemp("milvus") / "data") as address:
        yield address


@pytest.fixture(scope="module")
def identity() -> dict:
    return index_metadata(make_model(), SMALL_IMAGE, None, None, "fp32")


def other_model(identity: dict, **changes) -> dict:
    return {**identity, **changes}


def gallery_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str], MetadataTable]:
    """Row ids, float16-rounded L2-normalised features, paths and metadata (with nulls) of ``ROWS`` images."""
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((ROWS, DIM))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    features = features.astype(np.float16).astype(np.float32)  # as GalleryIndex stores them
    rows = rng.permutation(10 * ROWS)[:ROWS].astype(np.int64)  # stable ids, not positions
    vocabulary = ("c1", "c2", "c3", "c4", "c5", "c6", *sorted(HOSTILE))
    codes = rng.integers(0, 6, ROWS).astype(np.int32)
    codes[rng.random(ROWS) < 0.1] = -1
    codes[:len(HOSTILE)] = [vocabulary.index(name) for name in HOSTILE]  # one image per hostile name
    def numeric(values: np.ndarray) -> NumericColumn:
        valid = rng.random(ROWS) >= 0.1
        return NumericColumn(np.where(valid, values, 0).astype(values.dtype), valid)
    columns = {"camera": StringColumn(codes, vocabulary),
               "time": numeric(START + rng.integers(0, 7200, ROWS).astype(np.int64) * 1_000_000),
               "track": numeric(rng.integers(0, 300, ROWS).astype(np.int64)),
               "weight": numeric(rng.random(ROWS))}
    paths = [f"cam/{row:06d}.jpg" for row in rows.tolist()]
    return rows, features, paths, MetadataTable(SCHEMA, columns, ROWS)


@pytest.fixture(scope="module")
def filled(server: str, identity: dict):
    """The gallery of :func:`gallery_data` in collection ``parity`` (read-only for the tests that use it)."""
    rows, features, paths, table = data = gallery_data()
    gallery = MilvusGallery.create(f"milvus://{server}/parity", DIM, identity, SCHEMA)
    assert gallery.insert(rows, features, paths, table, batch_rows=1000) == ROWS
    return gallery, data


def score_bound(queries: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Largest |score error| of a float32 inner product of the stored float32 values, any summation order.

    A length-D float32 dot product errs by at most D·u·Σ|q_i x_i| (u = 2^-24, unit roundoff; Higham,
    *Accuracy and Stability of Numerical Algorithms*, eq. 3.5, first order), and rounding the result
    to float32 adds u·|s| ≤ u·Σ|q_i x_i|.
    """
    return (DIM + 1) * 2.0**-24 * (np.abs(queries.astype(np.float64)) @ np.abs(features.astype(np.float64)).T)


def brute_force(queries: np.ndarray, features: np.ndarray, passed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact float64 scores [Q, N] (``-inf`` where the filter fails) and the top-``k`` positions per query."""
    scores = queries.astype(np.float64) @ features.astype(np.float64).T
    scores[:, ~passed] = -np.inf
    return scores, np.argsort(-scores, axis=1, kind="stable")[:, :k]


# ------------------------------------------------------------------------------------------ URIs


@pytest.mark.parametrize(("uri", "expected"), [
    ("milvus://127.0.0.1:19530/gallery", ("http://127.0.0.1:19530", "gallery")),
    ("milvus://milvus.internal:443/_g_1", ("http://milvus.internal:443", "_g_1")),
    ("milvus://[::1]:19530/G", ("http://[::1]:19530", "G")),
    ("milvus://h:1/" + "a" * 255, ("http://h:1", "a" * 255)),
])
def test_parse_milvus_uri(uri: str, expected: tuple[str, str]) -> None:
    assert parse_milvus_uri(uri) == expected


@pytest.mark.parametrize(("uri", "message"), [
    ("http://127.0.0.1:19530/gallery", 'Milvus URI "http://127.0.0.1:19530/gallery" is not of the form milvus://HOST:PORT/COLLECTION'),
    ("milvus://127.0.0.1/gallery", "is not of the form milvus://HOST:PORT/COLLECTION"),
    ("milvus://127.0.0.1:19530", "is not of the form milvus://HOST:PORT/COLLECTION"),
    ("milvus://127.0.0.1:19530/a/b", "is not of the form"),
    ("milvus://127.0.0.1:0/g", "port 0 is not in 1-65535"),
    ("milvus://127.0.0.1:99999/g", "port 99999 is not in 1-65535"),
    ("milvus://h:1/1gallery", 'collection "1gallery" is not allowed'),
    ("milvus://h:1/gal-lery", 'collection "gal-lery" is not allowed'),
    ("milvus://h:1/" + "a" * 256, "is not allowed"),
    ("milvus://h:1/", 'collection "" is not allowed'),
    ("milvus://root:Milvus@h:19530/g", f"holds credentials; remove them and set {TOKEN_VARIABLE}"),
    ("milvus://token@h:19530/g", f"set {TOKEN_VARIABLE}"),
])
def test_parse_milvus_uri_refusals(uri: str, message: str) -> None:
    with pytest.raises(MilvusStoreError) as caught:
        parse_milvus_uri(uri)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_store_fields_are_reserved_from_metadata() -> None:
    assert {ROW_FIELD, VECTOR_FIELD, PATH_FIELD} <= RESERVED_NAMES  # no metadata field can take their names


@pytest.mark.parametrize(("version", "templates"), [
    ("v2.5.4", True), ("v2.6.0-beta", True), ("2.5.0", True), ("v3.0.1", True),
    ("v2.4.15", False), ("milvus_lite-3.2.2", False), ("", False),
])
def test_templates_only_from_milvus_2_5(version: str, templates: bool) -> None:
    class Server:
        address = "http://h:1"

        def call(self, name: str) -> str:
            assert name == "get_server_version"
            return version

    assert _reads_templates(Server()) is templates  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- search == brute force


FILTERS = [
    None,
    {"camera": "c3"},
    {"camera": ["c1", "c4"]},
    {"time": {"gte": "2026-12-01T14:30:00Z", "lt": "2026-12-01T15:00:00Z"}},
    {"track": {"gt": 150}, "weight": {"lte": 0.5}},
    {"camera": ["c2", "c5"], "time": {"gte": "2026-12-01T15:00:00+01:00"}, "track": {"lt": 200}},
    {"track": 17},  # about ten images: fewer than k for some queries
    {"camera": "c9"},  # no image
]


@pytest.mark.parametrize("spec", FILTERS, ids=lambda spec: "none" if spec is None else "-".join(spec))
def test_search_equals_brute_force(filled, spec: dict | None) -> None:
    gallery, (rows, features, paths, table) = filled
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((6, DIM))
    queries[:2] = features[[5, 700]] + 0.1 * queries[:2]  # near a stored image
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    filter = parse_filter(spec, SCHEMA) if spec is not None else None
    passed = filter.mask(table) if filter is not None else np.ones(ROWS, bool)

    hits = gallery.search(queries, K, filter)

    exact, top = brute_force(queries, features, passed, K)
    bound = score_bound(queries, features)
    position = {int(row): i for i, row in enumerate(rows.tolist())}
    assert len(hits) == len(queries)
    for q, query_hits in enumerate(hits):
        assert len(query_hits) == min(K, int(passed.sum()))
        got = np.array([position[hit.row] for hit in query_hits], dtype=np.int64)
        scores = np.array([hit.score for hit in query_hits])
        assert passed[got].all()
        # every returned score is the stored image's exact score to the float32 rounding bound ...
        assert np.all(np.abs(scores - exact[q, got]) <= bound[q, got])
        # ... and the ranking is exact: a row differs from brute force only inside a tie within that bound
        expected = top[q, :len(got)]
        differs = got != expected
        assert np.all(np.abs(exact[q, got[differs]] - exact[q, expected[differs]])
                      <= bound[q, got[differs]] + bound[q, expected[differs]])
        for hit, at in zip(query_hits, got.tolist()):
            assert hit.path == paths[at] and hit.metadata == table.record(at)


def test_hostile_filter_strings_match_only_themselves(filled) -> None:
    gallery, (rows, features, _, table) = filled
    codes = table.columns["camera"].codes
    vocabulary = table.columns["camera"].vocabulary
    for name in HOSTILE:
        (holder,) = np.flatnonzero(codes == vocabulary.index(name))
        query = features[holder][None]
        (hits,) = gallery.search(query, 50, parse_filter({"camera": name}, SCHEMA))
        assert [(hit.row, hit.metadata["camera"]) for hit in hits] == [(int(rows[holder]), name)], repr(name)
        (hits,) = gallery.search(query, 1000, parse_filter({"camera": [name, "c1"]}, SCHEMA))
        expected = parse_filter({"camera": [name, "c1"]}, SCHEMA).mask(table)
        assert sorted(hit.row for hit in hits) == sorted(rows[expected].tolist()), repr(name)
        assert {hit.metadata["camera"] for hit in hits} == {name, "c1"}
    (hits,) = gallery.search(features[:1], 50, parse_filter({"camera": "c3\" or camera != \"c3"}, SCHEMA))
    assert hits == []  # a name no image has matches nothing, whatever it holds


def test_filter_of_another_schema_is_refused(filled) -> None:
    gallery, _ = filled
    other = parse_filter({"camera": 3}, MetadataSchema.of({"camera": "int"}))
    with pytest.raises(FilterError, match='filter field "camera": the filter is for a int field but Milvus gallery'):
        gallery.search(np.ones((1, DIM), np.float32) / DIM**0.5, K, other)


def test_open_reads_identity_and_schema(server: str, filled, identity: dict) -> None:
    gallery = MilvusGallery.open(f"milvus://{server}/parity", identity=identity)
    assert gallery.identity == identity and gallery.schema == SCHEMA and gallery.dim == DIM
    assert gallery.count() == ROWS and gallery.vector_index == "FLAT"


# ------------------------------------------------------------------------------ writing and identity


def test_upsert_delete_and_count(server: str, identity: dict) -> None:
    rows, features, paths, table = gallery_data(seed=2)
    gallery = MilvusGallery.create(f"milvus://{server}/writes", DIM, identity, SCHEMA)
    gallery.insert(rows[:500], features[:500], paths[:500], table.take(np.arange(500)))
    assert gallery.count() == 500

    gallery.insert(rows[:10], features[:10], [f"moved/{i}.jpg" for i in range(10)], table.take(np.arange(10)))
    assert gallery.count() == 500  # same row ids replace, not add
    (hits,) = gallery.search(features[3][None], 1)
    assert (hits[0].row, hits[0].path) == (int(rows[3]), "moved/3.jpg")

    gallery.delete(rows[:100])
    gallery.delete([10 * ROWS + 1])  # not stored: ignored
    assert gallery.count() == 400
    found = gallery.search(features[:100], 5)
    assert not {hit.row for hits in found for hit in hits} & set(rows[:100].tolist())


def test_insert_refusals(server: str, identity: dict) -> None:
    rows, features, paths, table = gallery_data(seed=3)
    gallery = MilvusGallery.create(f"milvus://{server}/refusals", DIM, identity, SCHEMA)
    part = table.take(np.arange(4))
    with pytest.raises(MilvusStoreError, match=r"features have shape \[4, 47\]; expected \[N, 48\]"):
        gallery.insert(rows[:4], features[:4, :47], paths[:4], part)
    with pytest.raises(MilvusStoreError, match="have norm 2; store L2-normalised features"):
        gallery.insert(rows[:4], 2 * features[:4], paths[:4], part)
    with pytest.raises(MilvusStoreError, match="row ids must be distinct and non-negative"):
        gallery.insert([1, 1, 2, 3], features[:4], paths[:4], part)
    with pytest.raises(MilvusStoreError, match=r"leaves the images folder \(\.\.\)"):
        gallery.insert(rows[:4], features[:4], ["../x.jpg", *paths[1:4]], part)
    with pytest.raises(MilvusStoreError, match="does not fit the gallery's"):
        gallery.insert(rows[:4], features[:4], paths[:4], table.take(np.arange(5)))
    assert gallery.count() == 0


def test_identity_mismatch_refused(server: str, identity: dict) -> None:
    uri = f"milvus://{server}/identity"
    rows, features, paths, table = gallery_data(seed=4)
    MilvusGallery.create(uri, DIM, identity, SCHEMA).insert(rows[:50], features[:50], paths[:50], table.take(np.arange(50)))
    retrained = other_model(identity, adapter_sha256="ab" * 32)

    with pytest.raises(MilvusStoreError) as caught:
        MilvusGallery.open(uri, identity=retrained)
    assert str(caught.value) == (f"Milvus gallery {uri} was made with adapter_sha256 null, not \"{'ab' * 32}\"; "
                                 "query with that model or index into another collection")
    with pytest.raises(MilvusStoreError, match=r'already holds another model\'s features \(method "up-person", not "cskt"\); '
                                               "pass overwrite=True to replace it"):
        MilvusGallery.create(uri, DIM, other_model(identity, method="cskt"), SCHEMA)
    with pytest.raises(MilvusStoreError, match="already holds features of dimension 48, not 64"):
        MilvusGallery.create(uri, 64, identity, SCHEMA)
    with pytest.raises(MilvusStoreError, match="already holds metadata fields"):
        MilvusGallery.create(uri, DIM, identity, MetadataSchema.of({"camera": "string"}))

    assert MilvusGallery.create(uri, DIM, other_model(identity, upperson_version="9.9"), SCHEMA).count() == 50  # reused
    replaced = MilvusGallery.create(uri, DIM, retrained, SCHEMA, overwrite=True)
    assert replaced.count() == 0 and replaced.identity["adapter_sha256"] == "ab" * 32


def test_foreign_collection_never_dropped(server: str, identity: dict) -> None:
    from pymilvus import MilvusClient

    client = MilvusClient(uri=f"http://{server}")
    client.create_collection("someone_elses", dimension=DIM)
    for call in (lambda: MilvusGallery.open(f"milvus://{server}/someone_elses"),
                 lambda: MilvusGallery.create(f"milvus://{server}/someone_elses", DIM, identity, SCHEMA, overwrite=True)):
        with pytest.raises(MilvusStoreError, match="someone_elses is not an upperson gallery"):
            call()
    assert client.has_collection("someone_elses")


def test_hnsw_index_finds_each_image(server: str, identity: dict) -> None:
    rows, features, paths, table = gallery_data(seed=5)
    gallery = MilvusGallery.create(f"milvus://{server}/hnsw", DIM, identity, SCHEMA, vector_index="HNSW")
    gallery.insert(rows[:1000], features[:1000], paths[:1000], table.take(np.arange(1000)))
    found = gallery.search(features[:50], 1)
    assert [hits[0].row for hits in found] == rows[:50].tolist()
    assert MilvusGallery.open(f"milvus://{server}/hnsw").vector_index == "HNSW"


def test_token_comes_from_the_environment(server: str, filled, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_VARIABLE, "root:Milvus")  # Milvus Lite has no authentication and ignores it
    assert MilvusGallery.open(f"milvus://{server}/parity").count() == ROWS


# ------------------------------------------------------------------------------------------ failures


def test_missing_collection_is_one_line(server: str) -> None:
    with pytest.raises(MilvusStoreError) as caught:
        MilvusGallery.open(f"milvus://{server}/nothing_here")
    assert str(caught.value) == (f"Milvus gallery milvus://{server}/nothing_here: the server at http://{server} has no "
                                 "collection nothing_here; create it with MilvusGallery.create (or check the name)")


def test_server_down_is_one_line() -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(MilvusStoreError) as caught:
        MilvusGallery.open(f"milvus://127.0.0.1:{port}/gallery", timeout=2)
    message = str(caught.value)
    assert message.startswith(f"cannot reach Milvus at http://127.0.0.1:{port} for milvus://127.0.0.1:{port}/gallery within 2 s (")
    assert "start the server or fix the URI" in message and "\n" not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert time.monotonic() - started < 10


def test_silent_server_times_out_in_one_line() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # accepts connections, never answers
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(MilvusStoreError, match=f"cannot reach Milvus at http://127.0.0.1:{port} "):
            MilvusGallery.open(f"milvus://127.0.0.1:{port}/gallery", timeout=1)
        assert time.monotonic() - started < 10
