"""Photos of printed digits, made here: dark ink on light paper, several fonts, sizes and offsets."""

import glob

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONTS = sorted(glob.glob("/usr/share/fonts/truetype/dejavu/DejaVu*.ttf"))


def font(k: int, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(FONTS[k % len(FONTS)], size) if FONTS else ImageFont.load_default(size)


def printed_digit(digit: int, k: int, rng: np.random.Generator) -> Image.Image:
    """One RGB picture, larger than 28x28: paper colour, ink colour, font, size and position (off the edge) vary."""
    return printed_text(str(digit), k, rng)


def printed_text(text: str, k: int, rng: np.random.Generator) -> Image.Image:
    """As `printed_digit`, of any short text (a letter, say)."""
    width, height = int(rng.integers(40, 120)), int(rng.integers(40, 120))
    paper = tuple(int(v) for v in rng.integers(190, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    picture = Image.new("RGB", (width, height), paper)
    size = int(rng.integers(20, min(width, height) - 8))
    glyph = font(k, size)
    left, top, right, bottom = ImageDraw.Draw(picture).textbbox((0, 0), text, font=glyph)
    x = int(rng.integers(2, max(3, width - (right - left) - 2))) - left  # a margin: the ink stays off the edge
    y = int(rng.integers(2, max(3, height - (bottom - top) - 2))) - top
    ImageDraw.Draw(picture).text((x, y), text, fill=ink, font=glyph)
    return picture
