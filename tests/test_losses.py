"""Losses against straightforward element-by-element formulas in float64."""

from __future__ import annotations

import math

import torch

from upperson.losses import id_loss, itc_loss, sdm_loss


def _brute_sdm(image: torch.Tensor, text: torch.Tensor, pids: list[int], tau: float) -> float:
    n = len(pids)
    def unit(rows: list[list[float]]) -> list[list[float]]:
        return [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in rows]

    image, text = unit(image.tolist()), unit(text.tolist())

    def kl(queries, keys) -> float:
        total = 0.0
        for i in range(n):
            logits = [sum(a * b for a, b in zip(queries[i], keys[j])) / tau for j in range(n)]
            top = max(logits)
            norm = sum(math.exp(v - top) for v in logits)
            positives = sum(1 for j in range(n) if pids[j] == pids[i])
            for j in range(n):
                p = math.exp(logits[j] - top) / norm
                q = (1.0 if pids[j] == pids[i] else 0.0) / positives
                total += p * (math.log(p) - math.log(q + 1e-8))
        return total / n

    return kl(image, text) + kl(text, image)


def test_sdm_matches_brute_force_with_repeated_ids() -> None:
    image, text = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    pids = [3, 1, 3, 2, 1, 3]
    expected = _brute_sdm(image, text, pids, 0.02)
    assert abs(sdm_loss(image, text, torch.tensor(pids)).item() - expected) < 1e-9 * max(1.0, expected)


def test_sdm_is_near_zero_for_perfect_unique_matches() -> None:
    features = torch.eye(4) * 3.0
    assert sdm_loss(features, features, torch.arange(4)).item() < 1e-3


def test_itc_matches_manual_cross_entropy() -> None:
    image, text = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    logits = (text / text.norm(dim=1, keepdim=True)) @ (image / image.norm(dim=1, keepdim=True)).t() * 50
    def ce(matrix: torch.Tensor) -> float:
        return sum(-(matrix[i, i] - torch.logsumexp(matrix[i], 0)).item() for i in range(5)) / 5
    expected = (ce(logits) + ce(logits.t())) / 2
    assert abs(itc_loss(image, text).item() - expected) < 1e-9


def test_id_loss_averages_both_modalities() -> None:
    image_logits, text_logits = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    pids = torch.tensor([0, 6, 2])
    def ce(logits: torch.Tensor) -> float:
        return sum((torch.logsumexp(logits[i], 0) - logits[i, pids[i]]).item() for i in range(3)) / 3
    assert abs(id_loss(image_logits, text_logits, pids).item() - (ce(image_logits) + ce(text_logits)) / 2) < 1e-9
