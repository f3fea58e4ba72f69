"""Checkpoints: a clear word on a bad one, before any work; the settings a checkpoint decides on resume; where they
are; one written when Ctrl-C or SIGTERM stops a fit; every one written whole."""

import io
import pickle
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mnist_adder.data.mnist_files import write_atomic
from mnist_adder.errors import UsageError

TRAINER_NAMES = ("hpc", "registry")  # resolved by the Trainer itself; "last" and "best" by `find_checkpoint`


def find_checkpoint(path: str, root: Path) -> str:
    """`path`; for "last", the newest run's last.ckpt under `root` (the Trainer would look in this run's new, empty
    folder, and train from scratch). UsageError, in one line, if there is none, and for "best": the Trainer's best
    of a fit in this same process, which a command never has."""
    if path == "best":
        newest = newest_checkpoint(root, "best-*.ckpt")
        raise UsageError(
            "ckpt_path 'best' is the best checkpoint of a fit in this same process: name the file"
            + (f", e.g. --ckpt_path {newest}" if newest else "")
        )
    if path != "last":
        return path
    newest = newest_checkpoint(root, "last.ckpt")
    if newest is None:
        raise UsageError(
            f"ckpt_path 'last': no last.ckpt in {root / 'lightning_logs'}/version_*/checkpoints "
            f"or {root / 'checkpoints'}"
        )
    rank_zero_info(f"ckpt_path last: {newest}")
    return str(newest)


def load_for_inference(model_class: type[L.LightningModule], path: str) -> L.LightningModule:
    """The `model_class` of the checkpoint at `path` (or "last"), on the CPU in eval mode; UsageError, in one line,
    for a missing, unreadable or foreign file."""
    path = find_checkpoint(path, Path("."))
    read_checkpoint(path)
    return model_class.load_from_checkpoint(path, map_location="cpu").eval()


