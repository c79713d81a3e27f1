"""Synthetic pedestrians with captions, written in the CUHK-PEDES on-disk format (spec §7.1).

The built-in default dataset: the demo and the tests train and evaluate on it with no downloads,
and because it is written exactly as CUHK-PEDES is, the real reader, trainer and evaluator are
what run on it. Each identity is one fixed set of attributes (hair, clothes, shoes, bag, hat);
its images vary pose, framing, facing, background and lighting, and its captions vary wording
and word order, so text can tell identities apart only through the attributes.

Defaults of `generate_synthetic_cuhk`: 200 train / 50 val / 100 test identities, 4 images each
and 2 captions per image, i.e. train 800 images / 1,600 captions, val 200 / 400, test 400 / 800.
Chance R@1 on test (positives / gallery) is 4 / 400 = 1 %.
"""

from __future__ import annotations

import colorsys
import json
import logging
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

logger = logging.getLogger(__name__)

RGB = tuple[int, int, int]
Gender = Literal["man", "woman"]
TopType = Literal["t-shirt", "jacket", "coat", "dress"]
Pattern = Literal["plain", "striped", "checked", "dotted"]
BottomType = Literal["trousers", "shorts", "skirt"]
BagType = Literal["backpack", "handbag"]
Facing = Literal["front", "back"]
Scene = Literal["street", "studio"]
"""``street``: varied walls, floors, lighting, noise and blur (the surveillance-like default);
``studio``: a plain light-grey backdrop under neutral light (the demo's pre-training corpus, so that
the target data is a domain shift the PETL modules have to adapt to)."""
STUDIO_WALL: RGB = (205, 205, 200)
STUDIO_GROUND: RGB = (175, 175, 170)
T = TypeVar("T")

FORMAT_VERSION = 1
"""Bump when the drawing or captions change, so that cached datasets are regenerated."""
DATASET_DIR = "CUHK-PEDES"
MARKER = ".synthetic.json"
"""Written last into a finished dataset; records the parameters it was generated with."""
SUPERSAMPLE = 2
"""Draw at this multiple of the output size and downsample, for anti-aliased edges."""
JPEG_QUALITY = 92

COLOURS: dict[str, RGB] = {
    "black": (28, 28, 30),
    "white": (236, 236, 232),
    "grey": (128, 128, 130),
    "red": (196, 30, 36),
    "blue": (34, 72, 186),
    "green": (38, 136, 62),
    "yellow": (236, 200, 42),
    "orange": (238, 128, 30),
    "pink": (238, 140, 178),
    "purple": (118, 52, 150),
    "brown": (112, 70, 40),
}
"""Clothing colours; captions name them with the words in `COLOUR_WORDS`."""
COLOUR_WORDS: dict[str, tuple[str, ...]] = {name: (name,) for name in COLOURS} | {"grey": ("grey", "gray")}
HAIR_COLOURS: dict[str, RGB] = {
    "black": (22, 20, 20),
    "brown": (88, 54, 30),
    "blonde": (214, 178, 104),
    "grey": (165, 163, 160),
}
HAIR_WORDS: dict[str, tuple[str, ...]] = {
    "black": ("black", "dark"),
    "brown": ("brown",),
    "blonde": ("blonde", "blond", "fair"),
    "grey": ("grey", "gray"),
}
SKIN_TONES: tuple[RGB, ...] = ((246, 214, 186), (232, 188, 150), (198, 150, 110), (150, 104, 70), (104, 70, 48))

_BOTTOM_COLOUR_WEIGHTS = {
    "black": 5, "blue": 5, "grey": 3, "brown": 2, "white": 2, "green": 1, "red": 1, "pink": 1, "purple": 1, "yellow": 1,
}
_SHOE_COLOUR_WEIGHTS = {"black": 5, "white": 5, "brown": 3, "grey": 2, "red": 1, "blue": 1, "pink": 1}
_BAG_COLOUR_WEIGHTS = {"black": 4, "brown": 3, "red": 2, "blue": 2, "grey": 2, "pink": 1, "green": 1, "yellow": 1, "white": 1}


# --------------------------------------------------------------------------------------------
# Identities


@dataclass(frozen=True)
class PersonAttributes:
    """Everything that stays fixed across one identity's images."""

    gender: Gender
    height: float
    """Fraction of the image height the person spans (before per-image scale jitter)."""
    build: float
    """Width multiplier of shoulders, hips and limbs."""
    skin: RGB
    hair_colour: str
    hair_length: Literal["short", "long"]
    top: TopType
    top_colour: str
    top_pattern: Pattern
    bottom: BottomType | None
    """None with a dress."""
    bottom_colour: str | None
    shoe_colour: str
    bag: BagType | None
    bag_colour: str | None
    hat_colour: str | None
    """None when bare-headed."""

    def signature(self) -> tuple[object, ...]:
        """The attributes captions mention; distinct identities have distinct signatures."""
        return (
            self.gender, self.hair_colour, self.hair_length, self.top, self.top_colour, self.top_pattern,
            self.bottom, self.bottom_colour, self.shoe_colour, self.bag, self.bag_colour, self.hat_colour,
        )


