"""How well "not a digit" is told apart: `python benchmarks/not_a_digit.py --training NAME CKPT...` (about 5
minutes on two cores, and one more per checkpoint).

Makes `--per-kind` phone-like photos of each kind of non-digit picture for validation and for the held-out test
set (the "val" and "test" splits of mnist_adder/data/non_digits.py, photographed by non_digit_photos.py), reads
them as `predict` does (a picture it refuses, a digit cut off by the edge say, counts as caught), and scores them
and the real digits ten ways, from the checkpoint's 29 logits or the conv features under them:

- msp: minus the calibrated maximum softmax probability of the digit head (Hendrycks & Gimpel, 2017);
- energy: minus the log-sum-exp of the calibrated digit logits (Liu et al., 2020);
- mahalanobis: the smallest Mahalanobis distance of the features to a digit's mean, with one covariance shared by
  the ten digits (Lee et al., 2018), as `MNISTAdder.answer` measures it: the checkpoint's own means and covariance
  (fitted by its last validation pass on the data module's feature images) and threshold;
- mahalanobis_clean: the same distance (`feature_distance.py`), its means and covariance fitted here on 20,000
  training images without augmentation, through the net in eval mode;
- relative_mahalanobis: mahalanobis_clean minus the distance to the mean of all 20,000 images under their own
  covariance, one Gaussian for every digit (Ren et al., 2021, a fix for shapes near the digits);
- mahalanobis_penultimate: the same fit and distance on the penultimate layer (the first FC layer's output,
  after its ReLU), which sees the picture's number too: each training image is fitted with a random one;
- mahalanobis_layers: the conv features of every stage (Lee et al.'s ensemble of layers): the earlier stages'
  averaged over their pixels, each stage's mahalanobis_clean distance divided by its width, summed;
- mahalanobis_classwise: a covariance of each digit's own (half its own, half the shared one), each digit's
  distance plus its covariance's log-determinant, the smallest (a Gaussian per digit, fitted like mahalanobis_clean);
- mahalanobis_normalized: mahalanobis_clean of the features scaled to length 1;
- knn: minus the cosine similarity of the features to their 10th nearest among the 20,000 training images' (Sun et
  al., 2022).

Training with outlier exposure (the data's `non_digits`, the model's `not_digit_weight`) is one more method: each
`--training` group of checkpoints (trained with it or without, or on other non-digits) is scored these ten
ways. Each score's threshold refuses `calibration.NOT_DIGIT_SHARE` of the validation digits (mahalanobis's is the
one the last validation pass fitted, as `predict` uses it). Every picture is scored with a number, as `predict`
scores it: a digit of the val or test set with its own, a photo with a random one.

Each group's figures are kept in benchmarks/not_a_digit.json under its name, with the commit measured at (a group
measured again replaces its entry), and every group there is reported: AUROC against the validation digits
(validation) and the official test digits (test), the share of non-digits caught, per kind, and the shares of
validation digits, phone-like photos of validation digits, official test digits and phone-like photos of test
digits refused. Written into docs/experiments.md and BENCHMARKS.md between the `not_a_digit` markers.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench import ROOT, write_report
from seeds import commit

sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from datamodule import MNISTAdderData  # noqa: E402
from lightning_module import MNISTAdder  # noqa: E402
from mnist_adder.data.photos import PhotoError, gray_levels, to_mnist  # noqa: E402
from mnist_adder.errors import UsageError  # noqa: E402
from mnist_adder.model.calibration import NOT_DIGIT_SHARE  # noqa: E402
from mnist_adder.model.feature_distance import FeatureStats, feature_distance  # noqa: E402
from mnist_adder.model.net import MNIST_MEAN, MNIST_STD, split_logits  # noqa: E402
from mnist_adder.run.checkpoints import read_checkpoint  # noqa: E402
from non_digit_photos import KINDS, non_digit_photos  # noqa: E402
from phone import phone_photo  # noqa: E402

START, END = "<!-- not_a_digit:start -->", "<!-- not_a_digit:end -->"
METHODS = (
    "msp",
    "energy",
    "mahalanobis",
    "mahalanobis_clean",
    "relative_mahalanobis",
    "mahalanobis_penultimate",
    "mahalanobis_layers",
    "mahalanobis_classwise",
    "mahalanobis_normalized",
    "knn",
)
NEIGHBOUR = 10  # knn's: the 10th nearest training image


def auroc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """The chance that a random positive scores above a random negative, ties counting half. (torchmetrics' AUROC
    takes scores outside [0, 1] for logits and squashes them through a sigmoid: large distances would tie.)"""
    negatives = np.sort(negatives)
    below = np.searchsorted(negatives, positives, "left")
    tied = np.searchsorted(negatives, positives, "right") - below
    return float((below + tied / 2).sum() / (len(positives) * len(negatives)))


def read(pictures: list) -> tuple[torch.Tensor, int]:
    """The pictures `predict` can read, made MNIST-like, and how many it refuses."""
    images = []
    for picture in pictures:
        try:
            images.append(to_mnist(gray_levels(picture)))
        except PhotoError:
            pass
    return torch.stack(images) if images else torch.zeros(0, 1, 28, 28), len(pictures) - len(images)


class Scores:
    """Each method's score of MNIST-like images with their numbers, higher the less they look like a digit, and its
    threshold: for mahalanobis the checkpoint's own (`MNISTAdder.answer`), for the others the share
    `NOT_DIGIT_SHARE` of the validation digits' scores."""

    def __init__(self, model: MNISTAdder, train_images: torch.Tensor, train_digits: torch.Tensor):
        self.model = model
        numbers = torch.from_numpy(np.random.default_rng(0).integers(0, 10, len(train_images)))
        features = self.features(train_images)
        self.fits = {
            "mahalanobis_clean": self.fit(features, train_digits),
            "mahalanobis_penultimate": self.fit(self.penultimate(features, numbers), train_digits),
        }
        self.fits["layers"] = [self.fit(f, train_digits) for f in self.early(train_images)]
        means, whitening = self.fit(features, torch.zeros_like(train_digits))  # all as one digit: one Gaussian
        self.fits["background"] = (means[:1], whitening)  # that digit's mean only
        self.train_directions = F.normalize(features, dim=1)  # the features scaled to length 1
        self.fits["mahalanobis_normalized"] = self.fit(self.train_directions, train_digits)
        self.fits["mahalanobis_classwise"] = self.fit_classwise(features, train_digits)

    @staticmethod
    def fit(features: torch.Tensor, digits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(whitened means, whitening) of `feature_distance`, fitted in batches of 1000 as validation fits it."""
        stats = FeatureStats(features.shape[1])
        for chunk, chunk_digits in zip(features.split(1000), digits.split(1000)):
            stats.update(chunk, chunk_digits)
        means, whitening = stats.compute()
        return means @ whitening, whitening

    def fit_classwise(self, features: torch.Tensor, digits: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Per digit, in the shared fit's whitened space (where the shared covariance is the identity): its mean, the
        whitening of half its own covariance plus half the identity, and that covariance's log-determinant."""
        whitened = features @ self.fits["mahalanobis_clean"][1]
        fits = []
        for digit in range(10):
            own = whitened[digits == digit]
            variances, directions = torch.linalg.eigh(0.5 * torch.cov(own.T) + 0.5 * torch.eye(own.shape[1]))
            fits.append((own.mean(0), directions / variances.sqrt(), variances.log().sum()))
        return fits

    def classwise(self, features: torch.Tensor) -> torch.Tensor:
        whitened = features @ self.fits["mahalanobis_clean"][1]
        fits = self.fits["mahalanobis_classwise"]
        return torch.stack([((whitened - m) @ w).square().sum(1) + log_det for m, w, log_det in fits], 1).min(1).values

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model.net.image_features(chunk) for chunk in images.split(1000)])

    @torch.no_grad()
    def early(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Each earlier stage's output, averaged over its pixels: [N, channels] per stage."""
        outputs = {}
        for chunk in images.split(1000):
            x = (chunk - MNIST_MEAN) / MNIST_STD
            last = {}
            for layer in self.model.net.image[:-1]:
                x = layer(x)
                if isinstance(layer, torch.nn.ReLU):
                    last[x.shape[-1]] = x.mean((2, 3))
            for size, pooled in last.items():
                outputs.setdefault(size, []).append(pooled)
        return [torch.cat(outputs[size]) for size in sorted(outputs, reverse=True)[:-1]]

    @torch.no_grad()
    def penultimate(self, features: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        net = self.model.net
        number_features = net.number(torch.nn.functional.one_hot(numbers, 10).float())
        return net.head[:2](torch.cat([features, number_features], dim=1))  # the first FC layer and its ReLU

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, numbers: torch.Tensor) -> dict[str, np.ndarray]:
        if not len(images):
            return {method: np.zeros(0) for method in METHODS}
        features = self.features(images)
        directions = F.normalize(features, dim=1)
        digit = split_logits(self.model.calibrated(self.model.net.logits(features, numbers))).digit
        return {
            "msp": -digit.softmax(1).max(1).values.numpy(),
            "energy": -torch.logsumexp(digit, dim=1).numpy(),
            "mahalanobis": self.model.not_digit_score(features).numpy(),
            "mahalanobis_clean": feature_distance(features, *self.fits["mahalanobis_clean"]).numpy(),
            "relative_mahalanobis": (
                feature_distance(features, *self.fits["mahalanobis_clean"])
                - feature_distance(features, *self.fits["background"])
            ).numpy(),
            "mahalanobis_penultimate": feature_distance(
                self.penultimate(features, numbers), *self.fits["mahalanobis_penultimate"]
            ).numpy(),
            "mahalanobis_layers": sum(
                feature_distance(f, *fit) / f.shape[1]
                for f, fit in zip(
                    [*self.early(images), features], [*self.fits["layers"], self.fits["mahalanobis_clean"]]
                )
            ).numpy(),
            "mahalanobis_classwise": self.classwise(features).numpy(),
            "mahalanobis_normalized": feature_distance(directions, *self.fits["mahalanobis_normalized"]).numpy(),
            "knn": -(directions @ self.train_directions.T).topk(NEIGHBOUR, dim=1).values[:, -1].numpy(),
        }

    def thresholds(self, validation_digits: dict[str, np.ndarray]) -> dict[str, float]:
        quantiles = {m: float(np.quantile(validation_digits[m], 1 - NOT_DIGIT_SHARE)) for m in METHODS}
        return {**quantiles, "mahalanobis": float(self.model.not_digit_above)}


def percent(share: float) -> str:
    return f"{100 * share:.1f} %"


def spread(values: list[float], form=percent) -> str:
    """One checkpoint's figure, or the mean ± standard deviation (minimum) of several."""
    if len(values) == 1:
        return form(values[0])
    return f"{form(np.mean(values))} ± {form(np.std(values, ddof=1))} (min {form(min(values))})"


class Pictures:
    """A data split's digits and non-digits, made once per (seed, val_size) and read as `predict` reads them, each
    picture with a number: the split's own for the digits of the val and test sets, a random one for a photo."""

    def __init__(self, data: MNISTAdderData, per_kind: int, phone_digits: int):
        rng = np.random.default_rng(0)
        val, test = (s.__getitems__(list(range(len(s)))) for s in (data.val_set, data.test_set))
        train = data.train_set.__getitems__(list(range(20_000)))
        self.train = train["image"], train["digit"]

        def photos(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            read_images = read([phone_photo(i[0].numpy(), rng) for i in images[:phone_digits]])[0]
            return read_images, torch.from_numpy(rng.integers(0, 10, len(read_images)))

        self.digits = {
            "validation digits": (val["image"], val["number"]),
            "phone photos of validation digits": photos(val["image"]),
            "official test digits": (test["image"], test["number"]),
            "phone photos of test digits": photos(test["image"]),
        }
        self.non_digits = {}
        for split, images in (("val", val["image"]), ("test", test["image"])):
            made = non_digit_photos(split, per_kind, images[:, 0].numpy())
            for kind in KINDS:
                read_images, refused = read(made[kind])
                numbers = torch.from_numpy(rng.integers(0, 10, len(read_images)))
                self.non_digits[split, kind] = (read_images, numbers), refused


def measure(scores: Scores, pictures: Pictures, per_kind: int) -> dict:
    """Per method: AUROC, share caught (all, per kind) for each set, and the share of each set of digits refused."""
    digits = {name: scores(*pair) for name, pair in pictures.digits.items()}
    non_digits = {key: (scores(*pair), refused) for key, (pair, refused) in pictures.non_digits.items()}
    thresholds = scores.thresholds(digits["validation digits"])
    figures = {}
    for method, threshold in thresholds.items():
        for split, reference in (("val", "validation digits"), ("test", "official test digits")):
            caught = {
                kind: ((non_digits[split, kind][0][method] > threshold).sum() + non_digits[split, kind][1]) / per_kind
                for kind in KINDS
            }
            every = np.concatenate(
                [np.concatenate([s[method], np.full(n, np.inf)]) for s, n in (non_digits[split, k] for k in KINDS)]
            )
            figures[method, split] = {
                "AUROC": auroc(every, digits[reference][method]),
                "caught": np.mean(list(caught.values())),
                **caught,
            }
        figures[method, "refused"] = {name: float((s[method] > threshold).mean()) for name, s in digits.items()}
    return figures


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--training",
        nargs="+",
        action="append",
        default=[],
        metavar=("NAME", "CKPT"),
        help="a name for how these checkpoints were trained, then the checkpoints (one per seed, say); repeatable; "
        "none: the report of the stored groups only",
    )
    parser.add_argument("--per-kind", type=int, default=300, help="non-digit photos of each kind, in each set")
    parser.add_argument("--phone-digits", type=int, default=1000, help="phone-like photos of val and of test digits")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "not_a_digit.json")
    parser.add_argument("--no-write", action="store_true", help="print the tables only, store nothing")
    args = parser.parse_args(argv)
    source = commit()  # before the measuring: the code that measures
    made, results = {}, {}
    for name, *paths in args.training:
        for path in paths:
            checkpoint = read_checkpoint(path)
            split = {key: checkpoint["datamodule_hyper_parameters"][key] for key in ("seed", "val_size")}
            if tuple(split.values()) not in made:
                data = MNISTAdderData(str(args.data_dir), non_digits=0, **split)  # the checkpoint's own split
                data.prepare_data()
                data.setup("fit")
                data.setup("test")
                made[tuple(split.values())] = Pictures(data, args.per_kind, args.phone_digits)
            pictures = made[tuple(split.values())]
            model = MNISTAdder.load_from_checkpoint(path, map_location="cpu").eval()
            figures = measure(Scores(model, *pictures.train), pictures, args.per_kind)
            results.setdefault(name, []).append({f"{key[0]}/{key[1]}": value for key, value in figures.items()})
            print(f"measured {path}", flush=True)
    groups = {name: {**source, "per_kind": args.per_kind, "runs": runs} for name, runs in results.items()}
    if not args.no_write:
        stored = json.loads(args.results.read_text()) if args.results.exists() else {}
        groups = {**stored, **groups}
        args.results.write_text(json.dumps(groups, indent=2) + "\n")
    text = report(groups)
    print(text)
    if not args.no_write:
        for path in (ROOT / "docs" / "experiments.md", ROOT / "BENCHMARKS.md"):
            write_report(path, text, START, END)


