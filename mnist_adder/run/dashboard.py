"""What TensorBoard opens on: a Custom Scalars layout of the learning curves, each validation's confusion matrix and
misclassified samples, and an HPARAMS row per run."""

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torchmetrics.classification import MulticlassConfusionMatrix

from mnist_adder.model.net import split_logits
from mnist_adder.run.visuals import confusion_image, sample_grid

# (chart title, the tags drawn on it): the CUSTOM SCALARS tab, in this order.
CHARTS = [
    ("digit accuracy", ["train/digit_acc", "val/digit_acc"]),
    ("sum accuracy", ["train/sum_acc", "val/sum_acc", "val/sum_acc_best"]),
    # loss: the objective minimised, per logged step; {stage}/loss: its epoch mean; then its parts
    (
        "losses",
        [
            "loss",
            "train/loss",
            "train/digit_loss",
            "train/sum_loss",
            "train/agreement",
            "val/loss",
            "val/digit_loss",
            "val/sum_loss",
            "val/agreement",
        ],
    ),
    ("learning rate", ["lr-.*"]),
    ("sum = predicted digit + number", ["val/sum_consistency", "test/sum_consistency_all_pairs"]),
    (
        "calibration error (in-sample: the temperatures fitted on the same pass)",
        ["val/digit_ece", "val/sum_ece", "val/digit_ece_uncalibrated", "val/sum_ece_uncalibrated"],
    ),
]
# The figures an HPARAMS row shows beside the settings.
HPARAM_METRICS = ["val/sum_acc_best", "test/digit_acc", "test/sum_acc_all_pairs"]
MISCLASSIFIED_SHOWN = 32


class Dashboard(Callback):
    """Writes the Custom Scalars layout when training starts, and after each validation its digit confusion matrix
    and up to 32 misclassified pairs (from the raw logits `validation_step` returns) as images."""

    def __init__(self):
        self.confusion = MulticlassConfusionMatrix(10, validate_args=False)  # argmax against labels: valid
        self.misclassified: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        if isinstance(trainer.logger, TensorBoardLogger) and trainer.is_global_zero:
            trainer.logger.experiment.add_custom_scalars(
                {"mnist-adder": {title: ["Multiline", [f"^{tag}$" for tag in tags]] for title, tags in CHARTS}}
            )

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.confusion = self.confusion.to(pl_module.device)
        self.confusion.reset()
        self.misclassified = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if dataloader_idx:  # the feature images (the data module's second loader): no answers to show
            return
        digit_pred, sum_pred = (head.argmax(1) for head in split_logits(outputs))
        self.confusion.update(digit_pred, batch["digit"])
        wrong = (digit_pred != batch["digit"]) | (sum_pred != batch["sum"])
        if sum(len(m["image"]) for m in self.misclassified) < MISCLASSIFIED_SHOWN and wrong.any():  # any() syncs
            picked = {key: batch[key][wrong] for key in ("image", "number", "digit", "sum")}
            self.misclassified.append({**picked, "digit_pred": digit_pred[wrong], "sum_pred": sum_pred[wrong]})

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        confusion = self.confusion.compute()  # every process's counts: a collective, so every process computes
        experiment = getattr(trainer.logger, "experiment", None)
        if not trainer.is_global_zero or not hasattr(experiment, "add_image"):  # other ranks' is a no-op stand-in
            return
        experiment.add_image("val/confusion_matrix", confusion_image(confusion), trainer.current_epoch)
        if self.misclassified:
            wrong = {
                k: torch.cat([m[k] for m in self.misclassified])[:MISCLASSIFIED_SHOWN] for k in self.misclassified[0]
            }
            experiment.add_image("val/misclassified", sample_grid(**wrong), trainer.current_epoch)


def run_hparams(config, model) -> dict:
    """One HPARAMS row's settings: every model and data setting of a fit's configuration (the optimizer and scheduler
    as their class and arguments), the trainer's length and precision, as plain values. Paths are left out."""
    params = {"max_epochs": config.trainer.max_epochs, "precision": str(config.trainer.precision)}
    for section in (config.model, config.data):
        for key, value in vars(section).items():
            if hasattr(value, "class_path"):  # optimizer, scheduler
                params[key] = value.class_path.rsplit(".", 1)[-1]
                params.update(
                    {f"{key}.{k}": v for k, v in vars(value.init_args).items() if isinstance(v, (int, float))}
                )
            elif value is not None and key not in ("data_dir", "predict_manifest", "predict_output"):
                params[key] = str(list(value)) if isinstance(value, (list, tuple)) else value
    params["sum_loss_weight"] = model.sum_loss_weight  # the weight in effect, where the config leaves it unset
    return params