def read_checkpoint(path: str, trainer_names: bool = False) -> dict | None:
    """The checkpoint at `path`; with `trainer_names`, None for the names a Trainer resolves (`TRAINER_NAMES`).
    UsageError, in one line, if unreadable."""
    if trainer_names and (path in TRAINER_NAMES or path.startswith("registry:")):
        return None
    if not Path(path).is_file():
        raise UsageError(
            f"ckpt_path {path!r}: " + ("a folder, not a checkpoint file" if Path(path).is_dir() else "no such file")
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" not in str(err).lower():  # not a pickle of objects torch refuses: a damaged or foreign file
            raise UsageError(
                f"ckpt_path {path!r} is not a readable checkpoint (truncated or another kind of file)"
            ) from None
        raise UsageError(
            f"ckpt_path {path!r} holds objects that a checkpoint of this project never holds, and loading them "
            "could run code: it was not loaded"
        ) from None
    except Exception as err:  # a damaged or foreign file fails in many ways; each means "unreadable"
        first_line = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        raise UsageError(
            f"ckpt_path {path!r} is not a readable checkpoint (truncated or another kind of file): {first_line}"
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise UsageError(f"ckpt_path {path!r} holds no Lightning state_dict")
    return checkpoint


def check_weights(checkpoint: dict, path: str, model: L.LightningModule) -> None:
    """UsageError, in one line, unless `checkpoint` (read from `path`) holds weights of `model`'s shape."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in checkpoint["state_dict"].items()}
    if found != expected:
        differing = sorted(set(found) ^ set(expected)) or [n for n in expected if found[n] != expected[n]]
        raise UsageError(
            f"ckpt_path {path!r} is a checkpoint of another model or other model settings (it was saved with "
            f"{checkpoint.get('hyper_parameters', {})}); differing: {', '.join(differing[:3])}"
        )


# Data settings a checkpoint leaves to the run: where the data lives and how it is held, what is tested or predicted
# and by how many workers. Evaluation also leaves the training-only ones.
FREE = (
    "data.data_dir",
    "data.on_device",
    "data.num_workers",
    "data.test_pairs",
    "data.predict_manifest",
    "data.predict_output",
)
FREE_IN_EVALUATION = ("data.batch_size", "data.rotate", "data.translate", "data.scale", "data.non_digits")


def flat(value, prefix: str = "") -> dict:
    """A nested config (dicts, or jsonargparse Namespaces) as {dotted key: plain value}; tuples as lists."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): list(value) if isinstance(value, tuple) else value}


def checkpoint_settings(checkpoint: dict) -> dict:
    """What a checkpoint decides, as {dotted key: value}: its model settings (optimizer and scheduler included when
    LightningCLI built the model), its data settings, and the seed."""

    def settings(section: str) -> dict:  # without the instantiator LightningCLI records beside them
        return {k: v for k, v in checkpoint.get(section, {}).items() if k != "_instantiator"}

    model, data = settings("hyper_parameters"), settings("datamodule_hyper_parameters")
    seed = {"seed_everything": data.pop("seed")} if "seed" in data else {}
    return {**flat(model, "model."), **flat(data, "data."), **seed}


def named_settings(args: list[str], config_files) -> set[str]:
    """The dotted keys a run names itself, on the command line or in a --config file, whatever their value. A
    section given whole (`--data FILE` or `--data '{...}'`, as jsonargparse takes it) names the keys it holds."""
    names = set()
    for arg, following in zip(args, [*args[1:], ""]):
        name, equals, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        section = yaml_dict(value if equals else following) if name in ("model", "data") else None
        names |= {f"{name}.{key}" for key in flat(section)} if section else {name} - {""}
    for file in map(Path, map(str, config_files)):
        if file.is_file():
            names |= set(flat(yaml.safe_load(file.read_text()) or {}))
    return names


def yaml_dict(value: str) -> dict | None:
    """`value` as jsonargparse reads a section's value: a YAML file's content or inline YAML; None unless a dict."""
    try:
        loaded = yaml.safe_load(Path(value).read_text() if Path(value).is_file() else value)
    except (OSError, yaml.YAMLError):
        return None
    return loaded if isinstance(loaded, dict) else None


def apply_checkpoint(config, defaults, named: set[str], checkpoint: dict, path: str, evaluating: bool) -> None:
    """LightningCLI's rule, for the data and the seed as for the model: the checkpoint decides. A setting this run
    gives (`named`, or one that differs from its default) and the checkpoint contradicts ends in UsageError, in one
    line; the data settings and seed it does not give become the checkpoint's, in `config`. LightningCLI itself then
    puts the checkpoint's model settings in."""
    saved, asked, default = checkpoint_settings(checkpoint), flat(config), flat(defaults)
    unknown = sorted(k for k in saved if k.startswith("model.") and k.split(".")[1] not in config.model)
    if unknown:
        raise UsageError(
            f"ckpt_path {path!r} was written by another version of this model (settings it no longer has: "
            f"{', '.join(unknown)}): train it anew with `python cli.py fit`"
        )
    free = FREE + FREE_IN_EVALUATION * evaluating
    for key, value in saved.items():
        if key.startswith(free) or key not in asked:
            continue
        given = asked[key] != default.get(key) or any(key == n or key.startswith(f"{n}.") for n in named)
        if given and asked[key] != value:
            raise UsageError(
                f"ckpt_path {path!r} was trained with {key} {value}, this run sets {asked[key]}: leave the option "
                "out (the checkpoint decides), or start a new run without --ckpt_path"
            )
        if not key.startswith("model."):
            config[key] = value


def run_folder(checkpoint: Path) -> Path | None:
    """The run folder (…/lightning_logs/version_N) that holds this checkpoint, if it lies in one."""
    checkpoints = checkpoint.resolve().parent
    if checkpoints.name == "checkpoints" and checkpoints.parent.name.startswith("version_"):
        return checkpoints.parent
    return None


def newest_checkpoint(root: Path, name: str = "*.ckpt") -> Path | None:
    """The newest `name` where ModelCheckpoint writes under `root`: a run's folder, or checkpoints/ with no logger."""
    candidates = [*(root / "lightning_logs").glob(f"version_*/checkpoints/{name}"), *root.glob(f"checkpoints/{name}")]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


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
        if isinstance(exception, KeyboardInterrupt) and trainer.world_size > 1:  # saving waits for every process
            rank_zero_info(
                "Stopped by Ctrl-C: nothing saved, as each process stopped at another step (the last checkpoint "
                "stays). SIGTERM (kill PID) stops them all at one step, and saves."
            )
            return
        path = Path(ckpt.dirpath) / "last.ckpt"
        trainer.save_checkpoint(path)
        cause = "Ctrl-C" if isinstance(exception, KeyboardInterrupt) else "SIGTERM"
        rank_zero_info(f"Stopped by {cause}: saved {path}\nResume with the same options plus: --ckpt_path {path}")


def is_url(path) -> bool:
    """A URL (s3://..., memory://...) names a place fsspec writes to, not a local file or folder."""
    return "://" in str(path)


class CheckpointNotWritten(Exception):
    """A checkpoint could not be written (a full disk, a read-only folder): the message is one line."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Every checkpoint written whole or not at all, wherever it lives: serialised in memory, written to a temporary
    file in its own folder, fsynced and renamed over its name (mnist_files.write_atomic). Lightning's own save
    stages the file in the system's temp folder and moves it, which across filesystems is a copy that a full disk
    or a crash can cut short under the checkpoint's name. Remote paths (a URL) keep Lightning's save."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if is_url(path):
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
