"""The metrics of the validation and test stages, one torchmetrics object per head and figure."""

import torch
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from mnist_adder.model.calibration import calibration_error
from mnist_adder.model.losses import Losses


def accuracy(classes: int) -> MulticlassAccuracy:
    return MulticlassAccuracy(classes, average="micro", validate_args=False)  # checks cost a sync per batch


def calibration_metrics() -> nn.ModuleDict:
    """Each head's expected calibration error, with the model's temperatures and without (temperature 1)."""
    heads = {"digit": 10, "sum": 19}
    return nn.ModuleDict(
        {f"{head}_ece{suffix}": calibration_error(n) for head, n in heads.items() for suffix in ("", "_uncalibrated")}
    )


def stage_metrics() -> nn.ModuleDict:
    """A validation or test stage's accuracies and loss means (no NaN check: it waits for the device)."""
    return nn.ModuleDict(
        {
            "digit_acc": accuracy(10),
            "sum_acc": accuracy(19),
            **{name: MeanMetric(nan_strategy="disable") for name in Losses._fields},
        }
    )


def own_metric_states(module: nn.Module) -> None:
    """ddp_spawn leaves metric states in memory the processes share (Lightning copies out only parameters and
    buffers): each process's own copy keeps its updates apart."""
    for metric in module.modules():
        if isinstance(metric, Metric):
            for name, state in metric.metric_state.items():
                if isinstance(state, torch.Tensor):
                    setattr(metric, name, state.clone())
