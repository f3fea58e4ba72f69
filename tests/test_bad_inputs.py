"""A sweep of bad inputs: each ends in a short clear message, a non-zero exit, and nothing written."""

import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator

import lightning_module
from cli import cli_main
from lightning_module import MNISTAdder
from test_cli import ROOT, SMALL

BAD_FIT_OPTIONS = [
    (["--no_such_option", "1"], "no_such_option"),
    (["--trainer.max_epochs", "many"], "max_epochs"),
    (["--trainer.max_epochs", "0"], "max_epochs must be >= 1"),
    (["--model.sum_loss", "l1"], "sum_loss"),
    (["--model.hidden", "0"], "hidden must be >= 1"),
    (["--model.dropout", "1"], "dropout must be within [0, 1)"),
    (["--model.optimizer.lr", "-0.1"], "model.optimizer: Invalid learning rate"),
    (["--model.scheduler.init_args.pct_start", "2"], "model.scheduler: Expected float between 0 and 1 pct_start"),
    (["--data.batch_size", "0"], "batch_size must be >= 1"),
    (["--data.val_size", "0"], "val_size must be within"),
    (["--data.test_pairs", "some"], "test_pairs"),
    (["--data.rotate", "-5"], "rotate, translate, scale, non_digits and feature_images must be >= 0"),
    (["--data.non_digits", "-0.1"], "rotate, translate, scale, non_digits and feature_images must be >= 0"),
    (["--data.feature_images", "-1"], "rotate, translate, scale, non_digits and feature_images must be >= 0"),
    (["--model.not_digit_weight", "-1"], "not_digit_weight >= 0"),
    (["--ckpt_path", "missing.ckpt"], "no such file"),
    pytest.param(
        ["--config", str(ROOT / "configs" / "gpu.yaml")],
        "no usable GPU: run `python cli.py fit`",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
    ),
    (["--trainer.devices", "0"], "devices"),
    (["--trainer.max_epochs", "-5"], "max_epochs"),
    (["--trainer.max_epochs", "-1"], "needs the run's length"),
    (["--trainer.accumulate_grad_batches", "2"], "raise --data.batch_size"),
    (["--trainer.strategy", "nonsense"], "invalid strategy"),
    (["--trainer.precision", "bf16-true"], "trainer.precision bf16-true: the temperatures"),
    (["--trainer.precision", "64"], "trainer.precision 64-true: the temperatures"),
    (["--trainer.max_steps", "5"], "cannot span a run this short"),
    (["--trainer.limit_train_batches", "0"], "trainer.limit_train_batches is 0: fit has no training step"),
    (["--model.scheduler", "torch.optim.lr_scheduler.ReduceLROnPlateau"], "ReduceLROnPlateau"),
]


def ends_in_clear_error(args, capsys) -> str:
    with pytest.raises(SystemExit) as end:
        cli_main(args)
    assert end.value.code not in (0, None)
    message = (end.value.code if isinstance(end.value.code, str) else "") + capsys.readouterr().err
    assert "Traceback" not in message
    assert len(message.strip().splitlines()) <= 12  # the error and its details, no usage wall
    return message


@pytest.mark.parametrize("args, expected", BAD_FIT_OPTIONS)
def test_bad_fit_option(tmp_path, synthetic_data_dir, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    assert expected in ends_in_clear_error(["fit", *SMALL, *args], capsys)
    assert not (tmp_path / "lightning_logs").exists() or not list((tmp_path / "lightning_logs").rglob("*.ckpt"))


def test_apple_s_mps_is_refused_with_the_way_round(tmp_path, synthetic_data_dir, monkeypatch, capsys):
    """`accelerator: auto` picks MPS on Apple silicon, which has no float64: a clear line, not a crash at validation."""
    monkeypatch.chdir(tmp_path)
    # this machine's CPU stands in for an Apple GPU
    monkeypatch.setattr(lightning_module, "MPSAccelerator", CPUAccelerator)
    message = ends_in_clear_error(["fit", *SMALL], capsys)
    assert "MPS has no float64" in message and "--trainer.accelerator cpu" in message


@pytest.mark.parametrize("option", ["data.data_dir", "trainer.default_root_dir"])
def test_unwritable_folder(tmp_path, synthetic_data_dir, monkeypatch, capsys, option):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocker").write_text("a file, not a folder")
    message = ends_in_clear_error(["fit", *SMALL, f"--{option}", "blocker/data"], capsys)
    assert f"{option.split('.')[1]} 'blocker/data' cannot be written: Not a directory" in message


def test_a_remote_root_stays_remote(tmp_path, synthetic_data_dir, monkeypatch):
    """A URL (fsspec's: s3://, memory://) is no local folder to check or make."""
    monkeypatch.chdir(tmp_path)
    cli = cli_main([*SMALL, "--trainer.default_root_dir", "memory://runs"], run=False)
    assert cli.trainer.logger.save_dir == "memory://runs" and not (tmp_path / "memory:").exists()


def test_corrupted_idx_file_offline(tmp_path, synthetic_data_dir, no_sources, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    labels = synthetic_data_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-7])
    message = ends_in_clear_error(["fit", *SMALL], capsys)
    assert "could not obtain MNIST" in message and "t10k-labels-idx1-ubyte" in message
    assert not labels.exists()  # the damaged file is gone, never trained on


def test_diverging_run_stops_with_a_clear_message(tmp_path, synthetic_data_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    message = ends_in_clear_error(
        ["fit", *SMALL, "--model.optimizer.lr", "1e30", "--model.scheduler", "null", "--trainer.max_epochs", "5"],
        capsys,
    )
    assert "non-finite loss" in message
    for checkpoint in (tmp_path / "lightning_logs").rglob("*.ckpt"):  # whatever was kept is finite
        state = torch.load(checkpoint, weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_a_bug_keeps_its_traceback(tmp_path, synthetic_data_dir, monkeypatch):
    """Only a UsageError (a bad setting, file or picture) ends in one line: any other error is a bug, whose
    traceback is what its fixer needs."""
    monkeypatch.chdir(tmp_path)

    def bug(self, batch, batch_idx):
        raise ValueError("a bug")

    monkeypatch.setattr(MNISTAdder, "training_step", bug)
    with pytest.raises(ValueError, match="a bug"):
        cli_main(["fit", *SMALL])
