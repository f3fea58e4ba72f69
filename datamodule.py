"""MNIST images paired with random numbers 0-9, held as tensors and served a whole batch at a time."""

import hashlib
import itertools
import math
import os
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mnist_adder.data.mnist_files import OFFICIAL_MD5, ensure_mnist, read_idx
from mnist_adder.data.photos import read_manifest, read_picture
from mnist_adder.run.predictions import RESERVED

TestPairs = Literal["all", "fixed", "both"]


def _seeded(*keys) -> torch.Generator:
    """A CPU generator (the same stream on every machine) for one purpose, e.g. ("val", seed)."""
    return torch.Generator().manual_seed(int(hashlib.sha256(repr(keys).encode()).hexdigest()[:15], 16))


def draw_numbers(count: int, *keys) -> torch.Tensor:
    return torch.randint(0, 10, (count,), generator=_seeded(*keys))


class Pairs(Dataset):
    """Images with one number each; `__getitems__` cuts a whole batch with one index.

    A batch is a dict: image float [B,1,28,28] in [0,1], number, digit, sum and index (of the image
    in this set) int64 [B].
    """

    def __init__(self, images: torch.Tensor, digits: torch.Tensor, numbers: torch.Tensor):
        self.images, self.digits, self.numbers = images, digits, numbers

    def __len__(self) -> int:
        return len(self.digits)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, device=self.images.device)
        number, digit = self.numbers[idx], self.digits[idx]
        return {
            "image": self.images[idx].unsqueeze(1).float().div_(255),
            "number": number,
            "digit": digit,
            "sum": digit.view(-1, *[1] * (number.dim() - 1)) + number,
            "index": idx,
        }

    def to(self, device: torch.device) -> "Pairs":
        self.images, self.digits, self.numbers = (t.to(device) for t in (self.images, self.digits, self.numbers))
        return self


class TrainPairs(Pairs):
    """Fresh numbers every epoch, drawn from (seed, epoch) alone, and the augmentation's random stream,
    from (seed, epoch, rank): a run resumed at an epoch's start sees what the uninterrupted run saw.
    `batches_trained` counts the epoch's batches that reached the model (the data module counts them)."""

    def __init__(self, images: torch.Tensor, digits: torch.Tensor, seed: int):
        self.seed = seed
        super().__init__(images, digits, draw_numbers(len(digits), "train", seed, 0))
        self.augment_generator = _seeded("augment", seed, 0, 0)
        self.epoch = self.batches_trained = 0
        self.resume = None  # a ResumableLoader state to go on from

    def set_epoch(self, epoch: int, rank: int = 0) -> None:
        self.numbers = draw_numbers(len(self.digits), "train", self.seed, epoch).to(self.images.device)
        self.augment_generator = _seeded("augment", self.seed, epoch, rank)
        self.epoch, self.batches_trained = epoch, 0


def augment_draws(n: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """The uniform numbers in [-1, 1) that one batch of n images takes from the augmentation stream, in order:
    angle, zoom and the (x, y) shift."""
    return tuple(torch.rand(*shape, generator=generator) * 2 - 1 for shape in ((n,), (n,), (n, 2)))


def affine_augment(
    images: torch.Tensor, draws: tuple[torch.Tensor, ...], rotate: float, translate: float, scale: float
) -> torch.Tensor:
    """Each image rotated by up to `rotate` degrees, zoomed by up to `scale` and shifted by up to `translate` of its
    size, as its `augment_draws` (on the images' device) say; the whole batch at once."""
    angle, zoom, shift = draws
    angle, zoom = angle * math.radians(rotate), 1 + zoom * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    shift = shift * translate * 2  # affine_grid spans [-1, 1]: the image is 2 units wide
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)


class ResumableLoader(DataLoader):
    """The train loader, resumable mid-epoch through Lightning's state_dict / load_state_dict interface: its state
    is the epoch and how many of its batches were trained. Resumed in that epoch, it skips them in the epoch's own
    order and replays their draws from the augmentation stream, so it goes on as the uninterrupted run did."""

    def state_dict(self) -> dict:
        return {"epoch": self.dataset.epoch, "batches_trained": self.dataset.batches_trained}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.resume = state

    def __iter__(self):
        batches, resume = super().__iter__(), self.dataset.resume
        self.dataset.resume = None

        def resumed():  # runs at the first batch, once Lightning has set the epoch (a resume iterates before that)
            skip = resume["batches_trained"] if resume and resume["epoch"] == self.dataset.epoch else 0
            for _ in range(skip):
                augment_draws(self.batch_size, self.dataset.augment_generator)
            self.dataset.batches_trained = skip
            yield from itertools.islice(batches, skip, None)

        return resumed()


