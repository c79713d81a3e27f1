"""Retrieval metrics (R@K, mAP, mINP) with IRRA's ``rank()`` semantics, without sorting the gallery.

IRRA argsorts the whole ``[N_q, N_g]`` similarity at once (ICFG-PEDES: 19,848² int64 indices, 3.2 GB;
12.4 GiB at its peak with the gathered pids, cumulative sums and precision matrices, measured by
``benchmarks/eval_memory.py``). Every metric depends only on the ranks of each query's positives, and
a positive's rank is a count: the gallery items scoring more, plus those scoring the same at a
smaller gallery index (the order a stable descending sort gives). So nothing is sorted but a few
items per row: each row's scores are binned into cells by a non-decreasing map, items in cells
without a positive are counted from a histogram, and the few items sharing a cell with a positive
are ordered exactly. A block of query rows at a time, in buffers reused from block to block.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Sequence, overload

import torch

logger = logging.getLogger(__name__)

CMC_RANKS = (1, 5, 10)
"""The R@K cut-offs the papers report (IRRA's ``cmc[0]``, ``cmc[4]``, ``cmc[9]``)."""

DEFAULT_CHUNK_SIZE = 1024
"""Query rows processed at once. Their buffers take 13 bytes per row and gallery item (float32
scores): 260 MiB against ICFG's 19,848 gallery images, 309 MiB peak in all (measured by
``benchmarks/eval_memory.py``); see :func:`retrieval_metrics`."""

CELLS = 2048
"""Cells between a row's lowest and highest positive score (two more hold the items below and
above), or the gallery size if smaller. More cells leave fewer items to order exactly but make the
histogram larger; any number gives the same metrics."""

MAX_POSITIVES_PER_BLOCK = 2**20
"""A block holds fewer query rows than ``chunk_size`` when their positives would exceed this
(queries with thousands of positives): per-positive tensors take ~100 bytes each."""

CANDIDATE_BATCH_ITEMS = 2**21
"""Padded entries of the exactly-ordered items handled at once, ~50 bytes each (100 MiB), however
many items share cells with positives (heavy ties)."""


@overload
def retrieval_metrics(
    similarity: torch.Tensor,
    query_pids: torch.Tensor | Sequence[int],
    gallery_pids: torch.Tensor | Sequence[int],
    chunk_size: int = ...,
    return_ranks: Literal[False] = ...,
) -> dict[str, float]: ...


@overload
def retrieval_metrics(
    similarity: torch.Tensor,
    query_pids: torch.Tensor | Sequence[int],
    gallery_pids: torch.Tensor | Sequence[int],
    chunk_size: int = ...,
    *,
    return_ranks: Literal[True],
) -> dict[str, float | torch.Tensor]: ...


@torch.no_grad()
def retrieval_metrics(
    similarity: torch.Tensor,
    query_pids: torch.Tensor | Sequence[int],
    gallery_pids: torch.Tensor | Sequence[int],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    return_ranks: bool = False,
) -> dict[str, float] | dict[str, float | torch.Tensor]:
    """R@1/5/10, mAP, mINP and rSum of ranking the gallery for every query, in percent.

    The definitions are IRRA's ``rank()``: each query ranks the whole gallery by descending
    similarity; a gallery item is relevant when its pid equals the query's. R@K is the share of
    queries with a relevant item among the first K; AP is the mean over relevant items of the
    precision at each one's rank; INP is ``num_relevant / (rank of the last relevant + 1)``.

    Differences from ``rank()``, all deliberate:

    - Ties are ordered deterministically, as a stable descending sort orders them: equal
      similarities keep gallery order (IRRA's unstable ``argsort`` leaves tie order to the backend).
    - Queries without any relevant gallery item make IRRA's mAP/mINP NaN; here they are left out of
      every average, counted in ``queries_without_positive`` and reported by a warning.
    - AP and INP are accumulated in float64 (IRRA: float32), so values agree to ~1e-6 relative.
    - A gallery smaller than K gives R@K = R@(gallery size) instead of an ``IndexError``.

    For image→text retrieval pass the transposed similarity with the pids swapped:
    ``retrieval_metrics(similarity.t(), image_pids, text_pids)``.

    Args:
        similarity: ``[N_q, N_g]`` floating-point query-gallery scores, higher is better, on any
            device; the computation stays on that device.
        query_pids: ``[N_q]`` identity of each query.
        gallery_pids: ``[N_g]`` identity of each gallery item.
        chunk_size: query rows processed at once; peak extra memory is about
            ``chunk_size * N_g * 13`` bytes for float32 scores (17 for float64), 4 more when the
            rows are not contiguous float32/float64 (a transposed matrix, float16, bfloat16), plus
            at most ~100 MiB for the items sharing a cell with a positive (:data:`CANDIDATE_BATCH_ITEMS`).
        return_ranks: also return ``first_positive_rank``, an int64 CPU tensor ``[N_q]`` holding
            the 0-based rank of each query's first relevant item (-1 where there is none).

    Returns:
        ``R1``, ``R5``, ``R10``, ``mAP``, ``mINP``, ``rSum`` (= R1 + R5 + R10) as Python floats in
        percent, ``num_queries`` (queries averaged over) and ``queries_without_positive``.

    Raises:
        ValueError: on mismatched or empty shapes, a non-floating-point similarity, a non-positive
            ``chunk_size``, NaN similarities, or when no query has a relevant gallery item.
    """
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be [N_q, N_g], got shape {tuple(similarity.shape)}")
    if not similarity.is_floating_point():
        raise ValueError(f"similarity must be floating point, got {similarity.dtype}; convert the scores with .float()")
    num_queries, num_gallery = similarity.shape
    device = similarity.device
    query_pids = torch.as_tensor(query_pids, device=device)
    gallery_pids = torch.as_tensor(gallery_pids, device=device)
    if query_pids.shape != (num_queries,) or gallery_pids.shape != (num_gallery,):
        raise ValueError(
            f"query_pids {tuple(query_pids.shape)} and gallery_pids {tuple(gallery_pids.shape)} must be "
            f"1-D with the similarity's {num_queries} rows and {num_gallery} columns"
        )
    if num_queries == 0 or num_gallery == 0:
        raise ValueError(f"similarity is empty (shape {tuple(similarity.shape)}): no queries or no gallery")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    pid_dtype = torch.promote_types(query_pids.dtype, gallery_pids.dtype)
    query_pids, gallery_pids = query_pids.to(pid_dtype).contiguous(), gallery_pids.to(pid_dtype)
    sorted_pids, by_pid = torch.sort(gallery_pids, stable=True)  # by_pid: gallery indices grouped by pid, ascending
    start = torch.searchsorted(sorted_pids, query_pids)  # each query's positives: by_pid[start : start + count]
    count = torch.searchsorted(sorted_pids, query_pids, right=True) - start
    ranges = _blocks(count, chunk_size)
    workspace = _Workspace.create(similarity, max(stop - first for first, stop in ranges))
    blocks = [
        _rank_block(similarity[first:stop], start[first:stop], count[first:stop], by_pid, workspace, first)
        for first, stop in ranges
    ]
    first_rank, last_rank, num_relevant, precision_sum = (torch.cat(parts) for parts in zip(*blocks))

    valid = num_relevant > 0
    used = int(valid.sum())
    skipped = num_queries - used
    if used == 0:
        raise ValueError(
            f"none of the {num_queries} queries has a gallery item with its pid; check that query and "
            "gallery pids come from the same split and id mapping"
        )
    if skipped:
        logger.warning(
            "%d of %d queries have no positive in the gallery and are left out of every metric "
            "(IRRA's rank() would return NaN)",
            skipped,
            num_queries,
        )

    relevant = num_relevant[valid].double()
    metrics: dict[str, float | torch.Tensor] = {
        f"R{k}": (first_rank[valid] < k).double().mean().item() * 100 for k in CMC_RANKS
    }
    metrics["mAP"] = (precision_sum[valid] / relevant).mean().item() * 100
    metrics["mINP"] = (relevant / (last_rank[valid] + 1).double()).mean().item() * 100
    metrics["rSum"] = sum(metrics[f"R{k}"] for k in CMC_RANKS)
    metrics["num_queries"] = used
    metrics["queries_without_positive"] = skipped
    if return_ranks:
        metrics["first_positive_rank"] = torch.where(valid, first_rank, -1).cpu()
    return metrics


def _blocks(num_relevant: torch.Tensor, chunk_size: int) -> list[tuple[int, int]]:
    """Consecutive query ranges of at most ``chunk_size`` rows and :data:`MAX_POSITIVES_PER_BLOCK`
    positives (but at least one row)."""
    ends = torch.cumsum(num_relevant.cpu(), 0)  # positives up to and including each query
    ranges = []
    start = 0
    while start < len(ends):
        before = int(ends[start - 1]) if start else 0
        stop = int(torch.searchsorted(ends, before + MAX_POSITIVES_PER_BLOCK, right=True))
        stop = max(start + 1, min(stop, start + chunk_size))
        ranges.append((start, stop))
        start = stop
    return ranges


@dataclass
class _Workspace:
    """Buffers for one block of query rows, allocated once and reused by every block: a fresh
    100 MB CPU tensor per block costs more in page faults than the arithmetic done on it."""

    values: torch.Tensor
    """``[c, N_g]`` float: the scores mapped to cell coordinates."""
    cells: torch.Tensor
    """``[c, N_g]`` int64: the cell of each score."""
    candidate: torch.Tensor
    """``[c, N_g]`` bool: the item shares its cell with a positive."""
    histogram: torch.Tensor
    """``[c, min(CELLS, N_g) + 2]`` int64 items per cell."""
    scores: torch.Tensor | None
    """``[c, N_g]`` float32 copy of the rows, when they are not contiguous float32/float64 (a
    transposed matrix, float16, bfloat16); ``None`` when the rows are used as they are."""

    @classmethod
    def create(cls, similarity: torch.Tensor, rows: int) -> _Workspace:
        num_gallery, device = similarity.shape[1], similarity.device
        dtype = torch.promote_types(similarity.dtype, torch.float32)  # float16/bfloat16 -> float32 is exact
        as_is = similarity.dtype == dtype and similarity.is_contiguous()
        return cls(
            values=torch.empty(rows, num_gallery, dtype=dtype, device=device),
            cells=torch.empty(rows, num_gallery, dtype=torch.int64, device=device),
            candidate=torch.empty(rows, num_gallery, dtype=torch.bool, device=device),
            histogram=torch.empty(rows, min(CELLS, num_gallery) + 2, dtype=torch.int64, device=device),
            scores=None if as_is else torch.empty(rows, num_gallery, dtype=dtype, device=device),
        )

    def scores_of(self, similarity: torch.Tensor) -> torch.Tensor:
        """The block's rows as contiguous float32/float64, copied into :attr:`scores` if need be."""
        if self.scores is None:
            return similarity
        return self.scores[: len(similarity)].copy_(similarity)


def _rank_block(
    similarity: torch.Tensor,
    start: torch.Tensor,
    num_relevant: torch.Tensor,
    by_pid: torch.Tensor,
    workspace: _Workspace,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query row: ranks of the first and last positive, positive count, and Σ precision@positive.

    The positives of row ``i`` are ``by_pid[start[i] : start[i] + num_relevant[i]]`` (gallery
    indices, ascending). ``offset`` is the block's first row, for error messages.
    """
    # A sum is NaN when any score is (or +inf meets -inf): a cheap read-only pass before the exact check.
    if torch.isnan(similarity.sum()) and torch.isnan(similarity).any():
        raise ValueError(
            f"similarity has NaN in query rows {offset}..{offset + len(similarity) - 1}; check the features "
            "(a zero vector normalised without eps gives NaN)"
        )
    num_rows, num_gallery = similarity.shape
    device = similarity.device
    rows = torch.repeat_interleave(torch.arange(num_rows, device=device), num_relevant)  # one entry per positive
    row_start = torch.cumsum(num_relevant, 0) - num_relevant  # index in `rows` of each row's first positive
    slot = torch.arange(len(rows), device=device) - row_start[rows]  # 0, 1, ... within each row
    index = by_pid[start[rows] + slot]  # gallery index of each positive, ascending within a row

    ranks = _positive_ranks(workspace.scores_of(similarity), rows, index, workspace) if len(rows) else rows
    # Rows ascending, ranks ascending within a row: the order a sort of each row would list them in.
    ranks = torch.sort(rows * num_gallery + ranks).values % num_gallery

    hits = slot + 1  # positives at or above each one
    precision_sum = torch.zeros(num_rows, dtype=torch.float64, device=device)
    precision_sum.index_add_(0, rows, hits.double() / (ranks + 1).double())

    has_positive = num_relevant > 0
    first = torch.zeros_like(num_relevant)
    last = torch.zeros_like(num_relevant)
    first[has_positive] = ranks[row_start[has_positive]]
    last[has_positive] = ranks[row_start[has_positive] + num_relevant[has_positive] - 1]
    return first, last, num_relevant, precision_sum


def _positive_ranks(
    scores: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, workspace: _Workspace
) -> torch.Tensor:
    """0-based rank of each positive ``(rows[i], index[i])`` in its row's stable descending order.

    A higher cell means a higher score and equal scores share a cell (:func:`_score_cells`). So the
    items in cells holding no positive rank before a positive exactly when their cell is higher:
    a histogram counts them. The rest, the candidates, share a cell with some positive; they are
    few, and :func:`_order_among_candidates` orders them exactly, ties included.
    """
    num_rows, num_gallery = scores.shape
    histogram = workspace.histogram[:num_rows].zero_()  # [c, cells + 2]
    values, cells = workspace.values[:num_rows], workspace.cells[:num_rows]
    cells = _score_cells(scores, rows, index, values, cells, histogram.shape[1])
    positive_cell = cells[rows, index]
    shared = torch.zeros_like(histogram, dtype=torch.bool)  # cells holding a positive
    shared[rows, positive_cell] = True
    histogram.scatter_add_(1, cells, torch.ones((), dtype=torch.int64, device=scores.device).expand_as(cells))
    histogram.masked_fill_(shared, 0)  # only the items of cells without a positive
    outside = histogram.sum(1, keepdim=True)  # [c, 1] items in cells without a positive
    candidates_per_row = num_gallery - outside.squeeze(1)
    in_higher_cells = histogram.cumsum(1).neg_().add_(outside)  # [c, cells + 2]
    candidate = torch.gather(shared, 1, cells, out=workspace.candidate[:num_rows])
    before = _order_among_candidates(scores, candidate, candidates_per_row, rows, index)
    return in_higher_cells[rows, positive_cell] + before


def _score_cells(
    scores: torch.Tensor,
    rows: torch.Tensor,
    index: torch.Tensor,
    values: torch.Tensor,
    cells: torch.Tensor,
    num_cells: int,
) -> torch.Tensor:
    """Bins each row's scores into ``num_cells`` cells, written to ``cells`` (``values`` is scratch).

    The map is ``clamp((score - origin) * scale, 0, num_cells - 1)`` truncated to an integer, with a
    finite ``origin`` and a finite positive ``scale`` per row: a subtraction, a multiplication and a
    clamp, separate operations each correctly rounded, so non-decreasing and the same for every
    element. Hence equal scores share a cell and a higher cell means a higher score, whatever
    ``origin`` and ``scale`` are. They only decide speed: the row's finite positive scores are spread
    over the cells, the lowest one in cell 1, so that few other items share a cell with a positive.
    """
    num_rows = len(scores)
    positive = scores[rows, index]
    finite = positive.isfinite()
    low = positive.new_full((num_rows,), torch.inf).scatter_reduce_(0, rows[finite], positive[finite], "amin")
    high = positive.new_full((num_rows,), -torch.inf).scatter_reduce_(0, rows[finite], positive[finite], "amax")
    none_finite = low > high
    low.masked_fill_(none_finite, 0)
    high.masked_fill_(none_finite, 0)
    # Cells no narrower than 2^-8 of the scores' magnitude: a single positive still gets a narrow cell.
    span = torch.maximum(high - low, torch.maximum(low.abs(), high.abs()) * 2**-8)
    inner = num_cells - 2  # between the lowest and the highest positive
    scale = inner / span
    scale = torch.where(scale.isfinite() & (scale > 0), scale, inner)  # span 0, infinite or subnormal
    origin = low - 1.5 / scale
    origin = torch.where(origin.isfinite(), origin, low)
    torch.sub(scores, origin.unsqueeze(1), out=values)
    values.mul_(scale.unsqueeze(1)).clamp_(0, num_cells - 1)  # ±inf scores land in the end cells
    return cells.copy_(values)  # truncation = floor for these non-negative coordinates


def _order_among_candidates(
    scores: torch.Tensor, candidate: torch.Tensor, per_row: torch.Tensor, rows: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """For each positive ``(rows[i], index[i])``, the candidates of its row that a stable descending
    sort puts before it: those scoring more, and those scoring the same at a smaller gallery index.

    ``candidate`` marks the candidates (every positive is one), ``per_row`` counts them. They are
    gathered in gallery order into a ``[rows, widest]`` block padded with -inf (sorted after every
    real entry, ties keeping the original order), at most :data:`CANDIDATE_BATCH_ITEMS` entries at a
    time, and sorted stably.
    """
    num_rows, num_gallery = scores.shape
    device = scores.device
    before = torch.empty_like(rows)
    rows_per_batch = max(1, CANDIDATE_BATCH_ITEMS // int(per_row.max()))
    for first in range(0, num_rows, rows_per_batch):
        selected = (rows >= first) & (rows < first + rows_per_batch)
        if not selected.any():
            continue
        counts = per_row[first : first + rows_per_batch]
        candidate_row, candidate_index = candidate[first : first + rows_per_batch].nonzero(as_tuple=True)  # row-major
        start = torch.cumsum(counts, 0) - counts
        slot = torch.arange(len(candidate_row), device=device) - start[candidate_row]
        values = scores.new_full((len(counts), int(counts.max())), -torch.inf)  # [b, widest]
        values[candidate_row, slot] = scores[first + candidate_row, candidate_index]
        by_score = torch.sort(values, dim=1, descending=True, stable=True).indices
        ascending = torch.arange(by_score.shape[1], device=device).expand_as(by_score)
        place = torch.empty_like(by_score).scatter_(1, by_score, ascending)  # place[r, slot]: position in the sort
        local = rows[selected] - first
        found = torch.searchsorted(candidate_row * num_gallery + candidate_index, local * num_gallery + index[selected])
        before[selected] = place[local, found - start[local]]
    return before
