import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import TQDMProgressBar
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from cli import DEFAULT_CONFIG, DESCRIPTION, cli_main
from conftest import SYNTHETIC_SIZES
from datamodule import MNISTAdderData
from lightning_module import MNISTAdder
from mnist_adder.run.checkpoints import flat
from mnist_adder.run.progress import EpochLog, RichBar
from mnist_adder.run.results import results_table

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--data.val_size",
    "100",
    "--data.batch_size",
    "50",
    "--data.feature_images",
    "200",
    "--model.channels",
    "[8, 16, 16]",
]


@pytest.mark.parametrize("option", ["--data.non_digits", "--model.not_digit_weight"])
def test_fit_warns_when_non_digits_and_their_weight_are_not_both_on(in_tmp, option):
    with pytest.warns(UserWarning, match="data.non_digits and model.not_digit_weight work together"):
        cli_main(["fit", option, "0", "--trainer.fast_dev_run", "1", *SMALL])


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_fast_dev_run_each_subcommand(in_tmp, subcommand):
    """Two batches of each stage, and what each subcommand is for comes out of them."""
    cli = cli_main([subcommand, "--trainer.fast_dev_run", "2", *SMALL])
    metrics = cli.trainer.callback_metrics
    if subcommand == "fit":
        assert cli.trainer.global_step == 2 and {"test/sum_acc", "test/sum_acc_all_pairs"} <= set(metrics)
    elif subcommand == "predict":
        rows = (in_tmp / "predictions.csv").read_text().splitlines()  # fast_dev_run: no logger, no run folder
        assert rows[0].startswith("index,number,pred_digit") and len(rows) == 1 + SYNTHETIC_SIZES["t10k"]
    else:
        stage = {"validate": "val", "test": "test"}[subcommand]
        assert {f"{stage}/digit_acc", f"{stage}/sum_acc", f"{stage}/digit_ece_uncalibrated"} <= set(metrics)


def test_a_progress_bar_of_the_user_s_own_is_kept(in_tmp):
    """Out of a terminal (as here) the run would print epoch lines and turn Lightning's bar off, refusing theirs."""
    cli = cli_main(["fit", "--trainer.fast_dev_run", "1", *SMALL, "--trainer.callbacks+=TQDMProgressBar"])
    assert type(cli.trainer.progress_bar_callback) is TQDMProgressBar
    assert not any(isinstance(c, (EpochLog, RichBar)) for c in cli.trainer.callbacks)


def test_fit_without_a_logger(in_tmp):
    """--trainer.logger false is honoured: the callbacks that log (the learning rate's) stay out of the run."""
    cli = cli_main(["fit", "--trainer.logger", "false", "--trainer.max_epochs", "1", *SMALL])
    assert cli.trainer.logger is None and "test/sum_acc" in cli.trainer.callback_metrics
    assert not (in_tmp / "lightning_logs").exists() and any((in_tmp / "checkpoints").glob("best-*.ckpt"))