class AllPairs(Pairs):
    """Every image with every number 0..9: number and sum are [B, 10], so a batch holds 10 * B pairs."""

    def __init__(self, images: torch.Tensor, digits: torch.Tensor):
        super().__init__(images, digits, torch.arange(10).expand(len(digits), 10))


class ManifestPictures(Dataset):
    """The manifest's rows with a valid number; each picture is read and made MNIST-like as its batch is drawn, in
    the loader's worker processes. A batch holds the pictures it could read (image, number and their manifest row)
    and, under "unreadable", (row, reason) for each that it could not: a worker cannot write the parent's rows."""

    def __init__(self, rows: list[dict]):
        self.rows = [(k, row["path"], row["number"]) for k, row in enumerate(rows) if not row["error"]]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices: list[int]) -> dict:
        read, unreadable = [], []
        for k, path, number in (self.rows[i] for i in indices):
            image, error = read_picture(path)
            if error:
                unreadable.append((k, error))
            else:
                read.append((k, number, image))
        return {
            "image": torch.stack([image for *_, image in read]) if read else torch.zeros(0, 1, 28, 28),
            "number": torch.tensor([number for _, number, _ in read], dtype=torch.long),
            "row": torch.tensor([k for k, *_ in read], dtype=torch.long),
            "unreadable": unreadable,
        }


class EpochSampler(DistributedSampler):
    """This process's shard, reshuffled each epoch; tells the dataset the epoch so it redraws numbers."""

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.dataset.set_epoch(epoch, self.rank)


def _whole_batch(batch):
    return batch


