"""Retrieval losses as pure functions of features and identity labels.

All losses take the *unnormalised* image and text features the encoders return and normalise
internally, so that callers never have to remember which side does it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SDM_EPSILON = 1e-8
"""Added inside the log of the label distribution; makes mass on negatives very expensive."""

LOSS_NAMES = ("sdm", "itc", "id", "mlm")
"""Losses a run can select (``train.losses``); their sum is the training loss (IRRA, paper Table X)."""
MLM_IGNORE_INDEX = 0
"""MLM label of unselected positions (spec B.4); the cross-entropy skips them."""


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast fp16/bf16 to fp32; fp32 and fp64 pass through (fp64 keeps equivalence tests exact)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _cosine_logits(image_features: torch.Tensor, text_features: torch.Tensor, temperature: float) -> torch.Tensor:
    """Text-to-image logits ``(1/τ) t̂ îᵀ`` in at least fp32, rows = texts."""
    image_features, text_features = at_least_fp32(image_features), at_least_fp32(text_features)
    image_unit = image_features / image_features.norm(dim=-1, keepdim=True)
    text_unit = text_features / text_features.norm(dim=-1, keepdim=True)
    return text_unit @ image_unit.t() / temperature


def _matching_kl(logits: torch.Tensor, label_distribution: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(logits) ‖ label_distribution) with the SDM epsilon."""
    log_probs = F.log_softmax(logits, dim=1)
    probs = log_probs.exp()
    return (probs * (log_probs - torch.log(label_distribution + SDM_EPSILON))).sum(dim=1).mean()


def sdm_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    pids: torch.Tensor,
    temperature: float = 0.02,
) -> torch.Tensor:
    """Similarity Distribution Matching (IRRA), the loss UP-Person and CSKT train with.

    Pairs ``(image_i, text_i)`` come from the same sample; every pair sharing a person id is a
    positive, so a row may have several positives.

    Args:
        image_features: ``[B, D]`` image features.
        text_features: ``[B, D]`` text features.
        pids: ``[B]`` person ids.
        temperature: τ; the official value 0.02 gives logit scale 50.

    Returns:
        Scalar ``KL_i2t + KL_t2i``.
    """
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError(
            f"sdm_loss expects image and text features of the same [B, D] shape, got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    pids = pids.reshape(-1, 1)
    labels = (pids == pids.t()).to(at_least_fp32(image_features).dtype)
    label_distribution = labels / labels.sum(dim=1, keepdim=True)
    t2i = _cosine_logits(image_features, text_features, temperature)
    return _matching_kl(t2i.t(), label_distribution) + _matching_kl(t2i, label_distribution)


def itc_loss(image_features: torch.Tensor, text_features: torch.Tensor, temperature: float = 0.02) -> torch.Tensor:
    """Symmetric InfoNCE with the diagonal as targets: ``(CE_i2t + CE_t2i) / 2``."""
    t2i = _cosine_logits(image_features, text_features, temperature)
    targets = torch.arange(t2i.shape[0], device=t2i.device)
    return (F.cross_entropy(t2i.t(), targets) + F.cross_entropy(t2i, targets)) / 2


def id_loss(image_logits: torch.Tensor, text_logits: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    """Identity classification on both modalities, ``(CE_image + CE_text) / 2`` (IRRA).

    The classifier itself (``embed_dim → #train ids``) belongs to the method, not to the loss.
    """
    return (F.cross_entropy(at_least_fp32(image_logits), pids) + F.cross_entropy(at_least_fp32(text_logits), pids)) / 2


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """IRRA's masked-language-modelling cross-entropy over the selected caption positions.

    Args:
        logits: ``[B, L, vocab]`` scores of the MLM head.
        labels: ``[B, L]`` original ids at selected positions, :data:`MLM_IGNORE_INDEX` elsewhere.
    """
    scores = at_least_fp32(logits).reshape(-1, logits.shape[-1])  # [B * L, vocab]
    return F.cross_entropy(scores, labels.reshape(-1), ignore_index=MLM_IGNORE_INDEX)
