"""What TensorBoard opens on: a Custom Scalars layout of the learning curves, and an HPARAMS row per run."""

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard.summary import hparams

# (chart title, the tags drawn on it): the CUSTOM SCALARS tab, in this order.
CHARTS = [
    ("digit accuracy", ["train/digit_acc", "val/digit_acc"]),
    ("sum accuracy", ["train/sum_acc", "val/sum_acc", "val/sum_acc_best"]),
    ("losses", ["train/digit_loss", "train/sum_loss", "val/digit_loss", "val/sum_loss"]),
    ("learning rate", ["lr-.*"]),
    ("sum = predicted digit + number", ["val/sum_consistency", "test/sum_consistency_all_pairs"]),
]
HPARAM_METRICS = ["hp/val_sum_acc_best", "test/digit_acc", "test/sum_acc_all_pairs"]


class Dashboard(Callback):
    """Writes the Custom Scalars layout into the run's TensorBoard logs when training starts."""

    def on_train_start(self, trainer, pl_module) -> None:
        if isinstance(trainer.logger, TensorBoardLogger) and trainer.is_global_zero:
            trainer.logger.experiment.add_custom_scalars(
                {"mnist-adder": {title: ["Multiline", [f"^{tag}$" for tag in tags]] for title, tags in CHARTS}})


def write_hparams(experiment, params: dict, val_sum_acc_best: float, step: int) -> None:
    """One HPARAMS row: `params` (plain values) beside hp/val_sum_acc_best, written here as a scalar, and
    the test figures that the post-fit test logged."""
    experiment.add_scalar("hp/val_sum_acc_best", val_sum_acc_best, step)
    writer = experiment._get_file_writer()
    for summary in hparams(params, dict.fromkeys(HPARAM_METRICS, 0.0)):  # the names; TensorBoard reads the values
        writer.add_summary(summary, step)
    writer.flush()


def run_hparams(config, sum_loss_weight: float) -> dict:
    """The settings that tell two runs apart, from a fit's configuration namespace, as plain values."""
    model, data, trainer = config.model, config.data, config.trainer
    optimizer = model.optimizer
    params = {"optimizer": optimizer.class_path.rsplit(".", 1)[-1], **{
        f"optimizer.{k}": v for k, v in vars(optimizer.init_args).items() if isinstance(v, (int, float, bool))}}
    if model.scheduler:
        params["scheduler"] = model.scheduler.class_path.rsplit(".", 1)[-1]
        params.update({f"scheduler.{k}": v for k, v in vars(model.scheduler.init_args).items()
                       if k in ("max_lr", "pct_start", "step_size", "gamma", "T_max")})
    params.update({"batch_size": data.batch_size, "max_epochs": trainer.max_epochs, "seed": data.seed,
                   "rotate": data.rotate, "translate": data.translate, "scale": data.scale,
                   "sum_loss": model.sum_loss, "sum_loss_weight": sum_loss_weight,
                   "agreement": model.agreement,
                   "label_smoothing": model.label_smoothing, "channels": str(list(model.channels)),
                   "convs_per_stage": model.convs_per_stage, "hidden": model.hidden,
                   "precision": str(trainer.precision)})
    return params