def test_fit_then_files_metrics_and_tensorboard_tags(in_tmp, capsys):
    cli = cli_main(["fit", "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "5", *SMALL])
    run = in_tmp / "lightning_logs" / "version_0"
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and any(name.startswith("best-epoch=") for name in checkpoints)
    assert (run / "config.yaml").is_file()
    out = capsys.readouterr().out
    assert "Official MNIST test set" in out and "best-epoch=" in out
    # standard output is no terminal here: one line per epoch, with the figures a person follows
    lines = re.findall(r"^epoch .*$", out, re.M)
    pattern = r"epoch {}/2  step \d+  \d+ s  train loss \d+\.\d{{4}}  val digit \d+\.\d\d%  val sum \d+\.\d\d%"
    assert len(lines) == 2 and all(re.fullmatch(pattern.format(k + 1), line) for k, line in enumerate(lines)), lines
    assert RichBar().get_metrics(cli.trainer, cli.model)["v_num"] == "0"  # not 0.000
    events = EventAccumulator(str(run), size_guidance={"images": 0, "tensors": 0}).Reload()
    tags = set(events.Tags()["scalars"])
    for stage in ("train", "val", "test"):
        assert {f"{stage}/digit_acc", f"{stage}/sum_acc", f"{stage}/digit_loss", f"{stage}/sum_loss"} <= tags
    assert {"val/sum_acc_best", "test/sum_acc_all_pairs"} <= tags
    assert {"val/confusion_matrix", "val/misclassified"} <= set(events.Tags()["images"])
    assert len(events.Scalars("val/digit_acc")) == 2
    # the training loss is logged only on the steps the logger writes: none is lost
    assert [s.step for s in events.Scalars("loss")] == list(range(4, cli.trainer.global_step, 5))
    assert events.Scalars("val/sum_acc_best")[-1].value == max(s.value for s in events.Scalars("val/sum_acc"))
    assert {"lr-SGD", "val/sum_consistency", "test/sum_consistency_all_pairs"} <= tags
    lrs = [s.value for s in events.Scalars("lr-SGD")]
    assert len(set(lrs)) > 1  # the OneCycle schedule, as stepped by the manual step
    layout = layout_pb2.Layout.FromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert list(charts)[:4] == ["digit accuracy", "sum accuracy", "losses", "learning rate"]
    assert charts["digit accuracy"] == ["^train/digit_acc$", "^val/digit_acc$"]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        events.SummaryMetadata("_hparams_/experiment").plugin_data.content
    ).experiment
    names = {info.name for info in experiment.hparam_infos}
    assert {
        "optimizer",
        "optimizer.lr",
        "scheduler.max_lr",
        "batch_size",
        "max_epochs",
        "seed",
        "rotate",
        "sum_loss",
        "sum_loss_weight",
        "agreement",
        "channels",
        "convs_per_stage",
        "hidden",
        "dropout",
        "number_features",
        "scheduler_interval",
        "gradient_clip_val",
        "val_size",
        "label_smoothing",
    } <= names
    assert not any(name.startswith("_") for name in names) and "data_dir" not in names  # settings, not paths
    assert [m.name.tag for m in experiment.metric_infos] == [
        "val/sum_acc_best",
        "test/digit_acc",
        "test/sum_acc_all_pairs",
    ]
    session = plugin_data_pb2.HParamsPluginData.FromString(
        events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    ).session_start_info
    assert session.hparams["batch_size"].number_value == 50 and session.hparams["max_epochs"].number_value == 2
    assert session.hparams["sum_loss_weight"].number_value == 1.0  # the weight in effect, not the config's null


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_config_parses_and_every_value_it_sets_is_parsed_as_written(config, capsys):
    path = ROOT / "configs" / config
    with pytest.raises(SystemExit) as end:
        cli_main(["fit", "--config", str(path), "--print_config"])
    assert end.value.code in (0, None)
    printed = flat(yaml.safe_load(capsys.readouterr().out))
    for key, value in flat(yaml.safe_load(path.read_text())).items():
        assert printed[key] == value, key  # e.g. gpu.yaml's bf16-mixed, fast.yaml's one conv a stage


def test_the_classes_with_no_arguments_are_the_default_run(tmp_path, capsys):
    """One source of defaults: MNISTAdder() and MNISTAdderData() are what `python cli.py fit` builds, optimizer and
    schedule included; default.yaml says only what the signatures cannot (its optimizer and scheduler are the
    signature's, spelled out for the command line). --help names the file."""
    cli = cli_main(["--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)], run=False)
    model, data = MNISTAdder(), MNISTAdderData()
    assert {k: v for k, v in cli.model.hparams.items() if k not in ("_instantiator", "optimizer", "scheduler")} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in model.hparams.items()
    }
    assert {k: v for k, v in cli.datamodule.hparams.items() if k != "_instantiator"} == dict(data.hparams)
    built = [m.optimizer(m.parameters()) for m in (cli.model, model)]
    assert type(built[0]) is type(built[1]) and built[0].defaults == built[1].defaults
    schedules = [m.scheduler(o, total_steps=100) for m, o in zip((cli.model, model), built)]
    assert type(schedules[0]) is type(schedules[1])
    assert [s.get_last_lr() for s in schedules] == [schedules[1].get_last_lr()] * 2
    assert schedules[0].state_dict() == schedules[1].state_dict()
    default = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert set(default["model"]) == {"optimizer", "scheduler"} and "data" not in default
    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    assert str(DEFAULT_CONFIG) in capsys.readouterr().out  # the help names the file its defaults come from


def test_top_level_help_shows_the_subcommand_list_as_written(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    shown = capsys.readouterr().out.splitlines()
    for line in DESCRIPTION.splitlines():
        assert line.rstrip() in shown  # one subcommand per line, not re-wrapped into a paragraph


def test_script_entry_point_reports_bad_value_without_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "fit", "--data.batch_size", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "batch_size must be >= 1" in done.stderr and "Traceback" not in done.stderr


def val_curve(run_dir):
    events = EventAccumulator(str(run_dir)).Reload()
    return {tag: [s.value for s in events.Scalars(tag)] for tag in events.Tags()["scalars"] if tag.startswith("val/")}


def test_same_seed_gives_identical_validation_every_epoch(tmp_path, synthetic_data_dir, monkeypatch):
    curves = []
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        seed = "1" if name == "c" else "0"
        cli_main(
            [
                "fit",
                "--trainer.max_epochs",
                "3",
                "--trainer.deterministic",
                "true",
                "--seed_everything",
                seed,
                "--data.data_dir",
                str(synthetic_data_dir),
                "--trainer.enable_progress_bar",
                "false",
                *SMALL,
            ]
        )
        curves.append(val_curve(tmp_path / name / "lightning_logs" / "version_0"))
    assert len(curves[0]["val/sum_loss"]) == 3
    assert curves[0] == curves[1]
    assert curves[0]["val/sum_loss"] != curves[2]["val/sum_loss"]  # the seed matters


def test_on_device_data_gives_the_same_run(tmp_path, synthetic_data_dir, monkeypatch):
    """data.on_device keeps the sets on the accelerator (here the CPU) and must not change a run."""
    curves = []
    for on_device in ("false", "true"):
        (tmp_path / on_device).mkdir()
        monkeypatch.chdir(tmp_path / on_device)
        cli_main(
            [
                "fit",
                "--trainer.max_epochs",
                "2",
                "--trainer.deterministic",
                "true",
                "--data.on_device",
                on_device,
                "--data.data_dir",
                str(synthetic_data_dir),
                "--trainer.enable_progress_bar",
                "false",
                *SMALL,
            ]
        )
        curves.append(val_curve(tmp_path / on_device / "lightning_logs" / "version_0"))
    assert len(curves[0]["val/sum_loss"]) == 2 and curves[0] == curves[1]


def test_the_confusion_matrix_is_shaded_by_each_true_digit_s_share():
    """Row-normalised: a true 0 read as 0 once and as 1 once shades both cells as half its row, however many
    samples the other rows hold."""
    from mnist_adder.run.visuals import CELL, confusion_image

    matrix = torch.zeros(10, 10, dtype=torch.long)
    matrix[0, 0], matrix[0, 1], matrix[1, 1] = 1, 1, 98
    image = confusion_image(matrix)

    def shade(i, j):  # a cell's corner, clear of its count
        return image[0, (i + 1) * CELL + 1, (j + 1) * CELL + 1].item()

    half, full = int(255 * 0.5**0.3), 0
    assert (shade(0, 0), shade(0, 1), shade(1, 1), shade(2, 2)) == (half, half, full, 255)


def test_a_grid_of_misclassified_samples_has_a_row_for_every_sample():
    from mnist_adder.run.visuals import sample_grid

    n = 7  # one more than a row of six
    labels = [torch.arange(n)] * 5
    grid = sample_grid(torch.rand(n, 1, 28, 28), *labels)
    assert grid.shape[1] == 2 * (84 + 40) and grid.shape[2] == 6 * 84


def test_the_misclassified_samples_are_the_pairs_with_either_answer_wrong():
    """A wrong sum beside a right digit is the sum head failing to add: it is shown, as is a wrong digit."""
    from types import SimpleNamespace

    from mnist_adder.run.dashboard import Dashboard

    batch = {
        "image": torch.rand(3, 1, 28, 28),
        "number": torch.tensor([4, 1, 0]),
        "digit": torch.tensor([3, 5, 0]),
        "sum": torch.tensor([7, 6, 0]),
    }
    answered = [(3, 8), (2, 6), (0, 0)]  # the digit right and the sum wrong, the other way round, both right
    logits = torch.zeros(3, 29)
    for row, (digit, sum_) in enumerate(answered):
        logits[row, digit] = logits[row, 10 + sum_] = 5.0
    dashboard = Dashboard()
    dashboard.on_validation_epoch_start(None, SimpleNamespace(device="cpu"))
    dashboard.on_validation_batch_end(None, None, logits, batch, 0)
    [shown] = dashboard.misclassified
    assert shown["digit"].tolist() == [3, 5] and shown["number"].tolist() == [4, 1]
    assert shown["digit_pred"].tolist() == [3, 2] and shown["sum_pred"].tolist() == [8, 6]


def test_the_cli_leaves_the_callers_warning_filters_as_they_were(tmp_path, monkeypatch):
    """It silences a few warnings no user can act on while it runs, not for the rest of a notebook's session."""
    monkeypatch.chdir(tmp_path)
    before = list(warnings.filters)
    cli_main(["--trainer.logger", "false"], run=False)
    assert warnings.filters == before


def test_the_printed_summary_gives_each_figure_under_its_own_name():
    summary = {
        "checkpoint": "best.ckpt",
        "fit_seconds": 12.34,
        "test/digit_acc": 0.9911,
        "test/sum_acc": 0.9822,
        "test/sum_acc_all_pairs": 0.9733,
        "test/sum_consistency_all_pairs": 0.9644,
        "test/digit_ece_uncalibrated": 0.08,
        "test/digit_ece": 0.0014,
        "test/sum_ece_uncalibrated": 0.12,
        "test/sum_ece": 0.0015,
    }
    lines = results_table(summary).splitlines()
    assert lines[:2] == ["", "Official MNIST test set"]
    assert dict(re.split(r"\s{2,}", line.strip()) for line in lines[2:]) == {
        "checkpoint": "best.ckpt",
        "fit time": "12.3 s",
        "digit accuracy (fixed pairs)": "99.11 %",
        "sum accuracy (fixed pairs)": "98.22 %",
        "sum accuracy (each image with all 10 numbers)": "97.33 %",
        "sum = predicted digit + number (all pairs)": "96.44 %",
        "digit calibration error": "8.00 % -> 0.14 %",  # before the temperatures -> after
        "sum calibration error": "12.00 % -> 0.15 %",
    }
    assert "(weights at the end of fit)" in results_table({**summary, "checkpoint": None})
