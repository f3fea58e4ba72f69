"""A person's own digit pictures made MNIST-like, and the manifest (CSV of file,number) that lists them.

MNIST was made by cropping to the ink, scaling into a 20x20 box and centring by the centre of mass
in 28x28, white ink on black. `to_mnist` does the same to any picture PIL reads.
"""

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from mnist_adder.errors import UsageError

NUMBERS = [str(n) for n in range(10)]
MIN_CONTRAST = 0.1  # ink must differ from the background by this much (0..1 scale)


class PhotoError(UsageError):
    """A picture or manifest row that cannot be predicted; the message says why."""


def gray_levels(image: Image.Image) -> np.ndarray:
    """A picture (its first frame) as float32 gray levels in [0, 1]; where it has transparency, the opacity."""
    image.seek(0)
    frame = image.convert("RGBA") if "A" in image.getbands() or "transparency" in image.info else image
    if frame.mode == "RGBA" and np.asarray(frame.getchannel("A")).min() < 255:
        return np.asarray(frame.getchannel("A"), dtype=np.float32) / 255  # opaque strokes are the ink
    if frame.mode.startswith("I") or frame.mode == "F":  # 16-bit, 32-bit or float gray: convert("L") would clip it
        gray = np.asarray(frame, dtype=np.float32)
        return gray / max(1.0, float(gray.max()))  # its own scale, whatever its depth (12 bits in 16, say)
    return np.asarray(frame.convert("L"), dtype=np.float32) / 255


def load_gray(path: Path) -> np.ndarray:
    """The picture file's `gray_levels`, a big JPEG's decoded at reduced size (Pillow's draft mode scales by 1/2,
    1/4 or 1/8 and keeps the longer side at least DECODE_SIZE); PhotoError, in one line, if it cannot be read."""
    try:
        with Image.open(path) as image:
            image.draft("L", _scaled(image.size, DECODE_SIZE))  # a no-op for formats other than JPEG
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # a phone's photo as it was held, not as its sensor saw it
            return gray_levels(image)
    except FileNotFoundError:
        raise PhotoError(f"no such file: {path}") from None
    except Image.DecompressionBombError:
        raise PhotoError(f"too many pixels (over {Image.MAX_IMAGE_PIXELS:,}): {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise PhotoError(f"not a readable image: {path} ({type(err).__name__})") from None


def to_mnist(gray: np.ndarray) -> torch.Tensor:
    """Bright ink on black, cropped to the ink, longer side 20 px, centred by mass in 28x28: float [1, 28, 28].

    The paper's brightness is estimated around each pixel, not once for the whole picture, so a lighting
    gradient, a shadow or tinted, grainy paper leaves no grey slab beside the digit."""
    gray = _shrunk(gray, WORK_SIZE)  # no filter runs at full size: 28x28 needs far less
    paper = float(np.median(np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])))  # the border
    if paper > 0.5:  # dark ink on light paper
        gray = 1 - gray
    if gray.shape == (28, 28) and paper in (0, 1):  # already MNIST-like: leave it exactly as it is
        return torch.from_numpy(gray.copy()).unsqueeze(0)
    ink = _ink(gray)
    if ink.max() < MIN_CONTRAST:
        raise PhotoError("no ink found (the picture is blank or has too little contrast)")
    level = _otsu(ink)  # between the paper's residue and the strokes: half of it is taken as black
    ink = np.clip((ink - level / 2) / (np.percentile(ink[ink >= level], 90) - level / 2), 0, 1)
    band = max(1, round(EDGE * max(ink.shape)))
    if ink[band:-band, band:-band].sum() < (1 - EDGE_INK) * ink.sum():
        raise PhotoError("the ink runs off the picture's edge: a digit cut off? Leave a margin around it")
    return centred(ink)


def centred(ink: np.ndarray) -> torch.Tensor:
    """Bright ink on black in [0, 1], cropped to its central mass, longer side 20 px, centred by mass in 28x28:
    float [1, 28, 28], as MNIST's digits."""
    top, bottom = _span(ink.sum(1))
    left, right = _span(ink.sum(0))
    ink = ink[top : bottom + 1, left : right + 1]
    height, width = ink.shape
    size = _scaled((width, height), 20)
    ink = np.asarray(Image.fromarray(ink).resize(size, Image.Resampling.LANCZOS), dtype=np.float32).clip(0, 1)
    weights = ink / ink.sum()
    centre_y = (weights.sum(1) * np.arange(ink.shape[0])).sum()
    centre_x = (weights.sum(0) * np.arange(ink.shape[1])).sum()
    top = int(np.clip(round(13.5 - centre_y), 0, 28 - ink.shape[0]))
    left = int(np.clip(round(13.5 - centre_x), 0, 28 - ink.shape[1]))
    canvas = np.zeros((28, 28), dtype=np.float32)
    canvas[top : top + ink.shape[0], left : left + ink.shape[1]] = ink
    return torch.from_numpy(canvas).unsqueeze(0)


