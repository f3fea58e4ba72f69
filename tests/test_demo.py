"""The demo page's function, without a browser: what it reads, and what it answers (the browser test is slow)."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from demo import predictor
from lightning_module import MNISTAdder
from net import split_logits
from photos import gray_levels, to_mnist
from printed import printed_digit


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MNISTAdder(channels=(8, 16, 16), hidden=32).eval()


def drawing(stroke: bool) -> dict:
    """A Gradio sketchpad's value: a transparent RGBA canvas, with a white stroke on it or empty."""
    canvas = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    if stroke:
        ImageDraw.Draw(canvas).line([(100, 30), (100, 170)], fill=(255, 255, 255, 255), width=16)
    return {"composite": canvas}


def expected(model, picture: Image.Image, number: int) -> tuple[list[float], list[float]]:
    """Both heads' probabilities for this picture and number, straight from the model."""
    with torch.no_grad():
        digit_logits, sum_logits = split_logits(model(to_mnist(gray_levels(picture))[None], torch.tensor([number])))
    return digit_logits[0].softmax(0).tolist(), sum_logits[0].softmax(0).tolist()


def test_the_answer_is_both_heads_of_the_picture_it_read(model):
    photo = printed_digit(7, 0, np.random.default_rng(0))
    line, digit_probs, sum_probs, shown = predictor(model)(drawing(False), photo, 4)
    digits, sums = expected(model, photo, 4)  # an empty drawing: the photo is read
    digit, total = int(np.argmax(digits)), int(np.argmax(sums))
    assert line == f"digit {digit} ({100 * digits[digit]:.1f} %) + number 4 -> sum {total} ({100 * sums[total]:.1f} %)"
    assert list(digit_probs.values()) == pytest.approx(digits, abs=1e-6)
    assert list(sum_probs.values()) == pytest.approx(sums, abs=1e-6) and list(sum_probs) == [str(k) for k in range(19)]
    assert shown.size == (112, 112) and np.asarray(shown).max() == 255  # the white ink the net read


def test_a_stroke_is_read_before_the_photo_and_nothing_asks_for_a_picture(model):
    photo = printed_digit(7, 0, np.random.default_rng(0))
    stroke = drawing(True)
    _, digit_probs, sum_probs, _ = predictor(model)(stroke, photo, 2)
    digits, sums = expected(model, stroke["composite"], 2)
    assert list(digit_probs.values()) == pytest.approx(digits, abs=1e-6)
    assert list(sum_probs.values()) == pytest.approx(sums, abs=1e-6)
    assert predictor(model)(drawing(False), None, 2)[0] == "Draw a digit or upload a photo first."
