"""Which printed glyphs of the held-out set pass for digits, and how much the font adds:
`python benchmarks/printed_glyphs.py CKPT... [--per-glyph 60]` (about a minute, and one more per checkpoint).

Each glyph of the held-out printed kind (the "test" split of mnist_adder/data/non_digits.py) is printed
`--per-glyph` times in the held-out set's fonts (Liberation) and as many times in the fonts the training
non-digits are printed in (DejaVu), each photographed as a phone would. The share `predict` answers "not a
digit" (or refuses as unreadable) is the mean over the checkpoints. A glyph caught as seldom in the training
fonts as in the held-out ones is one the net reads as a digit, whatever the font. Written into
docs/experiments.md between the `printed_glyphs` markers.
"""

import argparse
import sys

import numpy as np
import torch

from bench import ROOT, write_report
from not_a_digit import percent, read
from seeds import commit

sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from lightning_module import MNISTAdder  # noqa: E402
from mnist_adder.data.non_digits import GLYPHS, fonts_drawing, print_glyph  # noqa: E402
from mnist_adder.errors import UsageError  # noqa: E402
from mnist_adder.model.net import split_logits  # noqa: E402
from mnist_adder.run.checkpoints import load_for_inference  # noqa: E402
from non_digit_photos import photograph  # noqa: E402

START, END = "<!-- printed_glyphs:start -->", "<!-- printed_glyphs:end -->"
FONT_SETS = {"held-out fonts (Liberation)": "test", "training fonts (DejaVu)": "train"}


def caught(models: list[MNISTAdder], glyph: str, font_split: str, count: int, rng: np.random.Generator):
    """The share of `count` phone photos of `glyph`, printed in `font_split`'s fonts, that the models catch, and the
    digit they most often answer for the others (None if none)."""
    images, refused = read(
        [photograph("printed", print_glyph(glyph, fonts_drawing(font_split, glyph), rng), rng) for _ in range(count)]
    )
    numbers = torch.from_numpy(rng.integers(0, 10, len(images)))
    answered, read_as = 0, []
    with torch.no_grad():
        for model in models:
            logits, not_digit = model.answer(images, numbers)
            answered += int(not_digit.sum())
            read_as += split_logits(logits).digit.argmax(1)[~not_digit].tolist()
    share = (answered / len(models) + refused) / count
    return share, max(set(read_as), key=read_as.count) if read_as else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoints written by `python cli.py fit` (a seed each)")
    parser.add_argument("--per-glyph", type=int, default=60, help="photos of each glyph in each set of fonts")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    source = commit()
    models = [load_for_inference(MNISTAdder, path) for path in args.checkpoints]
    rng = np.random.default_rng(0)
    found = {
        glyph: [caught(models, glyph, split, args.per_glyph, rng) for split in FONT_SETS.values()]
        for glyph in GLYPHS["test"]
    }
    lines = ["| glyph | " + " | ".join(FONT_SETS) + " | else read as |", "|---|---|---|---|"]
    for glyph, row in sorted(found.items(), key=lambda item: [share for share, _ in item[1]]):
        read_as = row[0][1] if row[0][1] is not None else "-"
        lines.append(f"| `{glyph}` | " + " | ".join(percent(share) for share, _ in row) + f" | {read_as} |")
    every = np.mean([[share for share, _ in row] for row in found.values()], axis=0)
    lines += [
        "| all | " + " | ".join(percent(share) for share in every) + " | |",
        "",
        f'Share of the held-out printed glyphs answered "not a digit" or refused, {args.per_glyph} phone photos of '
        f'each in each set of fonts, the mean over {len(models)} checkpoint(s); "else read as": the digit most '
        f"often answered for the others in the held-out fonts. Measured at `{source['commit'][:7]}`"
        + ("" if source["clean"] else " +")
        + " by `python benchmarks/printed_glyphs.py CKPT...`.",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_report(ROOT / "docs" / "experiments.md", text, START, END)


if __name__ == "__main__":
    try:
        main()
    except UsageError as err:  # a missing or unreadable checkpoint, say
        sys.exit(f"error: {err}")
