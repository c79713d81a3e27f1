"""Image transforms (spec B.5), caption masking (B.4) and the torch datasets built on them."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import upperson
from upperson.data import (
    CLIP_MEAN,
    CLIP_STD,
    ImageDataset,
    ImageTextDataset,
    TextDataset,
    TrainSample,
    build_transforms,
    collate_skip_none,
    mask_caption_tokens,
)
from upperson.tokenizer import EOT_TOKEN_ID, MASK_TOKEN_ID, SOT_TOKEN_ID


def fixed_image(size: tuple[int, int] = (50, 130)) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("train,augment", [(False, True), (True, True), (True, False)])
def test_output_shape(train: bool, augment: bool) -> None:
    out = build_transforms((384, 128), train=train, augment=augment)(fixed_image())
    assert out.shape == (3, 384, 128) and out.dtype == torch.float32


def test_test_transform_equals_explicit_resize_and_normalise() -> None:
    image = fixed_image()
    expected = np.asarray(image.resize((128, 384), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    expected = (torch.from_numpy(expected).permute(2, 0, 1) - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    torch.testing.assert_close(build_transforms((384, 128), train=False)(image), expected, rtol=0, atol=1e-6)


def test_train_pipeline_order_and_parameters() -> None:
    steps = build_transforms((384, 128), train=True).transforms
    assert [type(step) for step in steps] == [
        v2.Resize, v2.RandomHorizontalFlip, v2.Pad, v2.RandomCrop, v2.ToImage, v2.ToDtype, v2.Normalize, v2.RandomErasing,
    ]
    pad, crop, erasing = steps[2], steps[3], steps[7]
    assert (pad.padding, pad.fill, pad.padding_mode) == (10, 0, "constant")
    assert tuple(crop.size) == (384, 128)
    assert (erasing.p, erasing.scale, erasing.ratio) == (0.5, (0.02, 0.4), (0.3, 3.3))
    assert erasing.value == list(CLIP_MEAN)
    assert [type(step) for step in build_transforms((384, 128), train=True, augment=False).transforms] == [
        v2.Resize, v2.RandomHorizontalFlip, v2.ToImage, v2.ToDtype, v2.Normalize,
    ]


def test_erasing_fills_with_the_raw_clip_mean_after_normalisation() -> None:
    white = Image.new("RGB", (128, 384), (255, 255, 255))
    transform = build_transforms((384, 128), train=True, erasing_prob=1.0)
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    black = (-torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD))[:, None, None]
    white_value = ((1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))[:, None, None]
    for seed in range(5):
        torch.manual_seed(seed)
        out = transform(white)
        erased = (out == mean).all(dim=0)
        area = erased.float().mean().item()
        assert 0.015 < area <= 0.41
        rows, cols = erased.nonzero(as_tuple=True)
        assert erased[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()  # one rectangle
        rest = out[:, ~erased]
        is_white = torch.isclose(rest, white_value[:, :, 0]).all(dim=0)
        is_pad = torch.isclose(rest, black[:, :, 0]).all(dim=0)
        assert (is_white | is_pad).all()


# --- masking --------------------------------------------------------------------------------


def reference_mask(tokens: list[int], rng: random.Random) -> tuple[list[int], list[str]]:
    """Spec B.4 written out independently; also returns what happened to each position."""
    out, actions, any_selected = list(tokens), ["none"] * len(tokens), False
    for i, token in enumerate(tokens):
        if 0 < token < 49405:
            u = rng.random()
            if u < 0.15:
                any_selected = True
                u /= 0.15
                if u < 0.8:
                    out[i], actions[i] = 49405, "mask"
                elif u < 0.9:
                    out[i], actions[i] = rng.choice(range(1, 49405)), "random"
                else:
                    actions[i] = "keep"
    if not any_selected:
        out[1], actions[1] = 49405, "forced"
    return out, actions


def synthetic_captions(count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    ids = torch.zeros(count, 77, dtype=torch.long)
    for row in range(count):
        length = int(torch.randint(5, 60, (1,), generator=generator))
        ids[row, 0] = SOT_TOKEN_ID
        ids[row, 1 : length + 1] = torch.randint(1, 49405, (length,), generator=generator)
        ids[row, length + 1] = EOT_TOKEN_ID
    ids[::7, 3] = MASK_TOKEN_ID  # an existing mask token is not a candidate
    ids[::5, 4] = 0  # "!" shares id 0 with padding and is never touched
    return ids


def test_masking_matches_the_reference_draw_for_draw() -> None:
    captions = synthetic_captions(300)
    for row, ids in enumerate(captions):
        ours = mask_caption_tokens(ids, random.Random(row))
        expected, _ = reference_mask(ids.tolist(), random.Random(row))
        assert ours.tolist() == expected


def test_masking_statistics_and_untouched_specials() -> None:
    captions = synthetic_captions(2000)
    counts = {"mask": 0, "random": 0, "keep": 0, "forced": 0}
    candidates = 0
    for row, ids in enumerate(captions):
        original = ids.clone()
        masked = mask_caption_tokens(ids, random.Random(10_000 + row))
        assert torch.equal(ids, original)  # never in place
        special = (ids == 0) | (ids >= MASK_TOKEN_ID)
        assert torch.equal(masked[special], ids[special])
        candidates += int((~special).sum())
        _, actions = reference_mask(ids.tolist(), random.Random(10_000 + row))
        for action in actions:
            if action in counts:
                counts[action] += 1
        changed = masked != ids
        assert ((masked[changed] == MASK_TOKEN_ID) | ((masked[changed] > 0) & (masked[changed] < MASK_TOKEN_ID))).all()
    selected = counts["mask"] + counts["random"] + counts["keep"]
    assert abs(selected / candidates - 0.15) < 0.01
    assert abs(counts["mask"] / selected - 0.8) < 0.02
    assert abs(counts["random"] / selected - 0.1) < 0.015
    assert abs(counts["keep"] / selected - 0.1) < 0.015


def test_masking_forces_position_one_when_nothing_is_selected() -> None:
    ids = upperson.tokenize("a man in a red coat")[0]
    masked = mask_caption_tokens(ids, random.Random(0), prob=0.0)
    assert masked[1] == MASK_TOKEN_ID
    assert torch.equal(masked[2:], ids[2:]) and masked[0] == SOT_TOKEN_ID


# --- datasets -------------------------------------------------------------------------------


def make_samples(tmp_path: Path, count: int = 4) -> list[TrainSample]:
    samples = []
    for index in range(count):
        path = tmp_path / f"{index}.jpg"
        Image.new("RGB", (16, 32), (index * 40, 0, 0)).save(path)
        samples.append(TrainSample(index % 2, index, path, f"person number {index} wearing a long red coat and black shoes"))
    return samples


def test_image_text_items_and_deterministic_masking(tmp_path: Path) -> None:
    samples = make_samples(tmp_path)
    transform = build_transforms((32, 16), train=False)
    clean = ImageTextDataset(samples, transform)[2]
    assert set(clean) == {"images", "caption_ids", "pids", "image_ids"}
    assert torch.equal(clean["caption_ids"], upperson.tokenize(samples[2].caption)[0])
    assert (clean["pids"], clean["image_ids"], clean["images"].shape) == (0, 2, (3, 32, 16))

    first, second = ImageTextDataset(samples, transform, 0.5, seed=1), ImageTextDataset(samples, transform, 0.5, seed=1)
    assert all(torch.equal(first[i]["caption_ids"], second[i]["caption_ids"]) for i in range(4))
    epoch0 = [first[i]["caption_ids"] for i in range(4)]
    first.set_epoch(1)
    assert any(not torch.equal(first[i]["caption_ids"], epoch0[i]) for i in range(4))
    first.set_epoch(0)
    assert all(torch.equal(first[i]["caption_ids"], epoch0[i]) for i in range(4))
    assert any((epoch == MASK_TOKEN_ID).any() for epoch in epoch0)


def test_unreadable_image_is_skipped_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    samples = make_samples(tmp_path)
    samples[1].image_path.write_bytes(b"garbage")
    dataset = ImageTextDataset(samples, build_transforms((32, 16), train=False))
    with caplog.at_level(logging.WARNING, logger="upperson.data"):
        assert dataset[1] is None and dataset[1] is None
    warnings = [r for r in caplog.records if "unreadable image" in r.getMessage()]
    assert len(warnings) == 1 and str(samples[1].image_path) in warnings[0].getMessage()
    batch = collate_skip_none([dataset[i] for i in range(4)])
    assert batch["pids"].tolist() == [0, 0, 1] and batch["images"].shape == (3, 3, 32, 16)
    assert collate_skip_none([None, None]) is None

    gallery = ImageDataset([s.image_path for s in samples], [7, 8, 9, 10], build_transforms((32, 16), train=False))
    batch = collate_skip_none([gallery[i] for i in range(4)])
    assert batch["pids"].tolist() == [7, 9, 10]


def test_text_dataset_tokenises_up_front() -> None:
    captions = ["a man", "a woman in red", "a child with a kite"]
    dataset = TextDataset(captions, [3, 4, 5])
    batch = collate_skip_none([dataset[i] for i in range(3)])
    assert torch.equal(batch["caption_ids"], upperson.tokenize(captions))
    assert batch["pids"].tolist() == [3, 4, 5]
