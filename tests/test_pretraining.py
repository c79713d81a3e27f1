"""The demo's tiny-CLIP pre-training: it aligns the corpus, writes a loadable checkpoint, and caches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import upperson
from upperson.experiments import pretraining
from upperson.backbone import load_backbone
from upperson.data import load_dataset
from upperson.data.datasets import ImageTextDataset, collate_skip_none
from upperson.data.transforms import build_transforms
from upperson.losses import itc_loss
from upperson.experiments.pretraining import PretrainingSettings, pretrained_tiny_clip

SETTINGS = PretrainingSettings(corpus_ids=8, image_size=(64, 32), epochs=6, batch_size=16, lr=1e-3)


def corpus_itc(checkpoint: str, corpus_root: Path) -> float:
    """ITC of one fixed batch of the corpus under the given backbone."""
    clip = load_backbone(checkpoint, SETTINGS.image_size).clip
    samples = load_dataset("cuhk-pedes", corpus_root).train[::4][:16]
    data = ImageTextDataset(samples, build_transforms(SETTINGS.image_size, train=False, augment=False), text_mask_prob=0.0)
    batch = collate_skip_none([data[i] for i in range(len(samples))])
    with torch.no_grad():
        return itc_loss(clip.encode_image(batch["images"]), clip.encode_text(batch["caption_ids"])).item()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pretrained_tiny_clip(tmp_path_factory.mktemp("pretrain"), SETTINGS)


def test_pretraining_aligns_the_corpus_and_is_loadable_as_a_backbone(checkpoint: Path) -> None:
    corpus = checkpoint.parent / "pretraining-corpus"
    assert corpus_itc(str(checkpoint), corpus) < 0.6 * corpus_itc("tiny", corpus)
    model = upperson.create_model("up-person", backbone=str(checkpoint), image_size=SETTINGS.image_size, prefix_length=2, lora_rank=2)
    trained = load_backbone(str(checkpoint), SETTINGS.image_size).clip.state_dict()
    for name, tensor in model.backbone_state_dict().items():
        torch.testing.assert_close(tensor, trained[name], rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.backbone_state_dict().values())


def test_cached_checkpoint_is_reused_and_other_settings_retrain(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_train(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached checkpoint should have been reused")

    monkeypatch.setattr(pretraining, "pretrain_tiny_clip", must_not_train)
    assert pretrained_tiny_clip(checkpoint.parent, SETTINGS) == checkpoint
    with pytest.raises(AssertionError, match="reused"):
        pretrained_tiny_clip(checkpoint.parent, PretrainingSettings(**{**SETTINGS.__dict__, "epochs": 1}))
