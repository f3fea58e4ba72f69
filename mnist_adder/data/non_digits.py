"""Pictures that are not one digit, drawn from a seed as white ink on black: printed, bent and hand-drawn glyphs,
random hand-drawn shapes (training only), several digits side by side, scribbles, strokes and noise.

Three splits share no glyph: "train" (Greek, Cyrillic, Armenian, Hebrew, Georgian, N'Ko and Lao letters, arrows and
other signs) makes
the non-digit pictures the model is trained to refuse (`non_digit_images`); "val" and "test" (Latin letters and
common symbols; DejaVu and Liberation fonts) make the benchmark's (benchmarks/not_a_digit.py). Glyphs that
people read as digits too (O, I, l, S, Z, B, b, g, q, θ, δ, ε, Э...), strokes like "/" or "|", and the training
scripts' look-alikes of the Latin ones (Т, у, Ս, ט...) are in none.
"""

import glob
import warnings
from collections.abc import Callable
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from mnist_adder.data.photos import centred

SIZE = 84  # the ink is drawn on an 84x84 canvas (three times MNIST's), white on black
GLYPHS = {
    "train": "αηλξπφψωΓΔΞΠΣΨΩЖШЩЮЯФЦЙДЛЫИжшщюяфцйлыиԹԽԾՃՄՓՖթխծճփֆאמשתצקפÆŒæœŋħ♥♠♣♦♫★☆☺☼⌘※‰¤£¶©®±÷∞√∑≈≠≤≥∀∇⊕⊗←→↑↓↔↕⇒⇔✓"
    "ადჟტუფღშწჭჯߍߏߐߑߔߘߛߝߢߦߧຊຜຝພຟສຫປຢຂຄ",
    "val": "ACEFHKMNRVWXYacefhkmnrw#%&+=?@<",
    "test": "DGJLPTUdjtuvxy*$€^~>",
}
FONTS = {
    "train": sorted(
        set(glob.glob("/usr/share/fonts/truetype/dejavu/DejaVu*.ttf"))
        - set(glob.glob("/usr/share/fonts/truetype/dejavu/*Math*"))
    ),
    "val": sorted(glob.glob("/usr/share/fonts/truetype/dejavu/DejaVu*.ttf")),
    "test": sorted(glob.glob("/usr/share/fonts/truetype/liberation/Liberation*.ttf")),
}
TRAIN_FONTS = 21  # Debian's fonts-dejavu-core and fonts-dejavu-extra, as every reported run had them
# Hand-drawn glyphs as strokes (polylines in the unit square, y down), drawn with a wobbly hand.
STROKES = {
    "train": {
        "Δ": [[(0.5, 0), (0.95, 1), (0.05, 1), (0.5, 0)]],
        "→": [[(0, 0.5), (1, 0.5)], [(0.7, 0.2), (1, 0.5), (0.7, 0.8)]],
        "✓": [[(0.05, 0.55), (0.35, 1), (0.95, 0)]],
        "Π": [[(0.15, 1), (0.15, 0), (0.85, 0), (0.85, 1)]],
        "↑": [[(0.5, 1), (0.5, 0)], [(0.2, 0.3), (0.5, 0), (0.8, 0.3)]],
        "↓": [[(0.5, 0), (0.5, 1)], [(0.2, 0.7), (0.5, 1), (0.8, 0.7)]],
        "←": [[(1, 0.5), (0, 0.5)], [(0.3, 0.2), (0, 0.5), (0.3, 0.8)]],
        "↔": [[(0, 0.5), (1, 0.5)], [(0.25, 0.25), (0, 0.5), (0.25, 0.75)], [(0.75, 0.25), (1, 0.5), (0.75, 0.75)]],
        "Γ": [[(0.2, 1), (0.2, 0), (0.85, 0)]],
        "Ш": [[(0.1, 0), (0.1, 1), (0.9, 1), (0.9, 0)], [(0.5, 0), (0.5, 1)]],
        "Я": [
            [(0.8, 1), (0.8, 0), (0.35, 0), (0.2, 0.15), (0.2, 0.35), (0.35, 0.5), (0.8, 0.5)],
            [(0.5, 0.5), (0.15, 1)],
        ],
        "Ф": [
            [(0.5, 0), (0.5, 1)],
            [
                (0.5, 0.2),
                (0.15, 0.3),
                (0.1, 0.5),
                (0.15, 0.7),
                (0.5, 0.8),
                (0.85, 0.7),
                (0.9, 0.5),
                (0.85, 0.3),
                (0.5, 0.2),
            ],
        ],
        "Ψ": [[(0.1, 0.1), (0.15, 0.45), (0.5, 0.6), (0.85, 0.45), (0.9, 0.1)], [(0.5, 0), (0.5, 1)]],
        "Ω": [[(0.1, 1), (0.35, 1), (0.2, 0.7), (0.2, 0.3), (0.5, 0.05), (0.8, 0.3), (0.8, 0.7), (0.65, 1), (0.9, 1)]],
        "Σ": [[(0.85, 0), (0.15, 0), (0.55, 0.5), (0.15, 1), (0.85, 1)]],
        "π": [[(0.05, 0.1), (0.95, 0.1)], [(0.3, 0.1), (0.25, 1)], [(0.7, 0.1), (0.75, 1)]],
        "λ": [[(0.15, 0), (0.85, 1)], [(0.5, 0.5), (0.15, 1)]],
        "≠": [[(0.1, 0.35), (0.9, 0.35)], [(0.1, 0.65), (0.9, 0.65)], [(0.7, 0.05), (0.3, 0.95)]],
        "∇": [[(0.05, 0), (0.95, 0), (0.5, 1), (0.05, 0)]],
        "★": [[(0.5, 0.02), (0.79, 0.92), (0.02, 0.37), (0.98, 0.37), (0.21, 0.92), (0.5, 0.02)]],
        "♥": [
            [(0.5, 1), (0.1, 0.5), (0.1, 0.2), (0.3, 0.05), (0.5, 0.25), (0.7, 0.05), (0.9, 0.2), (0.9, 0.5), (0.5, 1)]
        ],
    },
    "val": {
        "A": [[(0.1, 1), (0.5, 0), (0.9, 1)], [(0.28, 0.6), (0.72, 0.6)]],
        "X": [[(0.1, 0), (0.9, 1)], [(0.9, 0), (0.1, 1)]],
        "H": [[(0.15, 0), (0.15, 1)], [(0.85, 0), (0.85, 1)], [(0.15, 0.5), (0.85, 0.5)]],
        "K": [[(0.2, 0), (0.2, 1)], [(0.85, 0), (0.2, 0.55)], [(0.4, 0.4), (0.85, 1)]],
        "M": [[(0.05, 1), (0.15, 0), (0.5, 0.7), (0.85, 0), (0.95, 1)]],
        "E": [[(0.85, 0), (0.2, 0), (0.2, 1), (0.85, 1)], [(0.2, 0.5), (0.7, 0.5)]],
        "#": [[(0.35, 0), (0.3, 1)], [(0.7, 0), (0.65, 1)], [(0, 0.35), (1, 0.35)], [(0, 0.68), (1, 0.68)]],
        "+": [[(0.5, 0.05), (0.5, 0.95)], [(0.05, 0.5), (0.95, 0.5)]],
    },
    "test": {
        "U": [[(0.15, 0), (0.15, 0.75), (0.5, 1), (0.85, 0.75), (0.85, 0)]],
        "L": [[(0.2, 0), (0.2, 1), (0.85, 1)]],
        "T": [[(0.05, 0), (0.95, 0)], [(0.5, 0), (0.5, 1)]],
        "J": [[(0.4, 0), (0.95, 0)], [(0.7, 0), (0.7, 0.8), (0.5, 1), (0.2, 0.85)]],
        "D": [[(0.2, 0), (0.2, 1), (0.6, 0.95), (0.85, 0.5), (0.6, 0.05), (0.2, 0)]],
        "*": [[(0.5, 0), (0.5, 1)], [(0.07, 0.25), (0.93, 0.75)], [(0.93, 0.25), (0.07, 0.75)]],
        ">": [[(0.15, 0.1), (0.85, 0.5), (0.15, 0.9)]],
        "^": [[(0.1, 0.9), (0.5, 0.1), (0.9, 0.9)]],
    },
}


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    canvas = Image.new("L", (SIZE, SIZE), 0)
    return canvas, ImageDraw.Draw(canvas)


