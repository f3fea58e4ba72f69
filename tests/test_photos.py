import numpy as np
import pytest
import torch
from PIL import Image

from conftest import synthetic_digits
from mnist_adder.data.photos import DECODE_SIZE, PhotoError, load_gray, read_manifest, read_picture, to_mnist
from phone import phone_jpeg, phone_photo
from printed import printed_digit

MNIST_LIKE = torch.from_numpy(synthetic_digits(1, 3)[0][0])
MNIST_LIKE[MNIST_LIKE < 100] = 0  # white ink on pure black, 28x28


@pytest.mark.parametrize(
    "suffix, mode",
    [
        (".png", "L"),
        (".png", "RGB"),
        (".png", "LA"),
        (".png", "RGBA"),
        (".jpg", "RGB"),
        (".bmp", "RGB"),
        (".tiff", "L"),
        (".gif", "P"),
    ],
)
def test_each_format_and_mode_reads(tmp_path, suffix, mode):
    picture = printed_digit(4, 0, np.random.default_rng(0))
    if mode == "LA":  # ink as opacity on a transparent background
        picture = Image.merge(
            "LA", [Image.new("L", picture.size, 0), Image.eval(picture.convert("L"), lambda v: 255 - v)]
        )
    picture.convert(mode).save(tmp_path / f"digit{suffix}")
    image = to_mnist(load_gray(tmp_path / f"digit{suffix}"))
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert image.max() > 0.9 and image[0, 0].abs().sum() == 0  # bright ink, black border


@pytest.mark.parametrize("mode, white", [("I;16", 65535), ("I;16", 4095), ("I", 255), ("F", 1)])
def test_deep_and_float_gray_read_as_their_ink(tmp_path, mode, white):
    """A scanner's 16-bit gray (12 bits used, or 8), or a float TIFF, is read on its own scale, not clipped to white
    as 8 bits would be."""
    gray = np.asarray(printed_digit(4, 0, np.random.default_rng(0)).convert("L"), dtype=np.float32)
    gray /= gray.max()  # the paper at the scale's top
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    Image.fromarray((gray * white).round().astype(dtype) if white > 1 else gray, mode).save(tmp_path / "d.tiff")
    assert np.abs(load_gray(tmp_path / "d.tiff") - gray).max() <= 0.5 / white + 1e-6  # a level's rounding at most
    assert to_mnist(load_gray(tmp_path / "d.tiff")).max() > 0.9


def test_first_frame_of_an_animated_gif(tmp_path):
    frames = [printed_digit(7, 0, np.random.default_rng(1)), Image.new("RGB", (50, 50), "white")]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert to_mnist(load_gray(tmp_path / "a.gif")).max() > 0.9


def test_polarity_both_ways_gives_the_same_picture():
    rng = np.random.default_rng(2)
    dark_on_light = np.asarray(printed_digit(3, 1, rng).convert("L"), dtype=np.float32) / 255
    assert torch.allclose(to_mnist(dark_on_light), to_mnist(1 - dark_on_light), atol=1e-5)


def test_ink_is_cropped_scaled_to_20_and_centred_by_mass():
    image = to_mnist(np.asarray(printed_digit(8, 2, np.random.default_rng(3)).convert("L"), np.float32) / 255)[0]
    rows, cols = torch.nonzero(image > 0.25, as_tuple=True)
    assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 in (19, 20, 21)
    mass = image / image.sum()
    assert abs((mass.sum(1) * torch.arange(28)).sum() - 13.5) < 1
    assert abs((mass.sum(0) * torch.arange(28)).sum() - 13.5) < 1


def test_mnist_like_28x28_passes_through_unharmed(tmp_path):
    Image.fromarray(MNIST_LIKE.numpy()).save(tmp_path / "m.png")
    assert torch.equal(to_mnist(load_gray(tmp_path / "m.png"))[0], MNIST_LIKE.float() / 255)


def test_blank_picture_has_no_ink():
    with pytest.raises(PhotoError, match="no ink"):
        to_mnist(np.full((40, 40), 0.8, dtype=np.float32))


def test_a_digit_cut_off_by_the_edge_is_refused_and_the_whole_one_is_read():
    paper = np.ones((60, 60), np.float32)
    paper[10:50, 27:33] = 0.1  # a bar of dark ink, a "1" with a margin all round
    assert to_mnist(paper).sum() > 0
    paper[:10, 27:33] = 0.1  # the bar now runs into the top edge
    with pytest.raises(PhotoError, match="runs off the picture's edge"):
        to_mnist(paper)


def test_manifest_rows_each_get_their_own_error(tmp_path):
    printed_digit(5, 0, np.random.default_rng(4)).save(tmp_path / "five.png")
    Image.new("RGB", (30, 30), "white").save(tmp_path / "blank.png")
    (tmp_path / "notes.png").write_text("not a picture")
    (tmp_path / "inputs.csv").write_text(
        "file,number\nfive.png,3\nmissing.png,1\nnotes.png,2\nblank.png,4\nfive.png,12\nfive.png,x\n ,5\n"
    )
    _, rows = read_manifest(tmp_path / "inputs.csv")  # the numbers are checked here, the pictures when read
    assert [bool(r["error"]) for r in rows] == [False, False, False, False, True, True, True]
    assert rows[-1]["error"] == "no file named in this row"  # not the CSV's folder, read as a picture
    assert rows[0]["number"] == 3 and rows[0]["path"] == tmp_path / "five.png"
    image, error = read_picture(rows[0]["path"])
    assert image.shape == (1, 28, 28) and error == ""
    errors = [read_picture(row["path"])[1] for row in rows[1:4]] + [row["error"] for row in rows[4:]]
    for error, expected in zip(errors, ["no such file", "not a readable image", "no ink", "0..9", "0..9"]):
        assert expected in error


