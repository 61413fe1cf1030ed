"""Text beside and under the tiles of a PIL image grid (training's reconstruction grids, generate's
sample grid), placed by the glyphs' own boxes: anchors need FreeType, which a Pillow build may lack."""

from __future__ import annotations

from collections.abc import Iterable

from PIL import Image, ImageDraw, ImageFont

_MEASURE = ImageDraw.Draw(Image.new("RGB", (1, 1)))


def tile_font(tile_height: int, largest: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's default font at a fifth of a tile's height, from 9 px up to ``largest``."""
    return ImageFont.load_default(size=max(9, min(tile_height // 5, largest)))


def text_width(texts: Iterable[str], font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> float:
    """The width of the widest of ``texts`` (0 for none)."""
    return max((_MEASURE.textlength(text, font=font) for text in texts), default=0)


def ink_box(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of ``text``'s ink drawn at the origin."""
    return _MEASURE.textbbox((0, 0), text, font=font)


def draw_beside(draw: ImageDraw.ImageDraw, text: str, left: float, top: float, height: int,
                font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> None:
    """``text`` starting at ``left``, centred on the row [top, top + height)."""
    x0, upper, _, lower = ink_box(text, font)
    draw.text((left - x0, top + (height - (lower - upper)) / 2 - upper), text, fill=(0, 0, 0), font=font)


def draw_under(draw: ImageDraw.ImageDraw, text: str, left: float, width: int, y: float,
               font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> None:
    """``text`` centred on the column [left, left + width), drawn at height ``y``."""
    x0, _, x1, _ = ink_box(text, font)
    draw.text((left + (width - (x1 - x0)) / 2 - x0, y), text, fill=(0, 0, 0), font=font)
