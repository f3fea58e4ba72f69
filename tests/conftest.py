"""Small synthetic stand-ins for MNIST, so that the tests run offline in seconds."""

from pathlib import Path

import numpy as np
import pytest

from mnist_adder.data import mnist_files
from mnist_adder.data.mnist_files import idx_bytes, md5

SYNTHETIC_SIZES = {"train": 600, "t10k": 200}
RUN_OUTPUTS = ("lightning_logs", "checkpoints", "predictions.csv")  # what a run started in a folder writes there


@pytest.fixture(autouse=True, scope="session")
def no_run_written_into_the_repository():
    """Every run a test starts writes under its tmp_path: in the clone it would be a user's surprise."""
    root = Path(__file__).resolve().parents[1]
    before = {name for name in RUN_OUTPUTS if (root / name).exists()}
    yield
    assert {name for name in RUN_OUTPUTS if (root / name).exists()} <= before, "a test wrote a run into the clone"


def synthetic_digits(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images of a learnable code: digit d lights a bar at row 2 + 2d, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count).astype(np.uint8)
    images = rng.integers(0, 60, (count, 28, 28)).astype(np.uint8)
    for i, d in enumerate(labels):
        images[i, 2 + 2 * d : 4 + 2 * d, 4:24] = 255
    return images, labels


def write_synthetic_mnist(raw_dir) -> dict[str, str]:
    """Writes the four IDX files of a small synthetic MNIST; returns their MD5 table."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    for split, count in SYNTHETIC_SIZES.items():
        images, labels = synthetic_digits(count, seed=len(split))
        (raw_dir / f"{split}-images-idx3-ubyte").write_bytes(idx_bytes(images))
        (raw_dir / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    return {name: md5(raw_dir / name) for name in mnist_files.OFFICIAL_MD5}


@pytest.fixture
def synthetic_data_dir(tmp_path, monkeypatch):
    """A data_dir holding a small synthetic MNIST that passes the (swapped) checksum table."""
    data_dir = tmp_path / "data"
    monkeypatch.setattr(mnist_files, "OFFICIAL_MD5", write_synthetic_mnist(data_dir / "MNIST" / "raw"))
    return data_dir


@pytest.fixture
def in_tmp(tmp_path, synthetic_data_dir, monkeypatch):
    """Runs in tmp_path, whose data/ holds the synthetic MNIST: lightning_logs/ lands there too."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def no_sources(monkeypatch):
    """Every download source fails at once, as on a machine without internet."""

    def offline(raw_dir):
        raise ConnectionError("no network in tests")

    monkeypatch.setattr(mnist_files, "SOURCES", {"offline stand-in": offline})


@pytest.fixture(scope="session")
def real_data_dir(tmp_path_factory):
    """The official MNIST, obtained once per session the way a user gets it (a download if need be)."""
    from datamodule import MNISTAdderData

    data_dir = tmp_path_factory.mktemp("real") / "data"
    MNISTAdderData(data_dir=str(data_dir)).prepare_data()
    return data_dir


@pytest.fixture(scope="session")
def default_checkpoint(tmp_path_factory, real_data_dir):
    """A default-config run on real MNIST (a few minutes), once per session; its checkpoint chosen on
    validation (the run's folder is two levels up)."""
    from cli import cli_main

    root = tmp_path_factory.mktemp("default_run")
    cli_main(
        [
            "fit",
            "--data.data_dir",
            str(real_data_dir),
            "--trainer.default_root_dir",
            str(root),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    return next((root / "lightning_logs" / "version_0" / "checkpoints").glob("best-*.ckpt"))
