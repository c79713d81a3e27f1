"""Resizing the visual positional embedding to a new patch grid, the way the official code does it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_visual_pos_embed(pos_embed: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Resize a ``[1 + h*w, width]`` table (CLS row first, square grid) to ``grid_size``.

    Bilinear with ``align_corners=False`` and no antialiasing, computed in at least fp32: this is what the
    official TPR code does (open_clip's own resize uses bicubic + antialias and gives different
    numbers). The CLS row is kept as is; grid rows are flattened row-major.

    Args:
        pos_embed: the checkpoint's table; the grid part must be square.
        grid_size: target ``(rows, cols)`` = ``(image_height // patch, image_width // patch)``.

    Returns:
        ``[1 + rows*cols, width]`` tensor in the input's dtype.
    """
    num_grid_tokens = pos_embed.shape[0] - 1
    side = round(num_grid_tokens**0.5)
    if side * side != num_grid_tokens:
        raise ValueError(
            f"visual positional embedding has {pos_embed.shape[0]} rows; expected 1 + a square number "
            "(CLS + square patch grid) in the source checkpoint"
        )
    if (side, side) == tuple(grid_size):
        return pos_embed
    width = pos_embed.shape[1]
    cls_row, grid = pos_embed[:1], pos_embed[1:]
    grid = grid.to(torch.promote_types(grid.dtype, torch.float32)).reshape(1, side, side, width).permute(0, 3, 1, 2)  # [1, width, side, side]
    grid = F.interpolate(grid, size=tuple(grid_size), mode="bilinear", align_corners=False, antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(grid_size[0] * grid_size[1], width)  # row-major tokens
    return torch.cat([cls_row, grid.to(pos_embed.dtype)], dim=0)
