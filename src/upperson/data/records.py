"""What a dataset reader produces: training samples, evaluation splits and data problems.

Every reader, whatever its on-disk format, returns the same `RetrievalDataset`, so training,
evaluation and the data check never look at json files themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

EVAL_SPLITS = ("val", "test")


class MissingSplitError(LookupError):
    """The dataset has no such evaluation split (ICFG-PEDES has no val, for example)."""


@dataclass(frozen=True, slots=True)
class TrainSample:
    """One caption of one training image (one sample per caption, as in the official code)."""

    pid: int
    """Identity label, contiguous in ``0..num_train_ids - 1``."""
    image_id: int
    """Running index of the image record the caption belongs to."""
    image_path: Path
    """Absolute path of the image file."""
    caption: str
    """Raw caption text (tokenised later)."""


@dataclass(frozen=True)
class EvalSplit:
    """A gallery of images and one query per caption; a query's positives share its pid."""

    image_paths: list[Path]
    """Absolute gallery image paths."""
    image_pids: list[int]
    """Identity of each gallery image (raw dataset ids; only equality matters)."""
    captions: list[str]
    """Query captions."""
    caption_pids: list[int]
    """Identity of each query (the pid of the image it describes)."""

    def __post_init__(self) -> None:
        if len(self.image_paths) != len(self.image_pids):
            raise ValueError(f"EvalSplit: {len(self.image_paths)} image_paths but {len(self.image_pids)} image_pids")
        if len(self.captions) != len(self.caption_pids):
            raise ValueError(f"EvalSplit: {len(self.captions)} captions but {len(self.caption_pids)} caption_pids")


@dataclass
class RetrievalDataset:
    """A text-image retrieval dataset read from disk: training samples plus val/test splits."""

    name: str
    """Registry name, e.g. ``cuhk-pedes``."""
    root: Path
    """Absolute dataset directory (the folder holding the annotation file)."""
    train: list[TrainSample]
    """Training samples, one per caption."""
    splits: dict[str, EvalSplit]
    """Evaluation splits that have data, by name (``val``, ``test``)."""
    annotation_files: tuple[Path, ...] = ()
    """The json files the dataset was read from."""
    num_train_ids: int = field(init=False)
    """Number of training identities (size of an identity classifier)."""

    def __post_init__(self) -> None:
        pids = {sample.pid for sample in self.train}
        if pids != set(range(len(pids))):
            raise ValueError(f"{self.name}: training pids must be exactly 0..N-1; got {len(pids)} ids up to {max(pids)}")
        self.num_train_ids = len(pids)

    def split(self, name: str) -> EvalSplit:
        """The evaluation split ``name``; raises `MissingSplitError` naming the splits that exist."""
        if name == "train":
            raise MissingSplitError(f"{self.name}: 'train' is not an evaluation split; use dataset.train for training samples")
        if name not in self.splits:
            available = ", ".join(repr(split) for split in self.splits) or "none"
            raise MissingSplitError(
                f"{self.name} at {self.root} has no {name!r} split (available: {available}); "
                f"choose one of those, e.g. evaluate or select the model on 'test' or on the last epoch"
            )
        return self.splits[name]


ProblemKind = Literal[
    "missing_annotation",
    "malformed_file",
    "malformed_record",
    "unknown_split",
    "empty_split",
    "missing_image",
    "unreadable_image",
    "empty_caption",
    "truncated_image",
    "missing_split",
    "duplicate_image",
    "shared_identity",
    "single_image_identity",
]

PROBLEM_TITLES: dict[ProblemKind, str] = {
    "missing_annotation": "missing annotation file",
    "malformed_file": "malformed annotation file",
    "malformed_record": "malformed record",
    "unknown_split": "unknown split value",
    "empty_split": "split without samples",
    "missing_image": "missing image file",
    "unreadable_image": "unreadable or corrupt image",
    "empty_caption": "empty caption (left out)",
    "truncated_image": "truncated image (loads with its missing part filled, like the official code)",
    "missing_split": "split without data (model selection falls back to the last epoch)",
    "duplicate_image": "image of several records",
    "shared_identity": "identity in several splits",
    "single_image_identity": "identity with a single image",
}
"""Human-readable heading of each problem kind, in the order reports list them."""

WARNING_KINDS: frozenset[ProblemKind] = frozenset(
    {"empty_caption", "truncated_image", "missing_split", "duplicate_image", "shared_identity", "single_image_identity"}
)
"""Kinds that do not break training; every other kind does."""


@dataclass(frozen=True)
class Problem:
    """Something wrong with a dataset on disk, phrased so that the fix is obvious."""

    kind: ProblemKind
    """What went wrong; decides whether training would break."""
    message: str
    """Names the file, the record index and the field where there is one."""

    @property
    def fatal(self) -> bool:
        """Whether training or evaluation would break on it."""
        return self.kind not in WARNING_KINDS
