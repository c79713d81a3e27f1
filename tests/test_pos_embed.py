"""Positional-embedding resize against an explicit bilinear (align_corners=False) computation."""

from __future__ import annotations

import pytest
import torch

from upperson.backbone import resize_visual_pos_embed


def _explicit_bilinear(grid: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """grid [h, w, c] → [rows, cols, c] with half-pixel centres and edge clamping."""
    height, width, _ = grid.shape
    out = torch.empty(rows, cols, grid.shape[2], dtype=torch.float64)
    for r in range(rows):
        y = min(max((r + 0.5) * height / rows - 0.5, 0.0), height - 1)
        y0 = int(y)
        y1, wy = min(y0 + 1, height - 1), y - int(y)
        for c in range(cols):
            x = min(max((c + 0.5) * width / cols - 0.5, 0.0), width - 1)
            x0 = int(x)
            x1, wx = min(x0 + 1, width - 1), x - int(x)
            top = grid[y0, x0] * (1 - wx) + grid[y0, x1] * wx
            bottom = grid[y1, x0] * (1 - wx) + grid[y1, x1] * wx
            out[r, c] = top * (1 - wy) + bottom * wy
    return out


@pytest.mark.parametrize("target", [(24, 8), (6, 3), (14, 14), (20, 30)])
def test_resize_matches_explicit_bilinear(target: tuple[int, int]) -> None:
    table = torch.randn(1 + 14 * 14, 5, dtype=torch.float64)
    resized = resize_visual_pos_embed(table, target)
    assert resized.shape == (1 + target[0] * target[1], 5)
    assert torch.equal(resized[0], table[0])
    expected = _explicit_bilinear(table[1:].reshape(14, 14, 5), *target).reshape(-1, 5)
    torch.testing.assert_close(resized[1:], expected, rtol=1e-6, atol=1e-6)


def test_resize_runs_in_fp32_and_returns_the_input_dtype() -> None:
    table = torch.randn(1 + 4 * 4, 3).half()
    resized = resize_visual_pos_embed(table, (6, 2))
    assert resized.dtype == torch.float16
    expected = resize_visual_pos_embed(table.float(), (6, 2)).half()
    assert torch.equal(resized, expected)


def test_non_square_source_is_rejected() -> None:
    with pytest.raises(ValueError, match="square"):
        resize_visual_pos_embed(torch.randn(1 + 6, 4), (2, 2))
