"""DDP on CPU (gloo, two processes): the same weights as one process, every sample counted once."""

import subprocess
import sys

import pytest
import torch
from lightning import Callback, Trainer

from datamodule import MNISTAdderData
from lightning_module import MNISTAdder
from test_cli import ROOT

pytestmark = pytest.mark.slow


class SaveWeights(Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.state_dict(), self.folder / f"rank{trainer.global_rank}.pt")


def fit(tmp_path, data_dir, devices, batch_size):
    torch.manual_seed(0)
    model = MNISTAdder(channels=(8, 16, 16), hidden=32, optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    data = MNISTAdderData(data_dir=str(data_dir), batch_size=batch_size, val_size=100, rotate=0, translate=0, scale=0)
    folder = tmp_path / f"devices{devices}"
    folder.mkdir()
    trainer = Trainer(default_root_dir=folder, accelerator="cpu", devices=devices, max_epochs=2,
                      strategy="ddp_spawn" if devices > 1 else "auto", sync_batchnorm=devices > 1,
                      limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      callbacks=[SaveWeights(folder)])
    trainer.fit(model, data)
    results = trainer.test(model, data, verbose=False)
    return folder, {k: v for result in results for k, v in result.items()}


def test_ddp_matches_one_process_over_the_same_global_batches(tmp_path, synthetic_data_dir):
    single, single_results = fit(tmp_path, synthetic_data_dir, devices=1, batch_size=50)
    ddp, ddp_results = fit(tmp_path, synthetic_data_dir, devices=2, batch_size=25)
    rank0, rank1 = torch.load(ddp / "rank0.pt"), torch.load(ddp / "rank1.pt")
    alone = torch.load(single / "rank0.pt")
    for name, weight in rank0.items():
        assert torch.equal(weight, rank1[name]), name
        if weight.is_floating_point():
            assert torch.allclose(weight, alone[name], atol=1e-5, rtol=1e-4), name
    # every test sample and every (image, number) pair counted exactly once under DDP
    assert ddp_results["test/sum_acc_all_pairs"] == single_results["test/sum_acc_all_pairs"]
    assert ddp_results["test/digit_acc"] == single_results["test/digit_acc"]


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
