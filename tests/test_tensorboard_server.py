import json
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from cli import cli_main
from mnist_adder.run.dashboard import CHARTS


@pytest.mark.slow
def test_tensorboard_server_serves_both_accuracies(tmp_path, synthetic_data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli_main(
        [
            "fit",
            "--trainer.max_epochs",
            "1",
            "--trainer.log_every_n_steps",
            "5",
            "--data.val_size",
            "100",
            "--data.batch_size",
            "50",
            "--model.channels",
            "[8, 16, 16]",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(tmp_path / "lightning_logs"),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline, url = time.monotonic() + 60, None
        while url is None and time.monotonic() < deadline:
            line = server.stderr.readline()
            found = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            url = found and found.group(1)
            assert line or server.poll() is None, "tensorboard exited before serving"
        assert url, "tensorboard did not say where it serves"
        with urllib.request.urlopen(f"{url}/data/plugin/scalars/tags", timeout=30) as response:
            tags = json.load(response)
        served = {tag for run in tags.values() for tag in run}
        assert {"val/digit_acc", "val/sum_acc", "test/sum_acc_all_pairs", "lr-SGD", "val/sum_consistency"} <= served
        assert {"val/digit_ece", "val/sum_ece_uncalibrated"} <= served
        with urllib.request.urlopen(f"{url}/data/plugin/custom_scalars/layout", timeout=30) as response:
            layout = json.load(response)
        charts = [chart["title"] for category in layout["category"] for chart in category["chart"]]
        assert charts == [title for title, _ in CHARTS]  # the dashboard's, in its order
        request = urllib.request.Request(
            f"{url}/data/plugin/hparams/experiment",
            data=b'{"experimentName": ""}',
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            experiment = json.load(response)
        hparams = {info["name"] for info in experiment["hparamInfos"]}
        metrics = {info["name"]["tag"] for info in experiment["metricInfos"]}
        assert {"optimizer.lr", "batch_size", "max_epochs", "seed", "sum_loss"} <= hparams
        assert metrics == {"val/sum_acc_best", "test/digit_acc", "test/sum_acc_all_pairs"}
    finally:
        server.terminate()
        server.wait(timeout=30)