def _weighted(rng: random.Random, weights: Mapping[T, float]) -> T:
    """One key of ``weights``, drawn with probability proportional to its value."""
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def sample_person(rng: random.Random) -> PersonAttributes:
    """One random identity; clothing choices follow the gender the captions will name."""
    gender: Gender = rng.choice(("man", "woman"))
    woman = gender == "woman"
    tops: dict[TopType, float] = {"t-shirt": 3, "jacket": 3, "coat": 2, "dress": 2 if woman else 0}
    top = _weighted(rng, tops)
    bottoms: dict[BottomType, float] = {"trousers": 5, "shorts": 0 if top == "coat" else 2, "skirt": 3 if woman else 0}
    bottom = _weighted(rng, bottoms)  # a coat would hide shorts
    bags: dict[BagType | None, float] = {None: 4, "backpack": 4, "handbag": 3 if woman else 1}
    bag = _weighted(rng, bags)
    patterns: dict[Pattern, float] = {"plain": 5, "striped": 2, "checked": 2, "dotted": 1}
    return PersonAttributes(
        gender=gender,
        height=rng.uniform(0.80, 0.92),
        build=rng.uniform(0.85, 1.15),
        skin=rng.choice(SKIN_TONES),
        hair_colour=_weighted(rng, {"black": 5, "brown": 3, "blonde": 2, "grey": 1}),
        hair_length="long" if rng.random() < (0.75 if woman else 0.1) else "short",
        top=top,
        top_colour=rng.choice(list(COLOURS)),
        top_pattern=_weighted(rng, patterns),
        bottom=None if top == "dress" else bottom,
        bottom_colour=None if top == "dress" else _weighted(rng, _BOTTOM_COLOUR_WEIGHTS),
        shoe_colour=_weighted(rng, _SHOE_COLOUR_WEIGHTS),
        bag=bag,
        bag_colour=None if bag is None else _weighted(rng, _BAG_COLOUR_WEIGHTS),
        hat_colour=rng.choice(list(COLOURS)) if rng.random() < 0.25 else None,
    )


def sample_identities(count: int, seed: int) -> list[PersonAttributes]:
    """``count`` identities with pairwise distinct signatures; entry ``i`` is the person with id ``i + 1``."""
    rng = random.Random(f"upperson-synthetic/{seed}/identities")
    people: list[PersonAttributes] = []
    seen: set[tuple[object, ...]] = set()
    for _ in range(50 * count):
        if len(people) == count:
            break
        person = sample_person(rng)
        if person.signature() not in seen:
            seen.add(person.signature())
            people.append(person)
    if len(people) < count:
        raise ValueError(f"could draw only {len(people)} distinct synthetic identities, {count} requested; ask for fewer ids")
    return people


# --------------------------------------------------------------------------------------------
# Per-image variation


@dataclass(frozen=True)
class View:
    """What varies between images of one identity: framing, pose, scene and lighting."""

    scale: float
    """Multiplies the identity's height."""
    centre_x: float
    """Horizontal centre of the body, as a fraction of the image width."""
    vertical: float
    """Where in the free vertical space the person stands, 0 (top) to 1 (bottom)."""
    facing: Facing
    mirror: bool
    stride: float
    """Extra spread of the feet, as a fraction of the person's height."""
    swing: float
    """Outward offset of the hands, as a fraction of the person's height."""
    wall: RGB
    ground: RGB
    horizon: float
    """Fraction of the image height where the wall meets the ground."""
    texture: Literal["plain", "tiles", "blocks", "stripes"]
    brightness: float
    contrast: float
    gains: tuple[float, float, float]
    """Per-channel colour cast of the light."""
    noise: float
    """Standard deviation of the sensor noise, in 0..255 units."""
    blur: float
    """Gaussian blur radius in output pixels."""


def _muted(rng: random.Random) -> RGB:
    red, green, blue = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.3, 0.85))
    return round(red * 255), round(green * 255), round(blue * 255)


def sample_view(rng: random.Random) -> View:
    """One random view of a person."""
    return View(
        scale=rng.uniform(0.93, 1.07),
        centre_x=rng.uniform(0.43, 0.57),
        vertical=rng.random(),
        facing="back" if rng.random() < 0.35 else "front",
        mirror=rng.random() < 0.5,
        stride=rng.uniform(0.0, 0.05),
        swing=rng.uniform(-0.005, 0.03),
        wall=_muted(rng),
        ground=_muted(rng),
        horizon=rng.uniform(0.45, 0.85),
        texture=rng.choice(("plain", "tiles", "blocks", "stripes")),
        brightness=rng.uniform(0.7, 1.25),
        contrast=rng.uniform(0.75, 1.2),
        gains=(rng.uniform(0.92, 1.08), rng.uniform(0.92, 1.08), rng.uniform(0.92, 1.08)),
        noise=rng.uniform(1.0, 6.0),
        blur=rng.choice((0.0, 0.0, 0.3, 0.6)),
    )


