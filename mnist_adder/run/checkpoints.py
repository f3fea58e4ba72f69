"""Checkpoints: a clear word on a bad one or a resume that cannot be exact, before any work; where they
are; a last.ckpt after every epoch, and one when Ctrl-C or SIGTERM stops a fit."""

import io
import pickle
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mnist_adder.data.mnist_files import write_atomic
from mnist_adder.model.calibration import fill_temperature

LIGHTNING_NAMES = ("last", "best", "hpc", "registry")  # resolved by the Trainer itself


def read_checkpoint(path: str) -> dict | None:
    """The checkpoint at `path` (None for a name the Trainer resolves); ValueError, in one line, if unreadable."""
    if path in LIGHTNING_NAMES or path.startswith("registry:"):
        return None
    if not Path(path).is_file():
        raise ValueError(f"ckpt_path {path!r}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" not in str(err).lower():  # not a pickle of objects torch refuses: a damaged or foreign file
            raise ValueError(
                f"ckpt_path {path!r} is not a readable checkpoint (truncated or another kind of file)"
            ) from None
        raise ValueError(
            f"ckpt_path {path!r} holds objects that a checkpoint of this project never holds, and loading them "
            "could run code: it was not loaded"
        ) from None
    except Exception as err:  # a damaged or foreign file fails in many ways; each means "unreadable"
        first_line = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        raise ValueError(
            f"ckpt_path {path!r} is not a readable checkpoint (truncated or another kind of file): {first_line}"
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"ckpt_path {path!r} holds no Lightning state_dict")
    return checkpoint


def check_checkpoint(path: str, model: L.LightningModule) -> dict | None:
    """The checkpoint at `path` (None for a name the Trainer resolves); ValueError, in one line, unless it is
    a readable checkpoint of `model`'s shape."""
    checkpoint = read_checkpoint(path)
    if checkpoint is None:
        return None
    state = dict(checkpoint["state_dict"])
    fill_temperature(state)  # one saved before calibration loads with temperature 1
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    if found != expected:
        differing = sorted(set(found) ^ set(expected)) or [n for n in expected if found[n] != expected[n]]
        raise ValueError(
            f"ckpt_path {path!r} is a checkpoint of another model or other model settings "
            f"(it was saved with {checkpoint.get('hyper_parameters', {})}); differing: "
            f"{', '.join(differing[:3])}"
        )
    return checkpoint


# The data module's settings that decide the split and every pairing: a resume must keep them.
SPLIT_SETTINGS = ("seed", "val_size")
# Settings a resume may change: where the data lives and how it is held, what is tested or predicted and by how many
# workers, compilation.
FREE_ON_RESUME = ("data_dir", "on_device", "test_pairs", "predict_manifest", "predict_output", "num_workers", "compile")


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def check_resume(checkpoint: dict, path: str, model_hparams, data_hparams) -> None:
    """Raise ValueError unless resuming from `checkpoint` (read from `path`) keeps the model and the data it was
    trained with: every model and data setting but FREE_ON_RESUME."""
    saved = checkpoint.get("datamodule_hyper_parameters", {})
    changed = [
        f"{key} {saved[key]} -> {data_hparams[key]}"
        for key in SPLIT_SETTINGS
        if key in saved and saved[key] != data_hparams[key]
    ]
    if changed:
        raise ValueError(
            f"ckpt_path {path!r} was trained on another split ({', '.join(changed)}): resume with "
            f"the run's own "
            + " and ".join(
                f"--{'seed_everything' if k == 'seed' else 'data.' + k} {saved[k]}"
                for k in SPLIT_SETTINGS
                if k in saved
            )
        )
    for section, stored, now in (
        ("model", checkpoint.get("hyper_parameters", {}), model_hparams),
        ("data", saved, data_hparams),
    ):
        for key, value in stored.items():
            if key not in FREE_ON_RESUME and key in now and _plain(value) != _plain(now[key]):
                raise ValueError(
                    f"ckpt_path {path!r} was trained with {section}.{key} {_plain(value)}, this run asks for "
                    f"{_plain(now[key])}: resume with the run's own {section}.{key}, or start a new run to train "
                    "with the new value"
                )


def run_folder(checkpoint: Path) -> Path | None:
    """The run folder (…/lightning_logs/version_N) that holds this checkpoint, if it lies in one."""
    checkpoints = checkpoint.resolve().parent
    if checkpoints.name == "checkpoints" and checkpoints.parent.name.startswith("version_"):
        return checkpoints.parent
    return None


def newest_checkpoint(root: Path) -> Path | None:
    candidates = list((root / "lightning_logs").glob("version_*/checkpoints/*.ckpt"))
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


class BestAndLastCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose last.ckpt is rewritten at every epoch's save point. Since Lightning 2.6, save_last only
    writes it beside a new best, so a run killed after epochs without one would resume from far back.

    It calls four of ModelCheckpoint's private methods, as its own hooks do: pyproject.toml pins Lightning 2.6, and
    tests/test_checkpoints.py fails if last.ckpt stops following every epoch."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def _save_last_if_missed(self, trainer: L.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):  # skipped: saved at this step
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class SaveOnInterrupt(Callback):
    """Ctrl-C or SIGTERM (a scheduler's pre-emption) during fit: write last.ckpt beside the other checkpoints
    and say how to resume. Lightning's own do not fit: OnExceptionCheckpoint saves on every exception and deletes
    its file when a run ends well (so it cannot be last.ckpt), and ModelCheckpoint(save_on_exception=True) names
    its file like a top-k checkpoint, which a best-epoch=NN.ckpt that was never the best would be."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        ckpt = trainer.checkpoint_callback
        if (
            not isinstance(exception, (KeyboardInterrupt, SIGTERMException))
            or trainer.sanity_checking
            or ckpt is None
            or ckpt.dirpath is None
            or trainer.state.fn != "fit"
            or trainer.fast_dev_run
        ):
            return
        path = Path(ckpt.dirpath) / "last.ckpt"
        trainer.save_checkpoint(path)
        cause = "Ctrl-C" if isinstance(exception, KeyboardInterrupt) else "SIGTERM"
        rank_zero_info(f"Stopped by {cause}: saved {path}\nResume with the same options plus: --ckpt_path {path}")


class CheckpointNotWritten(Exception):
    """A checkpoint could not be written (a full disk, a read-only folder): the message is one line."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Every checkpoint written whole or not at all, wherever it lives: serialised in memory, written to a temporary
    file in its own folder, fsynced and renamed over its name (mnist_files.write_atomic). Lightning's own save
    stages the file in the system's temp folder and moves it, which across filesystems is a copy that a full disk
    or a crash can cut short under the checkpoint's name. Remote paths (a URL) keep Lightning's save."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, buffer.getvalue())
        except OSError as err:
            raise CheckpointNotWritten(
                f"cannot write checkpoint {path.name} in {path.parent}: {err.strerror or err}; "
                "the checkpoints already there are intact (free space, or set --trainer.default_root_dir)"
            ) from None
