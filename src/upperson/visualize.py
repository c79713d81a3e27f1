"""Retrieval figures: each text query next to its top-ranked gallery images, framed green when the
image shows the queried person and red otherwise (as in Fig. 7 of the UP-Person paper), or grey
when there is no ground truth (searching one's own gallery). An image that cannot be read, or that
lies outside the gallery root, is drawn as a light-grey placeholder with a question mark."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from upperson._io import atomic_path
from upperson.data.datasets import IMAGE_ERRORS, read_image

logger = logging.getLogger(__name__)

MATCH_COLOUR = (0, 170, 60)
MISMATCH_COLOUR = (220, 30, 30)
NEUTRAL_COLOUR = (150, 150, 150)
"""Frame of every image when no ground truth is given (``is_match=None``)."""
PLACEHOLDER_COLOUR = (225, 225, 225)
"""Fill of a cell whose image cannot be read or lies outside the gallery root."""
_TEXT_COLOUR = (20, 20, 20)
_BACKGROUND = (255, 255, 255)
_ELLIPSIS = "..."

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


@dataclass(frozen=True)
class FigureLayout:
    """Pixel geometry of the figure, so that callers and tests can find each cell."""

    text_width: int = 240
    """Width of the query-text column."""
    frame: int = 3
    """Thickness of the green/red frame around each gallery image."""
    gap: int = 6
    """Space between cells, rows and the text column."""
    margin: int = 10
    """Space around the whole figure."""
    header: int = 18
    """Height of the top line holding the column titles (rank numbers)."""
    font_size: int = 12

    def cell_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of one framed gallery image; ``image_size`` is (height, width)."""
        height, width = image_size
        return width + 2 * self.frame, height + 2 * self.frame

    def cell_origin(self, row: int, column: int, image_size: tuple[int, int]) -> tuple[int, int]:
        """Top-left pixel of the frame of gallery image ``column`` in query row ``row``."""
        width = self.cell_size(image_size)[0]
        left = self.margin + self.text_width + self.gap + column * (width + self.gap)
        return left, self.row_top(row, image_size)

    def row_top(self, row: int, image_size: tuple[int, int]) -> int:
        return self.margin + self.header + row * (self.cell_size(image_size)[1] + self.gap)

    def size(self, rows: int, columns: int, image_size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of a figure with ``rows`` queries and ``columns`` images per query."""
        width, height = self.cell_size(image_size)
        return (
            2 * self.margin + self.text_width + columns * (self.gap + width),
            2 * self.margin + self.header + rows * height + (rows - 1) * self.gap,
        )


def _font(size: int) -> Font:
    """Pillow's built-in font at ``size``; Pillow < 10.1 only has the fixed-size bitmap one."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _line_height(font: Font) -> int:
    return round(font.getbbox("Hg")[3]) + 2


def _wrap(text: str, font: Font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; text beyond ``max_lines`` is cut with an ellipsis."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(candidate) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    if len(lines) <= max_lines:
        return lines
    kept = lines[:max_lines]
    while kept[-1] and font.getlength(kept[-1] + _ELLIPSIS) > width:
        kept[-1] = kept[-1].rsplit(" ", 1)[0] if " " in kept[-1] else kept[-1][:-1]
    kept[-1] += _ELLIPSIS
    return kept


def _thumbnail(path: str | os.PathLike[str], image_size: tuple[int, int], root: Path | None, font: Font) -> Image.Image:
    """The image resized to ``image_size`` (height, width), or a placeholder when it cannot be drawn."""
    height, width = image_size
    if root is not None and not Path(path).resolve().is_relative_to(root.resolve()):
        logger.warning("not drawing %s: it lies outside the gallery %s", path, root)
    else:
        try:
            return read_image(path).resize((width, height), Image.Resampling.BICUBIC)
        except IMAGE_ERRORS as error:
            logger.warning("cannot draw %s (%s: %s); drawing a placeholder", path, type(error).__name__, error)
    placeholder = Image.new("RGB", (width, height), PLACEHOLDER_COLOUR)
    left, top, right, bottom = font.getbbox("?")  # no anchor=: Pillow's bitmap font lacks it
    ImageDraw.Draw(placeholder).text(((width - right - left) / 2, (height - bottom - top) / 2), "?", fill=_TEXT_COLOUR, font=font)
    return placeholder


def _check_inputs(queries: Sequence[str], ranked: Sequence[Sequence[object]], is_match: Sequence[Sequence[bool | None]]) -> None:
    if not queries:
        raise ValueError("save_retrieval_figure: no queries to draw")
    if not len(queries) == len(ranked) == len(is_match):
        raise ValueError(
            f"save_retrieval_figure: {len(queries)} queries, {len(ranked)} ranked lists and {len(is_match)} "
            "match lists; pass one ranked list and one match list per query"
        )
    for row, (paths, matches) in enumerate(zip(ranked, is_match, strict=True)):
        if len(paths) != len(matches):
            raise ValueError(f"save_retrieval_figure: query {row} has {len(paths)} images but {len(matches)} match flags")


def save_retrieval_figure(
    path: str | os.PathLike[str],
    queries: list[str],
    ranked_image_paths: list[list[Path]],
    is_match: list[list[bool]] | None = None,
    top_k: int = 10,
    gallery_image_size: tuple[int, int] = (128, 48),
    layout: FigureLayout = FigureLayout(),
    root: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a PNG with one row per query: its text, then its first ``top_k`` ranked images.

    Args:
        path: Output PNG; written atomically.
        queries: Query captions, one row each.
        ranked_image_paths: Per query, gallery image paths best first.
        is_match: Per query, whether each ranked image shows the queried person (green frame) or not (red);
            ``None`` when there is no ground truth: every frame is grey.
        top_k: Images shown per query; rows with fewer leave the rest blank.
        gallery_image_size: (height, width) each gallery image is resized to.
        layout: Pixel geometry of the figure.
        root: Gallery root: images that resolve (symlinks followed) outside it are not read but drawn
            as placeholders, like images that cannot be read.

    Returns:
        The path written.
    """
    flags = is_match if is_match is not None else [[None] * len(paths) for paths in ranked_image_paths]
    _check_inputs(queries, ranked_image_paths, flags)
    canvas = Image.new("RGB", layout.size(len(queries), top_k, gallery_image_size), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font(layout.font_size)
    line_height = _line_height(font)
    draw.text((layout.margin, layout.margin), "query", fill=_TEXT_COLOUR, font=font)
    cell_width, cell_height = layout.cell_size(gallery_image_size)
    for column in range(top_k):
        left, _ = layout.cell_origin(0, column, gallery_image_size)
        label = str(column + 1)
        draw.text((left + (cell_width - font.getlength(label)) / 2, layout.margin), label, fill=_TEXT_COLOUR, font=font)
    for row, (query, paths, matches) in enumerate(zip(queries, ranked_image_paths, flags, strict=True)):
        top = layout.row_top(row, gallery_image_size)
        lines = _wrap(query, font, layout.text_width, max(1, cell_height // line_height))
        for number, line in enumerate(lines):
            draw.text((layout.margin, top + number * line_height), line, fill=_TEXT_COLOUR, font=font)
        for column, (image_path, match) in enumerate(zip(paths[:top_k], matches[:top_k], strict=True)):
            left, cell_top = layout.cell_origin(row, column, gallery_image_size)
            colour = NEUTRAL_COLOUR if match is None else MATCH_COLOUR if match else MISMATCH_COLOUR
            draw.rectangle((left, cell_top, left + cell_width - 1, cell_top + cell_height - 1), fill=colour)
            thumbnail = _thumbnail(image_path, gallery_image_size, Path(root) if root is not None else None, font)
            canvas.paste(thumbnail, (left + layout.frame, cell_top + layout.frame))
    target = Path(path)
    with atomic_path(target) as temporary:
        canvas.save(temporary, format="PNG")
    return target
