"""What each validation pass during training fits on its own logits, so that answers can be taken at their word:

- one temperature per head, minimising their negative log-likelihood (temperature scaling, Guo et al., 2017).
  Dividing a head's logits by its temperature changes how sure its softmax is, never which class wins: the
  accuracies stay those of the raw logits;
- the "not a digit" threshold on the validation digits' scores (the distance of their features to the training
  digits', feature_distance.py): above it lie `NOT_DIGIT_SHARE` of them; a picture above it is "not a digit"."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.classification import MulticlassCalibrationError
from torchmetrics.utilities import dim_zero_cat

from mnist_adder.model.net import split_logits

# An answer whose calibrated digit probability is below this is marked "unsure" (predict's table and CSV, the demo):
# it flags at most 1 % of the right validation answers (docs/experiments.md, "unsure").
UNSURE_BELOW = 0.95


# The share of validation digits the "not a digit" threshold refuses: phone photos of digits score higher than the
# clean ones, and this keeps them within 2 % (docs/experiments.md, "Not a digit").
NOT_DIGIT_SHARE = 0.005


def calibration_error(classes: int) -> MulticlassCalibrationError:
    """Expected calibration error of the top label: 15 equal-width bins, L1."""
    return MulticlassCalibrationError(classes, n_bins=15, norm="l1", validate_args=False)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature T > 0 that minimises the cross-entropy of softmax(logits / T) against `targets`."""
    with torch.inference_mode(False), torch.enable_grad():  # validation runs under inference mode
        logits = logits.double().clone()  # a clone made here is an ordinary tensor, which autograd may save
        log_t = torch.zeros((), dtype=torch.float64, device=logits.device, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

        def nll() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(logits / log_t.exp(), targets.clone())
            loss.backward()
            return loss

        optimizer.step(nll)
    return float(log_t.detach().exp())


class ValidationFit(Metric):
    """A validation pass's raw logits, conv features and targets; `compute` gathers every process's (torchmetrics
    concatenates them) and fits on them all, the same on every process: each head's temperature [digit, sum], and
    the "not a digit" threshold on the features' scores."""

    full_state_update = False

    def __init__(self):
        super().__init__(compute_with_cache=False)  # `compute` takes the score: a cached result could be another's
        for name in ("logits", "features", "digits", "sums"):
            self.add_state(name, [], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, features: torch.Tensor, digits: torch.Tensor, sums: torch.Tensor) -> None:
        self.logits.append(logits.detach().float())
        self.features.append(features.detach().float())
        self.digits.append(digits)
        self.sums.append(sums)

    def logits_and_targets(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The logits, digits and sums: this process's own, or every process's within `compute` (torchmetrics syncs
        the states for it)."""
        return dim_zero_cat(self.logits), dim_zero_cat(self.digits), dim_zero_cat(self.sums)

    def compute(self, not_digit_score: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits, digits, sums = self.logits_and_targets()
        digit_logits, sum_logits = split_logits(logits)
        temperatures = torch.tensor([fit_temperature(digit_logits, digits), fit_temperature(sum_logits, sums)])
        scores = not_digit_score(dim_zero_cat(self.features)).double()
        return temperatures, torch.quantile(scores, 1 - NOT_DIGIT_SHARE).float().cpu()
