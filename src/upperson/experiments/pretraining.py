"""Contrastive pre-training of a small CLIP from scratch: the demo's stand-in for OpenAI's CLIP.

PETL methods adapt a backbone that already aligns images and text; a randomly initialised CLIP
does not, and UP-Person on one collapses to uniform similarities (SDM's minimum when nothing
discriminates). The built-in demo therefore first pre-trains the tiny CLIP (all weights, symmetric
InfoNCE, as CLIP itself was trained) on a separate synthetic corpus with its own identities, saves
it as an ordinary open_clip-layout safetensors checkpoint, and then loads that file as the frozen
backbone, exactly as a user loads ``ViT-B-16.pt``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from upperson._io import atomic_path
from upperson.backbone import load_backbone
from upperson.data import load_dataset
from upperson.data.datasets import ImageTextDataset, collate_skip_none
from upperson.data.synthetic import Scene, generate_synthetic_cuhk
from upperson.data.transforms import build_transforms
from upperson.losses import itc_loss
from upperson.methods.exact_shortcuts import clip_image_features, clip_text_features
from upperson.runtime import Progress, SilentProgress

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "tiny-clip-pretrained.safetensors"
MARKER_SUFFIX = ".json"


@dataclass(frozen=True)
class PretrainingSettings:
    """Everything that determines the pre-trained weights; the cache is keyed on all of it."""

    corpus_ids: int = 300
    """Identities in the pre-training corpus (4 images, 8 captions each)."""
    corpus_seed: int = 1
    """Generator seed of the corpus; the demo's target dataset uses seed 0 (other people)."""
    corpus_scene: Scene = "studio"
    """Plain backdrops and neutral light, while the target data are street scenes: a domain shift."""
    image_size: tuple[int, int] = (128, 48)
    epochs: int = 8
    batch_size: int = 64
    lr: float = 3e-4
    temperature: float = 0.02
    seed: int = 0


def pretrained_tiny_clip(cache_dir: str | Path, settings: PretrainingSettings = PretrainingSettings(), progress: Progress | None = None) -> Path:
    """Return a checkpoint of the tiny CLIP pre-trained with ``settings``, training it only if needed."""
    cache_dir = Path(cache_dir)
    checkpoint = cache_dir / CHECKPOINT_NAME
    marker = checkpoint.with_suffix(MARKER_SUFFIX)
    wanted = _marker_payload(settings)
    if checkpoint.is_file() and marker.is_file() and json.loads(marker.read_text()) == wanted:
        logger.info("reusing pre-trained tiny CLIP %s", checkpoint)
        return checkpoint
    corpus_root = cache_dir / "pretraining-corpus"
    generate_synthetic_cuhk(corpus_root, num_train_ids=settings.corpus_ids, num_val_ids=1, num_test_ids=1, seed=settings.corpus_seed, image_size=settings.image_size, scene=settings.corpus_scene)
    state = pretrain_tiny_clip(corpus_root, settings, progress)
    with atomic_path(checkpoint) as temporary:
        save_file(state, str(temporary), metadata={"upperson": "tiny CLIP pre-trained on a synthetic corpus"})
    with atomic_path(marker) as temporary:
        temporary.write_text(json.dumps(wanted, indent=2))
    logger.info("pre-trained tiny CLIP written to %s", checkpoint)
    return checkpoint


def pretrain_tiny_clip(corpus_root: Path, settings: PretrainingSettings, progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Train every weight of the seeded tiny CLIP with ITC on the corpus' train split; return its state dict."""
    progress = progress or SilentProgress
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        clip = load_backbone("tiny", settings.image_size).clip
        clip.requires_grad_(True)
        clip.logit_scale.requires_grad_(False)  # the temperature is fixed, as in the methods
        clip.train()
        samples = load_dataset("cuhk-pedes", corpus_root).train
        train_set = ImageTextDataset(samples, build_transforms(settings.image_size, train=True, augment=True), text_mask_prob=0.0, seed=settings.seed)
        # fused: one kernel over all tensors; the dense token-embedding update dominates this small model
        optimizer = torch.optim.AdamW([p for p in clip.parameters() if p.requires_grad], lr=settings.lr, weight_decay=0.0, fused=True)
        for epoch in range(settings.epochs):
            train_set.set_epoch(epoch)
            loader = DataLoader(
                train_set,
                batch_size=settings.batch_size,
                shuffle=True,
                drop_last=True,
                collate_fn=collate_skip_none,
                generator=torch.Generator().manual_seed(settings.seed * 1_000 + epoch),
            )
            bar = progress(total=len(loader), desc=f"pre-training tiny CLIP {epoch + 1}/{settings.epochs}", unit="batch")
            total = 0.0
            for batch in loader:
                image_features = clip_image_features(clip, batch["images"])
                text_features = clip_text_features(clip, batch["caption_ids"])
                loss = itc_loss(image_features, text_features, temperature=settings.temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item()
                bar.update(1)
                bar.set_postfix(itc=f"{loss.item():.3f}")
            bar.close()
            logger.info("pre-training epoch %d: ITC %.4f", epoch + 1, total / max(1, len(loader)))
    return {name: tensor.detach().contiguous() for name, tensor in clip.state_dict().items()}


def _marker_payload(settings: PretrainingSettings) -> dict[str, object]:
    payload = asdict(settings)
    payload["image_size"] = list(settings.image_size)
    payload["torch"] = torch.__version__.split("+")[0]
    return payload
