"""Where the "unsure" threshold comes from: `python benchmarks/unsure.py CKPT [CKPT ...]`.

For each checkpoint (one per seed, say), on its own validation pairs: for each candidate threshold, how many of
the wrong answers (digit or sum wrong) have a calibrated digit probability below it, and how many of the right
ones. Then the same for printed letters A-Z (pictures that are no digit at all, four fonts each), read as
`predict` reads a photo. The threshold chosen is the largest candidate that flags at most 1 % of the right
validation answers of every checkpoint; the table goes into docs/experiments.md between the `unsure` markers.
"""

import argparse
import string
import sys
from pathlib import Path

import numpy as np
import torch

from bench import ROOT, write_report

sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from datamodule import MNISTAdderData  # noqa: E402
from lightning_module import MNISTAdder  # noqa: E402
from mnist_adder.data.photos import gray_levels, to_mnist  # noqa: E402
from mnist_adder.errors import UsageError  # noqa: E402
from mnist_adder.model.calibration import UNSURE_BELOW  # noqa: E402
from mnist_adder.model.net import split_logits  # noqa: E402
from mnist_adder.run.checkpoints import read_checkpoint  # noqa: E402
from printed import printed_text  # noqa: E402

CANDIDATES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
RIGHT_FLAGGED_AT_MOST = 0.01
START, END = "<!-- unsure:start -->", "<!-- unsure:end -->"


@torch.no_grad()
def validation_answers(model: MNISTAdder, data_dir: Path, hparams: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Each validation pair's calibrated digit probability, and whether both answers were right."""
    data = MNISTAdderData(str(data_dir), seed=hparams["seed"], val_size=hparams["val_size"])  # its own split
    data.prepare_data()
    data.setup("validate")
    batch = data.val_set.__getitems__(list(range(len(data.val_set))))
    digit, sum_ = split_logits(model(batch["image"], batch["number"]))
    right = (digit.argmax(1) == batch["digit"]) & (sum_.argmax(1) == batch["sum"])
    return digit.softmax(1).max(1).values, right


@torch.no_grad()
def letter_probabilities(model: MNISTAdder) -> torch.Tensor:
    rng = np.random.default_rng(0)
    pictures = [printed_text(letter, k, rng) for letter in string.ascii_uppercase for k in range(4)]
    images = torch.stack([to_mnist(gray_levels(picture)) for picture in pictures])
    digit = split_logits(model(images, torch.zeros(len(images), dtype=torch.long))).digit
    return digit.softmax(1).max(1).values


def share(flags: torch.Tensor) -> str:
    return f"{int(flags.sum())}/{len(flags)} ({100 * flags.float().mean():.1f} %)" if len(flags) else "0/0"


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoints written by `python cli.py fit`")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "experiments.md")
    args = parser.parse_args(argv)
    answers, letters = [], []
    for path in args.checkpoints:
        checkpoint = read_checkpoint(path)
        model = MNISTAdder.load_from_checkpoint(path, map_location="cpu").eval()
        answers.append(validation_answers(model, args.data_dir, checkpoint["datamodule_hyper_parameters"]))
        letters.append(letter_probabilities(model))
    lines = [
        "| threshold | wrong answers flagged | right answers flagged | printed letters flagged |",
        "|---|---|---|---|",
    ]
    chosen = CANDIDATES[0]
    for threshold in CANDIDATES:
        wrong = torch.cat([prob[~right] < threshold for prob, right in answers])
        right = torch.cat([prob[right] < threshold for prob, right in answers])
        flagged_letters = torch.cat([prob < threshold for prob in letters])
        if all((prob[ok] < threshold).float().mean() <= RIGHT_FLAGGED_AT_MOST for prob, ok in answers):
            chosen = threshold
        lines.append(f"| {threshold:.2f} | {share(wrong)} | {share(right)} | {share(flagged_letters)} |")
    text = "\n".join(
        [
            *lines,
            "",
            f"Validation pairs of {len(answers)} checkpoint(s), pooled; letters: A-Z in four fonts, read as `predict` "
            f"reads a photo, by each checkpoint. Chosen: {chosen:.2f}, the largest threshold that flags at most "
            f"{100 * RIGHT_FLAGGED_AT_MOST:.0f} % of each checkpoint's right answers (`calibration.UNSURE_BELOW` is "
            f"{UNSURE_BELOW:.2f}). Written by `python benchmarks/unsure.py CKPT ...`.",
        ]
    )
    print(text)
    write_report(args.report, text, START, END)
    return chosen


if __name__ == "__main__":
    try:
        main()
    except UsageError as err:  # a missing or unreadable checkpoint, say
        sys.exit(f"error: {err}")
