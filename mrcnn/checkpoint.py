"""Training checkpoints: written atomically, read back with a clear error when they cannot be used.

A checkpoint is everything needed to continue a run exactly where it stopped (paper section 3.1
trains for 160k iterations; nobody runs that in one go):

    {"format": "mrcnn-checkpoint", "version": 1,
     "model": state dict, "optimizer": state dict, "scheduler": state dict,
     "scaler": GradScaler state dict or None, "step": optimizer steps taken,
     "config": the MaskRCNNConfig as a dict, "settings": the training settings as a dict,
     "metadata": what a user of the weights needs, e.g. {"category_names": [...]},
     "rng": {"torch": CPU generator state, "cuda": one state per device, "numpy": ..., "python": ...}}

Saving writes to a temporary file in the target's directory and then renames it over the
target with `os.replace`, which is atomic on POSIX and Windows: a crash, a full disk or a
Ctrl-C while writing leaves the previous checkpoint as it was, never half a file (and a
temporary file that a killed run left behind is removed by the next save).

Loading raises a `CheckpointError` (a `ValueError`) naming the file and the problem: missing,
not a PyTorch file (truncated, corrupt, something else), not one of ours, or weights that do
not fit the model. It uses `torch.load(weights_only=True)`, which unpickles tensors and plain
containers only, so a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mrcnn.config import MaskRCNNConfig
from mrcnn.model import MaskRCNN

FORMAT = "mrcnn-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the reason."""


class NotACheckpointError(CheckpointError):
    """A readable PyTorch file that is not one of ours (a torchvision state dict, for example)."""


def atomic_save(obj, path: str | os.PathLike) -> None:
    """`torch.save(obj)` to `path` atomically: a temporary file in the same folder, then `os.replace`.

    A write that fails (a full disk, a read-only folder) raises the `OSError` that says so, naming
    `path`, and leaves `path` as it was. The temporary files of writers that were killed before
    they could clean up (`.NAME.*.tmp`) are removed once `path` is written.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(path)) from None
    try:
        with os.fdopen(descriptor, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())  # the bytes are on disk before the name points at them
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        failed_write = error if isinstance(error, OSError) else error.__context__
        if isinstance(error, (OSError, RuntimeError)) and isinstance(failed_write, OSError):
            # torch.save reports a failed write (ENOSPC, say) as a RuntimeError about positions in its zip file
            raise OSError(failed_write.errno, failed_write.strerror, str(path)) from None
        raise
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)


def rng_states() -> dict:
    """The states of every random generator a training step may draw from."""
    numpy_state = np.random.get_state()  # ("MT19937", uint32 [624], position, has_gauss, gauss)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "python": random.getstate(),
    }


def set_rng_states(states: dict) -> None:
    """Restore what `rng_states` returned (CUDA states only when as many devices are present)."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    keys, *rest = states["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    config: MaskRCNNConfig,
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    scaler=None,
    settings: dict | None = None,
    metadata: dict | None = None,
) -> None:
    """Write a checkpoint of a run after `step` optimizer steps (module docstring), atomically."""
    atomic_save(
        {
            "format": FORMAT,
            "version": VERSION,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            "step": int(step),
            "config": dataclasses.asdict(config),
            "settings": dict(settings or {}),
            "metadata": dict(metadata or {}),
            "rng": rng_states(),
        },
        path,
    )


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by `save_checkpoint`; a `CheckpointError` says why one cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, random bytes, a pickle of arbitrary objects, ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {path} is not a readable PyTorch file ({reason[:200]})") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise NotACheckpointError(f"{path} is not an mrcnn training checkpoint (no '{FORMAT}' marker); "
                              "a torchvision state dict loads with mrcnn.weights instead")  # fmt: skip
    if checkpoint.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has version {checkpoint.get('version')}, this code reads {VERSION}")
    return checkpoint


def config_from_checkpoint(checkpoint: dict, path: str | os.PathLike = "checkpoint") -> MaskRCNNConfig:
    """The `MaskRCNNConfig` a checkpoint was trained with."""
    fields = {field.name for field in dataclasses.fields(MaskRCNNConfig)}
    saved = dict(checkpoint["config"])
    if saved.get("fpn") is True and "architecture" not in saved:  # before `architecture` replaced it, every model was FPN
        del saved["fpn"]
    unknown = sorted(set(saved) - fields)
    if unknown:
        raise CheckpointError(f"{path}: its config has fields this code does not know: {', '.join(unknown)}")
    try:
        return MaskRCNNConfig(**saved)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: its config is not valid here: {error}") from error


def load_model_state(model: nn.Module, checkpoint: dict, path: str | os.PathLike = "checkpoint") -> None:
    """Load a checkpoint's weights into `model`, strictly; a `CheckpointError` lists what does not fit."""
    state = checkpoint["model"]
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        problems = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong_shape)):
            if keys:
                problems.append(f"{len(keys)} {name} (e.g. {keys[0]})")
        raise CheckpointError(f"{path} does not fit this model: weights " + ", ".join(problems))
    model.load_state_dict(state)


def model_from_checkpoint(checkpoint: dict, path: str | os.PathLike = "checkpoint") -> nn.Module:
    """The `MaskRCNN` a checkpoint holds: built from its config, its weights loaded strictly
    (in training mode, as a new model is). A `CheckpointError` if either does not fit this code."""
    model = MaskRCNN(config_from_checkpoint(checkpoint, path))
    load_model_state(model, checkpoint, path)
    return model
