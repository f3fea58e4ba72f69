"""The "not a digit" score: how far a picture's conv features lie from those of the digits the net trained on, the
smallest Mahalanobis distance to a digit's mean with one covariance shared by the ten (Lee et al., 2018). Chosen
over the energy and the maximum softmax of the digit logits on validation (benchmarks/not_a_digit.py)."""

import torch
import torch.nn.functional as F
from torchmetrics import Metric

RIDGE = 1e-3  # added to the covariance, times its mean variance: some features barely vary


class FeatureStats(Metric):
    """Sums over pictures of digits (digit -1, a non-digit, is left out): each digit's count and feature sum, and
    the sum of the features' outer products; summed over processes. `compute` gives each digit's mean and the
    covariance's whitening, both [.., D]."""

    full_state_update = False

    def __init__(self, size: int):
        super().__init__()
        self.add_state("counts", torch.zeros(10, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sums", torch.zeros(10, size, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("products", torch.zeros(size, size, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, features: torch.Tensor, digits: torch.Tensor) -> None:
        with full_precision(features):
            features = features.detach().float()
            is_digit = (digits >= 0).unsqueeze(1)  # masked, not indexed: no host sync per step
            one_hot = F.one_hot(digits.clamp(min=0), 10).float() * is_digit
            digit_features = features * is_digit
            self.counts += one_hot.sum(0).double()
            self.sums += (one_hot.T @ features).double()
            self.products += (digit_features.T @ digit_features).double()  # a batch in float32, the total in float64

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(means, whitening): ||(x - mean) @ whitening||² is the squared Mahalanobis distance of features x."""
        means = self.sums / self.counts.clamp(min=1).unsqueeze(1)
        within = self.products - (means.T * self.counts) @ means  # the scatter around each digit's own mean
        covariance = within / self.counts.sum().clamp(min=1)
        variances, directions = torch.linalg.eigh(covariance)
        variances = variances.clamp(min=0) + RIDGE * variances.mean().clamp(min=1e-12)
        return means.float(), (directions / variances.sqrt()).float()


def feature_distance(features: torch.Tensor, whitened_means: torch.Tensor, whitening: torch.Tensor) -> torch.Tensor:
    """Per picture, from its features [B, D]: the smallest squared Mahalanobis distance to a digit's mean, the
    means given whitened ([10, D], `means @ whitening`)."""
    with full_precision(features):
        return (features.float() @ whitening).unsqueeze(1).sub(whitened_means).square().sum(-1).min(1).values


def full_precision(features: torch.Tensor) -> torch.autocast:
    """Autocast off: under bf16-mixed, the sums' and the distance's products in bf16 would drown the spread."""
    return torch.autocast(features.device.type, enabled=False)
