"""Probabilities that can be taken at their word: one temperature per head, fitted after training on the
validation pairs by minimising their negative log-likelihood (temperature scaling, Guo et al., 2017).

Dividing a head's logits by its temperature changes how sure its softmax is, never which class wins: the
accuracies stay those of the raw logits."""

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassCalibrationError

from mnist_adder.model.net import split_logits

TEMPERATURE = "temperature"  # the model's buffer [digit head, sum head], in every checkpoint's state_dict


def calibration_error(classes: int) -> MulticlassCalibrationError:
    """Expected calibration error of the top label: 15 equal-width bins, L1."""
    return MulticlassCalibrationError(classes, n_bins=15, norm="l1", validate_args=False)


def fill_temperature(state_dict: dict) -> bool:
    """A checkpoint saved before calibration existed has no temperature: give it 1 (the raw softmax).
    True if it was missing."""
    if TEMPERATURE in state_dict:
        return False
    state_dict[TEMPERATURE] = torch.ones(2)
    return True


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature T > 0 that minimises the cross-entropy of softmax(logits / T) against `targets`."""
    logits, log_t = logits.double(), torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(nll)
    return float(log_t.detach().exp())


@torch.no_grad()
def raw_logits(model: L.LightningModule, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The net's uncalibrated logits [N, 29] over a loader of pairs, in eval mode, with their digits and sums."""
    was_training, outputs = model.training, []
    model.eval()
    for batch in loader:
        batch = {k: v.to(model.device) for k, v in batch.items()}
        outputs.append((model.net(batch["image"], batch["number"]), batch["digit"], batch["sum"]))
    model.train(was_training)
    return tuple(torch.cat(parts).cpu() for parts in zip(*outputs))


def fit_temperatures(model: L.LightningModule, loader: DataLoader) -> torch.Tensor:
    """Both heads' temperatures [digit, sum], fitted on the pairs of `loader`."""
    logits, digits, sums = raw_logits(model, loader)
    digit_logits, sum_logits = split_logits(logits)
    return torch.tensor([fit_temperature(digit_logits, digits), fit_temperature(sum_logits, sums)])


class TemperatureScaling(Callback):
    """When fit ends, fits the temperatures of each checkpoint it wrote (last.ckpt and the best) and of the weights
    the model ends with, each on the validation pairs, and writes them into the checkpoints: `load_from_checkpoint`,
    `validate`, `test`, `predict`, the demo and the ONNX export then give calibrated probabilities.

    The pairs come from the data module's `calibration_dataloader()`, all of them in every process, else from the
    trainer's validation loader."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            return
        datamodule = trainer.datamodule
        loader = (
            datamodule.calibration_dataloader()
            if hasattr(datamodule, "calibration_dataloader")
            else trainer.val_dataloaders
        )
        if not loader:  # nothing to fit them on (a fit without validation): they stay as they are
            return
        callback, io = trainer.checkpoint_callback, trainer.strategy.checkpoint_io
        paths = dict.fromkeys(p for p in (callback.best_model_path, callback.last_model_path) if p) if callback else {}
        final = {name: value.detach().cpu().clone() for name, value in pl_module.state_dict().items()}
        fitted: list[tuple[dict, torch.Tensor]] = []  # each distinct set of weights is fitted once

        def temperature_of(state: dict) -> torch.Tensor:
            for seen, temperature in fitted:
                if all(torch.equal(value, seen[name]) for name, value in state.items() if name != TEMPERATURE):
                    return temperature
            pl_module.load_state_dict(state)
            fitted.append((state, fit_temperatures(pl_module, loader)))
            return fitted[-1][1]

        for path in paths:
            checkpoint = io.load_checkpoint(path, map_location="cpu")
            fill_temperature(checkpoint["state_dict"])
            temperature = temperature_of(checkpoint["state_dict"])
            if trainer.is_global_zero:
                checkpoint["state_dict"][TEMPERATURE] = temperature
                io.save_checkpoint(checkpoint, path)
            trainer.strategy.barrier("temperatures written")
        final[TEMPERATURE] = temperature_of(final)
        pl_module.load_state_dict(final)


def warn_uncalibrated() -> None:
    rank_zero_warn(
        "this checkpoint was saved before calibration existed: its probabilities are the raw softmax "
        "(temperature 1); `python cli.py fit` writes calibrated checkpoints"
    )


# An answer whose calibrated digit probability is below this is marked "unsure" (predict's table and CSV, the demo):
# it flags at most 1 % of the right validation answers (docs/experiments.md, "unsure").
UNSURE_BELOW = 0.95