# --------------------------------------------------------------------------------------------
# Drawing


@dataclass(frozen=True)
class _Skeleton:
    """Places body fractions on the canvas: ``y(f)`` is ``f`` of the height below the top of the
    head, ``x(f, side)`` is ``f`` of the height left (-1) or right (+1) of the body's centre."""

    top: float
    centre: float
    unit: float
    build: float
    stride: float
    swing: float

    def y(self, fraction: float) -> float:
        return self.top + fraction * self.unit

    def x(self, fraction: float, side: int = 1) -> float:
        return self.centre + side * fraction * self.unit

    def point(self, x: float, y: float, side: int = 1) -> tuple[float, float]:
        return self.x(x, side), self.y(y)

    def box(self, x: float, y: float, half_width: float, half_height: float) -> tuple[float, float, float, float]:
        return self.x(x - half_width), self.y(y - half_height), self.x(x + half_width), self.y(y + half_height)

    @property
    def shoulder(self) -> float:
        return 0.105 * self.build

    @property
    def hip(self) -> float:
        return 0.085 * self.build

    @property
    def limb(self) -> float:
        """Arm thickness, in canvas pixels."""
        return 0.045 * self.unit * self.build**0.5

    def hand(self, side: int) -> tuple[float, float]:
        return self.point(self.shoulder + 0.012 + self.swing, 0.49, side)

    def arm(self, side: int, until: float) -> list[tuple[float, float]]:
        """The arm's centre line from the shoulder to ``until`` (0..1) of the way to the hand."""
        start = self.point(self.shoulder - 0.018, 0.185, side)
        end = self.hand(side)
        return [start, (start[0] + until * (end[0] - start[0]), start[1] + until * (end[1] - start[1]))]

    def leg(self, side: int) -> list[tuple[float, float]]:
        ankle = 0.045 + self.stride
        return [
            self.point(0.006, 0.5, side),
            self.point(self.hip, 0.5, side),
            self.point(ankle + 0.03, 0.95, side),
            self.point(ankle - 0.028, 0.95, side),
        ]


def _jitter(colour: RGB, rng: random.Random, amount: int = 12) -> RGB:
    red, green, blue = (min(255, max(0, channel + rng.randint(-amount, amount))) for channel in colour)
    return red, green, blue


def _shade(colour: RGB, amount: float) -> RGB:
    """Darker for light colours and lighter for dark ones, for seams, folds and patterns."""
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    target = 0 if luminance > 110 else 255
    red, green, blue = (round(channel + amount * (target - channel)) for channel in colour)
    return red, green, blue


def _pattern_fill(size: tuple[int, int], body: _Skeleton, colour: RGB, pattern: Pattern) -> Image.Image:
    """A canvas-sized layer painted with ``pattern``; garments are cut out of it with a mask."""
    layer = Image.new("RGB", size, colour)
    draw = ImageDraw.Draw(layer)
    accent = _shade(colour, 0.8)
    width, height = size
    period = max(3.0, 0.04 * body.unit)
    steps = range(int(height / period) + 2)
    if pattern == "striped":
        for step in steps:
            y = body.top + step * period
            draw.rectangle((0, y, width, y + period / 2), fill=accent)
    elif pattern == "checked":
        for step in steps:
            y = body.top + step * period
            draw.rectangle((0, y, width, y + period / 3), fill=accent)
        for step in range(-int(width / period) - 1, int(width / period) + 2):
            x = body.centre + step * period
            draw.rectangle((x, 0, x + period / 3, height), fill=accent)
    elif pattern == "dotted":
        radius = period / 5
        for row in steps:
            for column in range(-int(width / period) - 1, int(width / period) + 2):
                x = body.centre + (column + 0.5 * (row % 2)) * period
                y = body.top + row * period
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=accent)
    return layer


def _paint(image: Image.Image, fill: Image.Image | RGB, shapes: Callable[[ImageDraw.ImageDraw], None]) -> None:
    """Paint ``fill`` (a colour or a patterned layer) through the mask that ``shapes`` draws."""
    mask = Image.new("L", image.size, 0)
    shapes(ImageDraw.Draw(mask))
    if isinstance(fill, Image.Image):
        image.paste(fill, (0, 0), mask)
    else:
        image.paste(fill, (0, 0, *image.size), mask)


