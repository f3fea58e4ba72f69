"""Samples and seconds to 99 %: a config trained while, every few steps and at each epoch's end, the
clock stops and both heads are tested on all 100,000 (official test image, number) pairs and on the
5,000 validation pairs; the run stops once both heads reach 99 % on both. The seconds come from a
second run of the same seed, checked only at the step where the first reached 99 %: an uninterrupted
run, as a user's, whose cache and memory no check has disturbed."""

import time

import torch
from lightning.pytorch.callbacks import Callback

from mnist_adder.model.net import split_logits

TARGET = 0.99  # on both heads


@torch.no_grad()
def accuracies(model, dataset, paired: bool) -> tuple[float, float]:
    """Digit and sum accuracy over a data set: with each image's own number, or with all ten (`paired`)."""
    was_training = model.training
    model.eval()
    digit_right = sum_right = pairs = 0
    for i in range(0, len(dataset), 1000):
        indices = list(range(i, min(i + 1000, len(dataset))))
        batch = {k: v.to(model.device) for k, v in dataset.__getitems__(indices).items()}
        if paired:
            logits = model.net.paired_logits(batch["image"], batch["number"])
            digits = batch["digit"].repeat_interleave(batch["number"].shape[1])
        else:
            logits, digits = model(batch["image"], batch["number"]), batch["digit"]
        digit_logits, sum_logits = split_logits(logits)
        digit_right += (digit_logits.argmax(1) == digits).sum().item()
        sum_right += (sum_logits.argmax(1) == batch["sum"].flatten()).sum().item()
        pairs += len(digits)
    model.train(was_training)
    return digit_right / pairs, sum_right / pairs


class To99(Callback):
    """Records, at each check, the training samples and seconds so far and the accuracies; notes the first
    check where both heads reach 99 % on validation, and on the test pairs (then the run stops, as it
    does after the check at step `stop_at`)."""

    def __init__(self, every: int, stop_at: int | None = None):
        self.every, self.stop_at, self.history = every, stop_at, []
        self.reached = {"val": None, "test": None}

    def on_train_start(self, trainer, pl_module):
        self.start, self.paused = time.perf_counter(), 0.0

    def _check(self, trainer, pl_module):
        if pl_module.device.type == "cuda":  # the queued training work belongs on the clock
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self.start - self.paused
        data = trainer.datamodule
        accuracy = {
            "val": accuracies(pl_module, data.val_set, paired=False),
            "test": accuracies(pl_module, data.all_pairs_set, paired=True),
        }
        self.paused = time.perf_counter() - self.start - elapsed
        samples = trainer.global_step * data.hparams.batch_size * trainer.world_size
        check = {
            "step": trainer.global_step,
            "samples": samples,
            "seconds": round(elapsed, 2),
            **{
                f"{split}_{head}_acc": value
                for split, (digit, sum_) in accuracy.items()
                for head, value in (("digit", digit), ("sum", sum_))
            },
        }
        self.history.append(check)
        print(
            f"  step {trainer.global_step:4d}  {samples:6d} samples  {elapsed:6.1f} s  "
            f"val {100 * accuracy['val'][0]:.2f} / {100 * accuracy['val'][1]:.2f} %  "
            f"test (all pairs) {100 * accuracy['test'][0]:.2f} / "
            f"{100 * accuracy['test'][1]:.2f} %",
            flush=True,
        )
        for split, (digit, sum_) in accuracy.items():
            if self.reached[split] is None and min(digit, sum_) >= TARGET:
                self.reached[split] = {"step": trainer.global_step, "samples": samples, "seconds": round(elapsed, 2)}
        trainer.should_stop = all(self.reached.values()) or trainer.global_step == self.stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every == 0 and batch_idx + 1 < trainer.num_training_batches:
            self._check(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        checked_here = self.history and self.history[-1]["step"] == trainer.global_step
        before_stop = self.stop_at is not None and trainer.global_step < self.stop_at
        if not all(self.reached.values()) and not checked_here and not before_stop:
            self._check(trainer, pl_module)


def run_to_99(cli, every: int) -> dict:
    """Train `cli`'s model on its data (built, not yet fitted) with the checks; the figures of this run."""
    clock = To99(every)
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    test, val = clock.reached["test"] or {}, clock.reached["val"] or {}
    return {
        "samples_to_99": test.get("samples"),
        "step_to_99": test.get("step"),
        "seconds_with_checks": test.get("seconds"),
        "val_samples_to_99": val.get("samples"),
        "checks": clock.history,
    }


def seconds_to_step(cli, step: int) -> dict:
    """Train `cli`'s model (built like the checked run's, same seed) up to `step`, checked there only:
    the training seconds to that step and the accuracies there, which repeat the checked run's."""
    clock = To99(every=step, stop_at=step)
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return clock.history[-1]
