"""torch Datasets over a `RetrievalDataset`, and the collate function that skips unreadable images.

An image that cannot be read mid-run (deleted, corrupted on a network disk) must neither crash a
60-epoch run nor hang it (the official code retries forever): ``__getitem__`` logs a warning
naming the file, once per process, and returns ``None``; `collate_skip_none` drops those items.
Run the data check before training to catch such files up front.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset, default_collate

from upperson.data.masking import MLM_MASK_PROB, mask_caption_tokens_with_labels
from upperson.data.records import TrainSample
from upperson.tokenizer import CONTEXT_LENGTH, tokenize

logger = logging.getLogger(__name__)

IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
"""What PIL raises for missing, corrupt or hostile image files."""

_truncation_lock = threading.Lock()


def read_image(path: str | Path) -> Image.Image:
    """Open ``path`` as 8-bit RGB (see `to_rgb`). Truncated files load with their missing part
    filled, as the official code loads them (``LOAD_TRUNCATED_IMAGES``); anything else unreadable
    raises, decompression bombs (``Image.MAX_IMAGE_PIXELS``) included."""
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except OSError as error:
        if "truncated" not in str(error):
            raise
    with _truncation_lock:
        previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, True
        try:
            with Image.open(path) as image:
                return to_rgb(image)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


_INTEGER_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
"""Grey modes with more than 8 bits, which ``convert("RGB")`` clips to white instead of scaling."""


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of an image of any PIL mode, grey levels scaled to 8 bits by the image's bit depth.

    - ``I;16*``: ``value >> 8``; ``I``: ``value >> (bits - 8)`` with the bit depth the file
      declares (TIFF ``BitsPerSample``, one less when signed; 16 for PNG, which older Pillow
      opens as ``I``; else 31), negatives black.
    - ``F``: intensities in [0, 1] when every value is (the float-image convention), else on the
      0..255 scale; clipped, NaN black.
    - Alpha (``RGBA``, ``LA``, ``PA``, ``P`` with transparency) is dropped: each pixel keeps its
      stored colour, as ``convert("RGB")`` and the official code do.
    - Everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ...) converts with Pillow.
    """
    if image.mode in _INTEGER_MODES:
        values = np.asarray(image).astype(np.int64)
        grey = np.right_shift(values.clip(min=0), _integer_bit_depth(image) - 8).clip(max=255)
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        return Image.fromarray(np.rint(values * scale).clip(0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        return image.convert("RGBA").convert("RGB")  # direct conversion warns about transparency
    return image.convert("RGB")


def _integer_bit_depth(image: Image.Image) -> int:
    """Bits of the non-negative grey levels of an ``I``/``I;16*`` image (at least 8)."""
    if image.mode.startswith("I;16") or image.format == "PNG":
        return 16
    tags = getattr(image, "tag_v2", {})
    bits, sample_format = _first(tags.get(258)), _first(tags.get(339))  # TIFF BitsPerSample, SampleFormat
    if bits is None:
        return 31
    return max(8, int(bits) - (1 if sample_format == 2 else 0))  # SampleFormat 2: signed


def _first(value: Any) -> Any:
    """A TIFF tag's first value (Pillow gives multi-sample tags as tuples)."""
    return value[0] if isinstance(value, tuple) else value


class _ImageReader:
    """Reads images, warning once per file (per process) about those that cannot be read."""

    def __init__(self) -> None:
        self.failed: set[Path] = set()

    def __call__(self, path: Path) -> Image.Image | None:
        try:
            return read_image(path)
        except IMAGE_ERRORS as error:
            if path not in self.failed:
                self.failed.add(path)
                logger.warning("skipping unreadable image %s (%s); run `upperson data check` to list all such files", path, error)
            return None


def collate_skip_none(batch: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Default collation after dropping the ``None`` items of unreadable images.

    Returns ``None`` when every item was dropped; training and evaluation loops skip such batches.
    """
    kept = [item for item in batch if item is not None]
    return default_collate(kept) if kept else None


class ImageTextDataset(Dataset):
    """Training pairs ``{"images", "caption_ids", "pids", "image_ids"}``, one per caption.

    With ``text_mask_prob > 0`` the caption ids are masked (spec B.4). The masking draws come from
    an RNG seeded by ``(seed, epoch, index)``, so an item is the same in any worker and on resume;
    so do the image augmentation's (torch's generator, forked and reseeded per item), so an item is
    also the same in any process of a multi-process run.
    Call `set_epoch` before creating the epoch's iterator: workers copy the dataset when the
    iterator starts (with ``persistent_workers`` they would keep the old epoch).

    With ``mlm=True`` items also hold ``mlm_ids`` and ``mlm_labels`` for the MLM loss. As in the
    official code (UP-Person sets ``caption_ids = mlm_tokens``; IRRA masks both through shared
    memory) they come from the same draw as the masked ``caption_ids``; with caption masking off,
    ``caption_ids`` stay clean and the MLM gets its own draw at the official 15 %.
    """

    def __init__(
        self,
        samples: Sequence[TrainSample],
        transform: Callable[[Image.Image], torch.Tensor],
        text_mask_prob: float = 0.0,
        seed: int = 0,
        mlm: bool = False,
    ) -> None:
        if not 0.0 <= text_mask_prob <= 1.0:
            raise ValueError(f"text_mask_prob must be in [0, 1], got {text_mask_prob}")
        self.samples = list(samples)
        self.transform = transform
        self.text_mask_prob = text_mask_prob
        self.seed = seed
        self.mlm = mlm
        self.epoch = 0
        self._read = _ImageReader()
        self._caption_ids: dict[int, torch.Tensor] = {}
        """Tokenised captions by index: the BPE is the same every epoch and costs as much as reading a
        small image, so each process tokenises a caption once (77 ids, 616 bytes each)."""

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose masking draws `__getitem__` makes."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        sample = self.samples[index]
        image = self._read(sample.image_path)
        if image is None:
            return None
        caption_ids = self._caption_ids.get(index)
        if caption_ids is None:
            caption_ids = self._caption_ids[index] = tokenize(sample.caption)[0]
        item: dict[str, Any] = {}
        if self.text_mask_prob > 0 or self.mlm:
            rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
            prob = self.text_mask_prob if self.text_mask_prob > 0 else MLM_MASK_PROB
            masked_ids, labels = mask_caption_tokens_with_labels(caption_ids, rng, prob)
            if self.text_mask_prob > 0:
                caption_ids = masked_ids
            if self.mlm:
                item = {"mlm_ids": masked_ids, "mlm_labels": labels}
        with torch.random.fork_rng(devices=[]):  # augmentation keyed on the sample, not on the process
            torch.manual_seed(random.Random(f"augment:{self.seed}:{self.epoch}:{index}").getrandbits(63))
            pixels = self.transform(image)
        return {"images": pixels, "caption_ids": caption_ids, "pids": sample.pid, "image_ids": sample.image_id, **item}


class ImageDataset(Dataset):
    """Gallery images ``{"images", "pids"}`` for feature extraction."""

    def __init__(self, paths: Sequence[Path], pids: Sequence[int], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        if len(paths) != len(pids):
            raise ValueError(f"ImageDataset: {len(paths)} paths but {len(pids)} pids")
        self.paths = [Path(path) for path in paths]
        self.pids = list(pids)
        self.transform = transform
        self._read = _ImageReader()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        image = self._read(self.paths[index])
        if image is None:
            return None
        return {"images": self.transform(image), "pids": self.pids[index]}


class TextDataset(Dataset):
    """Query captions ``{"caption_ids", "pids"}``, tokenised once up front in batches."""

    TOKENIZE_BATCH = 4096

    def __init__(self, captions: Sequence[str], pids: Sequence[int]) -> None:
        if len(captions) != len(pids):
            raise ValueError(f"TextDataset: {len(captions)} captions but {len(pids)} pids")
        captions = list(captions)
        chunks = [tokenize(captions[start : start + self.TOKENIZE_BATCH]) for start in range(0, len(captions), self.TOKENIZE_BATCH)]
        self.caption_ids = torch.cat(chunks) if chunks else torch.zeros(0, CONTEXT_LENGTH, dtype=torch.long)
        self.pids = list(pids)

    def __len__(self) -> int:
        return len(self.pids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"caption_ids": self.caption_ids[index], "pids": self.pids[index]}
