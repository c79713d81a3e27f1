"""Batched feature extraction and retrieval evaluation of a model on a gallery/query split."""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from upperson.config import RunConfig
from upperson.data.datasets import ImageDataset, TextDataset, collate_skip_none
from upperson.data.records import EvalSplit
from upperson.data.transforms import build_transforms
from upperson.evaluation.metrics import retrieval_metrics
from upperson.methods import RetrievalModel
from upperson.runtime import Progress, SilentProgress, autocast, resolve_precision

logger = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(
    model: RetrievalModel,
    split: EvalSplit,
    device: torch.device,
    image_size: tuple[int, int],
    precision: str = "bf16",
    batch_size: int = 256,
    num_workers: int = 0,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """L2-normalised gallery image and query text features with their pids (gallery order kept).

    Returns:
        ``(image_features [Ng, D], image_pids [Ng], text_features [Nq, D], text_pids [Nq])``; images
        that cannot be read are dropped from the gallery with a warning.
    """
    progress = progress or SilentProgress
    was_training = model.training
    model.eval()
    images = ImageDataset(split.image_paths, split.image_pids, build_transforms(image_size, train=False))
    texts = TextDataset(split.captions, split.caption_pids)
    image_features, image_pids = _encode(
        DataLoader(images, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skip_none),
        lambda batch: model.encode_image(batch["images"].to(device)),
        device, precision, progress, "gallery images",
    )
    text_features, text_pids = _encode(
        DataLoader(texts, batch_size=batch_size, num_workers=0, collate_fn=collate_skip_none),
        lambda batch: model.encode_text(batch["caption_ids"].to(device)),
        device, precision, progress, "query captions",
    )
    model.train(was_training)
    if image_pids.numel() < len(split.image_paths):
        logger.warning("%d gallery images could not be read and were left out", len(split.image_paths) - image_pids.numel())
    return image_features, image_pids, text_features, text_pids


def _encode(
    loader: DataLoader,
    encode: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    device: torch.device,
    precision: str,
    progress: Progress,
    description: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    features, pids = [], []
    bar = progress(total=len(loader.dataset), desc=description, unit="item", leave=False)
    for batch in loader:
        if batch is None:
            continue
        with autocast(device, precision):
            features.append(F.normalize(encode(batch).float(), dim=-1))
        pids.append(batch["pids"])
        bar.update(len(batch["pids"]))
    bar.close()
    return torch.cat(features), torch.cat(pids).to(device)


def evaluate_split(
    model: RetrievalModel,
    split: EvalSplit,
    device: torch.device,
    image_size: tuple[int, int],
    precision: str = "bf16",
    batch_size: int = 256,
    num_workers: int = 0,
    chunk_size: int = 1024,
    i2t: bool = False,
    progress: Progress | None = None,
) -> dict[str, dict[str, float]]:
    """Text→image (and optionally image→text) R@1/5/10, mAP, mINP and rSum for one split."""
    image_features, image_pids, text_features, text_pids = extract_features(
        model, split, device, image_size, precision, batch_size, num_workers, progress
    )
    similarity = text_features @ image_features.t()  # [Nq, Ng] cosine similarities
    results = {"t2i": retrieval_metrics(similarity, text_pids, image_pids, chunk_size=chunk_size)}
    if i2t:
        results["i2t"] = retrieval_metrics(similarity.t(), image_pids, text_pids, chunk_size=chunk_size)
    return results


def evaluate_with_config(
    model: RetrievalModel,
    split: EvalSplit,
    config: RunConfig,
    device: torch.device,
    i2t: bool = False,
    progress: Progress | None = None,
) -> dict[str, dict[str, float]]:
    """:func:`evaluate_split` with the sizes, precision (resolved for ``device``) and loader settings of a run config."""
    return evaluate_split(
        model,
        split,
        device,
        config.data.image_size,
        precision=resolve_precision(config.train.precision, device),
        batch_size=config.eval.batch_size,
        num_workers=config.data.num_workers,
        chunk_size=config.eval.chunk_size,
        i2t=i2t,
        progress=progress,
    )
