"""Checkpoints: a clear word on a bad one before any work, and a last.ckpt when Ctrl-C stops a fit."""

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

LIGHTNING_NAMES = ("last", "best", "hpc", "registry")  # resolved by the Trainer itself


def read_checkpoint(path: str) -> dict | None:
    """The checkpoint at `path` (None for a name the Trainer resolves); ValueError, in one line, if unreadable."""
    if path in LIGHTNING_NAMES or path.startswith("registry:"):
        return None
    if not Path(path).is_file():
        raise ValueError(f"ckpt_path {path!r}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged or foreign file fails in many ways; each means "unreadable"
        first_line = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        raise ValueError(f"ckpt_path {path!r} is not a readable checkpoint (truncated or another kind "
                         f"of file): {first_line}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"ckpt_path {path!r} holds no Lightning state_dict")
    return checkpoint


def check_checkpoint(path: str, model: L.LightningModule) -> None:
    """Raise ValueError, in one line, unless `path` is a readable checkpoint of `model`'s shape."""
    checkpoint = read_checkpoint(path)
    if checkpoint is None:
        return
    state = checkpoint["state_dict"]
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    if found != expected:
        differing = sorted(set(found) ^ set(expected)) or [n for n in expected if found[n] != expected[n]]
        raise ValueError(f"ckpt_path {path!r} is a checkpoint of another model or other model settings "
                         f"(it was saved with {checkpoint.get('hyper_parameters', {})}); differing: "
                         f"{', '.join(differing[:3])}")


class SaveOnInterrupt(Callback):
    """Ctrl-C during fit: write last.ckpt beside the other checkpoints and say how to resume."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        ckpt = trainer.checkpoint_callback
        if not isinstance(exception, KeyboardInterrupt) or trainer.sanity_checking or ckpt is None \
                or ckpt.dirpath is None or trainer.state.fn != "fit" or trainer.fast_dev_run:
            return
        path = Path(ckpt.dirpath) / "last.ckpt"
        trainer.save_checkpoint(path)
        rank_zero_info(f"Stopped by Ctrl-C: saved {path}\n"
                       f"Resume with the same options plus: --ckpt_path {path}")
