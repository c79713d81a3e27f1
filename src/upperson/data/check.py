"""`check_dataset`: everything wrong with a dataset on disk, found before a long run trips on it."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from upperson.data.datasets import IMAGE_ERRORS, read_image
from upperson.data.readers import DatasetNotFoundError, get_reader
from upperson.data.records import PROBLEM_TITLES, Problem, ProblemKind, RetrievalDataset

logger = logging.getLogger(__name__)

PAPER_STATISTICS: dict[str, dict[str, tuple[int, int, int]]] = {
    "cuhk-pedes": {"train": (11_003, 34_054, 68_126), "val": (1_000, 3_078, 6_158), "test": (1_000, 3_074, 6_156)},
    "icfg-pedes": {"train": (3_102, 34_674, 34_674), "test": (1_000, 19_848, 19_848)},
    "rstpreid": {"train": (3_701, 18_505, 37_010), "val": (200, 1_000, 2_000), "test": (200, 1_000, 2_000)},
}
"""(ids, images, captions) per split as published (spec B.1); shown next to the counts found."""

SPLITS_WITH_VAL = {"cuhk-pedes", "rstpreid", "flickr30k", "mscoco"}


@dataclass(frozen=True)
class SplitSummary:
    """Counts of one split as read from disk."""

    split: str
    ids: int
    images: int
    captions: int


@dataclass
class DataReport:
    """Result of `check_dataset`: per-split counts and every problem found."""

    dataset: str
    """Registry name."""
    location: Path
    """Dataset directory (or the root given, when the annotation file was not found)."""
    splits: list[SplitSummary] = field(default_factory=list)
    """Counts per split, train first."""
    problems: list[Problem] = field(default_factory=list)
    """Errors and warnings, in the order they were found."""
    images_checked: int = 0
    """Distinct image files looked at."""
    images_decoded: bool = False
    """Whether images were opened and decoded, not only looked up."""

    @property
    def ok(self) -> bool:
        """False if anything would break training or evaluation."""
        return not any(problem.fatal for problem in self.problems)

    def format(self, max_per_kind: int = 10) -> str:
        """Human-readable report: a per-split table, then problems grouped by kind (capped lists)."""
        lines = [f"{self.dataset} at {self.location}"]
        if self.splits:
            paper = PAPER_STATISTICS.get(self.dataset, {})
            lines.append(f"  {'split':<6} {'ids':>9} {'images':>9} {'captions':>9}   {'published (ids/images/captions)' if paper else ''}".rstrip())
            for row in self.splits:
                expected = paper.get(row.split)
                note = ""
                if expected:
                    note = "matches" if expected == (row.ids, row.images, row.captions) else "/".join(f"{n:,}" for n in expected)
                lines.append(f"  {row.split:<6} {row.ids:>9,} {row.images:>9,} {row.captions:>9,}   {note}".rstrip())
            how = "opened and decoded" if self.images_decoded else "looked up only (decoding skipped)"
            lines.append(f"  images: {self.images_checked:,} distinct files {how}")
        errors = [problem for problem in self.problems if problem.fatal]
        warnings = [problem for problem in self.problems if not problem.fatal]
        if not self.problems:
            lines.append("no problems found")
        else:
            lines.append(f"{len(errors)} error(s), {len(warnings)} warning(s):")
        by_kind: dict[str, list[Problem]] = defaultdict(list)
        for problem in self.problems:
            by_kind[problem.kind].append(problem)
        for kind, title in PROBLEM_TITLES.items():
            found = by_kind.get(kind, [])
            if not found:
                continue
            level = "error" if found[0].fatal else "warning"
            lines.append(f"  {level}: {title} ({len(found)})")
            lines.extend(f"    {problem.message}" for problem in found[:max_per_kind])
            if len(found) > max_per_kind:
                lines.append(f"    ... and {len(found) - max_per_kind} more")
        if self.ok:
            lines.append("OK: the dataset can be used for training and evaluation")
        else:
            lines.append("FAILED: training or evaluation would break; fix the errors above and run the check again")
        return "\n".join(lines)


def check_dataset(name: str, root: str | Path, verify_images: bool = True, max_workers: int | None = None) -> DataReport:
    """Read dataset ``name`` under ``root`` collecting every problem instead of stopping at the first.

    Args:
        name: registry name (see ``DATASETS``).
        root: the folder holding the dataset folder, or the dataset folder itself.
        verify_images: open and fully decode every image (else only check that the files exist).
        max_workers: threads decoding images; defaults to ``min(16, cpu count)``.
    """
    key, reader = get_reader(name)
    problems: list[Problem] = []
    try:
        dataset = reader(root, problems)
    except DatasetNotFoundError as error:
        return DataReport(key, Path(root).expanduser().resolve(), problems=[Problem("missing_annotation", str(error))])
    report = DataReport(key, dataset.root, _summaries(dataset), problems)
    _check_splits(key, dataset, report)
    _check_images(dataset, report, verify_images, max_workers or min(16, os.cpu_count() or 1))
    return report


def _summaries(dataset: RetrievalDataset) -> list[SplitSummary]:
    train = dataset.train
    rows = [SplitSummary("train", dataset.num_train_ids, len({sample.image_id for sample in train}), len(train))]
    for split, data in dataset.splits.items():
        rows.append(SplitSummary(split, len(set(data.image_pids)), len(data.image_paths), len(data.captions)))
    return rows


def _check_splits(key: str, dataset: RetrievalDataset, report: DataReport) -> None:
    files = ", ".join(path.name for path in dataset.annotation_files)
    if not dataset.train:
        report.problems.append(Problem("empty_split", f"no training samples in {files}; training needs a 'train' split"))
    if "test" not in dataset.splits:
        report.problems.append(Problem("empty_split", f"no test images in {files}; evaluation needs a 'test' split"))
    if key in SPLITS_WITH_VAL and "val" not in dataset.splits:
        report.problems.append(Problem("missing_split", f"no val images in {files}"))


def _check_images(dataset: RetrievalDataset, report: DataReport, decode: bool, workers: int) -> None:
    """Every distinct image file: present, and with ``decode`` readable by PIL to the last byte."""
    first_split: dict[Path, str] = {}
    for sample in dataset.train:
        first_split.setdefault(sample.image_path, "train")
    for split, data in dataset.splits.items():
        for path in data.image_paths:
            first_split.setdefault(path, split)
    report.images_checked = len(first_split)
    report.images_decoded = decode
    present = [path for path in first_split if path.is_file()]
    if first_split and not present:
        example = _relative(next(iter(first_split)), dataset.root)
        report.problems.append(
            Problem("missing_image", f"none of the {len(first_split):,} image files exists (e.g. {example} under {dataset.root}); unpack the images there")
        )
    found = set(present)
    for path, split in first_split.items():
        if path not in found:
            report.problems.append(Problem("missing_image", f"{_relative(path, dataset.root)} ({split} split) does not exist"))
    if not decode:
        return
    logger.info("decoding %d images with %d threads", len(present), workers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for path, problem in zip(present, pool.map(_decode_problem, present)):
            if problem:
                kind, detail = problem
                report.problems.append(Problem(kind, f"{_relative(path, dataset.root)} ({first_split[path]} split): {detail}"))


def _decode_problem(path: Path) -> tuple[ProblemKind, str] | None:
    """None if ``path`` decodes completely, else the problem kind and PIL's message.

    A file that only loads with ``LOAD_TRUNCATED_IMAGES`` (as training reads it) is a warning.
    """
    try:
        with Image.open(path) as image:
            image.load()
        return None
    except IMAGE_ERRORS as error:
        detail = f"{type(error).__name__}: {error}"
    try:
        read_image(path)
    except IMAGE_ERRORS:
        return "unreadable_image", detail
    return "truncated_image", detail


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
