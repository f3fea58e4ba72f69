"""Pictures for TensorBoard: a confusion matrix and a labelled grid of samples, as [3, H, W] tensors."""

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

CELL = 32
FONT = ImageFont.load_default(size=14)  # legible at TensorBoard's default image size


def confusion_image(matrix: torch.Tensor) -> torch.Tensor:
    """Row-normalised confusion matrix (rows: true digit, columns: predicted), counts written in each cell."""
    counts = matrix.cpu().long()
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
    n = len(counts)
    canvas = Image.new("RGB", ((n + 1) * CELL, (n + 1) * CELL), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        draw.text((10, (i + 1) * CELL + 8), str(i), fill="black", font=FONT)  # true digit, left
        draw.text(((i + 1) * CELL + 12, 8), str(i), fill="black", font=FONT)  # predicted digit, top
        for j in range(n):
            shade = int(255 * (1 - rates[i, j].item()) ** 0.3)  # a few errors still show
            box = ((j + 1) * CELL, (i + 1) * CELL, (j + 2) * CELL - 1, (i + 2) * CELL - 1)
            draw.rectangle(box, fill=(shade, shade, 255))
            draw.text(
                (box[0] + 3, box[1] + 8), str(counts[i, j].item()), fill="black" if shade > 128 else "white", font=FONT
            )
    return _to_tensor(canvas)


def sample_grid(
    image: torch.Tensor,
    number: torch.Tensor,
    digit: torch.Tensor,
    sum: torch.Tensor,
    digit_pred: torch.Tensor,
    sum_pred: torch.Tensor,
    columns: int = 6,
) -> torch.Tensor:
    """Each sample drawn 3x with 'true <digit>+<number>=<sum>' and, in red, 'net <digit>, <sum>' under it."""
    size, label = 84, 40
    rows = max(1, -(-len(image) // columns))
    canvas = Image.new("RGB", (columns * size, rows * (size + label)), "white")
    draw = ImageDraw.Draw(canvas)
    pixels = (image.float().cpu().clamp(0, 1) * 255).to(torch.uint8).squeeze(1).numpy()
    number, digit, sum, digit_pred, sum_pred = (t.tolist() for t in (number, digit, sum, digit_pred, sum_pred))
    for k in range(len(image)):
        x, y = (k % columns) * size, (k // columns) * (size + label)
        canvas.paste(Image.fromarray(pixels[k]).resize((size, size)).convert("RGB"), (x, y))
        draw.text((x + 4, y + size + 2), f"true {digit[k]}+{number[k]}={sum[k]}", fill="black", font=FONT)
        draw.text((x + 4, y + size + 20), f"net {digit_pred[k]}, {sum_pred[k]}", fill="red", font=FONT)
    return _to_tensor(canvas)


def _to_tensor(canvas: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)
