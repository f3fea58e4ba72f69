"""A fit that diverges stops at once, on every process, before any checkpoint holds the diverged weights."""

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class StopOnNonFiniteLoss(Callback):
    """Ends fit with FloatingPointError once a training step's loss (what `training_step` returns) was NaN or
    infinite. A check waits for the device and, under DDP, for every process: it runs every `check_every_n_steps`,
    at each epoch's last batch and before every checkpoint is saved; between checks the steps only add to a flag
    on the device."""

    def __init__(self, check_every_n_steps: int = 50):
        self.check_every_n_steps = check_every_n_steps
        self.finite: torch.Tensor | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.finite = None  # a callback used again starts clean

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        finite = torch.isfinite(outputs["loss"])
        self.finite = finite if self.finite is None else self.finite & finite
        if trainer.global_step % self.check_every_n_steps == 0 or batch_idx + 1 == trainer.num_training_batches:
            self.check(trainer)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        self.check(trainer)  # every process saves, so every process asks

    def check(self, trainer: Trainer) -> None:
        diverged = self.finite is not None and not bool(self.finite)
        # Every process asks, and all stop together: none is left waiting in an all-reduce or a barrier.
        if trainer.strategy.reduce_boolean_decision(diverged, all=False):
            raise FloatingPointError(
                f"non-finite loss by step {trainer.global_step}: training stopped; lower the "
                "learning rate or set model.gradient_clip_val"
            )