def _ink(canvas: Image.Image, rng: np.random.Generator) -> np.ndarray:
    blurred = canvas.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.2))))
    return np.asarray(blurred, dtype=np.float32) / 255


@cache
def _font(path: str | None, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size) if path else ImageFont.load_default(size)


@cache
def fonts_drawing(split: str, glyph: str) -> list[str | None]:
    """The split's fonts that have `glyph`: a font that lacks it draws its "missing" box instead."""

    def drawn(path: str, text: str) -> bytes:
        canvas, draw = _canvas()
        draw.text((10, 10), text, fill=255, font=_font(path, 40))
        return canvas.tobytes()

    return [path for path in FONTS[split] if drawn(path, glyph) != drawn(path, "\uffff")] or [None]


def printed(split: str, rng: np.random.Generator, _digit_images: np.ndarray) -> np.ndarray:
    glyph = GLYPHS[split][rng.integers(len(GLYPHS[split]))]
    return print_glyph(glyph, fonts_drawing(split, glyph), rng)


def print_glyph(glyph: str, fonts: list[str | None], rng: np.random.Generator) -> np.ndarray:
    """`glyph` in one of `fonts`, at a random size, near the middle."""
    canvas, draw = _canvas()
    size = int(rng.integers(40, 70))
    font = _font(fonts[rng.integers(len(fonts))], size)
    left, top, right, bottom = draw.textbbox((0, 0), glyph, font=font)
    x = (SIZE - (right - left)) / 2 - left + rng.uniform(-6, 6)
    y = (SIZE - (bottom - top)) / 2 - top + rng.uniform(-6, 6)
    draw.text((x, y), glyph, fill=255, font=font)
    return _ink(canvas, rng)


