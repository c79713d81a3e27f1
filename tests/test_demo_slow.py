"""The built-in default end to end, at its real size (about 2.5 minutes on a 2-core CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from upperson.experiments.demo import run_demo
from upperson.retrieval import GalleryIndex


@pytest.mark.slow
def test_demo_beats_chance_tenfold_and_draws_the_figure(tmp_path: Path) -> None:
    result = run_demo(tmp_path / "run", tmp_path / "data")
    assert result.chance_r1 == pytest.approx(1.0)
    assert result.metrics["t2i"]["R1"] >= 10 * result.chance_r1
    assert result.metrics["t2i"]["R1"] > result.zero_shot_metrics["t2i"]["R1"]
    assert result.figure.is_file() and result.adapter.is_file()
    gallery = GalleryIndex.load(result.gallery_index)
    assert len(gallery) == 600 and not gallery.skipped  # the held-out images: val 50 + test 100 ids, 4 images each
