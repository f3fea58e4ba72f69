"""Command line: `python cli.py fit|validate|test|predict [--config FILE] [--key value ...]`."""

import sys
import time
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from checkpoints import SaveOnInterrupt, check_checkpoint, read_checkpoint
from datamodule import MNISTAdderData
from lightning_module import MNISTAdder
from mnist_files import MNISTUnavailable, write_atomic
from photos import fill_predictions, predictions_csv, predictions_table

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"


class ShortErrorParser(LightningArgumentParser):
    """A bad option ends in its one error line and a tip, without the usage wall; --help shows it all."""

    def print_usage(self, file=None) -> None:
        pass


class AdderCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/sum_acc", "checkpoint.mode": "max",
                             "checkpoint.save_last": True, "checkpoint.filename": "best-{epoch:02d}"})
        # One seed decides the initial weights, the augmentation, the split and every pairing.
        parser.link_arguments("seed_everything", "data.seed")

    def _check_ckpt_path(self) -> None:
        path = self.config[self.subcommand].get("ckpt_path")
        if path:
            check_checkpoint(str(path), self.model)

    def before_fit(self) -> None:
        if self.trainer.max_epochs == 0:
            raise ValueError("trainer.max_epochs must be >= 1 (or -1 for no limit)")
        self.model.optimizer(self.model.parameters())  # a bad optimizer setting fails here, before any work
        self._check_ckpt_path()
        self._fit_start = time.perf_counter()

    before_validate = before_test = before_predict = _check_ckpt_path

    def after_fit(self) -> None:
        """Test the best checkpoint (chosen on validation) on the official test set and print a summary."""
        fit_seconds = time.perf_counter() - self._fit_start
        if self.trainer.interrupted:
            return
        best = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
        results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)
        metrics = {k: v for result in results for k, v in result.items()}
        rows = [("checkpoint", best or "(weights at the end of fit)"), ("fit time", f"{fit_seconds:.1f} s")]
        rows += [(label, f"{100 * metrics[key]:.2f} %") for key, label in (
            ("test/digit_acc", "digit accuracy (fixed pairs)"), ("test/sum_acc", "sum accuracy (fixed pairs)"),
            ("test/sum_acc_all_pairs", "sum accuracy (each image with all 10 numbers)")) if key in metrics]
        width = max(len(label) for label, _ in rows)
        if self.trainer.is_global_zero:
            print("\n".join(["", "Official MNIST test set", *(f"  {a:<{width}}  {b}" for a, b in rows)]))


    def after_predict(self) -> None:
        """For a manifest of pictures: write the predictions CSV (atomically), print it, fail if a row failed."""
        rows = getattr(self.datamodule, "manifest_rows", None)
        if rows is None:
            return
        fill_predictions(rows, self.trainer.predict_loop.predictions)
        output = Path(self.datamodule.hparams.predict_output or Path(self.trainer.log_dir) / "predictions.csv")
        output.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(output, predictions_csv(rows))
        print(f"{predictions_table(rows)}\n\npredictions written to {output}")
        failed = sum(bool(row["error"]) for row in rows)
        if failed:
            sys.exit(f"error: {failed} of {len(rows)} rows could not be predicted (see the error column)")


def cli_main(args=None, run: bool = True) -> AdderCLI:
    """``run=False`` only builds the model, data module and trainer from the configs (no subcommand)."""
    args = sys.argv[1:] if args is None else list(args)
    if not run or (args and args[0] in ("fit", "validate", "test", "predict")):
        # configs/default.yaml is the base of every run; a --config given after it overrides it.
        at = int(run)
        args = [*args[:at], "--config", str(DEFAULT_CONFIG), *args[at:]]
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # args is argv, extended above
    try:
        for option, value in zip(args, args[1:] + [""]):  # read before LightningCLI takes hyperparameters from it
            if option.startswith("--ckpt_path"):
                read_checkpoint(option.partition("=")[2] or value)
        return AdderCLI(MNISTAdder, MNISTAdderData, args=args, run=run, seed_everything_default=0,
                        parser_class=ShortErrorParser, auto_configure_optimizers=False,
                        trainer_defaults={"callbacks": [SaveOnInterrupt()]})
    except (ValueError, FloatingPointError, MNISTUnavailable) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    cli_main()
