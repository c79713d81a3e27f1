"""Retrieval metrics (R@K, mAP, mINP) with IRRA's ``rank()`` semantics, computed in query chunks.

IRRA argsorts the whole ``[N_q, N_g]`` similarity at once (ICFG-PEDES: 19,848² int64 indices, 3.2 GB;
12.4 GiB at its peak with the gathered pids, cumulative sums and precision matrices, measured by
``benchmarks/eval_memory.py``). Every metric is a per-query
quantity, so ranking a block of query rows at a time gives the same numbers with memory bounded by
the block, and only the ranks of the positives are kept after each block.
"""

from __future__ import annotations

import logging
from typing import Literal, Sequence, overload

import torch

logger = logging.getLogger(__name__)

CMC_RANKS = (1, 5, 10)
"""The R@K cut-offs the papers report (IRRA's ``cmc[0]``, ``cmc[4]``, ``cmc[9]``)."""

DEFAULT_CHUNK_SIZE = 1024
"""Query rows ranked at once. The sort's values and int64 indices, about (itemsize + 8) bytes per row
and gallery item, are the peak: 233 MiB for float32 against ICFG's 19,848 gallery images."""


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

    - Ties are ordered deterministically: a stable descending sort, so equal similarities keep
      gallery order (IRRA's unstable ``argsort`` leaves tie order to the backend).
    - Queries without any relevant gallery item make IRRA's mAP/mINP NaN; here they are left out of
      every average, counted in ``queries_without_positive`` and reported by a warning.
    - AP and INP are accumulated in float64 (IRRA: float32), so values agree to ~1e-6 relative.
    - A gallery smaller than K gives R@K = R@(gallery size) instead of an ``IndexError``.

    For image→text retrieval pass the transposed similarity with the pids swapped:
    ``retrieval_metrics(similarity.t(), image_pids, text_pids)``.

    Args:
        similarity: ``[N_q, N_g]`` query-gallery scores, higher is better, on any device; the
            computation stays on that device.
        query_pids: ``[N_q]`` identity of each query.
        gallery_pids: ``[N_g]`` identity of each gallery item.
        chunk_size: query rows ranked at once; peak extra memory is about
            ``chunk_size * N_g * (itemsize + 8)`` bytes.
        return_ranks: also return ``first_positive_rank``, an int64 CPU tensor ``[N_q]`` holding
            the 0-based rank of each query's first relevant item (-1 where there is none).

    Returns:
        ``R1``, ``R5``, ``R10``, ``mAP``, ``mINP``, ``rSum`` (= R1 + R5 + R10) as Python floats in
        percent, ``num_queries`` (queries averaged over) and ``queries_without_positive``.

    Raises:
        ValueError: on mismatched or empty shapes, a non-positive ``chunk_size``, NaN similarities,
            or when no query has a relevant gallery item.
    """
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be [N_q, N_g], got shape {tuple(similarity.shape)}")
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

    blocks = [
        _rank_block(similarity[start : start + chunk_size], query_pids[start : start + chunk_size], gallery_pids, start)
        for start in range(0, num_queries, chunk_size)
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


def _rank_block(
    similarity: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor, offset: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query row: ranks of the first and last positive, positive count, and Σ precision@positive.

    Only the ranks of positives matter to every metric, so the sorted block is reduced to them here
    and freed before the next block. ``offset`` is the block's first row, for error messages.
    """
    if torch.isnan(similarity).any():
        raise ValueError(
            f"similarity has NaN in query rows {offset}..{offset + len(similarity) - 1}; check the features "
            "(a zero vector normalised without eps gives NaN)"
        )
    order = torch.sort(similarity, dim=1, descending=True, stable=True).indices  # [c, N_g] gallery index at each rank
    relevant = gallery_pids.unsqueeze(0) == query_pids.unsqueeze(1)  # [c, N_g] in gallery order
    matches = torch.gather(relevant, 1, order)  # [c, N_g] in rank order
    del order
    num_relevant = relevant.sum(1)  # [c]
    rows, ranks = matches.nonzero(as_tuple=True)  # one entry per positive, row-major so ranks ascend per row
    del matches, relevant

    row_start = torch.cumsum(num_relevant, 0) - num_relevant  # index in `ranks` of each row's first positive
    hits = torch.arange(1, len(ranks) + 1, device=ranks.device) - row_start[rows]  # positives at or above each one
    precision_sum = torch.zeros(len(num_relevant), dtype=torch.float64, device=ranks.device)
    precision_sum.index_add_(0, rows, hits.double() / (ranks + 1).double())

    has_positive = num_relevant > 0
    first = torch.zeros_like(num_relevant)
    last = torch.zeros_like(num_relevant)
    first[has_positive] = ranks[row_start[has_positive]]
    last[has_positive] = ranks[row_start[has_positive] + num_relevant[has_positive] - 1]
    return first, last, num_relevant, precision_sum
