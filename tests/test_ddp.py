"""DDP on CPU (gloo, two processes): the same weights as one process, every sample counted once."""

import subprocess
import sys
from functools import partial

import pytest
import torch
from lightning import Callback, Trainer
from torch.utils.data import BatchSampler

from datamodule import EpochSampler, MNISTAdderData
from lightning_module import MNISTAdder
from test_cli import ROOT

pytestmark = pytest.mark.slow


class SaveWeights(Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.state_dict(), self.folder / f"rank{trainer.global_rank}.pt")


def new_model():
    torch.manual_seed(0)
    return MNISTAdder(channels=(8, 16, 16), hidden=32, optimizer=partial(torch.optim.SGD, lr=0.05))


def new_data(data_dir, batch_size):
    return MNISTAdderData(data_dir=str(data_dir), batch_size=batch_size, val_size=100, rotate=0, translate=0, scale=0)


def one_process_over_the_same_global_batches(data_dir, epochs, steps_per_epoch):
    """Plain PyTorch: each step, the two ranks' batches, each through the net (BatchNorm sees one rank's
    batch, as under DDP), the two backward passes per batch, the gradients averaged, one SGD step."""
    data = new_data(data_dir, 25)
    data.setup("fit")
    samplers = [EpochSampler(data.train_set, num_replicas=2, rank=r, shuffle=True, seed=0, drop_last=True)
                for r in (0, 1)]
    model = new_model()
    optimizer = model.optimizer(model.parameters())
    for epoch in range(epochs):
        for sampler in samplers:
            sampler.set_epoch(epoch)
        for _, batches in zip(range(steps_per_epoch), zip(*(BatchSampler(s, 25, drop_last=True) for s in samplers))):
            optimizer.zero_grad()
            for indices in batches:
                batch = data.train_set.__getitems__(indices)
                digit_loss, sum_loss = model.losses(model(batch["image"], batch["number"]), batch["digit"],
                                                    batch["sum"])
                (digit_loss / 2).backward(retain_graph=True)
                (sum_loss / 2).backward()
            optimizer.step()
    return model.state_dict()


def test_ddp_weights_and_metrics_match_one_process(tmp_path, real_data_dir):
    """On real MNIST: spawned processes re-import the modules, so a test's monkeypatching would not reach them."""
    model, data = new_model(), new_data(real_data_dir, 25)
    ddp = Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2,
                  limit_train_batches=3, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  callbacks=[SaveWeights(tmp_path)])
    ddp.fit(model, data)
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    alone = one_process_over_the_same_global_batches(real_data_dir, epochs=2, steps_per_epoch=3)
    for name, _ in model.named_parameters():
        assert torch.equal(rank0[name], rank1[name]), name
        # Few steps: float rounding grows fast through small BatchNorm batches (measured: 1e-5 after 6
        # steps, 1e-3 after 10), while a wrongly reduced gradient would be off by ~1e-2 at once.
        assert torch.allclose(rank0[name], alone[name], atol=1e-4, rtol=1e-3), name
    # every test image and every (image, number) pair counted exactly once under DDP
    ddp_results = ddp.test(model, data, verbose=False)
    single = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    single_results = single.test(model, new_data(real_data_dir, 25), verbose=False)
    accuracies = [{k: v for k, v in r.items() if "acc" in k} for r in ddp_results]
    assert accuracies == [{k: v for k, v in r.items() if "acc" in k} for r in single_results]  # exactly
    for ddp_result, single_result in zip(ddp_results, single_results):  # mean losses: summed in another order
        assert ddp_result == pytest.approx(single_result, rel=1e-6)


def test_cli_fit_then_test_under_ddp(tmp_path, real_data_dir):
    done = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "fit", "--trainer.strategy", "ddp", "--trainer.devices", "2",
         "--trainer.accelerator", "cpu", "--data.data_dir", str(real_data_dir), "--trainer.max_epochs", "1",
         "--trainer.limit_train_batches", "20", "--trainer.limit_val_batches", "2",
         "--trainer.enable_progress_bar", "false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sum accuracy (each image with all 10 numbers)" in done.stdout
    assert (tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()
