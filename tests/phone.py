"""Phone-like photos of a digit: dark ink on tinted paper, a lighting gradient, a slight rotation, the
digit anywhere on a larger sheet, blur, grain and JPEG."""

import io

import numpy as np
from PIL import Image, ImageFilter


def phone_photo(digit: np.ndarray, rng: np.random.Generator, gradient: float | None = None) -> Image.Image:
    """`digit`: white ink on black, float in [0, 1], any size (an MNIST image, say). An RGB picture."""
    size = int(rng.integers(110, 220))
    ink = Image.fromarray((digit * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    ink = ink.rotate(float(rng.uniform(-8, 8)), resample=Image.Resampling.BICUBIC, expand=True)
    width, height = (int(ink.width * rng.uniform(1.5, 2.5)) for _ in range(2))
    alpha = np.zeros((height, width), np.float32)
    top, left = int(rng.integers(0, height - ink.height)), int(rng.integers(0, width - ink.width))
    alpha[top : top + ink.height, left : left + ink.width] = np.asarray(ink, np.float32) / 255
    paper = rng.uniform(0.75, 0.95) * rng.uniform(0.88, 1.0, 3)  # tinted
    pen = rng.uniform(0.05, 0.3) * rng.uniform(0.7, 1.0, 3)
    pixels = paper * (1 - alpha[..., None]) + pen * alpha[..., None]
    angle = rng.uniform(0, 2 * np.pi)  # light falls off across the sheet, by up to `gradient`
    ys, xs = np.mgrid[0:height, 0:width]
    ramp = np.cos(angle) * xs / width + np.sin(angle) * ys / height
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    pixels *= (1 - (rng.uniform(0.1, 0.4) if gradient is None else gradient) * ramp)[..., None]
    picture = Image.fromarray((pixels.clip(0, 1) * 255).astype(np.uint8))
    picture = picture.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5))))
    grain = rng.normal(0, rng.uniform(0.01, 0.04), (height, width, 1)) * 255
    picture = Image.fromarray((np.asarray(picture, np.float32) + grain).clip(0, 255).astype(np.uint8))
    jpeg = io.BytesIO()
    picture.save(jpeg, "JPEG", quality=int(rng.integers(50, 86)))
    return Image.open(io.BytesIO(jpeg.getvalue())).convert("RGB")
