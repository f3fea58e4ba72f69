import csv
import io
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning import Trainer
from PIL import Image

from cli import cli_main
from conftest import SYNTHETIC_SIZES, synthetic_digits
from datamodule import MNISTAdderData
from lightning_module import MNISTAdder
from mnist_adder.data.mnist_files import read_idx
from mnist_adder.data.photos import load_gray, read_picture, to_mnist
from mnist_adder.model.calibration import UNSURE_BELOW
from mnist_adder.model.net import split_logits
from mnist_adder.run.predictions import RESERVED, PredictionsCSV, predictions_csv, predictions_table
from phone import phone_photo
from printed import printed_digit
from test_cli import SMALL


@pytest.fixture
def checkpoint(tmp_path, synthetic_data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli_main(["fit", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", *SMALL])
    return tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


def predict(checkpoint, manifest, *extra):
    return cli_main(
        [
            "predict",
            "--ckpt_path",
            str(checkpoint),
            "--data.predict_manifest",
            str(manifest),
            "--trainer.enable_progress_bar",
            "false",
            *extra,
        ]
    )


def test_png_round_trip_matches_forward_on_tensors(checkpoint, tmp_path, capsys):
    images, _ = synthetic_digits(12, seed=9)
    images[images < 100] = 0  # MNIST-like: white ink on pure black
    folder = tmp_path / "pictures"
    folder.mkdir()
    lines = ["file,number"]
    for k, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{k}.png")
        lines.append(f"{k}.png,{k % 10}")
    (folder / "inputs.csv").write_text("\n".join(lines) + "\n")
    output = tmp_path / "out" / "predictions.csv"
    predict(checkpoint, folder / "inputs.csv", "--data.predict_output", str(output))
    rows = list(csv.DictReader(output.open()))
    assert list(rows[0]) == ["file", "number", *RESERVED] and len(rows) == 12
    model = MNISTAdder.load_from_checkpoint(checkpoint).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(images).float().div(255).unsqueeze(1), torch.arange(12) % 10)
    assert [int(r["pred_digit"]) for r in rows] == logits[:, :10].argmax(1).tolist()
    assert [int(r["pred_sum"]) for r in rows] == logits[:, 10:].argmax(1).tolist()
    out = capsys.readouterr().out
    assert f"predictions written to {output}" in out and "0.png" in out


def test_bad_rows_are_reported_and_the_rest_predicted(checkpoint, tmp_path, capsys):
    printed_digit(2, 0, np.random.default_rng(0)).save(tmp_path / "two.jpg")
    (tmp_path / "inputs.csv").write_text("file,number\ntwo.jpg,3\nnone.png,1\ntwo.jpg,11\n")
    with pytest.raises(SystemExit) as end:
        predict(checkpoint, tmp_path / "inputs.csv")
    assert "2 of 3 rows could not be predicted" in str(end.value.code)
    written = sorted((tmp_path / "lightning_logs").rglob("predictions.csv"))
    rows = list(csv.DictReader(written[-1].open()))
    assert rows[0]["pred_digit"] != "" and rows[0]["error"] == ""
    assert "no such file" in rows[1]["error"] and "0..9" in rows[2]["error"]
    assert "no such file" in capsys.readouterr().out


@pytest.mark.parametrize("manifest, expected", [("none.csv", "no such file"), ("bad.csv", "lacks the column")])
def test_bad_manifest_stops_before_any_work(checkpoint, tmp_path, manifest, expected):
    (tmp_path / "bad.csv").write_text("path\nx.png\n")
    with pytest.raises(SystemExit) as end:
        predict(checkpoint, tmp_path / manifest)
    assert expected in str(end.value.code)
    assert not list((tmp_path / "lightning_logs").rglob("predictions.csv"))


@pytest.mark.slow
def test_printed_digits_floor_with_a_default_run(tmp_path, default_checkpoint, monkeypatch):
    """200 photos of printed digits through `cli.py predict`."""
    monkeypatch.chdir(tmp_path)  # predict's own run folder
    rng = np.random.default_rng(0)
    lines, truth = ["file,number"], []
    for k in range(200):
        digit, number = k % 10, int(rng.integers(0, 10))
        printed_digit(digit, k, rng).save(tmp_path / f"{k}.png")
        lines.append(f"{k}.png,{number}")
        truth.append((digit, digit + number))
    (tmp_path / "inputs.csv").write_text("\n".join(lines) + "\n")
    predict(default_checkpoint, tmp_path / "inputs.csv", "--data.predict_output", str(tmp_path / "p.csv"))
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    digit_acc = np.mean([int(r["pred_digit"]) == d for r, (d, _) in zip(rows, truth)])
    sum_acc = np.mean([int(r["pred_sum"]) == s for r, (_, s) in zip(rows, truth)])
    print(f"printed digits: digit accuracy {digit_acc:.3f}, sum accuracy {sum_acc:.3f}")
    assert digit_acc >= 0.95 and sum_acc >= 0.95


@pytest.mark.slow
def test_phone_photos_of_test_digits_within_a_point_of_the_clean_digits(default_checkpoint, real_data_dir):
    """1,000 official test digits, clean and as phone-like photos (lighting gradients up to 40 %, tinted
    grainy paper, blur, JPEG 50-85, rotation, anywhere on a larger sheet): digit accuracy within 1 point."""
    images = read_idx(real_data_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte")[:1000].float().div(255)
    digits = read_idx(real_data_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte")[:1000].long()
    numbers = torch.arange(1000) % 10
    rng = np.random.default_rng(0)
    photos = torch.stack(
        [to_mnist(np.asarray(phone_photo(image.numpy(), rng).convert("L"), np.float32) / 255) for image in images]
    )
    model = MNISTAdder.load_from_checkpoint(default_checkpoint, map_location="cpu").eval()
    with torch.no_grad():
        clean = (model(images.unsqueeze(1), numbers)[:, :10].argmax(1) == digits).float().mean().item()
        photo = (model(photos, numbers)[:, :10].argmax(1) == digits).float().mean().item()
    print(f"digit accuracy: clean {100 * clean:.2f} %, phone-like photos {100 * photo:.2f} %")
    assert photo >= clean - 0.01


def test_the_table_and_csv_say_not_a_digit_over_unsure_and_keep_the_probabilities():
    answer = {"pred_digit": 7, "pred_digit_prob": 0.4, "pred_sum": 9, "pred_sum_prob": 0.3, "error": ""}
    rows = [
        {"file": f"{name}.png", "number": 2, "columns": {"file": f"{name}.png", "number": "2"}, **answer, **flags}
        for name, flags in (
            ("odd", {"pred_unsure": True, "pred_not_digit": True}),
            ("unclear", {"pred_unsure": True, "pred_not_digit": False}),
            ("sure", {"pred_unsure": False, "pred_not_digit": False}),
        )
    ]
    notes = [line.split("%")[-1].strip() for line in predictions_table(rows).splitlines()[1:]]
    assert notes == ["not a digit", "unsure", ""]
    written = list(csv.DictReader(io.StringIO(predictions_csv(["file", "number"], rows).decode())))
    assert [r["pred_not_digit"] for r in written] == ["not a digit", "", ""]
    assert [r["pred_unsure"] for r in written] == ["unsure", "unsure", ""]
    assert all(r["pred_digit_prob"] == "0.4000" and r["pred_sum"] == "9" for r in written)


def test_predict_without_a_manifest_writes_the_test_set_with_its_accuracy(checkpoint, tmp_path, capsys):
    output = tmp_path / "test_predictions.csv"
    cli_main(
        [
            "predict",
            "--ckpt_path",
            str(checkpoint),
            "--data.predict_output",
            str(output),
            "--trainer.enable_progress_bar",
            "false",
            *SMALL,
        ]
    )
    rows = list(csv.DictReader(output.open()))
    assert list(rows[0]) == [
        "index",
        "number",
        "pred_digit",
        "pred_digit_prob",
        "pred_sum",
        "pred_sum_prob",
        "pred_unsure",
        "pred_not_digit",
        "true_digit",
        "true_sum",
    ]
    # the flag: the digit's calibrated probability below the threshold (this small model is unsure throughout)
    assert [r["pred_unsure"] for r in rows] == [
        "unsure" if float(r["pred_digit_prob"]) < UNSURE_BELOW else "" for r in rows
    ]
    assert {r["pred_not_digit"] for r in rows} <= {"not a digit", ""}
    assert [int(r["index"]) for r in rows] == list(range(SYNTHETIC_SIZES["t10k"]))
    images, labels = synthetic_digits(SYNTHETIC_SIZES["t10k"], seed=len("t10k"))  # as conftest writes them
    assert [int(r["true_digit"]) for r in rows] == labels.tolist()
    assert all(int(r["true_sum"]) == int(r["true_digit"]) + int(r["number"]) for r in rows)
    digit_acc = np.mean([r["pred_digit"] == r["true_digit"] for r in rows])
    sum_acc = np.mean([r["pred_sum"] == r["true_sum"] for r in rows])
    out = capsys.readouterr().out
    assert f"digit accuracy {100 * digit_acc:.2f} %, sum accuracy {100 * sum_acc:.2f} %" in out


def test_trainer_predict_from_python_writes_each_rows_own_answer(checkpoint, tmp_path, synthetic_data_dir):
    """A plain `Trainer.predict` (no command line) with the PredictionsCSV callback writes the CSV. A manifest
    file,digit,number,id with unreadable rows between readable ones: the person's four columns come through as
    written, in their order; each readable row carries its own picture's answer; an unreadable one its reason and
    empty prediction columns."""
    rng = np.random.default_rng(1)
    lines = ["file,digit,number,id"]
    for k in range(6):
        lines.append(f"missing{k}.png,{k},{k},m{k}")  # unreadable rows between the readable ones
        printed_digit(k, k, rng).save(tmp_path / f"{k}.png")
        lines.append(f"{k}.png,{k},{(3 * k) % 10}, id {k}")
    (tmp_path / "inputs.csv").write_text("\n".join(lines) + "\n")
    output = tmp_path / "out.csv"
    model = MNISTAdder.load_from_checkpoint(checkpoint).eval()
    data = MNISTAdderData(
        data_dir=str(synthetic_data_dir), predict_manifest=str(tmp_path / "inputs.csv"), predict_output=str(output)
    )
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[PredictionsCSV()])
    trainer.predict(model, datamodule=data)
    rows = list(csv.DictReader(output.open()))
    assert list(rows[0]) == ["file", "digit", "number", "id", *RESERVED]
    assert [[row[c] for c in ("file", "digit", "number", "id")] for row in rows] == [
        line.split(",") for line in lines[1:]
    ]
    for row in rows:
        if row["file"].startswith("missing"):
            assert "no such file" in row["error"]
            assert row["pred_digit"] == row["pred_digit_prob"] == row["pred_sum"] == row["pred_sum_prob"] == ""
            continue
        image = to_mnist(load_gray(tmp_path / row["file"]))[None]
        with torch.no_grad():
            digit_logits, sum_logits = split_logits(model(image, torch.tensor([int(row["number"])])))
        digit_prob, digit = digit_logits.softmax(1).max(1)
        assert int(row["pred_digit"]) == digit.item() and row["error"] == ""
        assert float(row["pred_digit_prob"]) == pytest.approx(digit_prob.item(), abs=1e-4)
        sum_prob, total = sum_logits.softmax(1).max(1)
        assert int(row["pred_sum"]) == total.item() and len(row["pred_sum_prob"].split(".")[1]) == 4
        assert float(row["pred_sum_prob"]) == pytest.approx(sum_prob.item(), abs=1e-4)


def test_predicting_pictures_needs_no_mnist(checkpoint, tmp_path):
    """A checkpoint and one's pictures are all predict needs: a data_dir without MNIST, that cannot be written."""
    printed_digit(4, 0, np.random.default_rng(0)).save(tmp_path / "4.png")
    (tmp_path / "inputs.csv").write_text("file,number\n4.png,5\n")
    (tmp_path / "blocker").write_text("a file, where a folder would be")
    output = tmp_path / "out.csv"
    predict(
        checkpoint,
        tmp_path / "inputs.csv",
        "--data.data_dir",
        str(tmp_path / "blocker" / "data"),
        "--data.predict_output",
        str(output),
    )
    assert [row["error"] for row in csv.DictReader(output.open())] == [""]


def test_a_manifest_with_fewer_rows_than_processes_is_refused(tmp_path):
    """A process with no row would skip predict while the others wait for it in a collective."""
    (tmp_path / "inputs.csv").write_text("file,number\n4.png,5\n")
    data = MNISTAdderData(str(tmp_path / "no_mnist"), predict_manifest=str(tmp_path / "inputs.csv"))
    data.trainer = SimpleNamespace(world_size=1)
    data.setup("predict")
    data.trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ValueError, match=r"1 row\(s\) to predict for 2 processes: predict with --trainer.devices 1"):
        data.setup("predict")


@pytest.mark.parametrize("lines, expected", [(["8.png,12"], "8.png: number must be an integer 0..9"), ([], "none")])
def test_a_manifest_with_no_row_to_predict_is_refused(tmp_path, lines, expected):
    """Lightning would skip the empty loader: no table, no CSV, exit 0, as if all were well."""
    (tmp_path / "inputs.csv").write_text("\n".join(["file,number", *lines]) + "\n")
    data = MNISTAdderData(str(tmp_path / "no_mnist"), predict_manifest=str(tmp_path / "inputs.csv"))
    with pytest.raises(ValueError, match=f"no row to predict \\(.*{expected}"):
        data.setup("predict")


def test_an_unwritable_predict_output_is_refused_before_any_picture_is_read(tmp_path):
    (tmp_path / "inputs.csv").write_text("file,number\n8.png,1\n")
    (tmp_path / "blocker").write_text("a file, where a folder would be")
    (tmp_path / "folder").mkdir()
    for output, message in [
        (tmp_path / "blocker" / "out.csv", "predict_output's folder '.*blocker' is a file, not a folder"),
        (tmp_path / "folder", "predict_output '.*folder' is a folder: name a CSV file in it"),
    ]:
        data = MNISTAdderData(str(tmp_path), predict_manifest=str(tmp_path / "inputs.csv"), predict_output=str(output))
        with pytest.raises(ValueError, match=message):
            data.setup("predict")


def test_a_manifest_column_named_as_a_prediction_is_refused(checkpoint, tmp_path, capsys):
    (tmp_path / "inputs.csv").write_text("file,number,pred_digit\nx.png,1,3\n")
    with pytest.raises(SystemExit) as end:
        predict(checkpoint, tmp_path / "inputs.csv")
    assert "has the column(s) pred_digit" in str(end.value.code)


def test_a_predict_limited_to_no_batch_says_that_nothing_was_predicted(checkpoint, tmp_path):
    """Lightning skips the empty loop without a word: no table, no CSV, and exit 0 would read as success."""
    printed_digit(8, 0, np.random.default_rng(0)).save(tmp_path / "8.png")
    (tmp_path / "inputs.csv").write_text("file,number\n8.png,1\n")
    with pytest.raises(SystemExit) as end:
        predict(checkpoint, tmp_path / "inputs.csv", "--trainer.limit_predict_batches", "0")
    assert end.value.code == "error: nothing predicted (trainer.limit_predict_batches 0)"
    assert not list(tmp_path.rglob("predictions.csv"))


def test_pictures_are_read_in_worker_processes_and_answer_as_in_one(
    checkpoint, tmp_path, synthetic_data_dir, monkeypatch
):
    """setup("predict") only parses the manifest: each picture is read as its batch is drawn (so Lightning's progress
    bar covers the work), here in two worker processes, and they write the CSV that reading in this process writes,
    with the reasons of the rows they could not read (which come back in the batches) and the count of them."""
    rng = np.random.default_rng(3)
    for k in range(5):
        printed_digit(k, k, rng).save(tmp_path / f"{k}.png")
    Image.new("RGB", (30, 30), "white").save(tmp_path / "blank.png")
    (tmp_path / "notes.png").write_text("not a picture")
    files = [f"{k % 5}.png" for k in range(33)]
    files[3], files[17], files[30] = "missing.png", "blank.png", "notes.png"  # 33 rows: three batches of 16 or less
    (tmp_path / "inputs.csv").write_text("\n".join(["file,number", *(f"{f},{k % 10}" for k, f in enumerate(files))]))
    readers = tmp_path / "readers.txt"

    def recorded(path):  # which process reads each picture
        with readers.open("a") as f:
            f.write(f"{os.getpid()}\n")
        return read_picture(path)

    monkeypatch.setattr("mnist_adder.data.pairs.read_picture", recorded)
    model = MNISTAdder.load_from_checkpoint(checkpoint).eval()
    for workers in (0, 2):
        data = MNISTAdderData(
            data_dir=str(synthetic_data_dir),
            predict_manifest=str(tmp_path / "inputs.csv"),
            predict_output=str(tmp_path / f"{workers}.csv"),
            num_workers=workers,
        )
        data.setup("predict")
        assert not readers.exists()
        writer = PredictionsCSV()
        trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[writer])
        trainer.predict(model, datamodule=data)
        pids, here = set(readers.read_text().split()), str(os.getpid())
        readers.unlink()
        assert pids == ({here} if workers == 0 else pids - {here}) and len(pids) == max(1, workers)
        assert writer.failed == 3
    assert (tmp_path / "0.csv").read_bytes() == (tmp_path / "2.csv").read_bytes()
    rows = list(csv.DictReader((tmp_path / "2.csv").open()))
    assert [row["error"].split(":")[0] for row in rows if row["error"]] == [
        "no such file",
        "no ink found (the picture is blank or has too little contrast)",
        "not a readable image",
    ]
    assert all(bool(row["pred_digit"]) != bool(row["error"]) for row in rows)  # an answer or a reason, not both


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # more workers than this machine's cores
def test_the_manifest_loader_has_the_cores_up_to_four_workers_and_the_others_none(
    tmp_path, synthetic_data_dir, monkeypatch
):
    """By default a manifest's pictures are read by the machine's cores, up to 4; the loaders of tensors in memory
    have no workers; a negative count is refused; (a resume may change it: tests/test_checkpoints.py)."""
    (tmp_path / "inputs.csv").write_text("file,number\na.png,1\n")
    for cores, workers in ((1, 1), (3, 3), (16, 4)):
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        data = MNISTAdderData(str(synthetic_data_dir), val_size=100, predict_manifest=str(tmp_path / "inputs.csv"))
        data.setup("predict")
        assert data.predict_dataloader().num_workers == workers and data.predict_dataloader().batch_size == 16
    data.setup("fit")
    loaders = [data.train_dataloader(), *data.val_dataloader(), *data.test_dataloader()]
    assert [loader.num_workers for loader in loaders] == [0] * len(loaders)
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        MNISTAdderData(data_dir=str(synthetic_data_dir), num_workers=-1)
