"""Test-time augmentation, judged on validation: `python benchmarks/tta.py CHECKPOINT [CHECKPOINT ...]`.

Pairs every validation image of each checkpoint's run (or `--split test`) with all ten numbers and
prints both heads' accuracy when each head's softmax is averaged over views of the image: `none` (the
image as it is), `shift` (it and its four shifts by one pixel) and `rotate` (it and its rotations by
5 and 10 degrees either way); then their mean ± standard deviation over the checkpoints (e.g. one
per seed, from `python benchmarks/seeds.py --keep DIR`). The checkpoints were chosen on validation
without views, which flatters `none` a little.
"""

import argparse
import statistics

from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2.functional import affine

from disagreements import ROOT, all_pair_logits, as_is, load  # also puts the repository on the import path

# isort: split
from datamodule import AllPairs  # noqa: E402
from lightning_module import MNISTAdder  # noqa: E402
from mnist_adder.model.net import split_logits  # noqa: E402


def _moved(angle: float = 0.0, dx: int = 0, dy: int = 0):
    return lambda images: affine(
        images, angle=angle, translate=[dx, dy], scale=1.0, shear=[0.0, 0.0], interpolation=InterpolationMode.BILINEAR
    )


VIEWS = {
    "none": [as_is],
    "shift": [as_is, *(_moved(dx=dx, dy=dy) for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)))],
    "rotate": [as_is, *(_moved(angle=a) for a in (-10.0, -5.0, 5.0, 10.0))],
}


def accuracies(model: MNISTAdder, pairs: AllPairs, views: list) -> tuple[float, float]:
    """Digit and sum accuracy in % over all pairs, each head's softmax averaged over the views."""
    outputs = [all_pair_logits(model, pairs, view) for view in views]
    truth = outputs[0][1]
    heads = [split_logits(logits) for logits, _ in outputs]
    digit = sum(head.digit.softmax(1) for head in heads).argmax(1)
    sum_ = sum(head.sum.softmax(1) for head in heads).argmax(1)
    return (100 * (digit == truth["digit"]).float().mean().item(), 100 * (sum_ == truth["sum"]).float().mean().item())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--split", choices=["val", "test"], default="val")
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    args = parser.parse_args(argv)
    print(f"{args.split} images, each with all ten numbers: digit / sum accuracy in %, per view set")
    table = {name: [] for name in VIEWS}
    for checkpoint in args.checkpoints:
        model, pairs = load(checkpoint, args.data_dir, args.split)
        cells = []
        for name, views in VIEWS.items():
            table[name].append(accuracies(model, pairs, views))
            cells.append(f"{name} {table[name][-1][0]:.3f} / {table[name][-1][1]:.3f}")
        print(f"{checkpoint}: " + ", ".join(cells), flush=True)
    if len(args.checkpoints) > 1:
        print(
            "mean ± std: "
            + ", ".join(
                f"{name} {_spread([r[0] for r in rows])} / {_spread([r[1] for r in rows])}"
                for name, rows in table.items()
            )
        )


def _spread(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


if __name__ == "__main__":
    main()
