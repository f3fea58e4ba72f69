"""The demo page's function, without a browser: what it reads, and what it answers (the browser test is slow)."""

import numpy as np
import pytest
import torch
from gradio.data_classes import ImageData
from PIL import Image, ImageDraw

from demo import DRAW, PHOTO, answer_line, build_page, predictor
from lightning_module import MNISTAdder
from mnist_adder.data.photos import gray_levels, load_gray, to_mnist
from mnist_adder.model.net import split_logits
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
    line, digit_probs, sum_probs, shown = predictor(model)(PHOTO, drawing(False), photo, 4)
    digits, sums = expected(model, photo, 4)
    digit, total = int(np.argmax(digits)), int(np.argmax(sums))
    assert line == answer_line(torch.tensor(digits), torch.tensor(sums), 4)  # an untrained model: unsure
    assert line.startswith(f"digit {digit} ({100 * digits[digit]:.1f} %) + number 4 -> sum {total} (")
    assert list(digit_probs.values()) == pytest.approx(digits, abs=1e-6)
    assert list(sum_probs.values()) == pytest.approx(sums, abs=1e-6) and list(sum_probs) == [str(k) for k in range(19)]
    assert shown.size == (112, 112) and np.asarray(shown).max() == 255  # the white ink the net read


def test_the_tab_shown_is_read_and_an_empty_one_asks_for_a_picture(model):
    photo = printed_digit(7, 0, np.random.default_rng(0))
    stroke = drawing(True)
    for tab, picture in ((DRAW, stroke["composite"]), (PHOTO, photo)):  # both inputs are there, one is on screen
        _, digit_probs, sum_probs, _ = predictor(model)(tab, stroke, photo, 2)
        digits, sums = expected(model, picture, 2)
        assert list(digit_probs.values()) == pytest.approx(digits, abs=1e-6), tab
        assert list(sum_probs.values()) == pytest.approx(sums, abs=1e-6), tab
    nothing = ("Draw a digit or upload a photo first.", None, None, None)
    assert predictor(model)(PHOTO, stroke, None, 2) == nothing  # the hidden stroke is not answered
    assert predictor(model)(DRAW, drawing(False), photo, 2) == nothing  # nor the hidden photo


def test_an_unclear_digit_is_answered_as_unsure():
    sums = torch.full((19,), 1 / 19)
    sure, unclear = torch.tensor([0.99] + [0.01 / 9] * 9), torch.tensor([0.5, 0.3] + [0.025] * 8)
    assert answer_line(sure, sums, 4) == "digit 0 (99.0 %) + number 4 -> sum 0 (5.3 %)"
    assert answer_line(unclear, sums, 4) == "digit 0 (50.0 %) + number 4 -> sum 0 (5.3 %), unsure"


def test_a_picture_that_looks_like_no_digit_is_answered_so_with_no_sum(model):
    photo = printed_digit(7, 0, np.random.default_rng(0))
    model.not_digit_above.fill_(float("-inf"))  # every picture scores above it
    line, digit_probs, sum_probs, shown = predictor(model)(PHOTO, drawing(False), photo, 4)
    assert line.startswith("not a digit") and "sum" not in line
    assert digit_probs is None and sum_probs is None and shown.size == (112, 112)  # still shows what it read


@pytest.mark.parametrize("out_of_range", [0, 65536])
def test_a_port_taken_or_out_of_range_is_one_line(tmp_path, monkeypatch, capsys, out_of_range):
    import socket

    from demo import main

    model = MNISTAdder(channels=(8, 16, 16), hidden=32)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "m.ckpt")
    monkeypatch.setattr("demo.MNISTAdder.load_from_checkpoint", lambda *args, **kwargs: model)
    with pytest.raises(SystemExit):
        main(["--ckpt_path", str(tmp_path / "m.ckpt"), "--port", str(out_of_range)])
    assert f"--port must be within 1..65535, got {out_of_range}" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"cannot serve on 127.0.0.1:{port} .*: try another --port or --host"):
            main(["--ckpt_path", str(tmp_path / "m.ckpt"), "--port", str(port)])


def test_an_uploaded_photo_keeps_its_transparency_as_predict_reads_it(model, tmp_path):
    """Black ink on a transparent background: converted to RGB on upload, it would be black on black, blank."""
    ink = Image.eval(printed_digit(4, 0, np.random.default_rng(0)).convert("L"), lambda v: 255 - v)
    Image.merge("RGBA", [Image.new("L", ink.size, 0)] * 3 + [ink]).save(tmp_path / "ink.png")
    photo = next(block for block in build_page(model).blocks.values() if getattr(block, "elem_id", None) == "photo")
    uploaded = photo.preprocess(ImageData(path=str(tmp_path / "ink.png")))
    assert np.array_equal(to_mnist(gray_levels(uploaded)), to_mnist(load_gray(tmp_path / "ink.png")))