def _draw_background(image: Image.Image, view: View, rng: random.Random) -> None:
    draw = ImageDraw.Draw(image)
    width, height = image.size
    horizon = view.horizon * height
    draw.rectangle((0, 0, width, horizon), fill=view.wall)
    draw.rectangle((0, horizon, width, height), fill=view.ground)
    if view.texture == "tiles":
        line = _shade(view.ground, 0.2)
        gap = rng.uniform(0.04, 0.08) * height
        y = horizon + gap / 2
        while y < height:
            draw.line((0, y, width, y), fill=line, width=SUPERSAMPLE)
            gap *= 1.25
            y += gap
    elif view.texture == "blocks":
        for _ in range(rng.randint(2, 5)):
            left, top = rng.uniform(-0.2, 0.9) * width, rng.uniform(0.0, 0.8) * horizon
            right, bottom = left + rng.uniform(0.2, 0.6) * width, top + rng.uniform(0.1, 0.4) * horizon
            draw.rectangle((left, top, right, bottom), fill=_muted(rng))
    elif view.texture == "stripes":
        colour = _shade(view.wall, rng.uniform(0.15, 0.35))
        period = rng.uniform(0.1, 0.3) * width
        x = rng.uniform(0, period)
        while x < width:
            draw.rectangle((x, 0, x + period / 2, horizon), fill=colour)
            x += period


def _draw_long_hair_behind(draw: ImageDraw.ImageDraw, body: _Skeleton, hair: RGB) -> None:
    draw.rounded_rectangle(
        (body.x(-0.062), body.y(0.05), body.x(0.062), body.y(0.27)), radius=0.04 * body.unit, fill=hair
    )


def _draw_backpack(draw: ImageDraw.ImageDraw, body: _Skeleton, colour: RGB, facing: Facing) -> None:
    """Seen from the back the whole pack shows; from the front only its top edge peeks out."""
    if facing == "back":
        draw.rounded_rectangle(
            (body.x(-0.085), body.y(0.19), body.x(0.085), body.y(0.46)), radius=0.03 * body.unit, fill=colour
        )
        draw.rounded_rectangle(
            (body.x(-0.06), body.y(0.33), body.x(0.06), body.y(0.43)), radius=0.02 * body.unit, fill=_shade(colour, 0.25)
        )
    else:
        draw.rounded_rectangle(
            (body.x(-0.1), body.y(0.135), body.x(0.1), body.y(0.4)), radius=0.03 * body.unit, fill=colour
        )


def _draw_straps(draw: ImageDraw.ImageDraw, body: _Skeleton, colour: RGB) -> None:
    for side in (-1, 1):
        draw.line(
            (body.point(body.shoulder - 0.035, 0.17, side), body.point(body.shoulder - 0.045, 0.42, side)),
            fill=colour, width=max(2, round(0.018 * body.unit)),
        )


def _draw_legs(image: Image.Image, body: _Skeleton, person: PersonAttributes, skin: RGB, bottom: RGB | None) -> None:
    draw = ImageDraw.Draw(image)
    for side in (-1, 1):
        draw.polygon(body.leg(side), fill=skin)
    if person.bottom is None or bottom is None:
        return
    if person.bottom == "skirt":
        flare = body.hip + 0.05 + body.stride
        skirt = [body.point(-body.hip, 0.47), body.point(body.hip, 0.47), body.point(flare, 0.74), body.point(-flare, 0.74)]
        draw.polygon(skirt, fill=bottom)
        return
    hem = 0.95 if person.bottom == "trousers" else 0.65

    def trousers(mask: ImageDraw.ImageDraw) -> None:
        mask.rectangle((body.x(-body.hip), body.y(0.47), body.x(body.hip), body.y(0.54)), fill=255)
        for side in (-1, 1):
            mask.polygon(body.leg(side), fill=255)
        mask.rectangle((0, body.y(hem), image.width, image.height), fill=0)

    _paint(image, bottom, trousers)


def _draw_shoes(draw: ImageDraw.ImageDraw, body: _Skeleton, colour: RGB) -> None:
    for side in (-1, 1):
        draw.ellipse(body.box(side * (0.05 + body.stride), 0.965, 0.038, 0.024), fill=colour)


def _draw_arms(draw: ImageDraw.ImageDraw, body: _Skeleton, skin: RGB) -> None:
    for side in (-1, 1):
        draw.line(body.arm(side, 1.0), fill=skin, width=round(body.limb), joint="curve")


_SLEEVE_LENGTH: dict[str, float] = {"t-shirt": 0.4, "jacket": 0.93, "coat": 0.93, "dress": 0.15}
_TOP_HEM: dict[str, tuple[float, float]] = {
    "t-shirt": (0.52, 0.0), "jacket": (0.53, 0.01), "coat": (0.68, 0.04), "dress": (0.72, 0.07),
}
"""Hem height and extra half-width at the hem per top type, as fractions of the person's height."""


