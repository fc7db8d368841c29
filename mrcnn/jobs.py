"""What the `mrcnn` command, the demo and the experiments share: the doors between a user and the library.

Each function here takes what a user typed (a path, a device name, an option's value), checks
it, and either returns the library's object or raises a `UsageError` whose message is the one
line the user reads (the CLI prints it and exits with status 2). The library itself
(mrcnn/train.py, mrcnn/evaluate.py, ...) then trusts its inputs.

- the machine: `choose_device`, `set_threads`;
- the files: `output_directory`, `open_dataset`, `load_weights`, `prepare_run_directory`
  (a folder that holds a training run is continued or started over only when asked);
- a training run: `training_settings`, `run_training` (what `mrcnn train` and `mrcnn demo` do);
- the results: `class_names_for`, `metrics_table`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from mrcnn.checkpoint import CheckpointError, NotACheckpointError, load_checkpoint, model_from_checkpoint
from mrcnn.config import PRESETS
from mrcnn.data.coco import CocoDataset, DatasetError
from mrcnn.model import MaskRCNN
from mrcnn.train import CHECKPOINT_NAME, LOG_NAME, NonFiniteError, paper_schedule, train
from mrcnn.weights import from_torchvision, load_torchvision_resnet_backbone

METRIC_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LOSS_CURVE_NAME = "loss_curve.png"


class UsageError(Exception):
    """A mistake in how a command was called: reported in one line, exit status 2."""


def is_first_process() -> bool:
    """True but in the processes of rank >= 1 that torchrun starts (only the first one reports)."""
    return int(os.environ.get("RANK", "0")) == 0


# --- the machine ----------------------------------------------------------------------------------


def choose_device(name: str | None) -> torch.device:
    """`--device` as a torch.device (default: CUDA when there is one); a `UsageError` if unusable."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (try cpu, cuda or cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def set_threads(threads: int | None) -> None:
    """`--threads`: torch's CPU threads (None: torch's choice)."""
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


# --- the files ------------------------------------------------------------------------------------


