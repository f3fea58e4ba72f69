"""Stopped runs on real MNIST: kill -9 then --ckpt_path last.ckpt logs what an uninterrupted run logs;
SIGTERM (a scheduler's pre-emption) saves where the run was and says how to resume."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_cli import ROOT, val_curve

pytestmark = pytest.mark.slow


def fit_command(data_dir, *extra):
    return [
        sys.executable,
        str(ROOT / "cli.py"),
        "fit",
        "--data.data_dir",
        str(data_dir),
        "--trainer.max_epochs",
        "3",
        "--trainer.limit_train_batches",
        "40",
        "--trainer.deterministic",
        "true",
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


def wait_for(path, run, seconds=300):
    deadline = time.monotonic() + seconds
    while not path.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert run.poll() is None, "the run ended before it could be stopped"


def test_kill_9_then_resume_logs_what_an_uninterrupted_run_logs(tmp_path, real_data_dir):
    """Augmentation on: its random stream, the numbers, the order, the optimizer, the schedule and the best
    so far all come back, so every validation figure after the kill equals the uninterrupted run's."""
    (tmp_path / "whole").mkdir()
    whole = subprocess.run(fit_command(real_data_dir), cwd=tmp_path / "whole", capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]

    (tmp_path / "killed").mkdir()
    last = tmp_path / "killed" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    run = subprocess.Popen(
        fit_command(real_data_dir), cwd=tmp_path / "killed", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for(last, run)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()

    resumed = subprocess.run(
        fit_command(real_data_dir, "--ckpt_path", str(last)), cwd=tmp_path / "killed", capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = val_curve(tmp_path / "whole" / "lightning_logs" / "version_0")
    got = val_curve(tmp_path / "killed" / "lightning_logs" / "version_0")
    assert len(expected["val/sum_acc"]) == 3 and got.keys() == expected.keys()
    for tag in expected:
        assert got[tag][-2:] == pytest.approx(expected[tag][-2:], abs=1e-6), tag  # the epochs after the kill


def test_sigterm_saves_last_mid_epoch_and_the_resumed_run_logs_what_an_uninterrupted_run_logs(tmp_path, real_data_dir):
    one_epoch = [
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "400",
        "--trainer.limit_val_batches",
        "2",
        "--data.non_digits",
        "0",  # no non-digits to draw: training starts within the 3 s below
        "--model.not_digit_weight",
        "0",
    ]
    run = subprocess.Popen(
        fit_command(real_data_dir, *one_epoch), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(tmp_path / "lightning_logs" / "version_0", run)
    time.sleep(3)  # into the training steps
    run.send_signal(signal.SIGTERM)
    output = "".join(run.communicate(timeout=120))
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert run.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert f"Stopped by SIGTERM: saved {last}" in output and f"--ckpt_path {last}" in output
    assert "Traceback" not in output
    saved = torch.load(last, weights_only=True)
    assert 0 < saved["global_step"] < 214 and saved["epoch"] == 0  # in the middle of the epoch's 214 batches
    resumed = subprocess.run(
        fit_command(real_data_dir, *one_epoch, "--ckpt_path", str(last)), cwd=tmp_path, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "not resumable" not in resumed.stderr + resumed.stdout  # Lightning finds the train loader resumable
    (tmp_path / "whole").mkdir()
    whole = subprocess.run(fit_command(real_data_dir, *one_epoch), cwd=tmp_path / "whole", capture_output=True)
    assert whole.returncode == 0
    # the resumed epoch trained on exactly the uninterrupted run's remaining batches, augmented alike
    expected, got = val_curve(tmp_path / "whole" / "lightning_logs" / "version_0"), val_curve(last.parents[1])
    assert got.keys() == expected.keys() and len(expected["val/sum_acc"]) == 1
    for tag in expected:
        assert got[tag] == pytest.approx(expected[tag], abs=1e-6), tag
