"""Runs as people run them: output where they say, resumed from anywhere, guarded against a resume that
could not be exact, extended, or evaluated without weights."""

import json

import pytest
import torch
from lightning import Callback

from cli import cli_main
from mnist_adder.run.checkpoints import named_settings
from test_bad_inputs import ends_in_clear_error
from test_cli import SMALL, val_curve

QUIET = ["--trainer.enable_progress_bar", "false", *SMALL]


@pytest.fixture
def run_in_runs(tmp_path, synthetic_data_dir, monkeypatch):
    """A one-epoch fit with --trainer.default_root_dir runs, started in tmp_path/start; returns the run folder."""
    (tmp_path / "start").mkdir()
    monkeypatch.chdir(tmp_path / "start")
    cli_main(
        [
            "fit",
            "--trainer.max_epochs",
            "1",
            "--trainer.default_root_dir",
            "runs",
            "--data.data_dir",
            str(synthetic_data_dir),
            *QUIET,
        ]
    )
    return tmp_path / "start" / "runs" / "lightning_logs" / "version_0"


def test_default_root_dir_holds_everything_a_run_writes(run_in_runs, tmp_path):
    assert not (tmp_path / "start" / "lightning_logs").exists()
    names = {p.name for p in run_in_runs.iterdir()}
    assert {"config.yaml", "results.json", "checkpoints"} <= names and any(n.startswith("events.") for n in names)
    results = json.loads((run_in_runs / "results.json").read_text())
    assert results["checkpoint"].startswith(str(run_in_runs)) and 0 <= results["test/sum_acc_all_pairs"] <= 1


def test_resume_from_another_folder_writes_on_into_the_run(
    run_in_runs, tmp_path, synthetic_data_dir, monkeypatch, capsys
):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    last = run_in_runs / "checkpoints" / "last.ckpt"
    cli = cli_main(
        [
            "fit",
            "--ckpt_path",
            str(last),
            "--trainer.max_epochs",
            "1",
            "--data.data_dir",
            str(synthetic_data_dir),
            *QUIET,
        ]
    )
    assert cli.trainer.log_dir == str(run_in_runs)
    assert "Official MNIST test set" in capsys.readouterr().out  # the stored best path still resolves
    assert not (tmp_path / "elsewhere" / "lightning_logs").exists()


@pytest.mark.parametrize(
    "change, expected",
    [
        (["--seed_everything", "1"], "seed_everything 0, this run sets 1"),
        (["--data.val_size", "50"], "val_size 100, this"),
    ],
)
def test_resume_with_another_split_is_refused(run_in_runs, synthetic_data_dir, capsys, change, expected):
    last = run_in_runs / "checkpoints" / "last.ckpt"
    message = ends_in_clear_error(
        [
            "fit",
            "--ckpt_path",
            str(last),
            "--trainer.max_epochs",
            "1",
            "--data.data_dir",
            str(synthetic_data_dir),
            *QUIET,
            *change,
        ],
        capsys,
    )
    assert expected in message and "the checkpoint decides" in message


@pytest.mark.parametrize(
    "change, expected",
    [
        (["--model.number_features", "64"], "model.number_features 128, this run sets 64"),
        (["--data.rotate", "5"], "data.rotate 10.0, this run sets 5.0"),
        (["--model.agreement", "1"], "model.agreement 3.0, this run sets 1.0"),
        (["--model.optimizer.init_args.weight_decay", "0.01"], "model.optimizer.init_args.weight_decay 0.0005, this"),
        (["--model.scheduler.init_args.pct_start", "0.3"], "model.scheduler.init_args.pct_start 0.2, this run"),
        (["--data.batch_size", "256"], "data.batch_size 50, this run sets 256"),  # given, though the default
    ],
)
def test_resume_with_another_model_or_data_setting_is_refused(
    run_in_runs, synthetic_data_dir, capsys, change, expected
):
    last = run_in_runs / "checkpoints" / "last.ckpt"
    before = last.stat().st_mtime_ns
    message = ends_in_clear_error(
        [
            "fit",
            "--ckpt_path",
            str(last),
            "--trainer.max_epochs",
            "1",
            "--data.data_dir",
            str(synthetic_data_dir),
            *QUIET,
            *change,
        ],
        capsys,
    )
    assert expected in message and len(message.strip().splitlines()) == 1
    assert last.stat().st_mtime_ns == before


def test_a_setting_in_a_config_file_ckpt_path_included_is_checked_as_on_the_command_line(
    run_in_runs, synthetic_data_dir, tmp_path, capsys
):
    config = tmp_path / "resume.yaml"
    last = run_in_runs / "checkpoints" / "last.ckpt"
    config.write_text(f"ckpt_path: {last}\nmodel:\n  hidden: 256\n")
    args = ["fit", "--config", str(config), "--data.data_dir", str(synthetic_data_dir), *QUIET]
    assert "model.hidden 512, this run sets 256" in ends_in_clear_error(args, capsys)