def _polyline(draw: ImageDraw.ImageDraw, points: np.ndarray, width: int) -> None:
    draw.line([tuple(p) for p in points], fill=255, width=width, joint="curve")
    for x, y in points[[0, -1]]:  # round ends, as a pen leaves them
        draw.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=255)


def bent_glyph(split: str, rng: np.random.Generator, digit_images: np.ndarray) -> np.ndarray:
    """A printed glyph turned, slanted and bent by a smooth random field, its strokes thinned or thickened: drawn
    as a hand might, in shapes the split's few hand-drawn glyphs lack."""
    ink = torch.from_numpy(printed(split, rng, digit_images))[None, None]
    angle, slant = np.radians(rng.uniform(-15, 15)), rng.uniform(-0.3, 0.3)
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ [[1, slant], [0, 1]]
    affine = torch.tensor(np.hstack([turn, np.zeros((2, 1))]), dtype=torch.float32)[None]
    coarse = torch.from_numpy(rng.normal(0, rng.uniform(0.03, 0.1), (1, 2, 4, 4))).float()
    bend = F.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    grid = F.affine_grid(affine, [1, 1, SIZE, SIZE], align_corners=False) + bend
    ink = F.grid_sample(ink, grid, align_corners=False)
    grow = int(rng.integers(-1, 3))  # pixels added to each side of a stroke (-1: taken off)
    ink = F.max_pool2d(ink, 2 * grow + 1, 1, grow) if grow >= 0 else -F.max_pool2d(-ink, 3, 1, 1)
    return ink[0, 0].numpy()


def _by_hand(strokes: list, rng: np.random.Generator) -> np.ndarray:
    """`strokes` (polylines in the unit square, y down) drawn with a wobbly hand, at a random size, place and slant."""
    canvas, draw = _canvas()
    width, height = SIZE * rng.uniform(0.5, 0.85, 2)
    left, top = rng.uniform(0, SIZE - width), rng.uniform(0, SIZE - height)
    shear, width_px = rng.uniform(-0.25, 0.25), int(rng.integers(4, 10))
    for stroke in strokes:
        points = np.asarray(stroke, dtype=np.float64)
        dense = np.concatenate([np.linspace(a, b, 8, endpoint=False) for a, b in zip(points[:-1], points[1:])])
        dense = np.vstack([dense, points[-1:]])
        dense += np.cumsum(rng.normal(0, 0.012, dense.shape), axis=0)  # a hand wobbles, and drifts
        x = left + (dense[:, 0] + shear * (1 - dense[:, 1])) * width / (1 + abs(shear))
        _polyline(draw, np.stack([x, top + dense[:, 1] * height], 1), width_px)
    return _ink(canvas, rng)


def hand_drawn(split: str, rng: np.random.Generator, _digit_images: np.ndarray) -> np.ndarray:
    glyphs = STROKES[split]
    return _by_hand(glyphs[list(glyphs)[rng.integers(len(glyphs))]], rng)


def _rounded(points: np.ndarray) -> np.ndarray:
    """Chaikin's corner cutting, twice: a smooth curve from the first point to the last, near the others."""
    for _ in range(2):
        cuts = np.stack([0.75 * points[:-1] + 0.25 * points[1:], 0.25 * points[:-1] + 0.75 * points[1:]], 1)
        points = np.vstack([points[:1], cuts.reshape(-1, 2), points[-1:]])
    return points


def random_shape(_split: str, rng: np.random.Generator, _digit_images: np.ndarray) -> np.ndarray:
    """One or two pen strokes through 3-4 random points each, half of them rounded into curves: hand-drawn shapes
    of no alphabet (never nearly a line, which people read as a 1)."""
    while True:
        strokes = [rng.uniform(0, 1, (int(rng.integers(3, 5)), 2)) for _ in range(int(rng.integers(1, 3)))]
        strokes = [_rounded(points) if rng.random() < 0.5 else points for points in strokes]
        points = np.vstack(strokes)
        spread = np.linalg.svd(points - points.mean(0), compute_uv=False)
        if spread[1] > 0.4 * spread[0]:  # not nearly a line
            break
    low, high = points.min(0), points.max(0)
    return _by_hand([(points - low) / np.maximum(high - low, 1e-6) for points in strokes], rng)