class MNISTAdderData(L.LightningDataModule):
    """Official MNIST: 55,000 train / 5,000 val (a seeded split) / the official 10,000 test images.

    Args:
        data_dir: holds (or receives) ``MNIST/raw/`` with the four official IDX files.
        batch_size: training batch size; evaluation uses larger batches.
        seed: decides the split, the train numbers of every epoch and the fixed val/test numbers.
        val_size: training images held out for validation and model selection.
        test_pairs: ``fixed`` (one number per test image), ``all`` (each image with all ten
            numbers: 100,000 pairs) or ``both``.
        rotate: augmentation, maximum rotation in degrees (0 turns it off).
        translate: augmentation, maximum shift as a fraction of the image size.
        scale: augmentation, maximum relative zoom in or out.
        on_device: keep all images on the accelerator and cut batches there (fast on a GPU).
        predict_manifest: a CSV with the columns ``file,number`` (paths relative to the CSV's folder):
            ``predict`` then reads these pictures instead of the test set.
        predict_output: where ``predict`` writes its CSV (default: ``predictions.csv`` in the run's folder).
        num_workers: worker processes that read and prepare a manifest's pictures for ``predict``, batch by batch
            (default: the machine's cores, up to 4; 0 reads them in the main process). The train, val and test
            loaders keep none: they cut batches out of tensors in memory, where a worker would only add copies.
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        seed: int = 0,
        val_size: int = 5000,
        test_pairs: TestPairs = "both",
        rotate: float = 10.0,
        translate: float = 0.05,
        scale: float = 0.1,
        on_device: bool = False,
        predict_manifest: str | None = None,
        predict_output: str | None = None,
        num_workers: int | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 1 <= val_size <= 59_999:
            raise ValueError(f"val_size must be within 1..59999, got {val_size}")
        if test_pairs not in ("all", "fixed", "both"):
            raise ValueError(f"test_pairs must be 'all', 'fixed' or 'both', got {test_pairs!r}")
        if min(rotate, translate, scale) < 0:
            raise ValueError("rotate, translate and scale must be >= 0")
        if predict_manifest is not None and not Path(predict_manifest).is_file():
            raise ValueError(f"predict_manifest {predict_manifest!r}: no such file")
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.raw_dir = Path(data_dir) / "MNIST" / "raw"
        if not all((self.raw_dir / name).is_file() for name in OFFICIAL_MD5):
            _check_writable(Path(data_dir))

    def prepare_data(self) -> None:
        rank_zero_info(f"MNIST in {self.raw_dir}: {ensure_mnist(self.raw_dir)}")

    def setup(self, stage: str) -> None:
        if stage == "predict" and self.hparams.predict_manifest:
            self.manifest_columns, self.manifest_rows = read_manifest(Path(self.hparams.predict_manifest), RESERVED)
            return
        if not hasattr(self, "test_set"):
            self._load()
        if self.hparams.on_device and self.trainer is not None:
            for dataset in (self.train_set, self.val_set, self.test_set, self.all_pairs_set):
                dataset.to(self.trainer.strategy.root_device)

    def _load(self) -> None:
        hp = self.hparams
        images = read_idx(self.raw_dir / "train-images-idx3-ubyte")
        digits = read_idx(self.raw_dir / "train-labels-idx1-ubyte").long()
        if hp.val_size >= len(digits):
            raise ValueError(f"val_size {hp.val_size} leaves no training images out of {len(digits)}")
        order = torch.randperm(len(digits), generator=_seeded("split", hp.seed))
        train, val = order[hp.val_size :], order[: hp.val_size]
        test_images = read_idx(self.raw_dir / "t10k-images-idx3-ubyte")
        test_digits = read_idx(self.raw_dir / "t10k-labels-idx1-ubyte").long()
        self.train_set = TrainPairs(images[train], digits[train], hp.seed)
        self.val_set = Pairs(images[val], digits[val], draw_numbers(len(val), "val", hp.seed))
        self.test_set = Pairs(test_images, test_digits, draw_numbers(len(test_digits), "test", hp.seed))
        self.all_pairs_set = AllPairs(test_images, test_digits)

    def _shard(self) -> dict:
        trainer = self.trainer
        return {"num_replicas": trainer.world_size if trainer else 1, "rank": trainer.global_rank if trainer else 0}

    def _loader(
        self, dataset: Dataset, batch_size: int, sampler, drop_last: bool = False, num_workers: int = 0
    ) -> DataLoader:
        return (ResumableLoader if isinstance(dataset, TrainPairs) else DataLoader)(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=_whole_batch,
            drop_last=drop_last,
            pin_memory=self._pin_memory(),
            num_workers=num_workers,
        )

    def _pin_memory(self) -> bool:
        """Page-locked host batches speed up copies to a GPU: only when this run trains on one, from the host."""
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        return device.type == "cuda" and not self.hparams.on_device

    def _eval_loader(self, dataset: Dataset, batch_size: int = 1000, num_workers: int = 0) -> DataLoader:
        # No padding under DDP: every sample is counted exactly once.
        sampler = UnrepeatedDistributedSampler(dataset, shuffle=False, **self._shard())
        return self._loader(dataset, batch_size, sampler, num_workers=num_workers)

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSampler(self.train_set, shuffle=True, seed=self.hparams.seed, drop_last=True, **self._shard())
        return self._loader(self.train_set, self.hparams.batch_size, sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def calibration_dataloader(self) -> DataLoader:
        """Every validation pair, in every process: the temperatures fitted on them are the same everywhere."""
        return DataLoader(self.val_set, batch_size=1000, collate_fn=_whole_batch)

    def test_dataloader(self) -> list[DataLoader]:
        choice = self.hparams.test_pairs
        return [self._eval_loader(self.test_set)] * (choice != "all") + [self._eval_loader(self.all_pairs_set, 250)] * (
            choice != "fixed"
        )

    def predict_dataloader(self) -> DataLoader:
        if self.hparams.predict_manifest:  # small batches: the workers share the pictures, the progress bar moves
            workers = self.hparams.num_workers
            workers = min(4, os.cpu_count() or 1) if workers is None else workers
            return self._eval_loader(ManifestPictures(self.manifest_rows), 16, workers)
        return self._eval_loader(self.test_set)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        for row, error in batch.pop("unreadable", ()):  # found in a worker process: the reason comes back here
            self.manifest_rows[row]["error"] = error
        return batch

    def state_dict(self) -> dict:
        """The train loader's state, kept here as well: Lightning sets the loader up before it restores a checkpoint
        (the schedule needs the run's length), and then does not hand the loader its saved state."""
        return {"train_loader": self.trainer.train_dataloader.state_dict()} if self._fitting() else {}

    def load_state_dict(self, state: dict) -> None:
        if "train_loader" in state and self.trainer is not None and self.trainer.state.fn == "fit":
            self.train_set.resume = state["train_loader"]

    def _fitting(self) -> bool:
        return self.trainer is not None and isinstance(self.trainer.train_dataloader, ResumableLoader)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self.trainer is not None and self.trainer.training:
            batch["image"] = self.augment(batch["image"], self.train_set.augment_generator)
            self.train_set.batches_trained += 1  # this batch reaches the model: the loader's resume point
        return batch

    def augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A random rotation, zoom and shift for each image, done for the whole batch at once; the
        parameters come from `generator` (on the CPU: the same stream on every device)."""
        hp = self.hparams
        if hp.rotate == hp.translate == hp.scale == 0:
            return images
        draws = tuple(u.to(images.device, non_blocking=True) for u in augment_draws(len(images), generator))
        return affine_augment(images, draws, hp.rotate, hp.translate, hp.scale)


def _check_writable(data_dir: Path) -> None:
    existing = next(p for p in (data_dir, *data_dir.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"data_dir {str(data_dir)!r} cannot be written (checked {str(existing)!r})")
