"""The dual-input, dual-output net as a plain nn.Module, and what its 29 logits say."""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def _stage(cin: int, cout: int, kernel: int, convs: int) -> list[nn.Module]:
    # Pooling right after the first conv: BatchNorm, ReLU and any further 3x3 convs run on a quarter of the pixels.
    layers = [
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]
    for _ in range(convs - 1):
        layers += [nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return layers


class DualInputNet(nn.Module):
    """image -> conv features; number -> one-hot -> Linear; both concatenated -> 2 FC layers -> 29 logits.
    Each of the three stages has `convs_per_stage` conv layers; `dropout` > 0 puts a Dropout after the
    first FC layer's ReLU."""

    def __init__(
        self,
        channels: tuple[int, int, int],
        number_features: int,
        hidden: int,
        dropout: float = 0.0,
        convs_per_stage: int = 1,
    ):
        super().__init__()
        c1, c2, c3 = channels
        self.image = nn.Sequential(
            *_stage(1, c1, 5, convs_per_stage),
            *_stage(c1, c2, 3, convs_per_stage),
            *_stage(c2, c3, 3, convs_per_stage),
            nn.Flatten(),
        )  # 28->14->7->3
        self.feature_size = c3 * 3 * 3  # of `image_features`
        self.number = nn.Linear(10, number_features)
        self.head = nn.Sequential(
            nn.Linear(self.feature_size + number_features, hidden),
            nn.ReLU(inplace=True),
            *([nn.Dropout(dropout)] if dropout else []),
            nn.Linear(hidden, 29),
        )
        self.to(memory_format=torch.channels_last)  # measurably faster convolutions on CPU and GPU

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        if not images.is_floating_point():  # 0..255 would read as ink everywhere, and answer confidently wrong
            raise TypeError(f"images must be float in [0, 1], got {images.dtype}: divide uint8 pictures by 255")
        x = (images - MNIST_MEAN) / MNIST_STD
        return self.image(x.contiguous(memory_format=torch.channels_last))

    def logits(self, image_features: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        number_features = self.number(F.one_hot(numbers, 10).to(image_features.dtype))
        return self.head(torch.cat([image_features, number_features], dim=1))

    def forward(self, images: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        return self.logits(self.image_features(images), numbers)

    def paired_logits(self, images: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        """Logits [B*K, 29] of each of B images with each of its K numbers ([B, K]), image-major;
        the conv features are computed once per image and shared by its K pairs."""
        features = self.image_features(images)
        return self.logits(features.repeat_interleave(numbers.shape[1], dim=0), numbers.flatten())


class SplitLogits(NamedTuple):
    digit: torch.Tensor  # [..., 10]: digits 0..9
    sum: torch.Tensor  # [..., 19]: sums 0..18


def split_logits(logits: torch.Tensor) -> SplitLogits:
    """The net's 29 logits (the last dimension) as the digit head's 10 and the sum head's 19."""
    return SplitLogits(logits[..., :10], logits[..., 10:])


def sum_consistency(logits: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
    """Per pair: does the predicted sum equal the predicted digit plus the number (does the sum head add)?"""
    digit, sum_ = split_logits(logits)
    return sum_.argmax(1) == digit.argmax(1) + numbers


def logit_mismatch(logits: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
    """How far the sum head's logits of the ten sums number+0..number+9 are from the digit head's logits,
    each set centred on its mean: the mean squared difference (its gradient reaches both heads)."""
    digit, sum_ = split_logits(logits)
    reachable = sum_.gather(1, torch.arange(10, device=numbers.device) + numbers[:, None])
    return (reachable - reachable.mean(1, keepdim=True) - digit + digit.mean(1, keepdim=True)).square().mean()
