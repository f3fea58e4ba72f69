"""The optimizer a model gets by default, and its schedule over the run (OneCycleLR needs the run's length)."""

import inspect
from collections.abc import Iterable

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable


def default_optimizer(params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum; a module-level function, so the model pickles (ddp_spawn)."""
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True)


def takes_unset_total_steps(scheduler: LRSchedulerCallable) -> bool:
    """Does `scheduler` take a `total_steps` argument still None once its bound keywords apply (OneCycleLR's)?"""
    bound = getattr(scheduler, "keywords", {})  # LightningCLI's callables pass **kwargs on: the signature hides them
    if "total_steps" in bound:
        return bound["total_steps"] is None
    parameter = inspect.signature(scheduler).parameters.get("total_steps")
    return parameter is not None and parameter.default is None


def run_length(trainer: L.Trainer, interval: str, resumed: int | None) -> int:
    """The run's length in scheduler steps, which only the trainer knows; a resumed run must keep its schedule's."""
    total = trainer.max_epochs if interval == "epoch" else trainer.estimated_stepping_batches
    if total in (None, -1) or total == float("inf"):
        raise ValueError(
            "the scheduler (OneCycleLR) needs the run's length: set trainer.max_epochs (not -1) "
            "or trainer.max_steps, or --model.scheduler null"
        )
    if resumed is not None and resumed != int(total):
        raise ValueError(
            f"the checkpoint's learning-rate schedule spans {resumed} steps, this run {int(total)}: "
            "resume with the run's own trainer.max_epochs, or train longer with a new run "
            "(python cli.py fit --trainer.max_epochs N)"
        )
    return int(total)


def optimizer_and_schedule(
    model: L.LightningModule,
    optimizer: OptimizerCallable,
    scheduler: LRSchedulerCallable | None,
    interval: str,
    resumed_total_steps: int | None,
):
    """What `configure_optimizers` returns: the optimizer over the model's parameters and its scheduler, stepped
    every `interval`; an unset `total_steps` is the run's length. ValueError, in one line, for a schedule that
    cannot work here."""
    built = optimizer(model.parameters())
    if scheduler is None:
        return built
    kwargs = {}
    if takes_unset_total_steps(scheduler):
        kwargs["total_steps"] = run_length(model.trainer, interval, resumed_total_steps)
    try:
        schedule = scheduler(built, **kwargs)
    except ZeroDivisionError:  # OneCycleLR's warm-up phase rounds to no step at all
        raise ValueError(
            f"the scheduler cannot span a run this short ({kwargs.get('total_steps')} steps): "
            "train longer, or --model.scheduler null"
        ) from None
    if isinstance(schedule, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ValueError(
            "a scheduler that steps on a monitored value (ReduceLROnPlateau) does not fit this "
            "model's manual-optimization step: use one that steps by time (OneCycleLR, StepLR, ...)"
        )
    return {"optimizer": built, "lr_scheduler": {"scheduler": schedule, "interval": interval}}