def test_a_data_section_given_whole_names_only_the_keys_it_holds(run_in_runs, synthetic_data_dir, tmp_path, capsys):
    """`--data FILE` (jsonargparse's form for a whole section) gives the file's keys, not every data setting."""
    last, data = run_in_runs / "checkpoints" / "last.ckpt", tmp_path / "data.yaml"
    data.write_text(f"data_dir: {synthetic_data_dir}\n")
    args = ["fit", "--ckpt_path", str(last), "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"]
    cli = cli_main([*args, "--data", str(data)])
    assert cli.datamodule.hparams.val_size == 100  # the checkpoint's, not refused against the default 5000
    data.write_text(f"data_dir: {synthetic_data_dir}\nbatch_size: 256\n")  # given, though the default
    assert "data.batch_size 50, this run sets 256" in ends_in_clear_error([*args, "--data", str(data)], capsys)


def test_a_section_given_inline_names_the_keys_it_holds():
    assert named_settings(["--data", "{data_dir: x, batch_size: 256}"], []) == {"data.data_dir", "data.batch_size"}
    assert named_settings(["--model={hidden: 256}", "--seed_everything", "1"], []) == {
        "model.hidden",
        "seed_everything",
    }


def test_the_checkpoint_decides_the_settings_a_run_does_not_give(tmp_path, synthetic_data_dir, monkeypatch):
    """Trained with other model and data settings, a checkpoint is resumed and tested without repeating them."""
    monkeypatch.chdir(tmp_path)
    own = ["--model.number_features", "64", "--data.rotate", "5", "--seed_everything", "2"]
    cli_main(["fit", "--trainer.max_epochs", "1", "--data.data_dir", str(synthetic_data_dir), *QUIET, *own])
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    for subcommand in ("fit", "test"):  # the fit resumes a finished run: it tests the best checkpoint
        same_length = ["--trainer.max_epochs", "1"] * (subcommand == "fit")  # the schedule's length is the run's
        cli = cli_main(
            [subcommand, "--ckpt_path", str(last), *same_length, "--data.data_dir", str(synthetic_data_dir), *QUIET]
        )
        assert cli.model.hparams.number_features == 64 and cli.model.net.number.out_features == 64
        assert cli.datamodule.hparams.seed == 2  # the split and the test pairs of the run
        assert cli.datamodule.hparams.rotate == (5 if subcommand == "fit" else 10)  # evaluation leaves training's


def test_resume_may_change_where_the_data_lives_and_what_is_tested(run_in_runs, synthetic_data_dir):
    last = run_in_runs / "checkpoints" / "last.ckpt"
    cli = cli_main(
        [
            "fit",
            "--ckpt_path",
            str(last),
            "--trainer.max_epochs",
            "1",
            "--data.data_dir",
            str(synthetic_data_dir),
            "--data.test_pairs",
            "fixed",
            *QUIET,
        ]
    )
    tested = cli.trainer.callback_metrics  # the test after fit: the fixed pairs only, from the other data_dir
    assert "test/sum_acc" in tested and "test/sum_acc_all_pairs" not in tested
    assert cli.datamodule.hparams.data_dir == str(synthetic_data_dir)


def test_extending_a_finished_run_stops_before_training_with_a_command(run_in_runs, synthetic_data_dir, capsys):
    last = run_in_runs / "checkpoints" / "last.ckpt"
    before = last.stat().st_mtime_ns
    message = ends_in_clear_error(
        [
            "fit",
            "--ckpt_path",
            str(last),
            "--trainer.max_epochs",
            "3",
            "--data.data_dir",
            str(synthetic_data_dir),
            *QUIET,
        ],
        capsys,
    )
    assert "spans 11 steps, this run 33" in message and "python cli.py fit --trainer.max_epochs N" in message
    assert last.stat().st_mtime_ns == before


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluating_without_weights_names_the_newest_checkpoint(run_in_runs, tmp_path, capsys, subcommand):
    message = ends_in_clear_error([subcommand, "--trainer.default_root_dir", "runs", *QUIET], capsys)
    assert "needs trained weights" in message and "--ckpt_path runs/lightning_logs/version_0/checkpoints/" in message
    message = ends_in_clear_error([subcommand, "--trainer.default_root_dir", str(tmp_path / "empty"), *QUIET], capsys)
    assert "none found" in message and not (tmp_path / "empty").exists()  # a refused run leaves no folder


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluating_a_runs_checkpoint_leaves_that_run_as_it_is(
    run_in_runs, tmp_path, synthetic_data_dir, monkeypatch, recwarn, subcommand
):
    """A folder of its own, as Lightning gives it: logged at step 0, its figures in the run's folder would sit at the
    start of the run's curves. Predictions land in it too."""
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    before = {p.name: p.stat().st_mtime_ns for p in run_in_runs.iterdir()}
    cli = cli_main(
        [
            subcommand,
            "--ckpt_path",
            str(run_in_runs / "checkpoints" / "last.ckpt"),
            "--data.data_dir",
            str(synthetic_data_dir),
            *QUIET,
        ]
    )
    own = tmp_path / "elsewhere" / "lightning_logs" / "version_0"
    assert cli.trainer.log_dir == str(own)
    assert {p.name: p.stat().st_mtime_ns for p in run_in_runs.iterdir()} == before  # no new events, nothing rewritten
    assert (own / "predictions.csv").is_file() == (subcommand == "predict")
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]  # Lightning's note that it moved