EDGE, EDGE_INK = 0.02, 0.01  # more than 1 % of the ink within 2 % of the picture's edge: it runs off it
WORK_SIZE = 512  # the ink is worked out on a copy this large (longer side): plenty for a 20 px digit
DECODE_SIZE = 3 * WORK_SIZE // 2  # a JPEG is decoded at least this large (longer side): a margin over WORK_SIZE
PAPER_SIZE = 64  # the background is estimated on a copy this large (longer side): fast, and smooth anyway


def _scaled(size: tuple[int, int], longest: int) -> tuple[int, int]:
    """(width, height) scaled so that the longer side is `longest`, each side at least 1."""
    factor = longest / max(size)
    return max(1, round(size[0] * factor)), max(1, round(size[1] * factor))


def _shrunk(gray: np.ndarray, longest: int) -> np.ndarray:
    """`gray` averaged down to at most `longest` on its longer side, in floats (nothing is rounded)."""
    if max(gray.shape) <= longest:
        return gray
    picture = Image.fromarray(gray.astype(np.float32, copy=False))
    return np.asarray(picture.resize(_scaled(picture.size, longest), Image.Resampling.BOX))


def _ink(gray: np.ndarray) -> np.ndarray:
    """Bright ink above the local background: the paper's level under each pixel is a grey-level opening
    (a minimum then a maximum filter wider than a stroke, which removes the strokes), smoothed."""
    picture = Image.fromarray((gray * 255).round().astype(np.uint8))  # Pillow's filters work on 8-bit grey
    small = picture.resize(_scaled(picture.size, PAPER_SIZE), Image.Resampling.BOX)
    window = 2 * (PAPER_SIZE // 12) + 1  # wider than a stroke of a digit that fills the picture
    paper = small.filter(ImageFilter.MinFilter(window)).filter(ImageFilter.MaxFilter(window))
    paper = paper.filter(ImageFilter.GaussianBlur(window / 2)).resize(picture.size, Image.Resampling.BILINEAR)
    denoised = picture.filter(ImageFilter.GaussianBlur(max(picture.size) / 300))  # grain, JPEG blocks
    return np.clip(np.asarray(denoised, np.float32) - np.asarray(paper, np.float32), 0, None) / 255


def _otsu(values: np.ndarray) -> float:
    """The level that best splits `values` into two classes (Otsu's method, on a 256-bin histogram)."""
    counts, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(counts)
    mean = np.cumsum(counts * centres)
    below, above = weight[:-1], weight[-1] - weight[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = below * above * (mean[:-1] / below - (mean[-1] - mean[:-1]) / above) ** 2
    return float(centres[np.nanargmax(between) + 1]) if np.isfinite(between).any() else float(values.max())


def _span(mass: np.ndarray, trim: float = 0.005) -> tuple[int, int]:
    """First and last index inside the central mass: specks of grain far from the digit fall outside."""
    cumulative = np.cumsum(mass) / mass.sum()
    return int(np.searchsorted(cumulative, trim)), int(np.searchsorted(cumulative, 1 - trim))


def read_manifest(path: Path, reserved: tuple[str, ...] = ()) -> tuple[list[str], list[dict]]:
    """The columns of a CSV with at least file,number, and its rows: {"columns" (the row as written), "file",
    "path" (the picture's, from the CSV's folder), "number" (an int; as written where it is not 0..9), "error"}.
    The pictures are not read here (see `read_picture`). A column named as one of `reserved` is refused."""
    if not path.is_file():
        raise PhotoError(f"predict_manifest {str(path)!r}: no such file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            names = {name.strip(): name for name in columns}
            missing = {"file", "number"} - set(names)
            if missing:
                raise PhotoError(
                    f"predict_manifest {str(path)!r} lacks the column(s) {', '.join(sorted(missing))} "
                    "(it needs a header line: file,number)"
                )
            if clash := [name for name in reserved if name in names]:
                raise PhotoError(
                    f"predict_manifest {str(path)!r} has the column(s) {', '.join(clash)}, the names the "
                    "predictions are written under: rename them"
                )
            rows = [{"columns": {k: row.get(k) or "" for k in columns}} for row in reader]
    except (UnicodeDecodeError, csv.Error) as err:
        raise PhotoError(f"predict_manifest {str(path)!r} is not a UTF-8 CSV file ({err})") from None
    for row in rows:
        file, number = (row["columns"][names[key]].strip() for key in ("file", "number"))
        row.update(file=file, path=path.parent / file, number=int(number) if number in NUMBERS else number, error="")
        if not file:
            row["error"] = "no file named in this row"
        elif number not in NUMBERS:
            row["error"] = f"number must be an integer 0..9, got {number!r}"
    return columns, rows


def read_picture(path: Path) -> tuple[torch.Tensor | None, str]:
    """A manifest row's picture made MNIST-like, `to_mnist(load_gray(path))`, and "", or None and the reason it
    cannot be (the row's error, in one line)."""
    try:
        return to_mnist(load_gray(path)), ""
    except Exception as err:  # whatever a row's picture does wrong, it fails that row alone
        return None, str(err) if isinstance(err, PhotoError) else f"{type(err).__name__}: {err}"
