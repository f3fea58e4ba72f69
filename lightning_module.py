"""The LightningModule: the dual-input net, both losses in a manual-optimization step, metrics and calibration."""

from typing import Literal

import lightning as L
import torch
from lightning.pytorch.accelerators import MPSAccelerator
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MaxMetric

from mnist_adder.errors import UsageError
from mnist_adder.model.calibration import UNSURE_BELOW, ValidationFit
from mnist_adder.model.feature_distance import FeatureStats, feature_distance
from mnist_adder.model.losses import DEFAULT_SUM_LOSS_WEIGHT, Losses, SumLoss, compute_losses, weighted_sum_loss
from mnist_adder.model.metrics import (
    accuracy,
    calibration_metrics,
    mean,
    own_metric_states,
    stage_metrics,
    update_calibration,
    update_stage,
)
from mnist_adder.model.net import DualInputNet, split_logits, sum_consistency
from mnist_adder.model.optimization import (
    check_schedule_length,
    default_optimizer,
    default_scheduler,
    optimizer_and_schedule,
)


class MNISTAdder(L.LightningModule):
    """Predicts the digit in an MNIST image and its sum with a given number 0-9. With no arguments it is the
    default run's model (`python cli.py fit`), optimizer and schedule included.

    Contract: ``forward(images, numbers)`` takes float images [B,1,28,28] in [0,1] and int64 numbers
    [B] in 0..9 and returns logits [B,29]: 10 for the digit, then 19 for the sum 0..18, each head's divided
    by its temperature (the buffer ``temperature``, fitted on every validation pass: calibration.py), so that
    their softmax gives calibrated probabilities. ``calibrated_step`` is the global step of that validation, -1
    before any (the temperatures are then 1: raw probabilities). ``self.net`` gives the raw logits.
    ``answer(images, numbers)`` gives ``forward``'s logits and which pictures look like no digit at all: their
    conv features lie farther from the training digits' (``feature_means`` and ``feature_whitening``, fitted on
    every validation pass to the data module's ``feature_images``: feature_distance.py) than ``not_digit_above``,
    fitted on the same pass to the validation digits' distances.

    Args:
        sum_loss: ``cross_entropy``, or ``mse``: the Brier score, squared error between the softmax
            over the 19 sum logits and the one-hot target, summed over the classes.
        channels: widths of the three conv stages.
        convs_per_stage: conv layers in each stage: the first pools, the others are 3x3 at the pooled size.
        number_features: width of the Linear layer that embeds the number.
        hidden: width of the first FC layer.
        dropout: probability of a Dropout after the first FC layer (0: none).
        optimizer: any torch optimizer, e.g. from YAML as class_path/init_args.
        scheduler: any LR scheduler; an unset ``total_steps`` (OneCycleLR) is filled in from the trainer.
        scheduler_interval: step the scheduler after every ``step`` or every ``epoch``.
        gradient_clip_val: clip the gradient norm to this, unscaled under 16-mixed (0 turns it off).
        sum_loss_weight: the sum loss and the agreement term are multiplied by this before their backward
            pass; unset: 1 for ``cross_entropy``, 4 for ``mse`` (whose gradients are smaller).
        label_smoothing: for every cross-entropy loss (the digit's, and the sum's unless ``mse``).
        agreement: weight of a term added to the sum loss: the mean squared difference between the sum
            head's logits of number+0..number+9 and the digit head's logits, each centred, so that the
            two heads rank alike; its gradient reaches both heads. 0 turns it off.
        not_digit_weight: weight, in the digit loss, of the cross-entropy against equal probabilities on the
            training pictures that are no digit (digit -1: the data module's ``non_digits``). 0 turns it off.

    Logged per stage (train, val, test), as epoch means: ``digit_acc``, ``sum_acc``, ``loss``, the objective
    minimised, ``digit_loss`` + ``sum_loss_weight`` * (``sum_loss`` + ``agreement``); ``digit_loss``;
    ``sum_loss``; ``agreement``, only when it is on. The training step logs ``loss`` at Lightning's cadence.
    Validation and test log each head's calibration error, ``{head}_ece_uncalibrated`` (temperature 1) and
    ``{head}_ece``: in validation with the temperatures fitted on that very pass (in-sample), in test with the
    checkpoint's (the honest figure).
    """

    def __init__(
        self,
        sum_loss: SumLoss = "cross_entropy",
        channels: tuple[int, int, int] = (16, 32, 64),
        convs_per_stage: int = 2,
        number_features: int = 128,
        hidden: int = 512,
        dropout: float = 0.0,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = default_scheduler,
        scheduler_interval: Literal["step", "epoch"] = "step",
        gradient_clip_val: float = 0.0,
        sum_loss_weight: float | None = None,
        label_smoothing: float = 0.1,
        agreement: float = 3.0,
        not_digit_weight: float = 0.5,
    ):
        super().__init__()
        if sum_loss not in ("cross_entropy", "mse"):
            raise UsageError(f"sum_loss must be 'cross_entropy' or 'mse', got {sum_loss!r}")
        self.sum_loss_weight = DEFAULT_SUM_LOSS_WEIGHT[sum_loss] if sum_loss_weight is None else sum_loss_weight
        if (
            min(*channels, number_features, hidden, convs_per_stage) < 1
            or min(gradient_clip_val, agreement, not_digit_weight) < 0
            or self.sum_loss_weight <= 0
        ):
            raise UsageError(
                "channels, number_features, convs_per_stage and hidden must be >= 1, "
                "gradient_clip_val, agreement and not_digit_weight >= 0, sum_loss_weight > 0"
            )
        if not 0 <= label_smoothing < 1 or not 0 <= dropout < 1:
            raise UsageError(f"label_smoothing and dropout must be within [0, 1), got {label_smoothing} and {dropout}")
        self.save_hyperparameters()
        callables = [name for name in ("optimizer", "scheduler") if callable(self.hparams[name])]
        if callables:  # from Python (from LightningCLI: their config), which no checkpoint or logger can hold
            self.save_hyperparameters(ignore=callables)
        self.automatic_optimization = False
        self.optimizer, self.scheduler = optimizer, scheduler
        self.net = DualInputNet(tuple(channels), number_features, hidden, dropout, convs_per_stage)
        self.example_input_array = (torch.zeros(2, 1, 28, 28), torch.tensor([3, 7]))  # the summary's sizes and FLOPs
        self.register_buffer("temperature", torch.ones(2))  # [digit head, sum head]
        self.register_buffer("calibrated_step", torch.tensor(-1))
        self.register_buffer("not_digit_above", torch.tensor(float("inf")))  # no picture is refused before validation
        self.register_buffer("feature_means", torch.zeros(10, self.net.feature_size))  # whitened
        self.register_buffer("feature_whitening", torch.zeros(self.net.feature_size, self.net.feature_size))
        self.feature_fit = FeatureStats(self.net.feature_size)
        self.train_metrics, self.val_metrics, self.test_metrics = (stage_metrics(agreement > 0) for _ in range(3))
        self.val_metrics.update({"sum_consistency": mean(), **calibration_metrics()})
        all_pairs = {"digit_acc": accuracy(10), "sum_acc": accuracy(19), "sum_consistency": mean()}
        self.test_metrics.update({**calibration_metrics(), **{f"{k}_all_pairs": m for k, m in all_pairs.items()}})
        self.val_sum_acc_best = MaxMetric(sync_on_compute=False)  # of val/sum_acc, synced already
        self.val_sum_acc_best.persistent(True)  # in the checkpoint: a resumed run keeps its best so far
        self.val_fit = ValidationFit()
        self._checkpoint_classes = None  # the optimizer and schedule classes of the checkpoint loaded last

    def forward(self, images: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        return self.calibrated(self.net(images, numbers))

    def calibrated(self, logits: torch.Tensor) -> torch.Tensor:
        digit, sum_ = split_logits(logits.float())  # float32 probabilities, bf16-mixed's logits too
        return torch.cat([digit / self.temperature[0], sum_ / self.temperature[1]], dim=-1)

    def answer(self, images: torch.Tensor, numbers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`'s logits [B, 29], and per picture whether it looks like no digit at all [B]."""
        features = self.net.image_features(images)
        logits = self.calibrated(self.net.logits(features, numbers))
        return logits, self.not_digit_score(features) > self.not_digit_above

    def not_digit_score(self, image_features: torch.Tensor) -> torch.Tensor:
        return feature_distance(image_features, self.feature_means, self.feature_whitening)

    def losses(self, logits: torch.Tensor, batch: dict) -> Losses:
        """The losses of a batch's logits against its "digit" and "sum" (-1: no digit), given its "number"."""
        hp = self.hparams
        return compute_losses(
            logits,
            batch["digit"],
            batch["sum"],
            batch["number"],
            hp.sum_loss,
            self.sum_loss_weight,
            hp.label_smoothing,
            hp.agreement,
            hp.not_digit_weight,
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        logits = self.net(batch["image"], batch["number"])
        losses = self.losses(logits, batch)
        optimizer.zero_grad()
        # Under DDP the first backward pass only accumulates: the gradients are all-reduced once, in the second.
        with optimizer.toggle_model(sync_grad=False):
            self.manual_backward(losses.digit_loss, retain_graph=True)
        self.manual_backward(weighted_sum_loss(losses.sum_loss, losses.agreement, self.sum_loss_weight))
        optimizer.step()  # clips the gradients in on_before_optimizer_step
        if self.hparams.scheduler_interval == "step":
            self._step_scheduler()
        update_stage(self.train_metrics, logits, batch["digit"], batch["sum"], losses)
        self.log("loss", losses.loss, prog_bar=True)
        return losses.loss  # for callbacks (StopOnNonFiniteLoss)

    def _log_epoch(self, stage: str, metrics: nn.ModuleDict) -> None:
        # The metric objects, once an epoch: Lightning computes (syncs) and resets them; a call per step costs time.
        for name, metric in metrics.items():
            if metric.update_called:
                self.log(f"{stage}/{name}", metric, prog_bar=stage == "val" and name.endswith("acc"))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls this inside optimizer.step(), after a grad scaler (16-mixed) has unscaled the gradients.
        if self.hparams.gradient_clip_val:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.hparams.gradient_clip_val, gradient_clip_algorithm="norm"
            )

    def on_train_start(self) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is not None:  # restored from a checkpoint by now
            check_schedule_length(scheduler, self.trainer, self.hparams.scheduler_interval)

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train", self.train_metrics)
        if self.hparams.scheduler_interval == "epoch":
            self._step_scheduler()

    def _step_scheduler(self) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def on_validation_epoch_start(self) -> None:
        # DDP broadcasts rank 0's buffers before a training forward pass, which then updates each process's BatchNorm
        # statistics with its own batch: after the last step they differ. Every process validates rank 0's, which its
        # checkpoints save.
        if self.trainer.world_size > 1:
            for buffer in self.net.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor | None:
        if dataloader_idx == 1:  # training digits, as they are: "not a digit" measures the distance to them
            self.feature_fit.update(self.net.image_features(batch["image"]), batch["digit"])
            return None
        features = self.net.image_features(batch["image"])
        logits = self.net.logits(features, batch["number"])  # raw: the losses and accuracies of the net itself
        metrics, digits, sums = self.val_metrics, batch["digit"], batch["sum"]
        update_stage(metrics, logits, digits, sums, self.losses(logits, batch))
        metrics["sum_consistency"].update(sum_consistency(logits, batch["number"]).float())
        update_calibration(metrics, "_uncalibrated", logits, digits, sums)
        self.val_fit.update(logits, features, digits, sums)
        return logits  # for callbacks (the dashboard's confusion matrix and misclassified samples)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:  # a couple of batches: no temperature, no best
            if self.trainer.state.fn == "fit":  # `validate` measures a checkpoint as it was saved
                # fitted on every process's data alike; rank 0's kept everywhere: float sums may differ in a last bit.
                # Broadcast from the CPU: it pickles, and GPU tensors would arrive on rank 0's GPU everywhere.
                if self.feature_fit.update_called:
                    means, whitening = self.trainer.strategy.broadcast([t.cpu() for t in self.feature_fit.compute()])
                    self.feature_means.copy_(means @ whitening)
                    self.feature_whitening.copy_(whitening)
                temperatures, not_digit_above = self.trainer.strategy.broadcast(
                    self.val_fit.compute(self.not_digit_score)
                )
                self.temperature.copy_(temperatures)
                self.not_digit_above.copy_(not_digit_above)
                self.calibrated_step.fill_(self.global_step)
                self.val_sum_acc_best.update(self.val_metrics["sum_acc"].compute())  # compute() syncs; reused
                # The value, not the object, which Lightning would reset every epoch. It is the same on every
                # process; sync_dist (a mean of equal values) tells Lightning so.
                self.log("val/sum_acc_best", self.val_sum_acc_best.compute(), sync_dist=True)
            logits, digits, sums = self.val_fit.logits_and_targets()
            update_calibration(self.val_metrics, "", self.calibrated(logits), digits, sums)
        self.val_fit.reset()
        self.feature_fit.reset()
        self._log_epoch("val", self.val_metrics)  # in the sanity check too: Lightning then resets them

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        metrics, digits, sums = self.test_metrics, batch["digit"], batch["sum"]
        if batch["number"].ndim == 1:  # fixed pairs; all pairs' numbers are [B, 10] (test_pairs decides the index)
            logits = self.net(batch["image"], batch["number"])
            update_stage(metrics, logits, digits, sums, self.losses(logits, batch))
            update_calibration(metrics, "", self.calibrated(logits), digits, sums)
            update_calibration(metrics, "_uncalibrated", logits, digits, sums)
            return
        logits = self.net.paired_logits(batch["image"], batch["number"])  # each image with all ten numbers
        digit_logits, sum_logits = split_logits(logits)
        metrics["digit_acc_all_pairs"].update(digit_logits, digits.repeat_interleave(batch["number"].shape[1]))
        metrics["sum_acc_all_pairs"].update(sum_logits, sums.flatten())
        metrics["sum_consistency_all_pairs"].update(sum_consistency(logits, batch["number"].flatten()).float())

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_metrics)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        logits, not_digit = self.answer(batch["image"], batch["number"])
        digit_logits, sum_logits = split_logits(logits)
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
            "not_digit": not_digit,
            **extra,
        }

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if trainer.precision not in ("32-true", "16-mixed", "bf16-mixed"):  # "-true" casts every buffer
            raise UsageError(
                f'trainer.precision {trainer.precision}: the temperatures and the "not a digit" statistics stay '
                "float32; use 32-true, or 16-mixed / bf16-mixed for speed"
            )
        if isinstance(trainer.accelerator, MPSAccelerator):  # `auto` picks it on Apple silicon
            raise UsageError(
                "trainer.accelerator: Apple's MPS has no float64, which the temperatures' and the \"not a digit\" "
                "fits sum in; add --trainer.accelerator cpu"
            )
        own_metric_states(self)  # runs before a restore

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Their states only fit an optimizer and schedule of the same classes; from Python, neither is a hyperparameter.
        checkpoint["optimization_classes"] = self._optimization_classes()

    def on_fit_start(self) -> None:
        # Here the optimizers and schedules are built, and a resumed fit's states are not loaded into them yet.
        saved, built = self._checkpoint_classes, self._optimization_classes()
        if self.trainer.ckpt_path and saved is not None and saved != built:
            raise UsageError(
                f"{self.trainer.ckpt_path} was trained with {', '.join(saved)} and this fit builds "
                f"{', '.join(built)}: resume with the same optimizer and schedule (--model.optimizer and "
                "--model.scheduler, from Python optimizer= and scheduler=)"
            )

    def _optimization_classes(self) -> list[str]:
        trainer = self.trainer
        schedules = [config.scheduler for config in trainer.lr_scheduler_configs]
        return [_qualified(type(part)) for part in [*trainer.optimizers, *schedules]]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._checkpoint_classes = checkpoint.get("optimization_classes")  # absent: saved before they were recorded
        if not {"calibrated_step", "feature_whitening"} <= checkpoint["state_dict"].keys():
            raise UsageError("this checkpoint was written by an older version of this model: train it anew")
        calibrated = int(checkpoint["state_dict"]["calibrated_step"])
        if calibrated < 0:
            rank_zero_warn("this checkpoint was saved before any validation: its probabilities are not calibrated")
        elif calibrated != checkpoint["global_step"]:
            rank_zero_warn(
                f"this checkpoint's temperatures were fitted at step {calibrated}, its weights are from step "
                f"{checkpoint['global_step']}: its probabilities are calibrated for slightly older weights"
            )

    def configure_optimizers(self):
        return optimizer_and_schedule(self, self.optimizer, self.scheduler, self.hparams.scheduler_interval)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
