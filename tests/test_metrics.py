"""Retrieval metrics against independent references: a pure-Python brute force (ties included),
the previous stable-sort implementation (bit-for-bit), a full-argsort transcription of IRRA's
``rank()``, and a hand-computed example."""

from __future__ import annotations

import logging

import pytest
import torch

from upperson.evaluation import metrics as metrics_module
from upperson.evaluation import retrieval_metrics

CMC = (1, 5, 10)
KEYS = ("R1", "R5", "R10", "mAP", "mINP", "num_queries", "queries_without_positive")


def brute_force(similarity: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor) -> dict[str, float]:
    """One query at a time in Python floats; ties keep gallery order (Python's sort is stable)."""
    hits_at = {1: 0, 5: 0, 10: 0}
    ap_total = inp_total = 0.0
    used = skipped = 0
    gallery = gallery_pids.tolist()
    for row, pid in zip(similarity.tolist(), query_pids.tolist()):
        order = sorted(range(len(row)), key=lambda j: -row[j])
        matches = [gallery[j] == pid for j in order]
        relevant = sum(matches)
        if relevant == 0:
            skipped += 1
            continue
        used += 1
        positions = [k for k, match in enumerate(matches) if match]
        for k in hits_at:
            hits_at[k] += positions[0] < k
        ap_total += sum((n + 1) / (k + 1) for n, k in enumerate(positions)) / relevant
        inp_total += relevant / (positions[-1] + 1)
    return {
        "R1": 100 * hits_at[1] / used,
        "R5": 100 * hits_at[5] / used,
        "R10": 100 * hits_at[10] / used,
        "mAP": 100 * ap_total / used,
        "mINP": 100 * inp_total / used,
        "num_queries": used,
        "queries_without_positive": skipped,
    }


def irra_rank(similarity: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor) -> dict[str, float]:
    """IRRA's formulas on one full argsort of the whole matrix, float32 as IRRA computes them."""
    indices = torch.argsort(similarity, dim=1, descending=True)
    matches = gallery_pids[indices] == query_pids.view(-1, 1)  # [N_q, N_g]
    cmc = matches[:, :10].cumsum(1).clamp(max=1).float().mean(0) * 100
    num_rel = matches.sum(1)
    cumulative = matches.cumsum(1)
    last = matches.shape[1] - 1 - matches.flip(1).int().argmax(1)
    inp = num_rel / (last + 1.0)
    precision = cumulative / torch.arange(1, matches.shape[1] + 1, dtype=torch.float32)
    ap = (precision * matches).sum(1) / num_rel
    return {
        "R1": cmc[0].item(),
        "R5": cmc[4].item(),
        "R10": cmc[9].item(),
        "mAP": ap.mean().item() * 100,
        "mINP": inp.mean().item() * 100,
    }


def sort_reference(
    similarity: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor, chunk_size: int
) -> dict[str, float | torch.Tensor]:
    """The previous implementation of ``retrieval_metrics``, kept as a reference: a stable descending
    sort of each chunk of rows, the positives' ranks read off the sorted order, the same float64
    accumulation. The sort-free implementation must reproduce it bit for bit."""
    parts = []
    for start in range(0, len(similarity), chunk_size):
        block, pids = similarity[start : start + chunk_size], query_pids[start : start + chunk_size]
        order = torch.sort(block, dim=1, descending=True, stable=True).indices
        relevant = gallery_pids.unsqueeze(0) == pids.unsqueeze(1)
        num_relevant = relevant.sum(1)
        rows, ranks = torch.gather(relevant, 1, order).nonzero(as_tuple=True)
        row_start = torch.cumsum(num_relevant, 0) - num_relevant
        hits = torch.arange(1, len(ranks) + 1) - row_start[rows]
        precision_sum = torch.zeros(len(num_relevant), dtype=torch.float64)
        precision_sum.index_add_(0, rows, hits.double() / (ranks + 1).double())
        has_positive = num_relevant > 0
        first, last = torch.zeros_like(num_relevant), torch.zeros_like(num_relevant)
        first[has_positive] = ranks[row_start[has_positive]]
        last[has_positive] = ranks[row_start[has_positive] + num_relevant[has_positive] - 1]
        parts.append((first, last, num_relevant, precision_sum))
    first, last, num_relevant, precision_sum = (torch.cat(part) for part in zip(*parts))
    valid = num_relevant > 0
    relevant = num_relevant[valid].double()
    result: dict[str, float | torch.Tensor] = {f"R{k}": (first[valid] < k).double().mean().item() * 100 for k in CMC}
    result["mAP"] = (precision_sum[valid] / relevant).mean().item() * 100
    result["mINP"] = (relevant / (last[valid] + 1).double()).mean().item() * 100
    result["rSum"] = result["R1"] + result["R5"] + result["R10"]
    result["num_queries"] = int(valid.sum())
    result["queries_without_positive"] = len(similarity) - int(valid.sum())
    result["first_positive_rank"] = torch.where(valid, first, -1)
    return result


