import json
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from cli import cli_main


@pytest.mark.slow
def test_tensorboard_server_serves_both_accuracies(tmp_path, synthetic_data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli_main(["fit", "--trainer.max_epochs", "1", "--data.val_size", "100", "--data.batch_size", "50",
              "--model.channels", "[8, 16, 16]", "--trainer.enable_progress_bar", "false"])
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "lightning_logs"),
                               "--host", "127.0.0.1", "--port", "0"], stderr=subprocess.PIPE, text=True)
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
        assert {"val/digit_acc", "val/sum_acc", "test/sum_acc_all_pairs"} <= served
    finally:
        server.terminate()
        server.wait(timeout=30)