def _draw_top(image: Image.Image, body: _Skeleton, person: PersonAttributes, colour: RGB, facing: Facing) -> None:
    hem, flare = _TOP_HEM[person.top]
    hem_half = body.hip + flare + (body.stride if flare else 0.0)

    def garment(mask: ImageDraw.ImageDraw) -> None:
        shoulders = [body.point(-body.shoulder, 0.17), body.point(body.shoulder, 0.17)]
        outline = [*shoulders, body.point(hem_half, hem), body.point(-hem_half, hem)]
        mask.polygon(outline, fill=255)
        for side in (-1, 1):
            mask.ellipse(body.box(side * (body.shoulder - 0.025), 0.19, 0.03, 0.03), fill=255)
            mask.line(body.arm(side, _SLEEVE_LENGTH[person.top]), fill=255, width=round(body.limb * 1.25), joint="curve")

    _paint(image, _pattern_fill(image.size, body, colour, person.top_pattern), garment)
    draw = ImageDraw.Draw(image)
    seam = _shade(colour, 0.35)
    if person.top == "dress":
        draw.line((body.point(-body.hip, 0.47), body.point(body.hip, 0.47)), fill=seam, width=max(1, round(0.008 * body.unit)))
    elif person.top in ("jacket", "coat") and facing == "front":
        draw.line((body.point(0.0, 0.18), body.point(0.0, hem)), fill=seam, width=max(1, round(0.008 * body.unit)))
        for side in (-1, 1):
            draw.line((body.point(0.035, 0.165, side), body.point(0.0, 0.25)), fill=seam, width=max(1, round(0.01 * body.unit)))


def _draw_hands(draw: ImageDraw.ImageDraw, body: _Skeleton, skin: RGB) -> None:
    radius = 0.55 * body.limb
    for side in (-1, 1):
        x, y = body.hand(side)
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=skin)


def _draw_handbag(draw: ImageDraw.ImageDraw, body: _Skeleton, colour: RGB) -> None:
    x, y = body.hand(1)
    half, depth = 0.05 * body.unit, 0.085 * body.unit
    handle = (x - half * 0.7, y - depth * 0.35, x + half * 0.7, y + depth * 0.45)
    draw.arc(handle, 180, 360, fill=_shade(colour, 0.3), width=max(1, round(0.01 * body.unit)))
    draw.rounded_rectangle((x - half, y + depth * 0.1, x + half, y + depth), radius=0.015 * body.unit, fill=colour)


def _draw_head(draw: ImageDraw.ImageDraw, body: _Skeleton, person: PersonAttributes, skin: RGB, hair: RGB, facing: Facing) -> None:
    draw.rectangle((body.x(-0.022), body.y(0.11), body.x(0.022), body.y(0.18)), fill=skin)
    head = body.box(0.0, 0.075, 0.052, 0.07)
    draw.ellipse(head, fill=hair)
    if facing == "front":
        draw.ellipse(body.box(0.0, 0.088, 0.045, 0.058), fill=skin)
        for side in (-1, 1):
            draw.ellipse(body.box(side * 0.018, 0.08, 0.006, 0.005), fill=(40, 30, 28))
    if person.hair_length == "long" and facing == "back":
        _draw_long_hair_behind(draw, body, hair)


def _draw_hat(draw: ImageDraw.ImageDraw, body: _Skeleton, colour: RGB) -> None:
    draw.chord(body.box(0.0, 0.04, 0.056, 0.045), 180, 360, fill=colour)
    draw.ellipse(body.box(0.0, 0.038, 0.072, 0.011), fill=_shade(colour, 0.2))


def _draw_person(image: Image.Image, person: PersonAttributes, view: View, rng: random.Random) -> None:
    """Draw back to front: hair and pack behind, legs, shoes, arms, top, hands, bag, head, hat."""
    width, height = image.size
    unit = min(person.height * view.scale, 0.98) * height
    top = view.vertical * (height - unit)
    body = _Skeleton(top, view.centre_x * width, unit, person.build, view.stride, view.swing)
    skin = _jitter(person.skin, rng, 8)
    hair = _jitter(HAIR_COLOURS[person.hair_colour], rng, 8)
    bag = None if person.bag_colour is None else _jitter(COLOURS[person.bag_colour], rng)
    draw = ImageDraw.Draw(image)
    if person.hair_length == "long" and view.facing == "front":
        _draw_long_hair_behind(draw, body, hair)
    if person.bag == "backpack" and bag is not None and view.facing == "front":
        _draw_backpack(draw, body, bag, view.facing)
    bottom = None if person.bottom_colour is None else _jitter(COLOURS[person.bottom_colour], rng)
    _draw_legs(image, body, person, skin, bottom)
    _draw_shoes(draw, body, _jitter(COLOURS[person.shoe_colour], rng))
    _draw_arms(draw, body, skin)
    _draw_top(image, body, person, _jitter(COLOURS[person.top_colour], rng), view.facing)
    _draw_hands(draw, body, skin)
    if person.bag == "backpack" and bag is not None:
        if view.facing == "front":
            _draw_straps(draw, body, bag)
        else:
            _draw_backpack(draw, body, bag, view.facing)
    if person.bag == "handbag" and bag is not None:
        _draw_handbag(draw, body, bag)
    _draw_head(draw, body, person, skin, hair, view.facing)
    if person.hat_colour is not None:
        _draw_hat(draw, body, _jitter(COLOURS[person.hat_colour], rng))