def output_directory(path: Path) -> Path:
    """Create `path` if needed; a `UsageError` if it is a file or cannot be created."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output-dir {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create --output-dir {path}: {error.strerror or error}") from None
    return path


def open_dataset(root: Path, split: str, contiguous_labels: bool = True, train: bool = False) -> CocoDataset:
    """The `CocoDataset` of `ROOT/SPLIT` (images in `ROOT/SPLIT/`, annotations in
    `ROOT/annotations/instances_SPLIT.json`); a `UsageError` if it is missing or broken."""
    annotations = root / "annotations" / f"instances_{split}.json"
    if not annotations.is_file():
        raise UsageError(f"no annotation file {annotations} (expected ROOT/annotations/instances_{split}.json; "
                         "make one with `mrcnn shapes`)")  # fmt: skip
    try:
        return CocoDataset(root / split, annotations, remove_images_without_annotations=train,
                           contiguous_labels=contiguous_labels)  # fmt: skip
    except DatasetError as error:
        raise UsageError(str(error)) from None


def load_weights(path: Path | None, config_name: str | None, num_classes: int | None = None) -> tuple:
    """A model and its metadata: fresh from the preset, or with the weights in `path`.

    Our checkpoints bring their own config (a `--config` is then ignored); a torchvision state
    dict takes `--config` (default: its preset). Returns `(model, metadata, source)` with source
    "new", "checkpoint" or "torchvision". A new model's weights are drawn from torch's generator:
    seed it first for the same weights every time.
    """
    if path is None:
        preset = PRESETS[config_name or "shapes_small"]
        return MaskRCNN(preset(num_classes) if num_classes else preset()), {}, "new"
    try:
        checkpoint = load_checkpoint(path)
    except NotACheckpointError:
        checkpoint = None
    except CheckpointError as error:
        raise UsageError(f"--weights: {error}") from None
    if checkpoint is not None:
        try:
            model = model_from_checkpoint(checkpoint, path)
        except CheckpointError as error:
            raise UsageError(f"--weights: {error}") from None
        return model, checkpoint.get("metadata", {}), "checkpoint"
    try:
        model = from_torchvision(path, PRESETS[config_name]() if config_name else None)
    except ValueError as error:
        raise UsageError(f"--weights: {error}") from None
    return model, {}, "torchvision"


def prepare_run_directory(directory: Path, resume: bool, overwrite: bool) -> None:
    """Never mix two training runs in one folder.

    A folder that holds a run (`checkpoint.pt` or `log.jsonl`) is continued with `resume`, or
    started over with `overwrite` (its checkpoint, log and loss curve are deleted first, and the
    command says so); with neither, a `UsageError`. `resume` needs a checkpoint to continue from.
    """
    checkpoint, log = directory / CHECKPOINT_NAME, directory / LOG_NAME
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other: continue the run, or start it over")
    if resume:
        if not checkpoint.is_file():
            raise UsageError(f"--resume: there is no checkpoint {checkpoint} to continue from")
        return
    held = [path for path in (checkpoint, log) if path.is_file()]
    if not held:
        return
    names = " and ".join(path.name for path in held)
    if not overwrite:
        raise UsageError(f"--output-dir {directory} holds a training run ({names}); "
                         "use --resume to continue or --overwrite to start over")  # fmt: skip
    if is_first_process():
        steps = len(log.read_text().splitlines()) if log.is_file() else None
        logged = f", {steps} steps logged" if steps is not None else ""
        print(f"--overwrite: starting over in {directory}, replacing its {names}{logged}", flush=True)
    for path in (checkpoint, log, directory / LOSS_CURVE_NAME):
        path.unlink(missing_ok=True)  # under torchrun every process gets here; the first one deletes


# --- a training run -------------------------------------------------------------------------------


def training_settings(args: argparse.Namespace, num_images: int):
    """The `TrainSettings` of `mrcnn train` and `mrcnn demo`: the paper's schedule, scaled."""
    iterations = args.iterations
    if args.epochs is not None:
        iterations = max(1, round(args.epochs * (num_images // args.batch_size)))
    extra = {} if args.warmup is None else {"warmup_iterations": args.warmup}
    try:
        return paper_schedule(args.batch_size, args.schedule, args.lr, iterations, clip_grad_norm=args.clip_grad_norm,
                              amp=args.amp, seed=args.seed, checkpoint_every=args.checkpoint_every,
                              workers=args.workers, flip=not args.no_flip, **extra)  # fmt: skip
    except ValueError as error:
        raise UsageError(str(error)) from None


def run_training(args: argparse.Namespace, dataset, output_dir: Path) -> tuple:
    """Build the model, train it, return (model, summary); shared by `mrcnn train` and `mrcnn demo`.

    The model's initial weights are drawn after `torch.manual_seed(--seed)`: with the same
    command, seed and thread count, two runs give the same losses and weights, bit for bit.
    """
    prepare_run_directory(output_dir, args.resume, args.overwrite)
    device = choose_device(args.device)
    set_threads(args.threads)
    torch.manual_seed(args.seed)  # the initial weights
    model, _, _ = load_weights(args.weights, args.config, dataset.num_classes)
    if getattr(args, "backbone_weights", None) is not None:  # the paper's ImageNet initialization
        if not args.backbone_weights.is_file():
            raise UsageError(f"--backbone-weights {args.backbone_weights} does not exist")
        try:
            load_torchvision_resnet_backbone(model, args.backbone_weights)
        except ValueError as error:
            raise UsageError(f"--backbone-weights: {error}") from None
    if model.config.num_classes != dataset.num_classes:
        raise UsageError(f"the model has {model.config.num_classes} classes, the data set {dataset.num_classes}")
    settings = training_settings(args, len(dataset))
    metadata = {"category_names": list(dataset.category_names),
                "label_to_category_id": {str(k): v for k, v in dataset.label_to_category_id.items()}}  # fmt: skip
    try:
        summary = train(model, dataset, settings, output_dir, device, resume=args.resume, metadata=metadata)
    except CheckpointError as error:
        raise UsageError(f"--resume: {error}") from None
    except NonFiniteError as error:
        print(f"mrcnn: training stopped: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except ValueError as error:  # settings that do not fit the data or the resumed run
        raise UsageError(str(error)) from None
    return model, summary


# --- the results ----------------------------------------------------------------------------------


def class_names_for(model, metadata: dict, dataset=None) -> list[str]:
    """Names indexed by label: the checkpoint's, else the data set's, else "class k"."""
    names = metadata.get("category_names") or (list(dataset.category_names) if dataset is not None else None)
    return list(names) if names else ["__background__"] + [f"class {k}" for k in range(1, model.config.num_classes)]


def metrics_table(metrics: dict) -> str:
    """COCO metrics {"segm": {...}, "bbox": {...}} as a small text table (values in %, "-": no such objects)."""
    lines = ["       " + "".join(f"{c:>7}" for c in METRIC_COLUMNS)]
    for iou_type, name in (("segm", "mask"), ("bbox", "box")):
        if iou_type in metrics:
            values = (metrics[iou_type][c] for c in METRIC_COLUMNS)
            lines.append(f"{name:<7}" + "".join(f"{100 * v:7.1f}" if v >= 0 else f"{'-':>7}" for v in values))
    return "\n".join(lines)