def several_digits(_split: str, rng: np.random.Generator, digit_images: np.ndarray) -> np.ndarray:
    count = int(rng.choice([2, 2, 2, 3]))
    picked = digit_images[rng.choice(len(digit_images), count, replace=False)]
    step = int(rng.uniform(16, 24))  # MNIST digits are 20 px wide at most: the digits nearly touch, or not
    strip = np.zeros((28 + 8, step * (count - 1) + 28), dtype=np.float32)
    for k, digit in enumerate(picked):
        dy = int(rng.integers(0, 9))
        strip[dy : dy + 28, k * step : k * step + 28] = np.maximum(strip[dy : dy + 28, k * step : k * step + 28], digit)
    side = max(strip.shape) + 4
    square = np.zeros((side, side), dtype=np.float32)  # the phone writes a square; the strip sits in it
    top, left = (side - strip.shape[0]) // 2, (side - strip.shape[1]) // 2
    square[top : top + strip.shape[0], left : left + strip.shape[1]] = strip
    return square


def scribble(_split: str, rng: np.random.Generator, _digit_images: np.ndarray) -> np.ndarray:
    """A pen that loops back and forth: each coordinate a sum of three waves of random frequency and phase."""
    canvas, draw = _canvas()
    t = np.linspace(0, 2 * np.pi, 200)
    waves = [
        sum(rng.uniform(0.3, 1) * np.sin(f * t + rng.uniform(0, 2 * np.pi)) for f in rng.uniform(0.5, 4, 3))
        for _ in range(2)
    ]
    points = np.stack(waves, 1)
    points -= points.min(0)
    points *= SIZE * rng.uniform(0.5, 0.9, 2) / np.maximum(points.max(0), 1e-6)
    points += rng.uniform(0, SIZE - points.max(0))
    _polyline(draw, points, int(rng.integers(3, 9)))
    return _ink(canvas, rng)


def strokes_and_noise(_split: str, rng: np.random.Generator, _digit_images: np.ndarray) -> np.ndarray:
    canvas, draw = _canvas()
    kind = rng.integers(3)
    if kind == 0:  # straight strokes every which way
        for _ in range(int(rng.integers(3, 8))):
            _polyline(draw, rng.uniform(4, SIZE - 4, (2, 2)), int(rng.integers(3, 9)))
        return _ink(canvas, rng)
    if kind == 1:  # dots and blobs
        for _ in range(int(rng.integers(5, 25))):
            x, y, r = *rng.uniform(6, SIZE - 6, 2), rng.uniform(2, 7)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
        return _ink(canvas, rng)
    noise = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8))  # smudged noise, thresholded
    smooth = np.asarray(noise.filter(ImageFilter.GaussianBlur(float(rng.uniform(1.5, 4)))))
    return (smooth > np.quantile(smooth, rng.uniform(0.6, 0.85))).astype(np.float32)


MAKERS: dict[str, Callable[[str, np.random.Generator, np.ndarray], np.ndarray]] = {
    "printed": printed,
    "hand-drawn": hand_drawn,
    "bent glyph": bent_glyph,
    "random shape": random_shape,
    "several digits": several_digits,
    "scribble": scribble,
    "strokes and noise": strokes_and_noise,
}


def non_digit_images(count: int, seed: int, digit_images: torch.Tensor) -> torch.Tensor:
    """`count` MNIST-like non-digit pictures of the "train" split, uint8 [count, 28, 28], the kinds in turn, made
    as `predict` makes a picture (`photos.centred`); the first 10,000 of `digit_images` (uint8 [N, 28, 28]) make the
    several-digit pictures."""
    if len(FONTS["train"]) != TRAIN_FONTS:  # other fonts print other pictures: another training set
        warnings.warn(
            f"{len(FONTS['train'])} of the {TRAIN_FONTS} DejaVu fonts found (Pillow's default font if none): the "
            "printed training non-digits differ from those of the reported runs; "
            "apt-get install fonts-dejavu-core fonts-dejavu-extra",
            stacklevel=2,
        )
    rng = np.random.default_rng([seed, 2])
    pool = digit_images[:10_000].numpy().astype(np.float32) / 255
    makers = list(MAKERS.values())
    images = [centred(makers[k % len(makers)]("train", rng, pool))[0] for k in range(count)]
    return (torch.stack(images) * 255).round().to(torch.uint8) if images else torch.zeros(0, 28, 28, dtype=torch.uint8)
