"""Command line: `python cli.py fit|validate|test|predict [--config FILE] [--key value ...]`."""

import argparse
import json
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from datamodule import MNISTAdderData
from lightning_module import MNISTAdder
from mnist_adder.data.mnist_files import MNISTUnavailable, check_writable, write_atomic
from mnist_adder.errors import UsageError
from mnist_adder.model.optimization import build_optimizer
from mnist_adder.run.checkpoints import (
    AtomicCheckpointIO,
    CheckpointNotWritten,
    SaveOnInterrupt,
    apply_checkpoint,
    check_weights,
    find_checkpoint,
    is_url,
    named_settings,
    newest_checkpoint,
    read_checkpoint,
    run_folder,
)
from mnist_adder.run.dashboard import HPARAM_METRICS, Dashboard, run_hparams
from mnist_adder.run.divergence import StopOnNonFiniteLoss
from mnist_adder.run.predictions import PredictionsCSV
from mnist_adder.run.progress import EpochLog, RichBar
from mnist_adder.run.results import results_table

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
DEFAULT_SAVE_DIR = yaml.safe_load(DEFAULT_CONFIG.read_text())["trainer"]["logger"]["init_args"]["save_dir"]
DESCRIPTION = """mnist-adder: a network reads an MNIST digit and a number 0-9 and predicts the digit and their sum.

  fit       train (configs/default.yaml unless --config says more), then test the best checkpoint
  validate  the validation split, with --ckpt_path
  test      the official test set, fixed pairs and all 100,000 pairs, with --ckpt_path
  predict   your own pictures (--data.predict_manifest CSV) or the test set, with --ckpt_path

`python cli.py fit --help` lists every option with the value a plain `python cli.py fit` uses."""


# Warnings a user of this project can do nothing about: LightningCLI's when cli_main(args) runs from Python while
# sys.argv holds another program's arguments (pytest's); torch's about its own internals.
UNACTIONABLE_WARNINGS = ["LightningCLI's args parameter", r"`isinstance\(treespec, LeafSpec\)` is deprecated"]


def _data_seed(seed: int | bool) -> int:
    return 0 if isinstance(seed, bool) else seed


def _as_list(value) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """The description as written: argparse would run the list of subcommands together into one paragraph."""


class ShortErrorParser(LightningArgumentParser):
    """A bad option ends in its one error line and a tip, without the usage wall; --help shows it all."""

    def print_usage(self, file=None) -> None:
        pass


class AdderCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Two of Lightning's own: the best checkpoints by val/sum_acc, and last.ckpt after every epoch.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {"checkpoint.monitor": "val/sum_acc", "checkpoint.mode": "max", "checkpoint.filename": "best-{epoch:02d}"}
        )
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults({"last_checkpoint.filename": "last", "last_checkpoint.enable_version_counter": False})
        # One seed decides the initial weights, the augmentation, the split and every pairing: --data.seed is
        # not an option of its own. `--seed_everything true` draws its seed later, in before_instantiate_classes.
        parser.link_arguments("seed_everything", "data.seed", compute_fn=_data_seed)

    def parse_arguments(self, parser, args) -> None:
        """As LightningCLI's; with a ckpt_path (on the command line or in a --config file), the checkpoint is read
        (here, for one clear line on a bad file; LightningCLI and the Trainer read it again) and decides the settings
        it was trained with (checkpoints.apply_checkpoint)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        path = config.get("ckpt_path")
        if path:
            path = config.ckpt_path = find_checkpoint(path, Path(config.trainer.default_root_dir or "."))
        self.checkpoint = read_checkpoint(path, trainer_names=True) if path else None
        if self.checkpoint is not None:
            defaults = parser.parse_args([subcommand])[subcommand]
            named = named_settings(sys.argv[1:] if args is None else args, config.get("config") or [])
            apply_checkpoint(config, defaults, named, self.checkpoint, path, evaluating=subcommand != "fit")

    def before_instantiate_classes(self) -> None:
        """Settings that Lightning would take badly, turned into what the user meant or one clear error."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        if self.subcommand in ("validate", "test", "predict"):  # in a run folder of its own, which is no news
            warnings.filterwarnings("ignore", message="The dirpath has changed from")  # cli_main's catch_warnings
        if not isinstance(config.seed_everything, bool):  # the seed `--seed_everything true` drew by now
            config.data.seed = config.seed_everything
        if trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise UsageError(
                f"trainer.accelerator is {trainer.accelerator!r} but this machine has no usable GPU: "
                "run `python cli.py fit` (any machine) or add --trainer.accelerator cpu"
            )
        if trainer.gradient_clip_algorithm not in (None, "norm"):
            raise UsageError(
                "trainer.gradient_clip_algorithm: this model clips the gradients' norm only (its "
                "manual-optimization step); leave it unset and set --model.gradient_clip_val"
            )
        if trainer.gradient_clip_val:  # the manual-optimization step clips; Lightning's own clipping cannot
            if config.model.gradient_clip_val not in (0, trainer.gradient_clip_val):
                raise UsageError(
                    f"trainer.gradient_clip_val {trainer.gradient_clip_val} and model.gradient_clip_val "
                    f"{config.model.gradient_clip_val} differ: set one of them"
                )
            config.model.gradient_clip_val = float(trainer.gradient_clip_val)
            trainer.gradient_clip_val = None
            rank_zero_info(f"gradient clipping: model.gradient_clip_val = {config.model.gradient_clip_val}")
        if trainer.accumulate_grad_batches not in (None, 1):
            raise UsageError(
                "trainer.accumulate_grad_batches does not apply to this model's manual-optimization "
                "step; for larger effective batches raise --data.batch_size"
            )
        ckpt_path = config.get("ckpt_path")
        if self.subcommand in ("validate", "test", "predict") and not ckpt_path and not trainer.fast_dev_run:
            newest = newest_checkpoint(Path(trainer.default_root_dir or "."))
            raise UsageError(
                f"{self.subcommand} needs trained weights: add --ckpt_path CHECKPOINT"
                + (
                    f" (the newest here: --ckpt_path {newest})"
                    if newest
                    else " (none found in lightning_logs/ or checkpoints/: train with `python cli.py fit` first)"
                )
            )
        root = trainer.default_root_dir
        if root and not is_url(root) and not trainer.fast_dev_run:  # made after the refusals above
            check_writable(Path(root), "trainer.default_root_dir")
        self._place_logs(config, ckpt_path)

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """Our callbacks join the user's. Checkpoints are written whole (AtomicCheckpointIO), unless the user brings a
        CheckpointIO plugin; none is written with --trainer.enable_checkpointing false. Progress: a bar in a
        terminal, else a line per epoch, unless the user brings a progress bar."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        if config.trainer.enable_checkpointing is False:  # Lightning refuses any ModelCheckpoint then: ours go
            config.checkpoint = config.last_checkpoint = Callback()
        settings = config.trainer
        if settings.logger:  # both draw into the logger (LearningRateMonitor refuses a Trainer without one)
            self.trainer_defaults["callbacks"] += [LearningRateMonitor("step"), Dashboard()]
        if not any(isinstance(c, ProgressBar) for c in _as_list(settings.callbacks)):  # else the user's shows
            bar = settings.enable_progress_bar
            show_bar = bar or (bar is None and sys.stdout.isatty())
            if not show_bar:  # the epoch lines instead; left unset, Lightning would add its own bar beside them
                settings.enable_progress_bar = False
            self.trainer_defaults["callbacks"].append(RichBar() if show_bar else EpochLog())
        plugins = _as_list(settings.plugins)
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except ValueError as err:  # Lightning's word on a trainer setting, e.g. a strategy it does not know
            raise UsageError(f"trainer: {err}") from None
        return trainer

    def _place_logs(self, config, ckpt_path) -> None:
        """Unless the user placed them, the logs go to default_root_dir/lightning_logs/version_N as absolute paths; a
        resumed fit writes on into its run's folder, unless --trainer.default_root_dir says where: Lightning restores
        its step, so its curves go on. validate, test and predict get a folder of their own, as Lightning gives them:
        they log at step 0, which in the run's folder would put points at the start of its curves."""
        logger = config.trainer.logger
        if not (hasattr(logger, "class_path") and logger.class_path.endswith("TensorBoardLogger")):
            return
        args = logger.init_args
        if (str(args.save_dir), args.name, args.version) != (DEFAULT_SAVE_DIR, "lightning_logs", None):
            return  # set by the user: theirs
        resumed = self.subcommand == "fit" and ckpt_path and not config.trainer.default_root_dir
        folder = run_folder(Path(ckpt_path)) if resumed else None
        if folder is not None:
            args.save_dir, args.name, args.version = str(folder.parent.parent), folder.parent.name, folder.name
        else:
            root = str(config.trainer.default_root_dir or ".")
            args.save_dir = root if is_url(root) else str(Path(root).resolve())

    def _check_weights(self) -> None:
        if self.checkpoint is not None:
            check_weights(self.checkpoint, str(self.config[self.subcommand].ckpt_path), self.model)

    def before_fit(self) -> None:
        if self.trainer.max_epochs == 0:  # Lightning itself refuses other values below -1
            raise UsageError("trainer.max_epochs must be >= 1 (or -1 for no limit)")
        build_optimizer(self.model.optimizer, self.model)  # a bad optimizer setting fails here, before any work
        if (self.datamodule.hparams.non_digits > 0) != (self.model.hparams.not_digit_weight > 0):
            rank_zero_warn(
                "data.non_digits and model.not_digit_weight work together: with only one of them above 0, the "
                'model does not learn to answer "not a digit"'
            )
        self._check_weights()
        self._fit_start = time.perf_counter()

    before_validate = before_test = before_predict = _check_weights

    def after_fit(self) -> None:
        """Test the best checkpoint (chosen on validation) on the official test set; print a summary and
        write it as results.json in the run's folder."""
        fit_seconds = time.perf_counter() - self._fit_start
        if self.trainer.interrupted:
            return
        callback = self.trainer.checkpoint_callback
        best = callback.best_model_path if callback else ""
        best_val = self.trainer.callback_metrics.get("val/sum_acc_best")  # the module's, before the test reloads it
        results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)
        metrics = {k: v for result in results for k, v in result.items()}
        summary = {
            "checkpoint": best or None,
            "fit_seconds": round(fit_seconds, 1),
            "val/sum_acc_best": None if best_val is None else float(best_val),
            "monitor": callback.monitor if callback else None,
            "monitor_best": None
            if not callback or callback.best_model_score is None
            else float(callback.best_model_score),
            "seed": self.datamodule.hparams.seed,
            "temperature": dict(zip(("digit", "sum"), self.model.temperature.tolist())),
            **metrics,
        }
        log_dir = self.trainer.log_dir  # a collective under DDP: every process asks
        if isinstance(self.trainer.logger, TensorBoardLogger) and best_val is not None:
            shown = {key: summary[key] for key in HPARAM_METRICS if summary.get(key) is not None}
            self.trainer.logger.log_hyperparams(
                run_hparams(self.config.fit, self.model), shown, self.trainer.global_step
            )
        if self.trainer.is_global_zero:
            print(results_table(summary))
            if log_dir:
                write_atomic(Path(log_dir) / "results.json", json.dumps(summary, indent=2).encode())

    def after_predict(self) -> None:
        """PredictionsCSV has written the CSV; a picture that could not be predicted fails."""
        writer = next(c for c in self.trainer.callbacks if isinstance(c, PredictionsCSV))
        if writer.output is None:  # Lightning skips an empty predict loop without a word
            sys.exit(f"error: nothing predicted (trainer.limit_predict_batches {self.trainer.limit_predict_batches})")
        if writer.failed:
            rows = len(self.datamodule.manifest_rows)
            sys.exit(f"error: {writer.failed} of {rows} rows could not be predicted (see the error column)")


