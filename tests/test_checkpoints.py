import errno
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning import Callback

from cli import cli_main
from mnist_adder.data import mnist_files
from mnist_adder.run.checkpoints import SaveOnInterrupt
from test_bad_inputs import ends_in_clear_error
from test_cli import SMALL

QUIET = ["--trainer.enable_progress_bar", "false", *SMALL]


@pytest.fixture
def trained(tmp_path, synthetic_data_dir, monkeypatch):
    """A one-epoch run in tmp_path; returns its last.ckpt."""
    monkeypatch.chdir(tmp_path)
    cli_main(["fit", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", *SMALL])
    return tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


def test_ckpt_path_last_resumes_the_newest_run(trained, capsys):
    """Each run writes into its own folder, where the Trainer would look for "last" and find none."""
    cli = cli_main(["fit", "--trainer.max_epochs", "1", "--ckpt_path", "last", *QUIET])  # a finished run: no step
    assert Path(cli.trainer.log_dir) == trained.parents[1]  # not a new version_1, trained from scratch
    assert cli.trainer.global_step == torch.load(trained, weights_only=True)["global_step"]
    (trained.parents[3] / "elsewhere").mkdir()
    message = ends_in_clear_error(["fit", "--ckpt_path", "last", "--trainer.default_root_dir", "elsewhere"], capsys)
    assert (
        "ckpt_path 'last': no last.ckpt in elsewhere/lightning_logs/version_*/checkpoints or elsewhere/check" in message
    )


def test_ckpt_path_last_is_the_newest_also_of_a_run_without_a_logger(trained):
    """Without a logger ModelCheckpoint writes to checkpoints/; "last" is the newest last.ckpt of all the runs."""
    cli_main(["fit", "--trainer.max_epochs", "1", "--trainer.logger", "false", *QUIET])
    cli = cli_main(["validate", "--ckpt_path", "last", *QUIET])  # not the older lightning_logs/version_0's
    assert cli.config.validate.ckpt_path == str(Path("checkpoints") / "last.ckpt")


def test_enable_checkpointing_false_writes_no_checkpoint(tmp_path, synthetic_data_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "--trainer.max_epochs", "1", "--trainer.enable_checkpointing", "false", *QUIET])
    assert cli.trainer.checkpoint_callback is None and "test/sum_acc" in cli.trainer.callback_metrics
    assert not list(tmp_path.rglob("*.ckpt")) and "(weights at the end of fit)" in capsys.readouterr().out


def test_best_names_the_newest_runs_best_checkpoint(trained, capsys):
    message = ends_in_clear_error(["test", "--ckpt_path", "best", *QUIET], capsys)
    assert "name the file, e.g. --ckpt_path lightning_logs/version_0/checkpoints/best-epoch=00.ckpt" in message


def test_demo_serves_the_newest_runs_last_checkpoint(trained, monkeypatch):
    import demo

    served = []
    monkeypatch.setattr(demo, "build_page", lambda model: SimpleNamespace(launch=lambda **kw: served.append(model)))
    demo.main(["--ckpt_path", "last", "--port", "65535"])  # the highest port there is
    saved = torch.load(trained, weights_only=True)["state_dict"]
    assert len(served) == 1 and all(torch.equal(t, saved[k]) for k, t in served[0].state_dict().items())
    assert not served[0].training  # BatchNorm reads its running statistics, and leaves them as they are


class CtrlC(Callback):
    """Ctrl-C once 3 steps are done: between two steps, or in the 4th, before its optimizer step."""

    def __init__(self, mid_step: bool):
        self.mid_step = mid_step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 3 and not self.mid_step:
            raise KeyboardInterrupt

    def on_before_optimizer_step(self, trainer, *args):
        if trainer.global_step == 3 and self.mid_step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("mid_step", [False, True])
def test_ctrl_c_in_fit_saves_last_then_resume_finishes(tmp_path, synthetic_data_dir, monkeypatch, caplog, mid_step):
    """Resumed, the run trains every batch once: the 4th batch, which Ctrl-C stopped mid-step, goes again."""
    monkeypatch.chdir(tmp_path)
    run = ["fit", "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false", *SMALL]
    with pytest.raises(SystemExit):
        callback = {"class_path": "test_checkpoints.CtrlC", "init_args": {"mid_step": mid_step}}
        cli_main([*run, f"--trainer.callbacks+={json.dumps(callback)}"])
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert f"Stopped by Ctrl-C: saved {last}" in caplog.text and f"--ckpt_path {last}" in caplog.text
    cli = cli_main([*run, "--ckpt_path", str(last)])
    assert cli.trainer.current_epoch == 2 and cli.trainer.global_step == 2 * 550 // 50  # 500 digits, 50 non-digits
    assert Path(cli.trainer.log_dir) == last.parents[1]  # the resumed run writes on into its own folder
    assert sorted(p.name for p in last.parents[2].iterdir()) == ["version_0"]


@pytest.mark.parametrize("world_size", [1, 2])
def test_ctrl_c_saves_only_in_one_process(tmp_path, caplog, world_size):
    """Ctrl-C reaches each DDP process at another step: a save there would wait for the others in vain."""
    saved = []
    trainer = SimpleNamespace(
        checkpoint_callback=SimpleNamespace(dirpath=str(tmp_path)),
        sanity_checking=False,
        state=SimpleNamespace(fn="fit"),
        fast_dev_run=False,
        world_size=world_size,
        save_checkpoint=saved.append,
    )
    with caplog.at_level(logging.INFO):
        SaveOnInterrupt().on_exception(trainer, None, KeyboardInterrupt())
    assert saved == ([tmp_path / "last.ckpt"] if world_size == 1 else [])
    assert ("nothing saved" in caplog.text) == (world_size > 1)


def test_last_ckpt_follows_every_epoch_not_only_a_new_best(tmp_path, synthetic_data_dir, monkeypatch):
    """Monitored for its minimum, only epoch 0 is a best; a kill after epoch 2 must still resume from epoch 2."""
    monkeypatch.chdir(tmp_path)
    cli_main(
        [
            "fit",
            "--trainer.max_epochs",
            "3",
            "--trainer.enable_progress_bar",
            "false",
            "--checkpoint.monitor",
            "epoch",
            "--checkpoint.mode",
            "min",
            *SMALL,
        ]
    )
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best-epoch=00.ckpt", "last.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=True)["epoch"] == 2


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("missing", "no such file"),
        ("truncated", "not a readable checkpoint"),
        ("text", "not a readable checkpoint"),
        ("other_model", "another model"),
        ("no_state_dict", "holds no Lightning state_dict"),
        ("folder", "a folder, not a checkpoint file"),
    ],
)
def test_bad_checkpoints_give_one_clear_error(trained, capsys, damage, expected):
    bad = trained.with_name("bad.ckpt")
    if damage == "folder":
        bad.mkdir()
    elif damage == "truncated":
        bad.write_bytes(trained.read_bytes()[: trained.stat().st_size // 2])
    elif damage == "text":
        bad.write_text("not a checkpoint\n")
    elif damage == "other_model":
        torch.save({"state_dict": {"layer.weight": torch.zeros(2, 2)}}, bad)
    elif damage == "no_state_dict":
        torch.save({"epoch": 3, "weights": {"layer.weight": torch.zeros(2, 2)}}, bad)
    for subcommand in ("fit", "test"):
        assert expected in ends_in_clear_error([subcommand, "--ckpt_path", str(bad), *SMALL], capsys)


def test_checkpoint_of_other_settings_is_named(trained, capsys):
    stripped = trained.with_name("no_hparams.ckpt")  # with its hyperparameters the CLI would adopt them
    checkpoint = torch.load(trained, weights_only=True)
    del checkpoint["hyper_parameters"]
    torch.save(checkpoint, stripped)
    message = ends_in_clear_error(["validate", "--ckpt_path", str(stripped), *SMALL[:-1], "[8, 16, 32]"], capsys)
    assert "other model settings" in message


BREAK = {"how": None}  # how the next checkpoint write fails, once FailFromSecondEpoch arms it


class FailFromSecondEpoch(Callback):
    """Epoch 0's checkpoints are written as usual; every checkpoint write after that fails as BREAK says."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            BREAK["armed"] = True


def checkpoint_write(path, mode="r", *args, **kwargs):
    """open() as mnist_files sees it: a checkpoint's temporary file fails half-way through its write when armed."""
    f = open(path, mode, *args, **kwargs)
    if BREAK.get("armed") and BREAK["how"] == "disk full" and ".ckpt." in str(path) and "w" in mode:

        class HalfThenFull:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def write(self, data):
                f.write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return HalfThenFull()
    return f


REPLACE = os.replace


def replace_or_die(src, dst):
    if BREAK.get("armed") and BREAK["how"] == "killed before rename":
        raise RuntimeError("killed between writing and renaming")
    REPLACE(src, dst)


@pytest.mark.parametrize("how", ["disk full", "killed before rename"])
def test_a_failed_checkpoint_write_leaves_every_checkpoint_whole(
    tmp_path, synthetic_data_dir, monkeypatch, how, capsys
):
    """No partial file under a checkpoint's name, no temporary file left, last.ckpt still epoch 0's; a full disk
    ends the run in one line that names the folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(BREAK, "how", how)
    monkeypatch.setitem(BREAK, "armed", False)
    monkeypatch.setattr(mnist_files, "open", checkpoint_write, raising=False)
    monkeypatch.setattr(mnist_files.os, "replace", replace_or_die)
    run = ["fit", "--trainer.max_epochs", "3", "--trainer.callbacks+=test_checkpoints.FailFromSecondEpoch", *QUIET]
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    if how == "disk full":
        message = ends_in_clear_error(run, capsys)
        assert message.startswith("error: cannot write checkpoint") and str(folder) in message
        assert len(message.strip().splitlines()) == 1
    else:
        with pytest.raises(RuntimeError, match="killed between writing and renaming"):
            cli_main(run)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["best-epoch=00.ckpt", "last.ckpt"]  # nothing half-written, no temporary file
    for name in names:
        assert torch.load(folder / name, weights_only=True)["epoch"] == 0


def test_a_temporary_file_left_by_a_killed_write_goes_with_the_next_write(trained):
    leftover = trained.with_name(".last.ckpt.99999.tmp")
    leftover.write_bytes(b"half a checkpoint")
    mnist_files.write_atomic(trained, trained.read_bytes())
    assert not leftover.exists() and torch.load(trained, weights_only=True)["epoch"] == 0


class RunsCode:
    """What a malicious checkpoint may hold: unpickling it would create the file MARKER names."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture
def code_checkpoint(trained, tmp_path):
    checkpoint = torch.load(trained, weights_only=True)
    checkpoint["hyper_parameters"]["payload"] = RunsCode(tmp_path / "ran")
    torch.save(checkpoint, tmp_path / "model.ckpt")
    return tmp_path / "model.ckpt"


def run_script(script: str, *args: str) -> None:
    import runpy
    import sys

    sys.argv = [script, *args]
    runpy.run_path(str(Path(__file__).resolve().parents[1] / script), run_name="__main__")


@pytest.mark.parametrize(
    "entry",
    [
        *("fit", "validate", "test", "predict", "export.py", "demo.py", "benchmarks/disagreements.py"),
        *("benchmarks/tta.py", "benchmarks/unsure.py", "benchmarks/not_a_digit.py", "benchmarks/printed_glyphs.py"),
        "benchmarks/photos.py",
    ],
)
def test_a_checkpoint_that_would_run_code_is_refused_on_every_path(code_checkpoint, tmp_path, monkeypatch, entry):
    """The message says why, and never suggests loading it anyway (torch's own text does)."""
    monkeypatch.setattr("sys.argv", ["cli.py"])  # run_script sets its own; restored after
    option = {"export.py": ["--ckpt_path"], "demo.py": ["--ckpt_path"], "benchmarks/photos.py": ["--ckpt_path"]}
    option["benchmarks/not_a_digit.py"] = ["--no-write", "--training", "mine"]
    with pytest.raises(SystemExit) as end:
        if entry.endswith(".py"):
            run_script(entry, *option.get(entry, []), str(code_checkpoint))
        else:
            cli_main([entry, "--ckpt_path", str(code_checkpoint), *QUIET])
    message = str(end.value.code)
    assert "never holds, and loading them could run code: it was not loaded" in message
    assert "weights_only" not in message and len(message.splitlines()) == 1
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("name", ["hpc", "registry", "registry:my-model:latest"])
def test_names_the_trainer_resolves_are_left_to_it(name):
    from mnist_adder.run.checkpoints import read_checkpoint

    assert read_checkpoint(name, trainer_names=True) is None
    with pytest.raises(ValueError, match="no such file"):  # export.py and demo.py have no Trainer to resolve it
        read_checkpoint(name)


@pytest.mark.parametrize(
    "name, expected", [("last", "no last.ckpt in lightning_logs/version_*"), ("best", "name the file")]
)
@pytest.mark.parametrize("script", ["export.py", "demo.py", "cli.py"])
def test_last_is_the_newest_runs_and_best_a_file_to_name(tmp_path, monkeypatch, script, name, expected):
    """Everywhere: "last" is the newest run's (none here); "best", the Trainer's best of a fit in the same process."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["cli.py"])  # run_script sets its own; restored after
    with pytest.raises(SystemExit) as end:
        run_script(script, *(["test"] if script == "cli.py" else []), "--ckpt_path", name)
    assert expected in str(end.value.code) and len(str(end.value.code).splitlines()) == 1
