import pytest
import torch

from cli import cli_main
from test_cli import SMALL


@pytest.mark.slow
def test_compiled_run_trains_and_matches_eager(tmp_path, synthetic_data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "--model.compile", "true", "--trainer.fast_dev_run", "3", *SMALL])
    net = cli.model.net.eval()
    assert net._compiled_call_impl is not None and cli.trainer.global_step == 3
    images, numbers = torch.rand(50, 1, 28, 28), torch.arange(50) % 10
    with torch.no_grad():
        assert torch.allclose(net(images, numbers), net.forward(images, numbers), atol=1e-4)  # compiled, eager
