"""The non-digit pictures and the AUROC of benchmarks/not_a_digit.py."""

import warnings

import numpy as np
import pytest
import torch

from mnist_adder.data.non_digits import (
    FONTS,
    GLYPHS,
    MAKERS,
    STROKES,
    fonts_drawing,
    non_digit_images,
    random_shape,
)
from mnist_adder.data.photos import PhotoError, gray_levels, to_mnist
from non_digit_photos import KINDS, non_digit_photos
from not_a_digit import auroc


def test_auroc_is_the_chance_a_positive_outscores_a_negative():
    assert auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auroc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert auroc(np.array([1.0, 3.0]), np.array([2.0, 2.0])) == 0.5
    assert auroc(np.array([2.0]), np.array([2.0])) == 0.5  # a tie counts half


def test_the_three_splits_share_no_glyph_printed_or_drawn():
    glyphs = {split: set(GLYPHS[split]) | set(STROKES[split]) for split in ("train", "val", "test")}
    assert not glyphs["train"] & glyphs["val"] and not glyphs["train"] & glyphs["test"]
    assert not glyphs["val"] & glyphs["test"]


def test_several_digits_keep_the_digits_own_gray_levels():
    """The digits that make the several-digit training pictures are read as MNIST's uint8: a faint stroke stays
    faint, as it is in a real picture of several digits, instead of turning solid."""
    digits = torch.zeros(50, 28, 28, dtype=torch.uint8)
    digits[:, 6:22, 8:11] = 255  # a solid stroke
    digits[:, 6:22, 16:19] = 64  # a faint one
    kind = list(MAKERS).index("several digits")  # the kinds are made in turn
    several = non_digit_images(2 * len(MAKERS), 0, digits)[kind :: len(MAKERS)].float() / 255
    inked = several > 0.1
    assert ((several > 0.9) & inked).sum() < 0.5 * inked.sum()


def test_a_random_shape_is_never_nearly_a_line():
    """A line is a 1 to people: training to refuse it would teach the model to refuse the digit."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        rows, cols = np.nonzero(random_shape("train", rng, np.zeros(0)) > 0.5)
        spread = np.linalg.svd(np.stack([rows, cols], 1) - [rows.mean(), cols.mean()], compute_uv=False)
        assert spread[1] > 0.25 * spread[0]


@pytest.mark.parametrize("count", [3, 22])
def test_a_machine_with_other_fonts_is_told_its_training_set_differs(monkeypatch, count):
    monkeypatch.setitem(FONTS, "train", [f"{k}.ttf" for k in range(count)])
    with pytest.warns(UserWarning, match=f"{count} of the 21 DejaVu fonts found"):
        non_digit_images(0, 0, torch.zeros(1, 28, 28, dtype=torch.uint8))
    monkeypatch.setitem(FONTS, "train", [f"{k}.ttf" for k in range(21)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the reported runs' fonts: no word
        non_digit_images(0, 0, torch.zeros(1, 28, 28, dtype=torch.uint8))


@pytest.mark.skipif(not FONTS["train"], reason="no DejaVu fonts on this machine")
def test_a_glyph_is_printed_only_in_the_fonts_that_have_it():
    """A font that lacks a glyph would print its "missing" box: no glyph lacks every font of its split."""
    assert all(None not in fonts_drawing(split, glyph) for split, glyphs in GLYPHS.items() for glyph in glyphs)
    assert fonts_drawing("train", "\ue000") == [None]  # a private-use code point: in no font


@pytest.mark.parametrize("split", ["val", "test"])
def test_every_kind_is_made_and_only_the_cut_off_digits_are_refused(split):
    digits = np.zeros((5, 28, 28), np.float32)
    digits[:, 6:22, 12:16] = 1  # a bar, a "1", with MNIST's margin
    photos = non_digit_photos(split, 3, digits)
    assert list(photos) == list(KINDS) and all(len(p) == 3 for p in photos.values())
    for kind, pictures in photos.items():
        for picture in pictures:
            if kind == "cut-off digit":
                with pytest.raises(PhotoError, match="edge"):
                    to_mnist(gray_levels(picture))
            else:
                assert to_mnist(gray_levels(picture)).sum() > 0, kind
