"""configs/gpu.yaml's recipe (bf16 autocast, data on the device) learns, checked on the CPU."""

import json
import subprocess
import sys

import pytest

from test_cli import ROOT


@pytest.mark.slow
def test_gpu_recipe_learns_for_one_epoch_on_the_cpu(tmp_path, real_data_dir):
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "cli.py"),
            "fit",
            "--config",
            str(ROOT / "configs" / "gpu.yaml"),
            "--trainer.accelerator",
            "cpu",
            "--trainer.max_epochs",
            "1",
            "--data.data_dir",
            str(real_data_dir),
            "--trainer.enable_progress_bar",
            "false",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(tmp_path.glob("lightning_logs/version_0/results.json")).read_text())
    config = (tmp_path / "lightning_logs" / "version_0" / "config.yaml").read_text()
    assert "precision: bf16-mixed" in config and "on_device: true" in config
    assert results["test/digit_acc"] >= 0.97 and results["test/sum_acc_all_pairs"] >= 0.9