def report(groups: dict[str, dict]) -> str:
    """The tables of every group (name -> its commit, photos per kind and runs), each with its commit."""
    lines = [
        "| training | commit | score | set | AUROC | non-digits caught | " + " | ".join(KINDS) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(KINDS),
    ]
    where = {name: f"`{g['commit'][:7]}`" + ("" if g["clean"] else " +") for name, g in groups.items()}
    methods = {name: [m for m in METHODS if f"{m}/val" in g["runs"][0]] for name, g in groups.items()}
    for name, group in groups.items():
        runs = group["runs"]
        for method in methods[name]:
            for split in ("val", "test"):
                figures = [run[f"{method}/{split}"] for run in runs]
                cells = [
                    spread([f["AUROC"] for f in figures], lambda v: f"{v:.4f}"),
                    spread([f["caught"] for f in figures]),
                ]
                cells += [percent(np.mean([f[kind] for f in figures])) for kind in KINDS]
                lines.append(f"| {name} | {where[name]} | {method} | {split} | " + " | ".join(cells) + " |")
    sets = list(next(iter(groups.values()))["runs"][0][f"{METHODS[0]}/refused"])
    lines += [
        "",
        "| training | score | " + " | ".join(f"{s} refused" for s in sets) + " |",
        "|---|---|" + "---|" * len(sets),
    ]
    for name, group in groups.items():
        for method in methods[name]:
            cells = [spread([run[f"{method}/refused"][s] for run in group["runs"]]) for s in sets]
            lines.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
    mean = {
        (name, method): tuple(np.mean([run[f"{method}/val"][k] for run in group["runs"]]) for k in ("caught", "AUROC"))
        for name, group in groups.items()
        for method in methods[name]
    }
    best = max(mean, key=mean.get)
    counts = ", ".join(f"{name}: {len(g['runs'])}, {g['per_kind']} a kind" for name, g in groups.items())
    lines += [
        "",
        f"Checkpoints and non-digit phone photos in each set ({counts}; several checkpoints: mean ± standard "
        "deviation (minimum), each kind the mean); a picture `predict` refuses counts as caught. Each score's "
        f"threshold refuses {percent(NOT_DIGIT_SHARE)} of the validation digits (mahalanobis: the checkpoint's own). "
        "Measured at the commit shown (+: with changes not committed); the checkpoints trained as benchmarks/seeds.py "
        "trains them. Written by `python benchmarks/not_a_digit.py --training NAME CKPT... [--training NAME CKPT...]`.",
        "",
        f"Highest mean on validation (the share caught, then the AUROC): training {best[0]}, score {best[1]}, "
        f"{percent(mean[best][0])} caught, AUROC {mean[best][1]:.4f}. A lead inside the seed spread is no lead: "
        "docs/experiments.md says what ships and why.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except UsageError as err:  # a missing or unreadable checkpoint, say
        sys.exit(f"error: {err}")