def test_logger_paths_the_user_sets_are_kept(tmp_path, synthetic_data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(
        [
            "fit",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "2",
            "--trainer.logger.init_args.save_dir",
            "mine",
            "--trainer.logger.init_args.name",
            "adder",
            "--trainer.default_root_dir",
            "runs",
            *QUIET,
        ]
    )
    assert cli.trainer.log_dir == "mine/adder/version_0"
    assert (tmp_path / "mine" / "adder" / "version_0" / "results.json").is_file()


def test_data_seed_is_the_one_seed(tmp_path, synthetic_data_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    message = ends_in_clear_error(["fit", "--data.seed", "5", *QUIET], capsys)
    assert "seed_everything" in message
    assert cli_main(["--seed_everything", "7", *QUIET], run=False).datamodule.hparams.seed == 7


@pytest.mark.parametrize("monitor", ["val/sum_acc", "val/digit_loss"])
def test_results_name_what_was_monitored_and_the_best_val_sum_accuracy_as_itself(
    tmp_path, synthetic_data_dir, monkeypatch, monitor
):
    """The tested checkpoint is the monitored best (by default the epoch of the highest val/sum_acc); results.json
    says what was monitored and gives val/sum_acc_best from the module's own record, whatever the monitor."""
    monkeypatch.chdir(tmp_path)
    chosen = [] if monitor == "val/sum_acc" else ["--checkpoint.monitor", monitor, "--checkpoint.mode", "min"]
    cli_main(["fit", "--trainer.max_epochs", "3", *chosen, *QUIET])
    run = tmp_path / "lightning_logs" / "version_0"
    results = json.loads((run / "results.json").read_text())
    curves = val_curve(run)
    assert results["monitor"] == monitor
    assert results["val/sum_acc_best"] == pytest.approx(max(curves["val/sum_acc"]))
    pick = max if monitor.endswith("acc") else min
    best_epoch = curves[monitor].index(pick(curves[monitor]))
    assert results["checkpoint"].endswith(f"best-epoch={best_epoch:02d}.ckpt")
    assert results["monitor_best"] == pytest.approx(curves[monitor][best_epoch])


def test_gradient_clip_val_goes_to_the_manual_step(tmp_path, synthetic_data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "--trainer.fast_dev_run", "1", "--trainer.gradient_clip_val", "0.5", *QUIET])
    assert cli.model.hparams.gradient_clip_val == 0.5 and not cli.trainer.gradient_clip_val


@pytest.mark.parametrize(
    "option, expected",
    [
        (["--trainer.gradient_clip_val", "0.5", "--model.gradient_clip_val", "2"], "differ: set one of them"),
        (["--trainer.gradient_clip_val", "0.5", "--trainer.gradient_clip_algorithm", "value"], "norm only"),
    ],
)
def test_clipping_options_the_manual_step_cannot_honour_are_refused(tmp_path, monkeypatch, capsys, option, expected):
    monkeypatch.chdir(tmp_path)
    assert expected in ends_in_clear_error(["fit", "--trainer.fast_dev_run", "1", *option, *QUIET], capsys)


@pytest.mark.parametrize("value", ["true", "false"])
def test_seed_everything_true_and_false(tmp_path, synthetic_data_dir, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "--trainer.fast_dev_run", "1", "--seed_everything", value, *QUIET])
    seed = cli.config.fit.seed_everything
    assert cli.datamodule.hparams.seed == (seed if value == "true" else 0)
    assert isinstance(seed, int) if value == "true" else seed is False