def test_manifest_without_columns_or_file_stops_before_any_work(tmp_path):
    (tmp_path / "bad.csv").write_text("path,value\na.png,1\n")
    with pytest.raises(PhotoError, match="lacks the column"):
        read_manifest(tmp_path / "bad.csv")
    with pytest.raises(PhotoError, match="no such file"):
        read_manifest(tmp_path / "none.csv")


def test_manifest_from_a_spreadsheet_and_odd_rows(tmp_path, monkeypatch):
    """A byte-order mark (Excel's UTF-8 CSV), a number that is a digit to Python but not 0..9, a picture over
    Pillow's decompression-bomb limit, a picture that breaks inside the decoder: each fails its own row."""
    printed_digit(5, 0, np.random.default_rng(4)).save(tmp_path / "five.png")
    Image.new("L", (1500, 1500), 255).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # 1500x1500 is over twice the limit
    (tmp_path / "inputs.csv").write_bytes("\ufefffile,number\nfive.png,2\nfive.png,²\nhuge.png,1\n".encode())
    _, rows = read_manifest(tmp_path / "inputs.csv")
    assert rows[0]["error"] == "" and rows[0]["number"] == 2
    assert "0..9" in rows[1]["error"] and "too many pixels" in read_picture(rows[2]["path"])[1]

    def broken_decoder(path):
        raise ZeroDivisionError("inside the decoder")

    monkeypatch.setattr("mnist_adder.data.photos.load_gray", broken_decoder)
    assert read_picture(rows[0]["path"]) == (None, "ZeroDivisionError: inside the decoder")


def test_manifest_that_is_not_utf8_gets_one_clear_line(tmp_path):
    (tmp_path / "latin1.csv").write_bytes("file,number\nchiffre_cinq_\xe9.png,5\n".encode("latin-1"))
    with pytest.raises(PhotoError, match="not a UTF-8 CSV file"):
        read_manifest(tmp_path / "latin1.csv")


def test_shape_is_kept_exactly():
    """A filled bar 60 px tall and 15 px wide: 20 px tall and 5 wide, not squashed, nothing cut."""
    picture = np.ones((100, 90), np.float32)
    picture[20:80, 30:45] = 0.1
    image = to_mnist(picture)[0]
    rows, cols = torch.nonzero(image > 0.5, as_tuple=True)
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (20, 5)


def test_small_picture_on_grey_paper_is_not_taken_for_mnist():
    """28x28 but dark ink on grey paper, off-centre: it is still cleaned, cropped and centred."""
    picture = np.full((28, 28), 0.7, np.float32)
    picture[2:14, 2:8] = 0.1
    image = to_mnist(picture)[0]
    assert image[0].abs().sum() == 0 and image[:, 0].abs().sum() == 0 and image.max() > 0.9
    mass = image / image.sum()
    assert abs((mass.sum(1) * torch.arange(28)).sum() - 13.5) < 1


def ink_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0.3, b > 0.3
    return (a & b).sum().item() / (a | b).sum().item()


@pytest.mark.parametrize("seed", range(6))
def test_phone_photos_read_like_the_clean_digit(seed):
    """A printed digit, then a phone-like photo of it (40 % lighting gradient, tinted paper, grain, blur,
    JPEG, a slight rotation, anywhere on the sheet): both read to nearly the same 28x28 picture."""
    rng = np.random.default_rng(seed)
    clean = to_mnist(np.asarray(printed_digit(seed, seed, rng).convert("L"), np.float32) / 255)
    photo = phone_photo(clean[0].numpy(), rng, gradient=0.4)
    read = to_mnist(np.asarray(photo.convert("L"), np.float32) / 255)
    assert ink_overlap(read[0], clean[0]) > 0.6


def test_a_big_jpeg_is_decoded_at_reduced_size_and_reads_as_at_full_size(tmp_path):
    """A 1600x1200 phone-like JPEG: decoded at half size (draft mode), at least DECODE_SIZE on its longer side; the
    same photo as PNG, which has no draft mode, is decoded whole. Both read to nearly the same 28x28 picture, and
    that reads like the clean digit."""
    rng = np.random.default_rng(7)
    clean = to_mnist(np.asarray(printed_digit(4, 2, rng).convert("L"), np.float32) / 255)
    (tmp_path / "big.jpg").write_bytes(phone_jpeg(clean[0].numpy(), rng, gradient=0.4, sheet=(1600, 1200)))
    Image.open(tmp_path / "big.jpg").save(tmp_path / "big.png")
    drafted, whole = load_gray(tmp_path / "big.jpg"), load_gray(tmp_path / "big.png")
    assert drafted.shape == (600, 800) and max(drafted.shape) >= DECODE_SIZE and whole.shape == (1200, 1600)
    read = to_mnist(drafted)
    assert ink_overlap(read[0], to_mnist(whole)[0]) > 0.8 and ink_overlap(read[0], clean[0]) > 0.6


def test_a_photo_is_read_as_it_was_held_by_its_orientation_tag(tmp_path):
    """Phones store a portrait photo sideways with an EXIF orientation tag: it is read upright."""
    upright = printed_digit(7, 0, np.random.default_rng(5))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to display
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.jpg", exif=exif, quality=95)
    upright.save(tmp_path / "upright.jpg", quality=95)
    read, expected = to_mnist(load_gray(tmp_path / "sideways.jpg")), to_mnist(load_gray(tmp_path / "upright.jpg"))
    assert ink_overlap(read[0], expected[0]) > 0.8
