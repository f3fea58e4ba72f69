"""What a run shows as it goes: Lightning's progress bar in a terminal, one line per epoch anywhere else
(a file, as under SLURM, nohup or CI, where the bar draws nothing)."""

import time

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, RichProgressBar

# (logged key, label, format) of what an epoch's line shows, when the run logged it
SHOWN = [("train/loss", "train loss", ".4f"), ("val/digit_acc", "val digit", ".2%"), ("val/sum_acc", "val sum", ".2%")]


class RichBar(RichProgressBar):
    """Lightning's rich bar, with the run's version as the integer it is (the bar formats numbers as floats)."""

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        if "v_num" in items:
            items["v_num"] = str(items["v_num"])
        return items


class EpochLog(Callback):
    """One line per epoch on standard output: epoch, step, seconds since fit started, train loss, val accuracies."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start, self._ended = time.perf_counter(), None

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Callbacks run before the module's own hook, which logs the epoch's training figures: the line
        # is written once they are in, when the next epoch starts or training ends.
        self._ended = (trainer.current_epoch, trainer.global_step, time.perf_counter() - self._start)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer)

    def _write(self, trainer: Trainer) -> None:
        if self._ended is None or not trainer.is_global_zero:
            return
        (epoch, step, seconds), self._ended = self._ended, None
        of = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        metrics = trainer.callback_metrics
        shown = [f"{label} {float(metrics[key]):{fmt}}" for key, label, fmt in SHOWN if key in metrics]
        print("  ".join([f"epoch {epoch + 1}{of}", f"step {step}", f"{seconds:.0f} s", *shown]), flush=True)
