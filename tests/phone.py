"""Phone-like photos of a digit: dark ink on tinted paper, a lighting gradient, a slight rotation, the
digit anywhere on a larger sheet, blur, grain and JPEG."""

import io

import numpy as np
from PIL import Image, ImageFilter

TWELVE_MEGAPIXELS = (4032, 3024)  # a phone camera's photo, landscape


def phone_photo(digit: np.ndarray, rng: np.random.Generator, gradient: float | None = None) -> Image.Image:
    """`digit`: white ink on black, float in [0, 1], any size (an MNIST image, say). An RGB picture."""
    return Image.open(io.BytesIO(phone_jpeg(digit, rng, gradient))).convert("RGB")


def phone_jpeg(
    digit: np.ndarray, rng: np.random.Generator, gradient: float | None = None, sheet: tuple[int, int] | None = None
) -> bytes:
    """`phone_photo`'s JPEG file. `sheet` (width, height): the photo's size, the digit written large on it (a
    sixth to two fifths of the shorter side tall), as a phone's camera takes it; by default the digit is 110-220 px
    tall on a sheet 1.5-2.5 times its size."""
    size = int(rng.integers(110, 220)) if sheet is None else int(min(sheet) * rng.uniform(1 / 6, 0.4))
    ink = Image.fromarray((digit * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    ink = ink.rotate(float(rng.uniform(-8, 8)), resample=Image.Resampling.BICUBIC, expand=True)
    width, height = sheet or (int(ink.width * rng.uniform(1.5, 2.5)) for _ in range(2))
    alpha = np.zeros((height, width), np.float32)
    top, left = int(rng.integers(0, height - ink.height)), int(rng.integers(0, width - ink.width))
    alpha[top : top + ink.height, left : left + ink.width] = np.asarray(ink, np.float32) / 255
    paper = rng.uniform(0.75, 0.95) * rng.uniform(0.88, 1.0, 3)  # tinted
    pen = rng.uniform(0.05, 0.3) * rng.uniform(0.7, 1.0, 3)
    pixels = paper * (1 - alpha[..., None]) + pen * alpha[..., None]
    angle = rng.uniform(0, 2 * np.pi)  # light falls off across the sheet, by up to `gradient`
    ramp = np.cos(angle) * np.arange(width) / width + np.sin(angle) * np.arange(height)[:, None] / height
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    pixels *= (1 - (rng.uniform(0.1, 0.4) if gradient is None else gradient) * ramp)[..., None]
    picture = Image.fromarray((pixels.clip(0, 1) * 255).astype(np.uint8))
    blur = rng.uniform(0.5, 1.5) if sheet is None else rng.uniform(1, 3)  # a phone's photo is sharp to a few px
    picture = picture.filter(ImageFilter.GaussianBlur(float(blur)))
    grain = rng.normal(0, rng.uniform(0.01, 0.04), (height, width, 1)) * 255
    picture = Image.fromarray((np.asarray(picture, np.float32) + grain).clip(0, 255).astype(np.uint8))
    jpeg = io.BytesIO()
    picture.save(jpeg, "JPEG", quality=int(rng.integers(50, 86) if sheet is None else rng.integers(80, 96)))
    return jpeg.getvalue()