def _apply_lighting(image: Image.Image, view: View, rng: random.Random) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32)
    mean = pixels.mean()
    pixels = (pixels - mean) * view.contrast + mean
    pixels = pixels * view.brightness * np.asarray(view.gains, dtype=np.float32)
    noise = np.random.default_rng(rng.getrandbits(64)).standard_normal(pixels.shape, dtype=np.float32) * view.noise
    lit = Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))
    return lit.filter(ImageFilter.GaussianBlur(view.blur)) if view.blur > 0 else lit


def studio_view(view: View) -> View:
    """The same pose and framing against the plain studio backdrop, with neutral light and a clean sensor."""
    return replace(
        view, wall=STUDIO_WALL, ground=STUDIO_GROUND, horizon=0.8, texture="plain",
        brightness=1.0, contrast=1.0, gains=(1.0, 1.0, 1.0), noise=0.0, blur=0.0,
    )


def render_person(
    person: PersonAttributes, rng: random.Random, image_size: tuple[int, int] = (128, 48), scene: Scene = "street"
) -> Image.Image:
    """One RGB image of ``person`` of ``image_size`` (height, width) under a random view."""
    height, width = image_size
    view = sample_view(rng)
    if scene == "studio":
        view = studio_view(view)
    canvas = Image.new("RGB", (width * SUPERSAMPLE, height * SUPERSAMPLE))
    _draw_background(canvas, view, rng)
    _draw_person(canvas, person, view, rng)
    image = canvas.resize((width, height), Image.Resampling.LANCZOS)
    if view.mirror:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _apply_lighting(image, view, rng)


# --------------------------------------------------------------------------------------------
# Captions

_NOUNS: dict[str, tuple[str, ...]] = {
    "woman": ("woman", "lady", "girl", "young woman", "female pedestrian"),
    "man": ("man", "guy", "gentleman", "young man", "male pedestrian"),
}
_PRONOUNS: dict[str, tuple[str, str]] = {"woman": ("she", "her"), "man": ("he", "his")}
_TOP_NOUNS: dict[str, tuple[str, ...]] = {
    "t-shirt": ("t-shirt", "tee shirt", "short-sleeved shirt"),
    "jacket": ("jacket", "zip-up jacket"),
    "coat": ("coat", "long coat", "overcoat"),
    "dress": ("dress",),
}
_PATTERN_ADJECTIVES: dict[str, tuple[str, ...]] = {
    "striped": ("striped", "stripy"),
    "checked": ("checked", "plaid", "checkered"),
    "dotted": ("dotted", "polka-dot", "spotted"),
}
_PATTERN_SUFFIXES: dict[str, tuple[str, ...]] = {
    "striped": ("with stripes", "with horizontal stripes"),
    "checked": ("with a checked pattern", "with a plaid pattern"),
    "dotted": ("with dots", "with polka dots"),
}
_BOTTOM_NOUNS: dict[str, tuple[str, ...]] = {
    "trousers": ("trousers", "pants", "long trousers"), "shorts": ("shorts",), "skirt": ("skirt",),
}
_SHOE_NOUNS = ("shoes", "sneakers", "trainers")
_BAG_NOUNS: dict[str, tuple[str, ...]] = {"backpack": ("backpack", "rucksack"), "handbag": ("handbag", "purse", "hand bag")}
_HAT_NOUNS = ("hat", "cap")


def _article(phrase: str) -> str:
    return f"an {phrase}" if phrase[0] in "aeiou" else f"a {phrase}"


