"""The LightningDataModule: MNIST images paired with random numbers 0-9, served a whole batch at a time."""

import os
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from mnist_adder.data.mnist_files import OFFICIAL_MD5, check_writable, ensure_mnist, read_idx
from mnist_adder.data.non_digits import non_digit_images
from mnist_adder.data.pairs import (
    AllPairs,
    EpochSampler,
    ManifestPictures,
    Pairs,
    ResumableLoader,
    Shard,
    TrainPairs,
    affine_augment,
    augment_draws,
    draw_numbers,
    seeded,
    whole_batch,
)
from mnist_adder.data.photos import read_manifest
from mnist_adder.errors import UsageError
from mnist_adder.run.predictions import RESERVED

TestPairs = Literal["all", "fixed", "both"]


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
        non_digits: generated pictures that are no digit (mnist_adder/data/non_digits.py) added to the training
            images, as a share of them, with the digit -1: the model learns to refuse them (0 adds none).
        feature_images: training images (the first of the seeded split), as they are, that each validation also
            reads (a second loader, which the Trainer's ``limit_val_batches`` limits too): the model's "not a digit"
            distance is measured to their conv features (0: no second loader, and no picture is answered "not a
            digit").
        on_device: keep all images on the accelerator and cut batches there (fast on a GPU).
        predict_manifest: a CSV with the columns ``file,number`` (paths relative to the CSV's folder):
            ``predict`` then reads these pictures instead of the test set.
        predict_output: where ``predict`` writes its CSV (default: ``predictions.csv`` in its run's folder).
        num_workers: worker processes that read and prepare a manifest's pictures for ``predict``, batch by batch
            (default: the machine's cores, up to 4; 0 reads them in the main process). The train, val and test
            loaders keep none: they cut batches out of tensors in memory, where a worker would only add copies.
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 256,
        seed: int = 0,
        val_size: int = 5000,
        test_pairs: TestPairs = "both",
        rotate: float = 10.0,
        translate: float = 0.05,
        scale: float = 0.1,
        non_digits: float = 0.1,
        feature_images: int = 10_000,
        on_device: bool = False,
        predict_manifest: str | None = None,
        predict_output: str | None = None,
        num_workers: int | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        if not 1 <= val_size <= 59_999:
            raise UsageError(f"val_size must be within 1..59999, got {val_size}")
        if test_pairs not in ("all", "fixed", "both"):
            raise UsageError(f"test_pairs must be 'all', 'fixed' or 'both', got {test_pairs!r}")
        if min(rotate, translate, scale, non_digits, feature_images) < 0:
            raise UsageError("rotate, translate, scale, non_digits and feature_images must be >= 0")
        if predict_manifest is not None and not Path(predict_manifest).is_file():
            raise UsageError(f"predict_manifest {predict_manifest!r}: no such file")
        if num_workers is not None and num_workers < 0:
            raise UsageError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.raw_dir = Path(data_dir) / "MNIST" / "raw"

    def prepare_data(self) -> None:
        if self.hparams.predict_manifest and self.trainer is not None and self.trainer.predicting:
            return  # the manifest's pictures are all that predict reads: no MNIST needed
        if not all((self.raw_dir / name).is_file() for name in OFFICIAL_MD5):
            check_writable(Path(self.hparams.data_dir), "data_dir")
        rank_zero_info(f"MNIST in {self.raw_dir}: {ensure_mnist(self.raw_dir)}")

    def setup(self, stage: str) -> None:
        if stage == "predict" and self.hparams.predict_output:  # said now, not once every picture is predicted
            output = Path(self.hparams.predict_output)
            if output.is_dir():
                raise UsageError(f"predict_output {str(output)!r} is a folder: name a CSV file in it")
            check_writable(output.parent, "predict_output's folder")
        if stage == "predict" and self.hparams.predict_manifest:
            self.manifest_columns, self.manifest_rows = read_manifest(Path(self.hparams.predict_manifest), RESERVED)
            if all(row["error"] for row in self.manifest_rows):  # Lightning would skip an empty loader, silently
                first = next((f"{row['file']}: {row['error']}" for row in self.manifest_rows), "it has none")
                raise UsageError(f"predict_manifest {self.hparams.predict_manifest!r}: no row to predict ({first})")
            rows = sum(not row["error"] for row in self.manifest_rows)
            processes = self.trainer.world_size if self.trainer else 1
            if rows < processes:  # a process with no row would skip predict, the others wait for it
                raise UsageError(
                    f"predict_manifest {self.hparams.predict_manifest!r}: {rows} row(s) to predict for {processes} "
                    f"processes: predict with --trainer.devices {rows} or fewer"
                )
            return
        if not hasattr(self, "test_set"):
            self._load()
        if stage == "fit" and not hasattr(self, "train_set"):  # its non-digits are drawn only to train
            self.train_set = self._train_set()
        if self.hparams.on_device and self.trainer is not None:
            datasets = (self.val_set, self.feature_set, self.test_set, self.all_pairs_set)
            for dataset in (getattr(self, "train_set", None), *datasets):
                if dataset is not None:
                    dataset.to(self.trainer.strategy.root_device)

    def _load(self) -> None:
        hp = self.hparams
        images = read_idx(self.raw_dir / "train-images-idx3-ubyte")
        digits = read_idx(self.raw_dir / "train-labels-idx1-ubyte").long()
        if hp.val_size >= len(digits):
            raise UsageError(f"val_size {hp.val_size} leaves no training images out of {len(digits)}")
        order = torch.randperm(len(digits), generator=seeded("split", hp.seed))
        train, val = order[hp.val_size :], order[: hp.val_size]
        test_images = read_idx(self.raw_dir / "t10k-images-idx3-ubyte")
        test_digits = read_idx(self.raw_dir / "t10k-labels-idx1-ubyte").long()
        self.train_images, self.train_digits = images[train], digits[train]
        self.val_set = Pairs(images[val], digits[val], draw_numbers(len(val), "val", hp.seed))
        kept = train[: hp.feature_images]  # their numbers are not read
        self.feature_set = Pairs(images[kept], digits[kept], torch.zeros(len(kept), dtype=torch.long))
        self.test_set = Pairs(test_images, test_digits, draw_numbers(len(test_digits), "test", hp.seed))
        self.all_pairs_set = AllPairs(test_images, test_digits)

    def _train_set(self) -> TrainPairs:
        """The training images and, with the digit -1, `non_digits` times as many generated non-digits."""
        hp, images, digits = self.hparams, self.train_images, self.train_digits
        extra = non_digit_images(round(hp.non_digits * len(images)), hp.seed, images)
        return TrainPairs(torch.cat([images, extra]), torch.cat([digits, digits.new_full((len(extra),), -1)]), hp.seed)

    def _shard(self) -> dict:
        trainer = self.trainer
        return {"num_replicas": trainer.world_size if trainer else 1, "rank": trainer.global_rank if trainer else 0}

    def _loader(
        self, dataset: Dataset, batch_size: int, sampler, drop_last: bool = False, num_workers: int = 0
    ) -> DataLoader:
        train = {"position": self._train_position} if isinstance(dataset, TrainPairs) else {}
        return (ResumableLoader if train else DataLoader)(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=whole_batch,
            drop_last=drop_last,
            pin_memory=self._pin_memory(),
            num_workers=num_workers,
            **train,
        )

    def _pin_memory(self) -> bool:
        """Page-locked host batches speed up copies to a GPU: only when this run trains on one, from the host."""
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        return device.type == "cuda" and not self.hparams.on_device

    def _eval_loader(self, dataset: Dataset, batch_size: int = 1000, num_workers: int = 0) -> DataLoader:
        # No padding under DDP: every sample is counted exactly once.
        sampler = Shard(dataset, **self._shard())
        return self._loader(dataset, batch_size, sampler, num_workers=num_workers)

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSampler(self.train_set, shuffle=True, seed=self.hparams.seed, drop_last=True, **self._shard())
        return self._loader(self.train_set, self.hparams.batch_size, sampler, drop_last=True)

    def val_dataloader(self) -> list[DataLoader]:
        """The validation pairs, then, in fit, the training images the "not a digit" distance is fitted on (`validate`
        measures a checkpoint as it was saved)."""
        fitting = self.trainer is None or self.trainer.state.fn == "fit"
        features = [self._eval_loader(self.feature_set)] if fitting and len(self.feature_set) else []
        return [self._eval_loader(self.val_set), *features]

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

    # The model summary's example input, a tuple, passes through these two hooks as well: only batches are touched.
    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        for row, error in (
            batch.pop("unreadable", ()) if isinstance(batch, dict) else ()
        ):  # found in a worker process: the reason comes back here
            self.manifest_rows[row]["error"] = error
        return batch

    def state_dict(self) -> dict:
        """The train loader's state, kept here as well: Lightning sets the loader up before it restores a checkpoint
        (the schedule needs the run's length), and then does not hand the loader its saved state (Lightning issue
        #20550). The loader keeps its own state_dict / load_state_dict: they tell Lightning that it resumes
        mid-epoch, and serve a run whose schedule does not need the run's length."""
        return {"train_loader": self._train_position()} if self._has_train_loader() else {}

    def _train_position(self) -> dict:
        """The train loader's epoch, the batches trained in it (one a step, so a batch that Ctrl-C stopped mid-step
        goes again) and the epoch's length, which a resumed run must share."""
        trainer = self.trainer
        return {
            "epoch": self.train_set.epoch,
            "batches_trained": trainer.global_step - trainer.current_epoch * trainer.num_training_batches,
            "batches_per_epoch": trainer.num_training_batches,
        }

    def load_state_dict(self, state: dict) -> None:
        if "train_loader" in state and self.trainer is not None and self.trainer.state.fn == "fit":
            self.train_set.resume = state["train_loader"]

    def _has_train_loader(self) -> bool:
        return self.trainer is not None and isinstance(self.trainer.train_dataloader, ResumableLoader)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if isinstance(batch, dict) and self.trainer is not None and self.trainer.training:
            batch["image"] = self.augment(batch["image"], self.train_set.augment_generator)
        return batch

    def augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A random rotation, zoom and shift for each image, done for the whole batch at once; the
        parameters come from `generator` (on the CPU: the same stream on every device)."""
        hp = self.hparams
        if hp.rotate == hp.translate == hp.scale == 0:
            return images
        draws = tuple(u.to(images.device, non_blocking=True) for u in augment_draws(len(images), generator))
        return affine_augment(images, draws, hp.rotate, hp.translate, hp.scale)