def cli_main(args=None, run: bool = True) -> AdderCLI:
    """``run=False`` only builds the model, data module and trainer from the configs (no subcommand)."""
    args = None if args is None else list(args)  # None: LightningCLI reads sys.argv
    defaults = {"default_config_files": [str(DEFAULT_CONFIG)]}  # the base of every run; --config overrides it
    parser_kwargs = (
        {"description": DESCRIPTION, "formatter_class": HelpFormatter, **{name: defaults for name in SUBCOMMANDS}}
        if run
        else defaults
    )
    with warnings.catch_warnings():  # the caller's own filters are theirs again afterwards
        for message in UNACTIONABLE_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        try:
            return AdderCLI(
                MNISTAdder,
                MNISTAdderData,
                args=args,
                run=run,
                parser_class=ShortErrorParser,
                parser_kwargs=parser_kwargs,
                auto_configure_optimizers=False,
                save_config_kwargs={"overwrite": True},  # a resumed run writes on into its own folder
                trainer_defaults={
                    "callbacks": [
                        StopOnNonFiniteLoss(),
                        SaveOnInterrupt(),
                        PredictionsCSV(),
                    ]
                },
            )
        except SIGTERMException:
            print("error: stopped by SIGTERM", file=sys.stderr)
            sys.exit(128 + signal.SIGTERM)
        except (UsageError, FloatingPointError, MNISTUnavailable, CheckpointNotWritten) as err:
            sys.exit(f"error: {err}")
        except MisconfigurationException as err:  # Lightning's word on a Trainer setting: its first line says it
            sys.exit(f"error: {str(err).strip().splitlines()[0]}")


if __name__ == "__main__":
    cli_main()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Left to the interpreter's exit, Gloo's worker threads now and then abort it (SIGABRT) after a finished run.
        torch.distributed.destroy_process_group()
