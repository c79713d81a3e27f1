"""Caption token masking, the text augmentation UP-Person trains SDM with (spec B.4, C.16)."""

from __future__ import annotations

import random

import torch

from upperson.tokenizer import MASK_TOKEN_ID

MASK_BELOW = 0.8
"""A selected token with ``u / prob`` below this becomes ``<|mask|>`` (80 %)..."""
RANDOM_BELOW = 0.9
"""...below this a random ordinary token (10 %); the remaining 10 % are kept."""


MLM_MASK_PROB = 0.15
"""The MLM selection rate, hard-coded in the official code (``--masked_token_rate`` is unused)."""


def mask_caption_tokens(ids: torch.Tensor, rng: random.Random, prob: float = 0.15) -> torch.Tensor:
    """A masked copy of one tokenised caption, exactly as the official MLM augmentation draws it.

    Every id in ``(0, MASK_TOKEN_ID)`` is a candidate (padding and ``"!"`` share id 0 and are never
    touched, nor are SOT/EOT/mask). Each candidate draws ``u = rng.random()``; ``u < prob`` selects
    it, and ``u / prob`` picks mask (< 0.8), a random id in ``1..MASK_TOKEN_ID - 1`` (< 0.9), or
    keep. If nothing was selected, position 1 (the first word) is masked so every caption changes.

    Args:
        ids: ``[L]`` token ids; left unchanged.
        rng: source of all draws, so a caption's masking is reproducible from its seed.
        prob: selection probability per candidate.

    Returns:
        New ``[L]`` LongTensor.
    """
    return mask_caption_tokens_with_labels(ids, rng, prob)[0]


def mask_caption_tokens_with_labels(
    ids: torch.Tensor, rng: random.Random, prob: float = MLM_MASK_PROB
) -> tuple[torch.Tensor, torch.Tensor]:
    """`mask_caption_tokens` plus the MLM targets of the same draws (spec B.4).

    The draws are identical to `mask_caption_tokens` for the same ``rng`` state, so the masked
    caption SDM trains on and the one the MLM loss reconstructs can be one and the same.

    Returns:
        ``(masked_ids, labels)``, both ``[L]`` LongTensors; ``labels`` holds the original id at
        every selected position (also where the token was kept) and 0 elsewhere, the MLM
        cross-entropy's ``ignore_index``.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"mask probability must be in [0, 1], got {prob}")
    if ids.dim() != 1:
        raise ValueError(f"mask_caption_tokens expects one caption of shape [L], got {tuple(ids.shape)}")
    tokens = ids.tolist()
    labels = [0] * len(tokens)
    selected = False
    for position, token in enumerate(tokens):
        if not 0 < token < MASK_TOKEN_ID:
            continue
        u = rng.random()
        if u >= prob:
            continue
        selected = True
        labels[position] = token
        u /= prob
        if u < MASK_BELOW:
            tokens[position] = MASK_TOKEN_ID
        elif u < RANDOM_BELOW:
            tokens[position] = rng.randrange(1, MASK_TOKEN_ID)
    if not selected:
        labels[1] = tokens[1]
        tokens[1] = MASK_TOKEN_ID
    return torch.tensor(tokens, dtype=torch.long), torch.tensor(labels, dtype=torch.long)
