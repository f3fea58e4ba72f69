"""The LightningModule: the net's losses, its manual-optimization training step and its metrics."""

from typing import Literal

import lightning as L
import torch
import torch._functorch.config as functorch_config
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassConfusionMatrix

from mnist_adder.model.calibration import (
    TEMPERATURE,
    UNSURE_BELOW,
    TemperatureScaling,
    fill_temperature,
    warn_uncalibrated,
)
from mnist_adder.model.losses import DEFAULT_SUM_LOSS_WEIGHT, Losses, SumLoss, compute_losses, weighted_sum_loss
from mnist_adder.model.metrics import accuracy, calibration_metrics, own_metric_states, stage_metrics
from mnist_adder.model.net import DualInputNet, split_logits, sum_consistency
from mnist_adder.model.optimization import default_optimizer, optimizer_and_schedule
from mnist_adder.run.predictions import PredictionsCSV
from mnist_adder.run.visuals import confusion_image, sample_grid
from static_step import TrainCounts, forward_losses

# Steps between checks that the losses stayed finite: a check waits for the device and, under DDP, every process.
FINITE_CHECK_EVERY = 50


class MNISTAdder(L.LightningModule):
    """Predicts the digit in an MNIST image and its sum with a given number 0-9.

    Contract: ``forward(images, numbers)`` takes float images [B,1,28,28] in [0,1] and int64 numbers
    [B] in 0..9 and returns logits [B,29]: 10 for the digit, then 19 for the sum 0..18, each head's divided
    by its temperature (the buffer ``temperature``, fitted on validation after fit: calibration.py), so that
    their softmax gives calibrated probabilities. ``self.net`` gives the raw logits, which training uses.

    Args:
        sum_loss: ``cross_entropy``, or ``mse``: the Brier score, squared error between the softmax
            over the 19 sum logits and the one-hot target, summed over the classes.
        channels: widths of the three conv stages.
        convs_per_stage: conv layers in each stage: the first pools, the others are 3x3 at the pooled size.
        number_features: width of the Linear layer that embeds the number.
        hidden: width of the first FC layer.
        dropout: probability of a Dropout after the first FC layer (0: none).
        optimizer: any torch optimizer, e.g. from YAML as class_path/init_args (default: ``default_optimizer``).
        scheduler: any LR scheduler; an unset ``total_steps`` (OneCycleLR) is filled in from the trainer.
        scheduler_interval: step the scheduler after every ``step`` or every ``epoch``.
        gradient_clip_val: clip the gradient norm to this, unscaled under 16-mixed (0 turns it off).
        sum_loss_weight: the sum loss and the agreement term are multiplied by this before their backward
            pass; unset: 1 for ``cross_entropy``, 4 for ``mse`` (whose gradients are smaller).
        label_smoothing: for every cross-entropy loss (the digit's, and the sum's unless ``mse``).
        agreement: weight of a term added to the sum loss: the mean squared difference between the sum
            head's logits of number+0..number+9 and the digit head's logits, each centred, so that the
            two heads rank alike; its gradient reaches both heads. 0 turns it off.
        compile: ``torch.compile`` the net's forward (and so its backward) when a run starts (slower than
            eager on two CPU cores, BENCHMARKS.md).

    Logged per stage (train, val, test), as epoch means: ``loss``, the objective minimised, ``digit_loss``
    + ``sum_loss_weight`` * (``sum_loss`` + ``agreement``); ``digit_loss``; ``sum_loss``, the sum head's
    own loss; ``agreement``, the weighted agreement term, only when ``agreement`` > 0. The training step
    also logs the objective per step as ``loss`` (the progress bar's).
    """

    def __init__(
        self,
        sum_loss: SumLoss = "cross_entropy",
        channels: tuple[int, int, int] = (16, 32, 64),
        number_features: int = 128,
        hidden: int = 512,
        dropout: float = 0.0,
        convs_per_stage: int = 1,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        gradient_clip_val: float = 0.0,
        sum_loss_weight: float | None = None,
        label_smoothing: float = 0.0,
        agreement: float = 0.0,
        compile: bool = False,
    ):
        super().__init__()
        if sum_loss not in ("cross_entropy", "mse"):
            raise ValueError(f"sum_loss must be 'cross_entropy' or 'mse', got {sum_loss!r}")
        self.sum_loss_weight = DEFAULT_SUM_LOSS_WEIGHT[sum_loss] if sum_loss_weight is None else sum_loss_weight
        if (
            min(*channels, number_features, hidden, convs_per_stage) < 1
            or min(gradient_clip_val, agreement) < 0
            or self.sum_loss_weight <= 0
        ):
            raise ValueError(
                "channels, number_features, convs_per_stage and hidden must be >= 1, "
                "gradient_clip_val and agreement >= 0, sum_loss_weight > 0"
            )
        if not 0 <= label_smoothing < 1 or not 0 <= dropout < 1:
            raise ValueError(f"label_smoothing and dropout must be within [0, 1), got {label_smoothing} and {dropout}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.automatic_optimization = False
        self.optimizer, self.scheduler = optimizer, scheduler
        self.net = DualInputNet(tuple(channels), number_features, hidden, dropout, convs_per_stage)
        self.train_metrics, self.val_metrics, self.test_metrics = TrainCounts(), stage_metrics(), stage_metrics()
        self.val_metrics["sum_consistency"] = MeanMetric()
        self.register_buffer(TEMPERATURE, torch.ones(2))  # [digit head, sum head]
        self.val_calibration, self.test_calibration = calibration_metrics(), calibration_metrics()
        self.test_all_pairs = nn.ModuleDict(
            {"digit_acc": accuracy(10), "sum_acc": accuracy(19), "sum_consistency": MeanMetric()}
        )
        self.val_sum_acc_best = MaxMetric()
        self.val_sum_acc_best.persistent(True)  # in the checkpoint: a resumed run keeps its best so far
        self._resumed_total_steps = None  # the schedule length stored in a checkpoint this run resumes from
        self.val_confusion = MulticlassConfusionMatrix(10)
        self._misclassified: list[dict[str, torch.Tensor]] = []

    def forward(self, images: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        return self.calibrated(self.net(images, numbers))

    def calibrated(self, logits: torch.Tensor) -> torch.Tensor:
        digit, sum_ = split_logits(logits)
        return torch.cat([digit / self.temperature[0], sum_ / self.temperature[1]], dim=-1)

    def _update_calibration(self, logits: torch.Tensor, batch: dict, metrics: nn.ModuleDict) -> None:
        targets = {"digit": batch["digit"], "sum": batch["sum"]}
        for suffix, scaled in (("", self.calibrated(logits)), ("_uncalibrated", logits)):
            for head, head_logits in split_logits(scaled)._asdict().items():
                metrics[f"{head}_ece{suffix}"].update(head_logits.softmax(1), targets[head])

    def losses(self, logits: torch.Tensor, digits: torch.Tensor, numbers: torch.Tensor) -> Losses:
        hp = self.hparams
        return compute_losses(
            logits, digits, numbers, hp.sum_loss, self.sum_loss_weight, hp.label_smoothing, hp.agreement
        )

    def _evaluate(self, batch: dict, metrics: nn.ModuleDict) -> tuple[torch.Tensor, Losses]:
        logits = self.net(batch["image"], batch["number"])  # raw: the losses and accuracies of the net itself
        losses = self.losses(logits, batch["digit"], batch["number"])
        digit_logits, sum_logits = split_logits(logits)
        metrics["digit_acc"].update(digit_logits, batch["digit"])
        metrics["sum_acc"].update(sum_logits, batch["sum"])
        for name, value in losses._asdict().items():
            if name != "agreement" or self.hparams.agreement:
                # one value per sample (nan_strategy "disable" ignores `weight`): a short batch counts its size
                metrics[name].update(value.detach().expand(len(logits)))
        return logits, losses

    def _log_epoch(self, stage: str, metrics: nn.ModuleDict, suffix: str = "") -> None:
        # Once per epoch: a self.log call moves the metric's state to the device, a large per-step cost.
        for name, metric in metrics.items():
            if metric.update_called:
                self.log(f"{stage}/{name}{suffix}", metric, prog_bar=stage == "val" and name.endswith("acc"))

    def training_step(self, batch: dict, batch_idx: int) -> None:
        """The eager step. train_step.StaticStep runs it on static buffers without what Lightning adds here:
        manual_backward (loss scaling under 16-mixed), toggle_model (DDP's all-reduce held back in the first
        backward pass) and LightningOptimizer (the clipping hook)."""
        optimizer = self.optimizers()
        logits, losses = forward_losses(self, batch["image"], batch["number"], batch["digit"])
        self.train_metrics.update(logits, batch["digit"], batch["sum"], losses)  # its loss sums turn non-finite too
        if (self.global_step + 1) % FINITE_CHECK_EVERY == 0 or batch_idx + 1 == self.trainer.num_training_batches:
            self._stop_if_nonfinite()
        optimizer.zero_grad(set_to_none=True)
        # Under DDP the first backward pass only accumulates: the gradients are all-reduced once, in the second.
        with optimizer.toggle_model(sync_grad=False):
            self.manual_backward(losses.digit_loss, retain_graph=True)
        self.manual_backward(weighted_sum_loss(losses.sum_loss, losses.agreement, self.sum_loss_weight))
        optimizer.step()  # clips the gradients in on_before_optimizer_step
        if self.hparams.scheduler_interval == "step":
            self._step_scheduler()
        every = self.trainer.log_every_n_steps
        if every and self.global_step % every == 0:  # only the steps the logger writes: a self.log call is costly
            self.log("loss", losses.loss, prog_bar=True, on_step=True, on_epoch=False)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls this inside optimizer.step(), after a grad scaler (16-mixed) has unscaled the gradients.
        if self.hparams.gradient_clip_val:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.hparams.gradient_clip_val, gradient_clip_algorithm="norm"
            )

    def _stop_if_nonfinite(self) -> None:
        # Every process asks, and all stop together: none is left waiting in an all-reduce or a barrier.
        if self.trainer.strategy.reduce_boolean_decision(self.train_metrics.diverged(), all=False):
            raise FloatingPointError(
                f"non-finite loss by step {self.global_step}: training stopped; lower the "
                "learning rate or set model.gradient_clip_val"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._stop_if_nonfinite()  # never from diverged weights; every process saves, so every process asks

    def on_train_epoch_end(self) -> None:
        if self.train_metrics.update_called:  # compute() sums over processes: sync_dist only tells Lightning so
            self.log_dict(self.train_metrics.logged(self.hparams.agreement), sync_dist=True)
        self.train_metrics.reset()
        if self.hparams.scheduler_interval == "epoch":
            self._step_scheduler()

    def _step_scheduler(self) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits, _ = self._evaluate(batch, self.val_metrics)
        self._update_calibration(logits, batch, self.val_calibration)
        self.val_metrics["sum_consistency"].update(sum_consistency(logits, batch["number"]).float())
        digit_pred, sum_pred = (head.argmax(1) for head in split_logits(logits))
        self.val_confusion.update(digit_pred, batch["digit"])
        wrong = (digit_pred != batch["digit"]) | (sum_pred != batch["sum"])
        if wrong.any() and len(self._misclassified) < 32:
            self._misclassified.append(
                {
                    "image": batch["image"][wrong],
                    "number": batch["number"][wrong],
                    "digit": batch["digit"][wrong],
                    "sum": batch["sum"][wrong],
                    "digit_pred": digit_pred[wrong],
                    "sum_pred": sum_pred[wrong],
                }
            )

    def on_validation_epoch_end(self) -> None:
        confusion = self.val_confusion.compute()
        self.val_confusion.reset()
        misclassified, self._misclassified = self._misclassified, []
        self._log_epoch("val", self.val_calibration)
        self._log_epoch("val", self.val_metrics)  # in the sanity check too: Lightning then resets them
        if self.trainer.sanity_checking:
            return
        self.val_sum_acc_best(self.val_metrics["sum_acc"].compute())
        # The value, not the object: Lightning resets a logged metric object every epoch.
        self.log("val/sum_acc_best", self.val_sum_acc_best.compute())
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image("val/confusion_matrix", confusion_image(confusion), self.current_epoch)
            if misclassified:
                wrong = {k: torch.cat([m[k] for m in misclassified])[:32] for k in misclassified[0]}
                experiment.add_image("val/misclassified", sample_grid(**wrong), self.current_epoch)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch["number"].ndim == 1:
            logits, _ = self._evaluate(batch, self.test_metrics)
            self._update_calibration(logits, batch, self.test_calibration)
            return
        logits = self.net.paired_logits(batch["image"], batch["number"])  # each image with all ten numbers
        digit_logits, sum_logits = split_logits(logits)
        pairs = batch["number"].shape[1]
        self.test_all_pairs["digit_acc"].update(digit_logits, batch["digit"].repeat_interleave(pairs))
        self.test_all_pairs["sum_acc"].update(sum_logits, batch["sum"].flatten())
        self.test_all_pairs["sum_consistency"].update(sum_consistency(logits, batch["number"].flatten()).float())

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_metrics)
        self._log_epoch("test", self.test_calibration)
        self._log_epoch("test", self.test_all_pairs, suffix="_all_pairs")

    def configure_callbacks(self) -> list:
        # fit calibrates; predict writes predictions.csv; from Python as from the command line (once: fit's own
        # test attaches them again)
        callbacks = [TemperatureScaling(), PredictionsCSV()]
        return [c for c in callbacks if not any(isinstance(have, type(c)) for have in self.trainer.callbacks)]

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        digit_logits, sum_logits = split_logits(self(batch["image"], batch["number"]))
        digit_prob, digit = digit_logits.softmax(1).max(1)
        sum_prob, sum_ = sum_logits.softmax(1).max(1)
        # which manifest row (a person's pictures), or which test image and its true digit and sum
        extra = {key: batch[key] for key in ("row", "index") if key in batch}
        if "digit" in batch:
            extra.update(true_digit=batch["digit"], true_sum=batch["sum"])
        return {
            "number": batch["number"],
            "digit": digit,
            "digit_prob": digit_prob,
            "sum": sum_,
            "sum_prob": sum_prob,
            "unsure": digit_prob < UNSURE_BELOW,
            **extra,
        }

    def setup(self, stage: str) -> None:
        own_metric_states(self)  # runs before a restore

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if fill_temperature(checkpoint["state_dict"]):
            warn_uncalibrated()
        schedulers = checkpoint.get("lr_schedulers") or [{}]
        self._resumed_total_steps = schedulers[0].get("total_steps")

    def configure_model(self) -> None:
        if self.hparams.compile:
            # The first backward pass keeps the graph (retain_graph=True), which donated buffers forbid.
            functorch_config.donated_buffer = False
            self.net.compile()  # in place: the checkpoint's keys stay those of the eager net

    def configure_optimizers(self):
        interval = self.hparams.scheduler_interval
        return optimizer_and_schedule(self, self.optimizer, self.scheduler, interval, self._resumed_total_steps)
