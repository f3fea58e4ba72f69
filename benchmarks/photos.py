"""Phone photos: `python benchmarks/photos.py --ckpt_path CKPT` (about 5 minutes on two cores).

Generates phone-like 12-megapixel JPEGs (4032x3024, tests/phone.py: an official MNIST test digit written large on
tinted paper, a lighting gradient, blur, grain, JPEG quality 80-95) into a temporary folder, then measures:

- prepare: `photos.read_picture` on one JPEG (decoding in draft mode, then `to_mnist`) on one core
  (`torch.set_num_threads(1)`): the median over every photo, each read `--repeats` times, of the wall time and of
  this process's CPU time (the machine may be shared: the CPU time is the steadier figure);
- predict: `python cli.py predict --ckpt_path CKPT --data.predict_manifest M.csv` (also `--data.predict_output` and
  `--trainer.logger false`, so that nothing is written beside the checkpoint) over a manifest of `--rows` rows
  that reuse the `--photos` distinct photos, with the data module's default `num_workers`: images per second of
  the whole command, and without its start-up (the same command over one row); the CPU seconds per picture of all
  its processes (workers included), start-up left out likewise; and the digit accuracy of its rows.

Prints the table and writes it into BENCHMARKS.md between the `photos` markers (`--no-write`: print only).
"""

import argparse
import csv
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]  # the repository's photos.py first

from bench import write_report  # noqa: E402
from datamodule import MNISTAdderData  # noqa: E402
from mnist_adder.data.mnist_files import ensure_mnist, read_idx  # noqa: E402
from mnist_adder.data.photos import read_picture  # noqa: E402
from mnist_adder.errors import UsageError  # noqa: E402
from mnist_adder.run.checkpoints import read_checkpoint  # noqa: E402
from phone import TWELVE_MEGAPIXELS, phone_jpeg  # noqa: E402

START, END = "<!-- photos:start -->", "<!-- photos:end -->"


def make_photos(folder: Path, count: int, data_dir: Path) -> list[tuple[Path, int]]:
    """`count` 12-megapixel JPEGs of the first official test digits, and each one's digit."""
    raw = data_dir / "MNIST" / "raw"
    ensure_mnist(raw)
    images = read_idx(raw / "t10k-images-idx3-ubyte")[:count].float().div(255).numpy()
    digits = read_idx(raw / "t10k-labels-idx1-ubyte")[:count].tolist()
    rng = np.random.default_rng(0)
    for k, image in enumerate(images):
        (folder / f"{k}.jpg").write_bytes(phone_jpeg(image, rng, sheet=TWELVE_MEGAPIXELS))
    return [(folder / f"{k}.jpg", digit) for k, digit in enumerate(digits)]


def prepare_times(files: list[Path], prepare, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of `prepare(file)` over every file, each `repeats` times, on one core."""
    torch.set_num_threads(1)
    walls, cpus = [], []
    for _ in range(repeats):
        for file in files:
            wall, cpu = time.perf_counter(), time.process_time()
            prepare(file)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def timed_predict(args: argparse.Namespace, manifest: Path, output: Path) -> tuple[float, float]:
    """Wall seconds of `cli.py predict` over `manifest` and the CPU seconds of all its processes."""
    command = [sys.executable, str(ROOT / "cli.py"), "predict", "--ckpt_path", str(args.ckpt_path)]
    command += ["--data.data_dir", str(args.data_dir), "--data.predict_manifest", str(manifest)]
    command += ["--data.predict_output", str(output), "--trainer.logger", "false"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def write_manifest(path: Path, photos: list[tuple[Path, int]], rows: int) -> None:
    """`rows` rows that take the photos in turn, each with a number and the photo's true digit."""
    lines = ["file,number,digit"]
    for k in range(rows):
        file, digit = photos[k % len(photos)]
        lines.append(f"{file},{k % 10},{digit}")
    path.write_text("\n".join(lines) + "\n")


def default_workers(manifest: Path, data_dir: Path) -> int:
    """The worker processes that `predict` reads the manifest's pictures with, by default."""
    data = MNISTAdderData(str(data_dir), predict_manifest=str(manifest))
    data.setup("predict")
    return data.predict_dataloader().num_workers


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", type=Path, required=True, help="a trained checkpoint for `cli.py predict`")
    parser.add_argument("--data_dir", type=Path, default=ROOT / "data", help="holds (or receives) MNIST (default data)")
    parser.add_argument("--photos", type=int, default=20, help="distinct photos generated (about 4 s each; 20)")
    parser.add_argument("--repeats", type=int, default=5, help="times each photo is prepared for the median (5)")
    parser.add_argument("--rows", type=int, default=1000, help="rows of the predicted manifest (1000)")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md as it is")
    args = parser.parse_args(argv)
    read_checkpoint(str(args.ckpt_path))  # a bad one said in one line now, not after the photos are made
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        photos = make_photos(folder, args.photos, args.data_dir)
        wall, cpu = prepare_times([file for file, _ in photos], read_picture, args.repeats)
        for name, count in (("one.csv", 1), ("all.csv", args.rows)):
            write_manifest(folder / name, photos, count)
        workers = default_workers(folder / "one.csv", args.data_dir)
        start_up, start_up_cpu = timed_predict(args, folder / "one.csv", folder / "one_out.csv")
        total, total_cpu = timed_predict(args, folder / "all.csv", folder / "out.csv")
        rows = list(csv.DictReader((folder / "out.csv").open()))
    accuracy = np.mean([row["pred_digit"] == row["digit"] for row in rows])
    table = "\n".join(
        [
            f"Measured {time.strftime('%Y-%m-%d')} with `python benchmarks/photos.py` on {os.cpu_count()} cores "
            f"(5-minute load average at the end {os.getloadavg()[1]:.1f}: others' work slows the wall times), "
            f"{args.photos} distinct 12-megapixel JPEGs.",
            "",
            "| figure | value |",
            "|---|---|",
            f"| prepare one 12 MP JPEG, one core: median wall time | {1000 * wall:.0f} ms |",
            f"| the same, CPU time | {1000 * cpu:.0f} ms |",
            f"| `cli.py predict`, {args.rows:,} rows, {workers} workers: images/s | {args.rows / total:.1f} |",
            f"| the same without start-up ({start_up:.1f} s for one row) | "
            f"{(args.rows - 1) / (total - start_up):.1f} |",
            f"| CPU seconds per picture, all processes, without start-up | "
            f"{(total_cpu - start_up_cpu) / (args.rows - 1):.3f} |",
            f"| digit accuracy of the rows | {100 * accuracy:.1f} % |",
        ]
    )
    print(table)
    if not args.no_write:
        write_report(ROOT / "BENCHMARKS.md", table, START, END)
    return table


if __name__ == "__main__":
    try:
        main()
    except UsageError as err:  # a missing or unreadable checkpoint, say
        sys.exit(f"error: {err}")
