"""MNIST images paired with numbers 0-9, held as tensors and served a whole batch at a time; a person's pictures,
read in the loader's workers; the samplers and the train loader that resumes mid-epoch."""

import hashlib
import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mnist_adder.data.photos import read_picture
from mnist_adder.errors import UsageError


def seeded(*keys) -> torch.Generator:
    """A CPU generator (the same stream on every machine) for one purpose, e.g. ("val", seed)."""
    return torch.Generator().manual_seed(int(hashlib.sha256(repr(keys).encode()).hexdigest()[:15], 16))


def draw_numbers(count: int, *keys) -> torch.Tensor:
    return torch.randint(0, 10, (count,), generator=seeded(*keys))


class Pairs(Dataset):
    """Images with one number each; `__getitems__` cuts a whole batch with one index.

    A batch is a dict: image float [B,1,28,28] in [0,1], number, digit, sum and index (of the image
    in this set) int64 [B]. A picture that is no digit has the digit -1 and the sum -1.
    """

    def __init__(self, images: torch.Tensor, digits: torch.Tensor, numbers: torch.Tensor):
        self.images, self.digits, self.numbers = images, digits, numbers

    def __len__(self) -> int:
        return len(self.digits)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, device=self.images.device)
        number, digit = self.numbers[idx], self.digits[idx]
        per_pair = digit.view(-1, *[1] * (number.dim() - 1))  # [B, 1] against AllPairs' numbers [B, 10]
        return {
            "image": self.images[idx].unsqueeze(1).float().div_(255),
            "number": number,
            "digit": digit,
            "sum": torch.where(per_pair >= 0, per_pair + number, -1),
            "index": idx,
        }

    def to(self, device: torch.device) -> "Pairs":
        self.images, self.digits, self.numbers = (t.to(device) for t in (self.images, self.digits, self.numbers))
        return self


class TrainPairs(Pairs):
    """Fresh numbers every epoch, drawn from (seed, epoch) alone, and the augmentation's random stream,
    from (seed, epoch, rank): a run resumed at an epoch's start sees what the uninterrupted run saw."""

    def __init__(self, images: torch.Tensor, digits: torch.Tensor, seed: int):
        self.seed = seed
        super().__init__(images, digits, draw_numbers(len(digits), "train", seed, 0))
        self.augment_generator = seeded("augment", seed, 0, 0)
        self.epoch = 0
        self.resume = None  # where a resumed run goes on (MNISTAdderData._train_position)

    def set_epoch(self, epoch: int, rank: int = 0) -> None:
        self.numbers = draw_numbers(len(self.digits), "train", self.seed, epoch).to(self.images.device)
        self.augment_generator = seeded("augment", self.seed, epoch, rank)
        self.epoch = epoch


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
    is the epoch and how many of its batches were trained (`position`, which the data module gives). Resumed in
    that epoch, it skips them in the epoch's own order and replays their draws from the augmentation stream, so it
    goes on as the uninterrupted run did."""

    def __init__(self, *args, position: Callable[[], dict], **kwargs):
        super().__init__(*args, **kwargs)
        self.position = position

    def state_dict(self) -> dict:
        return self.position()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.resume = state

    def __iter__(self):
        batches, resume = super().__iter__(), self.dataset.resume
        self.dataset.resume = None

        def resumed():  # runs at the first batch, once Lightning has set the epoch (a resume iterates before that)
            skip = 0
            if resume:
                epoch_length = self.position()["batches_per_epoch"]
                if resume.get("batches_per_epoch", epoch_length) != epoch_length:  # positions count in its batches
                    raise UsageError(
                        f"the checkpoint's epochs held {resume['batches_per_epoch']} batches and this run's hold "
                        f"{epoch_length}: resume with the devices, batch size and limit_train_batches it had"
                    )
                skip = resume["batches_trained"] if resume["epoch"] == self.dataset.epoch else 0
            for _ in range(skip):
                augment_draws(self.batch_size, self.dataset.augment_generator)
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


class Shard(DistributedSampler):
    """This process's share of an evaluation set, in order and without padding (DistributedSampler repeats samples
    to even the shares out): every sample is counted exactly once. A DistributedSampler, so Lightning keeps it."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.indices = range(rank, len(dataset), num_replicas)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def whole_batch(batch):
    """The collate function of loaders whose dataset cuts whole batches (`__getitems__`)."""
    return batch