def _join(items: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class _Phrases:
    """Randomly worded phrases for one identity; each call draws a fresh wording."""

    def __init__(self, person: PersonAttributes, rng: random.Random) -> None:
        self.person, self.rng = person, rng

    def colour(self, name: str) -> str:
        return self.rng.choice(COLOUR_WORDS[name])

    def noun(self) -> str:
        return self.rng.choice(_NOUNS[self.person.gender])

    def pronoun(self) -> str:
        return _PRONOUNS[self.person.gender][0]

    def possessive(self) -> str:
        return _PRONOUNS[self.person.gender][1]

    def hair(self) -> str:
        return f"{self.person.hair_length} {self.rng.choice(HAIR_WORDS[self.person.hair_colour])} hair"

    def top(self) -> str:
        person = self.person
        noun, colour = self.rng.choice(_TOP_NOUNS[person.top]), self.colour(person.top_colour)
        if person.top_pattern == "plain":
            return _article(f"{colour} {noun}")
        if self.rng.random() < 0.5:
            return _article(f"{colour} {self.rng.choice(_PATTERN_ADJECTIVES[person.top_pattern])} {noun}")
        return f"{_article(f'{colour} {noun}')} {self.rng.choice(_PATTERN_SUFFIXES[person.top_pattern])}"

    def bottom(self) -> str | None:
        person = self.person
        if person.bottom is None or person.bottom_colour is None:
            return None
        phrase = f"{self.colour(person.bottom_colour)} {self.rng.choice(_BOTTOM_NOUNS[person.bottom])}"
        if person.bottom == "skirt":
            return _article(phrase)
        return f"a pair of {phrase}" if self.rng.random() < 0.3 else phrase

    def shoes(self) -> str:
        phrase = f"{self.colour(self.person.shoe_colour)} {self.rng.choice(_SHOE_NOUNS)}"
        return f"a pair of {phrase}" if self.rng.random() < 0.2 else phrase

    def hat(self) -> str | None:
        if self.person.hat_colour is None:
            return None
        return _article(f"{self.colour(self.person.hat_colour)} {self.rng.choice(_HAT_NOUNS)}")

    def bag(self) -> str | None:
        if self.person.bag is None or self.person.bag_colour is None:
            return None
        return _article(f"{self.colour(self.person.bag_colour)} {self.rng.choice(_BAG_NOUNS[self.person.bag])}")

    def outfit(self) -> list[str]:
        """Top, bottom and hat; the order is sometimes shuffled."""
        items = [item for item in (self.top(), self.bottom(), self.hat()) if item]
        if self.rng.random() < 0.3:
            self.rng.shuffle(items)
        return items

    def carrying(self) -> str:
        bag = self.bag() or ""
        verbs = ("carrying", "holding", "with") if self.person.bag == "handbag" else ("carrying", "with", "wearing")
        return f"{self.rng.choice(verbs)} {bag}"


def _caption_with(p: _Phrases) -> str:
    bag = f", {p.carrying()}" if p.person.bag else ""
    return f"{_article(p.noun())} with {p.hair()} wearing {_join([*p.outfit(), p.shoes()])}{bag}."


def _caption_has(p: _Phrases) -> str:
    text = f"This {p.noun()} has {p.hair()}. {p.pronoun()} is wearing {_join(p.outfit())} with {p.shoes()}."
    bag = p.bag()
    return f"{text} {p.pronoun()} {p.rng.choice(('carries', 'has'))} {bag}." if bag else text


def _caption_dressed(p: _Phrases) -> str:
    text = f"The {p.noun()} is dressed in {_join(p.outfit())}. {p.possessive()} shoes are {p.colour(p.person.shoe_colour)}"
    bag = f" and {p.pronoun()} {p.rng.choice(('carries', 'has'))} {p.bag()}" if p.person.bag else ""
    return f"{text}{bag}. {p.pronoun()} has {p.hair()}."


def _caption_participle(p: _Phrases) -> str:
    bag = f" and carries {p.bag()}" if p.person.bag else ""
    return f"Wearing {_join(p.outfit())}, the {p.noun()} with {p.hair()} walks in {p.shoes()}{bag}."


def _caption_pedestrian(p: _Phrases) -> str:
    things = [p.hair(), *([p.bag()] if p.person.bag else [])]
    return f"A pedestrian in {_join([*p.outfit(), p.shoes()])}. The {p.noun()} has {_join([t for t in things if t])}."


def _caption_list(p: _Phrases) -> str:
    items = [p.hair(), *p.outfit(), p.shoes(), *([p.bag()] if p.person.bag else [])]
    return f"{p.noun()}: {', '.join(item for item in items if item)}."


_TEMPLATES: tuple[Callable[[_Phrases], str], ...] = (
    _caption_with, _caption_has, _caption_dressed, _caption_participle, _caption_pedestrian, _caption_list,
)


def _capitalise(text: str) -> str:
    """Upper-case the first letter of each sentence."""
    return re.sub(r"(^|[.!?]\s+)([a-z])", lambda match: match.group(1) + match.group(2).upper(), text)


def make_captions(person: PersonAttributes, rng: random.Random, count: int = 2) -> list[str]:
    """``count`` captions of ``person`` from distinct templates, each with its own wording."""
    phrases = _Phrases(person, rng)
    return [_capitalise(template(phrases)) for template in rng.sample(_TEMPLATES, count)]


def tokenize(caption: str) -> list[str]:
    """Lower-case word tokens, the shape of CUHK-PEDES ``processed_tokens``."""
    return re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", caption.lower())


# --------------------------------------------------------------------------------------------
# Writing the dataset


@dataclass(frozen=True)
class SyntheticParams:
    """Everything the generated files depend on; equal params mean an equal dataset."""

    num_train_ids: int
    num_val_ids: int
    num_test_ids: int
    images_per_id: int
    seed: int
    image_size: tuple[int, int]
    """(height, width) of the written images."""
    scene: Scene = "street"

    def __post_init__(self) -> None:
        if self.scene not in ("street", "studio"):
            raise ValueError(f"synthetic dataset: scene must be 'street' or 'studio', got {self.scene!r}")
        for name in ("num_train_ids", "num_val_ids", "num_test_ids", "images_per_id"):
            if getattr(self, name) < 1:
                raise ValueError(f"synthetic dataset: {name} must be at least 1, got {getattr(self, name)}")
        height, width = self.image_size
        if height < 32 or width < 12:
            raise ValueError(f"synthetic dataset: image_size (height, width) must be at least (32, 12), got {self.image_size}")

    def splits(self) -> list[tuple[str, range]]:
        """Each split's 1-based ids: train 1..N_train, then val, then test."""
        val_start = self.num_train_ids + 1
        test_start = val_start + self.num_val_ids
        return [
            ("train", range(1, val_start)),
            ("val", range(val_start, test_start)),
            ("test", range(test_start, test_start + self.num_test_ids)),
        ]

    def marker(self) -> dict[str, Any]:
        return {"generator": __name__, "format_version": FORMAT_VERSION, "params": asdict(self)}


def _is_complete(directory: Path, params: SyntheticParams) -> bool:
    marker = directory / MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return recorded == json.loads(json.dumps(params.marker()))


def _write_dataset(directory: Path, params: SyntheticParams) -> None:
    """Images, ``reid_raw.json`` and, last, the marker that says the dataset is complete."""
    identities = sample_identities(params.num_train_ids + params.num_val_ids + params.num_test_ids, params.seed)
    records: list[dict[str, Any]] = []
    for split, ids in params.splits():
        folder = "train_query" if split == "train" else "test_query"
        (directory / "imgs" / folder).mkdir(parents=True, exist_ok=True)
        for pid in ids:
            for view in range(params.images_per_id):
                rng = random.Random(f"upperson-synthetic/{params.seed}/{pid}/{view}")
                person = identities[pid - 1]
                file_path = f"{folder}/p{pid:05d}_s{len(records):05d}.jpg"
                render_person(person, rng, params.image_size, params.scene).save(directory / "imgs" / file_path, quality=JPEG_QUALITY)
                captions = make_captions(person, rng)
                records.append(
                    {"split": split, "captions": captions, "file_path": file_path,
                     "processed_tokens": [tokenize(caption) for caption in captions], "id": pid}
                )
    (directory / "reid_raw.json").write_text(json.dumps(records))
    (directory / MARKER).write_text(json.dumps(params.marker(), indent=2))


def _move_into_place(staging: Path, target: Path) -> None:
    """Swap ``staging`` in for ``target``; an old synthetic dataset there is removed after the swap."""
    if not target.exists():
        staging.rename(target)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    target.rename(retired / target.name)
    staging.rename(target)
    shutil.rmtree(retired)


def generate_synthetic_cuhk(
    out_root: str | Path,
    num_train_ids: int = 200,
    num_val_ids: int = 50,
    num_test_ids: int = 100,
    images_per_id: int = 4,
    seed: int = 0,
    image_size: tuple[int, int] = (128, 48),
    scene: Scene = "street",
) -> Path:
    """Write (or reuse) a synthetic dataset at ``out_root/CUHK-PEDES`` and return that directory.

    A dataset whose marker records the same parameters is reused as it is. Generation happens in
    a staging directory that is renamed into place only when complete, so an interrupted run is
    never mistaken for a dataset. A ``CUHK-PEDES`` folder without the marker (real data) is never
    overwritten.

    Args:
        out_root: Directory that will hold ``CUHK-PEDES/``; pass it as the dataset root.
        num_train_ids: Training identities, ids 1..num_train_ids.
        num_val_ids: Validation identities, the next ids.
        num_test_ids: Test identities, the ids after validation.
        images_per_id: Images per identity in every split (2 captions each).
        seed: Same seed, same files, byte for byte.
        image_size: (height, width) of the images.
        scene: ``street`` (varied scenes and light) or ``studio`` (plain backdrop, neutral light).
    """
    size = (int(image_size[0]), int(image_size[1]))
    params = SyntheticParams(num_train_ids, num_val_ids, num_test_ids, images_per_id, seed, size, scene)
    out_root = Path(out_root)
    target = out_root / DATASET_DIR
    if _is_complete(target, params):
        logger.info("reusing synthetic dataset %s", target)
        return target
    if target.exists() and not (target / MARKER).exists():
        raise FileExistsError(
            f"{target} exists but was not written by the synthetic generator (no {MARKER}); "
            "pass another output directory, or move that folder away if it is a leftover"
        )
    out_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DATASET_DIR}.partial-", dir=out_root))
    try:
        logger.info("generating synthetic dataset %s (%s)", target, params)
        _write_dataset(staging, params)
        staging.chmod(0o755)  # mkdtemp makes it private to this user
        _move_into_place(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target
