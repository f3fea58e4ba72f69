"""The benchmark's non-digit pictures: mnist_adder/data/non_digits.py's "val" and "test" splits and digits cut off
by the picture's edge, each picture photographed as a phone would (tests/phone.py), a cut-off digit's photo then
cropped through the digit."""

import numpy as np
from PIL import Image

from mnist_adder.data.non_digits import MAKERS
from phone import phone_photo

KINDS = ("printed", "hand-drawn", "several digits", "cut-off digit", "scribble", "strokes and noise")


def cut_off_digit(_split: str, rng: np.random.Generator, digit_images: np.ndarray) -> np.ndarray:
    """A digit of which the picture holds 40-65 %: the rest lies beyond one of its edges (see `photograph`)."""
    return digit_images[rng.integers(len(digit_images))]


def photograph(kind: str, ink: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """`ink` as a phone photographs it; a cut-off digit's photo is then cropped through the digit, found as where
    the photo differs from one of blank paper taken with the same draws."""
    blank_rng = np.random.default_rng()
    blank_rng.bit_generator.state = rng.bit_generator.state
    picture = phone_photo(ink, rng)
    if kind != "cut-off digit":
        return picture
    paper = phone_photo(np.zeros_like(ink), blank_rng)
    difference = np.abs(np.asarray(picture, np.float32) - np.asarray(paper, np.float32)).max(2)
    rows, cols = np.nonzero(difference > 60)  # the digit's strokes
    keep = rng.uniform(0.4, 0.65)
    box = [0, 0, picture.width, picture.height]  # left, top, right, bottom
    edge = int(rng.integers(4))  # the picture ends inside the digit: at its right, left, bottom or top
    strokes = cols if edge < 2 else rows
    low, high = int(strokes.min()), int(strokes.max())
    kept = int(keep * (high - low))
    box[(2, 0, 3, 1)[edge]] = low + kept if edge % 2 == 0 else high - kept
    return picture.crop(tuple(box))


def non_digit_photos(
    split: str, per_kind: int, digit_images: np.ndarray, seed: int = 0
) -> dict[str, list[Image.Image]]:
    """`per_kind` phone photos of each kind; `digit_images` (float [N, 28, 28], white on black): the MNIST images the
    several-digit and cut-off pictures are made of."""
    rng = np.random.default_rng([seed, ("val", "test").index(split)])
    makers = {**MAKERS, "cut-off digit": cut_off_digit}
    return {
        kind: [photograph(kind, makers[kind](split, rng, digit_images), rng) for _ in range(per_kind)] for kind in KINDS
    }
