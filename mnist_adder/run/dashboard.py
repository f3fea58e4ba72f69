"""What TensorBoard opens on: a Custom Scalars layout of the learning curves, and an HPARAMS row per run."""

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

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
]
# The figures an HPARAMS row shows beside the settings.
HPARAM_METRICS = ["val/sum_acc_best", "test/digit_acc", "test/sum_acc_all_pairs"]


class Dashboard(Callback):
    """Writes the Custom Scalars layout into the run's TensorBoard logs when training starts."""

    def on_train_start(self, trainer, pl_module) -> None:
        if isinstance(trainer.logger, TensorBoardLogger) and trainer.is_global_zero:
            trainer.logger.experiment.add_custom_scalars(
                {"mnist-adder": {title: ["Multiline", [f"^{tag}$" for tag in tags]] for title, tags in CHARTS}}
            )


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
