"""The two heads' losses, a plain function of the 29 logits: what the manual-optimization step minimises."""

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from mnist_adder.model.net import logit_mismatch, split_logits

SumLoss = Literal["cross_entropy", "mse"]
# The Brier score's gradients are smaller than cross-entropy's, so its default weight is larger (docs/experiments.md).
DEFAULT_SUM_LOSS_WEIGHT = {"cross_entropy": 1.0, "mse": 4.0}


class Losses(NamedTuple):
    """A batch's losses, as logged: `loss` = `digit_loss` + sum_loss_weight * (`sum_loss` + `agreement`)."""

    loss: torch.Tensor  # the objective the training step minimises
    # the digit head's cross-entropy; on the pictures that are no digit (training only), against all ten alike
    digit_loss: torch.Tensor
    sum_loss: torch.Tensor  # the sum head's own loss: cross-entropy, or the Brier score for `mse`
    agreement: torch.Tensor  # `agreement` * logit_mismatch (0 when the weight is 0)


def compute_losses(
    logits: torch.Tensor,
    digits: torch.Tensor,
    sums: torch.Tensor,
    numbers: torch.Tensor,
    sum_loss: SumLoss,
    sum_loss_weight: float,
    label_smoothing: float,
    agreement: float,
    not_digit_weight: float,
) -> Losses:
    """Pictures that are no digit (digit and sum -1) have no digit and no sum to learn: they add to the digit loss
    `not_digit_weight` times the cross-entropy of their digit softmax against equal odds, 1/10 each (outlier
    exposure, Hendrycks et al., 2019): it teaches the conv features to set them apart from the digits, whose
    distance `MNISTAdder.answer` thresholds. The agreement term, which asks nothing of the answer, keeps them."""
    is_digit = digits >= 0
    digit_logits, sum_logits = split_logits(logits)
    count = is_digit.sum().clamp(min=1)  # a mean over the digits, 0 in a batch of only non-digits
    smoothed = {"label_smoothing": label_smoothing, "ignore_index": -1, "reduction": "sum"}
    digit_loss = F.cross_entropy(digit_logits, digits, **smoothed) / count
    if not_digit_weight:  # masked, not indexed: no host sync per step
        flat = F.cross_entropy(digit_logits, torch.full_like(digit_logits, 0.1), reduction="none")
        digit_loss = digit_loss + not_digit_weight * (flat * ~is_digit).sum() / (~is_digit).sum().clamp(min=1)
    if sum_loss == "mse":
        target = F.one_hot(sums.clamp(min=0), 19).to(logits.dtype)
        brier = (sum_logits.softmax(dim=1) - target).square().sum(dim=1)
        own = (brier * is_digit).sum() / count
    else:
        own = F.cross_entropy(sum_logits, sums, **smoothed) / count
    term = agreement * logit_mismatch(logits, numbers) if agreement else logits.new_zeros(())
    return Losses(digit_loss + weighted_sum_loss(own, term, sum_loss_weight), digit_loss, own, term)


def weighted_sum_loss(sum_loss: torch.Tensor, agreement: torch.Tensor, sum_loss_weight: float) -> torch.Tensor:
    """The objective's part that the second backward pass takes."""
    return sum_loss_weight * (sum_loss + agreement)