@pytest.mark.parametrize(
    "crash, extra, saved_at",
    [("CrashAtSecondEpoch", [], (0, 11)), ("CrashMidEpoch", ["--last_checkpoint.every_n_train_steps", "7"], (1, 14))],
    ids=["epoch end", "mid-epoch"],
)
def test_a_resumed_run_logs_what_the_uninterrupted_run_logged(
    tmp_path, synthetic_data_dir, monkeypatch, recwarn, crash, extra, saved_at
):
    """With augmentation on and deterministic: crash, resume from last.ckpt, and every later validation figure
    equals the uninterrupted run's. Mid-epoch, the resumed epoch skips the batches already trained, in the epoch's
    own order, and replays their augmentation draws; Lightning finds the train loader resumable and does not warn."""
    run = [
        "fit",
        "--trainer.max_epochs",
        "3",
        "--trainer.deterministic",
        "true",
        *extra,
        "--data.data_dir",
        str(synthetic_data_dir),
        *QUIET,
    ]
    (tmp_path / "whole").mkdir()
    monkeypatch.chdir(tmp_path / "whole")
    cli_main(run)
    (tmp_path / "stopped").mkdir()
    monkeypatch.chdir(tmp_path / "stopped")
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli_main([*run, f"--trainer.callbacks+=test_runs.{crash}"])
    last = tmp_path / "stopped" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == saved_at
    recwarn.clear()
    cli_main([*run, "--ckpt_path", str(last)])
    assert not [w for w in recwarn if "not resumable" in str(w.message)]
    whole = val_curve(tmp_path / "whole" / "lightning_logs" / "version_0")
    resumed = val_curve(tmp_path / "stopped" / "lightning_logs" / "version_0")
    assert len(whole["val/sum_loss"]) == 3 and whole.keys() == resumed.keys()
    for tag in whole:
        assert resumed[tag] == pytest.approx(whole[tag], abs=1e-6), tag


def test_a_resume_whose_epochs_are_longer_or_shorter_is_refused(tmp_path, synthetic_data_dir, monkeypatch, capsys):
    """The position in the epoch counts the checkpoint's batches: with other epochs of as many steps in all (so
    the schedule's check passes) it would skip the wrong ones, so the run is refused in one line."""
    monkeypatch.chdir(tmp_path)
    run = ["fit", "--trainer.max_epochs", "3", "--data.data_dir", str(synthetic_data_dir), *QUIET]
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli_main([*run, "--last_checkpoint.every_n_train_steps", "7", "--trainer.callbacks+=test_runs.CrashMidEpoch"])
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    resume = [*run, "--trainer.max_epochs", "11", "--trainer.limit_train_batches", "3", "--ckpt_path", str(last)]
    assert "the checkpoint's epochs held 11 batches and this run's hold 3" in ends_in_clear_error(resume, capsys)


class CrashAtSecondEpoch(Callback):
    """Dies like a killed process would, once epoch 0's checkpoints are written (no last.ckpt of its own)."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated crash")


class CrashMidEpoch(Callback):
    """Dies like a killed process would in the middle of epoch 1, after the checkpoint of step 14 (3 of its 11
    batches) and two batches more."""

    step = 16

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


class CrashAtStep15(CrashMidEpoch):
    step = 15


class CrashAtStep17(CrashMidEpoch):
    step = 17


def test_two_stops_in_one_epoch_resume_where_each_left_off(tmp_path, synthetic_data_dir, monkeypatch):
    """Stopped after the checkpoint of step 14, resumed, stopped again after that of step 16, resumed: the second
    resume goes on from batch 6 of epoch 1 (the first resume counts the batches it skipped), as a run never
    stopped would."""
    run = [
        "fit",
        "--trainer.max_epochs",
        "3",
        "--trainer.deterministic",
        "true",
        "--last_checkpoint.every_n_train_steps",
        "2",
        "--checkpoint.monitor",
        "null",
        "--data.data_dir",
        str(synthetic_data_dir),
        *QUIET,
    ]
    (tmp_path / "whole").mkdir()
    monkeypatch.chdir(tmp_path / "whole")
    cli_main(run)
    (tmp_path / "stopped").mkdir()
    monkeypatch.chdir(tmp_path / "stopped")
    last = tmp_path / "stopped" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli_main([*run, "--trainer.callbacks+=test_runs.CrashAtStep15"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli_main([*run, "--ckpt_path", str(last), "--trainer.callbacks+=test_runs.CrashAtStep17"])
    assert torch.load(last, weights_only=True)["global_step"] == 16
    cli_main([*run, "--ckpt_path", str(last)])
    whole = val_curve(tmp_path / "whole" / "lightning_logs" / "version_0")
    resumed = val_curve(tmp_path / "stopped" / "lightning_logs" / "version_0")
    assert len(whole["val/sum_loss"]) == 3 and whole.keys() == resumed.keys()
    for tag in whole:
        assert resumed[tag] == pytest.approx(whole[tag], abs=1e-6), tag
