"""The optimizer and schedule a model gets by default, and the schedule's length (OneCycleLR needs the run's)."""

import inspect
from collections.abc import Iterable

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from mnist_adder.errors import UsageError


def default_optimizer(params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum and weight decay (foreach: one operation per update for all parameters); a
    module-level function, so the model pickles (ddp_spawn). configs/default.yaml spells it out for the CLI."""
    return torch.optim.SGD(params, lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=True)


def default_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int | None = None
) -> torch.optim.lr_scheduler.OneCycleLR:
    """OneCycleLR up to lr 0.2 over the first 20 % of the run; `total_steps` is filled in from the trainer."""
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.2, pct_start=0.2, total_steps=total_steps)


def takes_unset_total_steps(scheduler: LRSchedulerCallable) -> bool:
    """Does `scheduler` take a `total_steps` argument still None once its bound keywords apply (OneCycleLR's)?"""
    bound = getattr(scheduler, "keywords", {})  # LightningCLI's callables pass **kwargs on: the signature hides them
    if "total_steps" in bound:
        return bound["total_steps"] is None
    parameter = inspect.signature(scheduler).parameters.get("total_steps")
    return parameter is not None and parameter.default is None


def run_length(trainer: L.Trainer, interval: str) -> int:
    """The run's length in scheduler steps, which only the trainer knows."""
    if trainer.limit_train_batches == 0:
        raise UsageError("trainer.limit_train_batches is 0: fit has no training step (to measure weights: validate)")
    total = trainer.max_epochs if interval == "epoch" else trainer.estimated_stepping_batches
    if total in (None, -1) or total == float("inf"):
        raise UsageError(
            "the scheduler (OneCycleLR) needs the run's length: set trainer.max_epochs (not -1) "
            "or trainer.max_steps, or --model.scheduler null"
        )
    return int(total)


def check_schedule_length(scheduler, trainer: L.Trainer, interval: str) -> None:
    """UsageError, in one line, if a schedule restored from a checkpoint spans another length than this run."""
    total = getattr(scheduler, "total_steps", None)
    if total is not None and total != run_length(trainer, interval):
        raise UsageError(
            f"the checkpoint's learning-rate schedule spans {total} steps, this run {run_length(trainer, interval)}: "
            "resume with the run's own trainer.max_epochs, or train longer with a new run "
            "(python cli.py fit --trainer.max_epochs N)"
        )


def build_optimizer(optimizer: OptimizerCallable, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer over the model's parameters; UsageError, in one line, for a setting torch refuses."""
    try:
        return optimizer(model.parameters())
    except ValueError as err:  # e.g. a negative learning rate
        raise UsageError(f"model.optimizer: {err}") from None


def optimizer_and_schedule(
    model: L.LightningModule, optimizer: OptimizerCallable, scheduler: LRSchedulerCallable | None, interval: str
):
    """What `configure_optimizers` returns: the optimizer over the model's parameters and its scheduler, which the
    manual step steps every `interval` (Lightning reads the "interval" key only to tell LearningRateMonitor when to
    log); an unset `total_steps` is the run's length. UsageError, in one line, for a schedule that cannot work here."""
    built = build_optimizer(optimizer, model)
    if scheduler is None:
        return built
    kwargs = {"total_steps": run_length(model.trainer, interval)} if takes_unset_total_steps(scheduler) else {}
    try:
        schedule = scheduler(built, **kwargs)
    except ValueError as err:  # torch's word on a setting it refuses, e.g. a pct_start of 2
        raise UsageError(f"model.scheduler: {err}") from None
    except ZeroDivisionError:  # OneCycleLR's warm-up phase rounds to no step at all
        raise UsageError(
            f"the scheduler cannot span a run this short ({kwargs.get('total_steps')} steps): "
            "train longer, or --model.scheduler null"
        ) from None
    if isinstance(schedule, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise UsageError(
            "a scheduler that steps on a monitored value (ReduceLROnPlateau) does not fit this "
            "model's manual-optimization step: use one that steps by time (OneCycleLR, StepLR, ...)"
        )
    return {"optimizer": built, "lr_scheduler": {"scheduler": schedule, "interval": interval}}
