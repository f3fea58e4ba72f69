"""kill -9 in the middle of fit, then --ckpt_path last.ckpt: the run finishes as if never stopped."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from test_cli import ROOT

pytestmark = pytest.mark.slow


def fit_command(data_dir, *extra):
    return [sys.executable, str(ROOT / "cli.py"), "fit", "--data.data_dir", str(data_dir), "--trainer.max_epochs", "3",
            "--trainer.limit_train_batches", "40", "--data.rotate", "0", "--data.translate", "0", "--data.scale", "0",
            "--trainer.enable_progress_bar", "false", *extra]


def all_pairs_sum_accuracy(stdout: str) -> float:
    return float(re.search(r"each image with all 10 numbers\)\s+([\d.]+) %", stdout).group(1))


def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path, real_data_dir):
    (tmp_path / "whole").mkdir()
    whole = subprocess.run(fit_command(real_data_dir), cwd=tmp_path / "whole", capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]

    (tmp_path / "killed").mkdir()
    last = tmp_path / "killed" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    run = subprocess.Popen(fit_command(real_data_dir), cwd=tmp_path / "killed", stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not last.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert run.poll() is None, "the run ended before it could be killed"
    os.kill(run.pid, signal.SIGKILL)
    run.wait()

    resumed = subprocess.run(fit_command(real_data_dir, "--ckpt_path", str(last)), cwd=tmp_path / "killed",
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert abs(all_pairs_sum_accuracy(resumed.stdout) - all_pairs_sum_accuracy(whole.stdout)) <= 0.1
