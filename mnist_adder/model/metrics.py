"""The metrics of every stage, one torchmetrics object per head and figure."""

import torch
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from mnist_adder.model.calibration import calibration_error
from mnist_adder.model.losses import Losses
from mnist_adder.model.net import split_logits


def accuracy(classes: int) -> MulticlassAccuracy:
    # -1: a picture that is no digit, which has neither digit nor sum; checks cost a sync per batch
    return MulticlassAccuracy(classes, average="micro", ignore_index=-1, validate_args=False)


def mean() -> MeanMetric:
    """A mean without torchmetrics' NaN check, which waits for the device at every update."""
    return MeanMetric(nan_strategy="disable")


def stage_metrics(agreement: bool) -> nn.ModuleDict:
    """A stage's accuracies and loss means; the agreement term's only when it is on."""
    losses = [name for name in Losses._fields if name != "agreement" or agreement]
    return nn.ModuleDict(
        {
            "digit_acc": accuracy(10),
            "sum_acc": accuracy(19),
            **{name: mean() for name in losses},
        }
    )


def update_stage(
    metrics: nn.ModuleDict, logits: torch.Tensor, digits: torch.Tensor, sums: torch.Tensor, losses: Losses
):
    digit_logits, sum_logits = split_logits(logits.detach())
    metrics["digit_acc"].update(digit_logits, digits)
    metrics["sum_acc"].update(sum_logits, sums)
    for name, value in losses._asdict().items():
        if name in metrics:  # one value per sample (nan_strategy "disable" ignores `weight`): a short batch counts less
            metrics[name].update(value.detach().expand(len(logits)))


def calibration_metrics() -> nn.ModuleDict:
    """Each head's expected calibration error, with the model's temperatures and without (temperature 1)."""
    heads = {"digit": 10, "sum": 19}
    return nn.ModuleDict(
        {f"{head}_ece{suffix}": calibration_error(n) for head, n in heads.items() for suffix in ("", "_uncalibrated")}
    )


def update_calibration(
    metrics: nn.ModuleDict, suffix: str, logits: torch.Tensor, digits: torch.Tensor, sums: torch.Tensor
):
    """Update each head's `{head}_ece{suffix}` with the softmax of `logits`."""
    for head, head_logits, targets in zip(("digit", "sum"), split_logits(logits), (digits, sums)):
        metrics[f"{head}_ece{suffix}"].update(head_logits.softmax(1), targets)


def own_metric_states(module: nn.Module) -> None:
    """ddp_spawn leaves metric states in memory the processes share (Lightning copies out only parameters and
    buffers): each process's own copy keeps its updates apart."""
    for metric in module.modules():
        if isinstance(metric, Metric):
            for name, state in metric.metric_state.items():
                if isinstance(state, torch.Tensor):
                    setattr(metric, name, state.clone())