def random_case(queries: int, gallery: int, ids: int, levels: int | None, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    similarity = torch.rand(queries, gallery, generator=generator, dtype=torch.float64)
    if levels is not None:
        similarity = (similarity * levels).floor() / levels  # few distinct values: many exact ties
    query_pids = torch.randint(0, ids, (queries,), generator=generator)
    gallery_pids = torch.randint(0, ids, (gallery,), generator=generator)
    return similarity.to(dtype), query_pids, gallery_pids


CASES = [
    # queries, gallery, ids, similarity levels (None = continuous)
    (40, 50, 6, None),
    (35, 64, 4, 3),
    (23, 12, 12, 2),
    (60, 9, 3, 5),
    (17, 130, 20, 1),  # every similarity equal: ranking is gallery order
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize(("queries", "gallery", "ids", "levels"), CASES)
def test_matches_brute_force(queries: int, gallery: int, ids: int, levels: int | None, dtype: torch.dtype) -> None:
    similarity, query_pids, gallery_pids = random_case(queries, gallery, ids, levels, dtype, seed=queries * gallery)
    expected = brute_force(similarity, query_pids, gallery_pids)
    result = retrieval_metrics(similarity, query_pids, gallery_pids, chunk_size=7)
    for key in KEYS:
        assert result[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-12), key
    assert result["rSum"] == pytest.approx(expected["R1"] + expected["R5"] + expected["R10"], rel=1e-12)


SORT_CASES = [
    # queries, gallery, ids, similarity levels (None = continuous); 3 queries get no positive
    (50, 40, 8, None),  # ~5 positives per query
    (64, 300, 250, None),  # mostly one positive: first_positive_rank checks every rank
    (40, 7, 3, 4),  # gallery smaller than 10
    (33, 120, 2, 3),  # ~60 positives per query, nearly all scores tie
    (30, 90, 1, 1),  # every gallery item positive, every score equal
    (45, 200, 30, 50),
]


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize(("queries", "gallery", "ids", "levels"), SORT_CASES)
def test_equals_stable_sort_reference(
    queries: int, gallery: int, ids: int, levels: int | None, dtype: torch.dtype, chunk_size: int
) -> None:
    similarity, query_pids, gallery_pids = random_case(queries, gallery, ids, levels, dtype, seed=queries + gallery)
    query_pids[:3] = ids  # not in the gallery
    expected = sort_reference(similarity, query_pids, gallery_pids, chunk_size)
    result = retrieval_metrics(similarity, query_pids, gallery_pids, chunk_size=chunk_size, return_ranks=True)
    assert result.pop("first_positive_rank").equal(expected.pop("first_positive_rank"))
    assert result == expected  # bit for bit, not approximately


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_infinite_and_signed_zero_scores(dtype: torch.dtype) -> None:
    similarity, query_pids, gallery_pids = random_case(40, 60, 5, 4, dtype, seed=9)
    special = torch.randint(0, 8, similarity.shape, generator=torch.Generator().manual_seed(10))
    for code, value in enumerate([float("inf"), float("-inf"), -0.0, 0.0]):
        similarity[special == code] = value  # half of the scores: many ties at ±inf and ±0
    expected = sort_reference(similarity, query_pids, gallery_pids, chunk_size=16)
    result = retrieval_metrics(similarity, query_pids, gallery_pids, chunk_size=16, return_ranks=True)
    assert result.pop("first_positive_rank").equal(expected.pop("first_positive_rank"))
    assert result == expected
    brute = brute_force(similarity, query_pids, gallery_pids)
    assert {key: result[key] for key in KEYS} == pytest.approx(brute, rel=1e-12)


@pytest.mark.parametrize(
    ("cells", "candidate_batch", "positives_per_block"),
    [(1, 1, 1), (2, 7, 5), (16, 40, 50), (100_000, 2**21, 2**20)],
)
def test_cells_and_batches_change_nothing(
    monkeypatch: pytest.MonkeyPatch, cells: int, candidate_batch: int, positives_per_block: int
) -> None:
    """The cell count only decides how many items are ordered exactly (one cell: all of them), the
    batch sizes only bound memory: the metrics stay bit-identical to the stable sort."""
    monkeypatch.setattr(metrics_module, "CELLS", cells)
    monkeypatch.setattr(metrics_module, "CANDIDATE_BATCH_ITEMS", candidate_batch)
    monkeypatch.setattr(metrics_module, "MAX_POSITIVES_PER_BLOCK", positives_per_block)
    for levels in (None, 3):
        similarity, query_pids, gallery_pids = random_case(37, 25, 4, levels, torch.float32, seed=12)
        expected = sort_reference(similarity, query_pids, gallery_pids, chunk_size=8)
        result = retrieval_metrics(similarity, query_pids, gallery_pids, chunk_size=8, return_ranks=True)
        assert result.pop("first_positive_rank").equal(expected.pop("first_positive_rank"))
        assert result == expected


def test_matches_irra_rank_without_ties() -> None:
    similarity, query_pids, gallery_pids = random_case(80, 300, 10, None, torch.float32, seed=5)
    assert all(len(row.unique()) == len(row) for row in similarity)  # no ties: IRRA's order is unique
    expected = irra_rank(similarity, query_pids, gallery_pids)
    result = retrieval_metrics(similarity, query_pids, gallery_pids, chunk_size=32)
    assert result["queries_without_positive"] == 0
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-5), key


def test_hand_computed_example(caplog: pytest.LogCaptureFixture) -> None:
    gallery_pids = torch.tensor([1, 2, 1, 3, 2, 4])
    query_pids = torch.tensor([1, 3, 3, 9, 4])
    similarity = torch.tensor(
        [
            [0.9, 0.8, 0.1, 0.5, 0.3, 0.2],  # matches 1 0 0 0 0 1: AP (1/1 + 2/6)/2 = 2/3, INP 2/6
            [0.7, 0.2, 0.6, 0.1, 0.3, 0.8],  # matches 0 0 0 0 0 1: AP 1/6, INP 1/6 (R5 miss, R10 hit)
            [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],  # all tied, gallery order: matches 0 0 0 1 0 0: AP 1/4, INP 1/4
            [0.4, 0.3, 0.2, 0.1, 0.0, 0.6],  # pid 9 is not in the gallery: left out
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # matches 1 0 0 0 0 0: AP 1, INP 1
        ]
    )
    with caplog.at_level(logging.WARNING, logger="upperson.evaluation.metrics"):
        result = retrieval_metrics(similarity, query_pids, gallery_pids, return_ranks=True)
    assert result["R1"] == 50.0 and result["R5"] == 75.0 and result["R10"] == 100.0 and result["rSum"] == 225.0
    assert result["mAP"] == pytest.approx(100 * 25 / 48)  # (2/3 + 1/6 + 1/4 + 1) / 4
    assert result["mINP"] == pytest.approx(100 * 21 / 48)  # (1/3 + 1/6 + 1/4 + 1) / 4
    assert result["num_queries"] == 4 and result["queries_without_positive"] == 1
    assert result["first_positive_rank"].tolist() == [0, 5, 3, -1, 0]
    assert "1 of 5 queries have no positive" in caplog.text


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_equals_unchunked(dtype: torch.dtype) -> None:
    similarity, query_pids, gallery_pids = random_case(53, 31, 5, 4, dtype, seed=3)
    full = retrieval_metrics(similarity, query_pids, gallery_pids, chunk_size=53, return_ranks=True)
    for chunk_size in (1, 7, 1000):
        chunked = retrieval_metrics(similarity, query_pids, gallery_pids, chunk_size=chunk_size, return_ranks=True)
        assert chunked.pop("first_positive_rank").equal(full["first_positive_rank"])
        assert chunked == {key: value for key, value in full.items() if key != "first_positive_rank"}


def test_queries_without_positive_are_excluded_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    similarity, query_pids, gallery_pids = random_case(30, 40, 8, None, torch.float32, seed=11)
    query_pids[::3] = 99  # 10 queries whose pid is absent from the gallery
    with caplog.at_level(logging.WARNING, logger="upperson.evaluation.metrics"):
        result = retrieval_metrics(similarity, query_pids, gallery_pids, chunk_size=4, return_ranks=True)
    kept = query_pids != 99
    reference = retrieval_metrics(similarity[kept], query_pids[kept], gallery_pids)
    assert result["queries_without_positive"] == 10 and result["num_queries"] == reference["num_queries"]
    assert {key: result[key] for key in KEYS[:5]} == {key: reference[key] for key in KEYS[:5]}
    assert (result["first_positive_rank"][~kept] == -1).all()
    assert "10 of 30 queries have no positive" in caplog.text


def test_image_to_text_by_transposing() -> None:
    similarity, text_pids, image_pids = random_case(45, 20, 6, 3, torch.float32, seed=2)
    transposed = retrieval_metrics(similarity.t(), image_pids, text_pids, chunk_size=6)  # non-contiguous rows
    assert transposed == retrieval_metrics(similarity.t().contiguous(), image_pids, text_pids)
    expected = brute_force(similarity.t(), image_pids, text_pids)
    assert {key: transposed[key] for key in KEYS} == pytest.approx(expected, rel=1e-12)


def test_pids_as_lists() -> None:
    similarity, query_pids, gallery_pids = random_case(10, 15, 3, None, torch.float64, seed=4)
    assert retrieval_metrics(similarity, query_pids.tolist(), gallery_pids.tolist()) == retrieval_metrics(
        similarity, query_pids, gallery_pids
    )


@pytest.mark.parametrize(
    ("similarity", "query_pids", "gallery_pids", "chunk_size", "message"),
    [
        (torch.zeros(2, 3), [0, 1, 2], [0, 1, 2], 8, "1-D with the similarity's 2 rows"),
        (torch.zeros(2, 3), [0, 1], [0, 1], 8, "3 columns"),
        (torch.zeros(6), [0], [0], 8, r"must be \[N_q, N_g\]"),
        (torch.zeros(2, 3, dtype=torch.int64), [0, 1], [0, 1, 2], 8, "must be floating point"),
        (torch.zeros(0, 3), [], [0, 1, 2], 8, "similarity is empty"),
        (torch.zeros(2, 3), [0, 1], [0, 1, 2], 0, "chunk_size must be >= 1"),
        (torch.tensor([[0.1, float("nan")], [0.3, 0.2]]), [0, 1], [0, 1], 1, "NaN in query rows 0..0"),
        (torch.zeros(2, 2), [5, 6], [0, 1], 8, "none of the 2 queries"),
    ],
)
def test_invalid_input_is_an_error(similarity, query_pids, gallery_pids, chunk_size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(similarity, query_pids, gallery_pids, chunk_size=chunk_size)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_equals_cpu(dtype: torch.dtype) -> None:
    similarity, query_pids, gallery_pids = random_case(70, 90, 7, 4, dtype, seed=8)
    cpu = retrieval_metrics(similarity, query_pids, gallery_pids, chunk_size=16, return_ranks=True)
    cuda = retrieval_metrics(similarity.cuda(), query_pids.cuda(), gallery_pids, chunk_size=16, return_ranks=True)
    assert cuda.pop("first_positive_rank").equal(cpu.pop("first_positive_rank"))
    assert cuda == pytest.approx(cpu, rel=1e-12)
