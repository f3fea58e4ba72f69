from pathlib import Path

import pytest
import torch
from lightning import Callback

from cli import cli_main
from test_bad_inputs import ends_in_clear_error
from test_cli import SMALL


@pytest.fixture
def trained(tmp_path, synthetic_data_dir, monkeypatch):
    """A one-epoch run in tmp_path; returns its last.ckpt."""
    monkeypatch.chdir(tmp_path)
    cli_main(["fit", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", *SMALL])
    return tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


class CtrlC(Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 3:
            raise KeyboardInterrupt


def test_ctrl_c_in_fit_saves_last_then_resume_finishes(tmp_path, synthetic_data_dir, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    run = ["fit", "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false", *SMALL]
    with pytest.raises(SystemExit):
        cli_main([*run, "--trainer.callbacks+=test_checkpoints.CtrlC"])
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert f"Stopped by Ctrl-C: saved {last}" in caplog.text and f"--ckpt_path {last}" in caplog.text
    cli = cli_main([*run, "--ckpt_path", str(last)])
    assert cli.trainer.current_epoch == 2 and cli.trainer.global_step == 2 * 500 // 50
    assert Path(cli.trainer.log_dir) == last.parents[1]  # the resumed run writes on into its own folder
    assert sorted(p.name for p in last.parents[2].iterdir()) == ["version_0"]


def test_last_ckpt_follows_every_epoch_not_only_a_new_best(tmp_path, synthetic_data_dir, monkeypatch):
    """Monitored for its minimum, only epoch 0 is a best; a kill after epoch 2 must still resume from epoch 2."""
    monkeypatch.chdir(tmp_path)
    cli_main(["fit", "--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "false",
              "--checkpoint.monitor", "epoch", "--checkpoint.mode", "min", *SMALL])
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best-epoch=00.ckpt", "last.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=True)["epoch"] == 2


@pytest.mark.parametrize("damage, expected", [
    ("missing", "no such file"),
    ("truncated", "not a readable checkpoint"),
    ("text", "not a readable checkpoint"),
    ("other_model", "another model"),
])
def test_bad_checkpoints_give_one_clear_error(trained, capsys, damage, expected):
    bad = trained.with_name("bad.ckpt")
    if damage == "truncated":
        bad.write_bytes(trained.read_bytes()[: trained.stat().st_size // 2])
    elif damage == "text":
        bad.write_text("not a checkpoint\n")
    elif damage == "other_model":
        torch.save({"state_dict": {"layer.weight": torch.zeros(2, 2)}}, bad)
    for subcommand in ("fit", "test"):
        assert expected in ends_in_clear_error([subcommand, "--ckpt_path", str(bad), *SMALL], capsys)


def test_checkpoint_of_other_settings_is_named(trained, capsys):
    stripped = trained.with_name("no_hparams.ckpt")  # with its hyperparameters the CLI would adopt them
    checkpoint = torch.load(trained, weights_only=True)
    del checkpoint["hyper_parameters"]
    torch.save(checkpoint, stripped)
    message = ends_in_clear_error(["validate", "--ckpt_path", str(stripped), *SMALL[:-1], "[8, 16, 32]"], capsys)
    assert "other model settings" in message
