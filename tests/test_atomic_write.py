"""Atomic writes publish whole files with the mode a plain open() would give them (issue 16 row 20)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from upperson._io import atomic_path


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_published_file_has_the_umask_mode_not_mkstemps_0600(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        with atomic_path(tmp_path / "config.yaml") as temporary:
            temporary.write_text("a: 1\n")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "config.yaml").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask


def test_a_failed_write_leaves_neither_target_nor_temporary(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.json") as temporary:
            temporary.write_text("half")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
