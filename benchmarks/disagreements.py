"""Where the sum head does not add: `python benchmarks/disagreements.py CHECKPOINT`.

Pairs every validation image (or `--split test`) with all ten numbers and prints, for the pairs whose
predicted sum is not the predicted digit plus the number: which head is right, which numbers and
digits they involve, how sure the digit head was, and whether the sum head followed the digit head's
second choice instead of its first.
"""

import argparse
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodule import AllPairs, MNISTAdderData  # noqa: E402
from lightning_module import MNISTAdder  # noqa: E402
from mnist_adder.data.mnist_files import MNISTUnavailable  # noqa: E402
from mnist_adder.errors import UsageError  # noqa: E402
from mnist_adder.model.net import split_logits  # noqa: E402
from mnist_adder.run.checkpoints import read_checkpoint  # noqa: E402


def as_is(images: torch.Tensor) -> torch.Tensor:
    return images


@torch.no_grad()
def all_pair_logits(
    model: MNISTAdder, pairs: AllPairs, view: Callable[[torch.Tensor], torch.Tensor] = as_is
) -> tuple[torch.Tensor, dict]:
    """Logits [N*10, 29] of every image (as `view` shows it) with every number, and the pairs' number, digit
    and sum [N*10]."""
    batch = pairs.__getitems__(list(range(len(pairs))))
    logits = torch.cat(
        [
            model.net.paired_logits(view(batch["image"][i : i + 1000]), batch["number"][i : i + 1000])
            for i in range(0, len(pairs), 1000)
        ]
    )
    return logits, {
        "number": batch["number"].flatten(),
        "digit": batch["digit"].repeat_interleave(10),
        "sum": batch["sum"].flatten(),
    }


def report(logits: torch.Tensor, truth: dict) -> str:
    digit_logits, sum_logits = split_logits(logits)
    top2 = digit_logits.softmax(1).topk(2, dim=1)
    digit_pred, sum_pred = top2.indices[:, 0], sum_logits.argmax(1)
    number = truth["number"]
    disagree = sum_pred != digit_pred + number
    n = int(disagree.sum())
    lines = [
        (
            f"{n} of {len(logits)} pairs disagree ({100 * n / len(logits):.3f} %); "
            f"digit accuracy {100 * (digit_pred == truth['digit']).float().mean():.3f} %, "
            f"sum accuracy {100 * (sum_pred == truth['sum']).float().mean():.3f} %"
        )
    ]
    if n == 0:
        return lines[0]
    d, s = digit_pred[disagree] == truth["digit"][disagree], sum_pred[disagree] == truth["sum"][disagree]
    lines.append(
        f"  digit right, sum wrong: {int((d & ~s).sum())}; digit wrong, sum right: {int((~d & s).sum())}; "
        f"both wrong: {int((~d & ~s).sum())}"
    )
    second = sum_pred[disagree] == top2.indices[disagree, 1] + number[disagree]
    lines.append(f"  the sum head chose the digit head's second choice plus the number: {int(second.sum())} of {n}")
    confidence = top2.values[disagree, 0]
    lines.append(
        f"  the digit head's top probability on these pairs: median {confidence.median():.3f}, "
        f"below 0.6 on {int((confidence < 0.6).sum())}; on all pairs below 0.6 on "
        f"{int((top2.values[:, 0] < 0.6).sum())}"
    )
    images = torch.div(torch.nonzero(disagree).flatten(), 10, rounding_mode="floor")
    lines.append(
        f"  distinct images: {len(images.unique())}; pairs per image: "
        f"{dict(sorted(Counter(Counter(images.tolist()).values()).items()))}"
    )
    for name, values in (("number", number[disagree]), ("true digit", truth["digit"][disagree])):
        lines.append(f"  by {name}: {dict(sorted(Counter(values.tolist()).items()))}")
    return "\n".join(lines)


def load(checkpoint: str, data_dir: str, split: str) -> tuple[MNISTAdder, AllPairs]:
    """The checkpoint's model, and its run's validation images (or the official test images) with all ten numbers;
    exits with a one-line error if either cannot be read."""
    try:
        data_hparams = read_checkpoint(checkpoint).get("datamodule_hyper_parameters")
        if not data_hparams:
            raise UsageError(f"{checkpoint} does not say which split it was trained on (no datamodule hyperparameters)")
        data = MNISTAdderData(data_dir=data_dir, seed=data_hparams["seed"], val_size=data_hparams["val_size"])
        data.prepare_data()
        data.setup("fit")
    except (UsageError, MNISTUnavailable) as err:
        sys.exit(f"error: {err}")
    source = data.val_set if split == "val" else data.test_set
    model = MNISTAdder.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    return model, AllPairs(source.images, source.digits)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--split", choices=["val", "test"], default="val")
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    args = parser.parse_args(argv)
    model, pairs = load(args.checkpoint, args.data_dir, args.split)
    print(f"{args.split} images, each with all ten numbers")
    print(report(*all_pair_logits(model, pairs)))


if __name__ == "__main__":
    main()
