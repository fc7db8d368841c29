"""What the `mrcnn` command, the demo and the experiments share: the doors between a user and the library.

Each function here takes what a user typed (a path, a device name, an option's value), checks
it, and either returns the library's object or raises a `UsageError` whose message is the one
line the user reads (the CLI prints it and exits with status 2). The library itself
(mrcnn/train.py, mrcnn/evaluate.py, ...) then trusts its inputs.

- the machine: `choose_device`, `set_threads`, `check_amp`;
- the files: `output_directory`, `open_dataset` (instances, or keypoints from a
  `person_keypoints_*.json`), `load_weights` (a model to run), `check_classes` (the model's
  classes are the data's), `prepare_run_directory` (a folder that holds a training run is
  continued or started over only when asked);
- a training run: `training_config` and `training_model` (the model to train, for the data's
  classes, from pretrained weights of any class count), `training_settings`, `run_training`
  (what `mrcnn train` and `mrcnn demo` do);
- the results: `class_names_for`, `metrics_table`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from mrcnn.checkpoint import (
    CheckpointError,
    NotACheckpointError,
    config_from_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
)
from mrcnn.config import (
    PRESETS,
    MaskRCNNConfig,
    figures_small,
    from_scratch,
    shapes_small,
    torchvision_keypointrcnn_resnet50_fpn,
    torchvision_maskrcnn_resnet50_fpn,
)
from mrcnn.data.coco import CocoDataset, DatasetError
from mrcnn.data.keypoints import KEYPOINT_NAMES, KeypointCocoDataset
from mrcnn.model import MaskRCNN
from mrcnn.train import CHECKPOINT_NAME, LOG_NAME, NonFiniteError, paper_schedule, train
from mrcnn.weights import (
    from_torchvision,
    from_torchvision_keypoint_rcnn,
    load_pretrained,
    load_state_dict_file,
    load_torchvision_resnet_backbone,
)

METRIC_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LOSS_CURVE_NAME = "loss_curve.png"
TORCHVISION_CLASSES = "roi_heads.box_predictor.cls_score.weight"  # [K, 1024] in a torchvision detection state dict
TORCHVISION_KEYPOINTS = "roi_heads.keypoint_predictor.kps_score_lowres.weight"  # [C, J, 4, 4] in a Keypoint R-CNN


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


def check_amp(amp: str, device: torch.device) -> None:
    """`--amp` on `device`, refused before any work where it cannot run: float16 needs CUDA (a CPU
    has no fast float16, and its GradScaler is CUDA's); bfloat16 runs on a CPU too, training included."""
    if amp == "fp16" and device.type != "cuda":
        raise UsageError(f"--amp fp16 needs a CUDA device, got {device}; on a CPU use --amp bf16")


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


def open_dataset(root: Path, split: str, contiguous_labels: bool = True, train: bool = False,
                 verify_images: bool = True, annotations: Path | None = None) -> CocoDataset:  # fmt: skip
    """The data set of `ROOT/SPLIT`: the images in `ROOT/SPLIT/`, the annotations in `annotations`
    (`--annotations`) if given, else `ROOT/annotations/instances_SPLIT.json`, else
    `ROOT/annotations/person_keypoints_SPLIT.json`. A file named `person_keypoints_*.json` (COCO's
    keypoint files, `generate_figures`'s) is read with its keypoints (`KeypointCocoDataset`), any
    other as instances (`CocoDataset`). verify_images: decode every image now (`CocoDataset`), or
    find a broken one when it is read. A `UsageError` if the data set is missing or broken."""
    if annotations is None:
        folder = root / "annotations"
        candidates = (folder / f"instances_{split}.json", folder / f"person_keypoints_{split}.json")
        annotations = next((path for path in candidates if path.is_file()), None)
        if annotations is None:
            raise UsageError(f"no annotation file {candidates[0]} (expected ROOT/annotations/instances_{split}.json, or "
                             f"person_keypoints_{split}.json for keypoints; make one with `mrcnn shapes`)")  # fmt: skip
    elif not annotations.is_file():
        raise UsageError(f"--annotations {annotations} does not exist")
    kind = KeypointCocoDataset if annotations.name.startswith("person_keypoints") else CocoDataset
    try:
        return kind(root / split, annotations, remove_images_without_annotations=train,
                    contiguous_labels=contiguous_labels, verify_images=verify_images)  # fmt: skip
    except DatasetError as error:
        raise UsageError(str(error)) from None


def read_checkpoint(path: Path) -> dict | None:
    """Our checkpoint in `path`, or None for a PyTorch file that is not one (a torchvision state dict)."""
    try:
        return load_checkpoint(path)
    except NotACheckpointError:
        return None
    except CheckpointError as error:
        raise UsageError(f"--weights: {error}") from None


def read_state_dict(path: Path) -> dict:
    """The tensors of a weights file that is not our checkpoint (torchvision's detection models, an ImageNet ResNet)."""
    try:
        return load_state_dict_file(path)
    except ValueError as error:
        raise UsageError(f"--weights: {error}") from None


def _weights_error(path: Path, error: ValueError) -> UsageError:
    """A `ValueError` of mrcnn/weights.py about the tensors of `path`, as the user's one line."""
    return UsageError(f"--weights {path}: {str(error).removeprefix('state dict: ')}")


def load_weights(path: Path | None, config_name: str | None) -> tuple:
    """A model to run (evaluate, predict, export) and its metadata: fresh from the preset, or with the weights in `path`.

    Our checkpoints bring their own config (a `--config` is then ignored); a torchvision
    `maskrcnn_resnet50_fpn` or `keypointrcnn_resnet50_fpn` state dict takes `--config` (default:
    torchvision's preset) with the file's number of classes (and keypoints). Returns `(model,
    metadata, source)` with source "new", "checkpoint" or "torchvision". A new model's weights are
    drawn from torch's generator: seed it first for the same weights every time.
    """
    if path is None:
        return MaskRCNN(PRESETS[config_name or "shapes_small"]()), {}, "new"
    checkpoint = read_checkpoint(path)
    if checkpoint is not None:
        try:
            model = model_from_checkpoint(checkpoint, path)
        except CheckpointError as error:
            raise UsageError(f"--weights: {error}") from None
        return model, checkpoint.get("metadata", {}), "checkpoint"
    state_dict = read_state_dict(path)
    config = PRESETS[config_name]() if config_name else None
    try:
        if TORCHVISION_KEYPOINTS in state_dict and TORCHVISION_CLASSES in state_dict:
            counts = {"num_classes": len(state_dict[TORCHVISION_CLASSES]), "num_keypoints": state_dict[TORCHVISION_KEYPOINTS].shape[1]}
            model = from_torchvision_keypoint_rcnn(state_dict, config.replace(**counts) if config else None)
        else:  # the file's class count, whatever the preset's
            counts = {"num_classes": len(state_dict[TORCHVISION_CLASSES])} if TORCHVISION_CLASSES in state_dict else {}
            model = from_torchvision(state_dict, config.replace(**counts, num_keypoints=0) if config else None)
    except ValueError as error:
        raise _weights_error(path, error) from None
    return model, {}, "torchvision"


def check_classes(model: MaskRCNN, metadata: dict, dataset, weights: Path) -> None:
    """Before scoring `model` on `dataset`: its classes must be the data set's, or the scores mean nothing.

    The class count always; the names of the classes, label by label, when the checkpoint's metadata
    has them (a data set whose categories are renumbered or reordered gives its labels other names);
    the keypoints' count and names when the data set has keypoints. A `UsageError` otherwise.
    """
    where = getattr(dataset, "annotation_file", "the data set")
    names, data_names = metadata.get("category_names"), list(dataset.category_names)
    if model.config.num_classes != dataset.num_classes:
        theirs = f" ({_some(names[1:])})" if names else ""
        raise UsageError(f"--weights {weights} has {model.config.num_classes - 1} classes{theirs}, {where} has "
                         f"{dataset.num_classes - 1} ({_some(data_names[1:])}): score a model trained on these categories")  # fmt: skip
    if names and list(names) != data_names:
        raise UsageError(f"--weights {weights} has the classes {_some(names[1:])} (labels 1, 2, ...) but {where} gives "
                         f"these labels to {_some(data_names[1:])}: its categories are named or numbered otherwise")  # fmt: skip
    keypoint_names = tuple(getattr(dataset, "keypoint_names", ()))
    if keypoint_names and model.config.num_keypoints != len(keypoint_names):
        raise UsageError(f"--weights {weights} predicts {model.config.num_keypoints} keypoints, {where} has "
                         f"{len(keypoint_names)} ({_some(keypoint_names)})")  # fmt: skip
    if keypoint_names and metadata.get("keypoint_names") and tuple(metadata["keypoint_names"]) != keypoint_names:
        raise UsageError(f"--weights {weights} has the keypoints {_some(metadata['keypoint_names'])}, {where} "
                         f"{_some(keypoint_names)}")  # fmt: skip


def _some(names, shown: int = 5) -> str:
    names = list(names)
    return ", ".join(map(str, names[:shown])) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


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
    """The `TrainSettings` of `mrcnn train` and `mrcnn demo`: the paper's schedule, scaled, and
    unless --no-flip, horizontal flipping."""
    iterations = args.iterations
    if args.epochs is not None:
        iterations = max(1, round(args.epochs * (num_images // args.batch_size)))
    extra = {} if args.warmup is None else {"warmup_iterations": args.warmup}
    if getattr(args, "forward", None) is not None:  # --forward batched / per-image; else the device decides
        extra["batched_forward"] = args.forward == "batched"
    try:
        return paper_schedule(args.batch_size, args.schedule, args.lr, iterations, clip_grad_norm=args.clip_grad_norm,
                              amp=args.amp, seed=args.seed, checkpoint_every=args.checkpoint_every,
                              workers=args.workers, flip=not args.no_flip, **extra)  # fmt: skip
    except ValueError as error:
        raise UsageError(str(error)) from None


def training_config(args: argparse.Namespace, dataset, checkpoint: dict | None, state_dict: dict | None) -> MaskRCNNConfig:
    """The config `mrcnn train` builds its model from: a preset, the data set's counts, the user's options.

    The preset: `--config` if given; else the checkpoint's own config (`--weights` of ours); else
    torchvision's Mask R-CNN preset for a torchvision or ImageNet file (its Keypoint R-CNN preset
    for a keypoint data set; ResNet-101 when the file's res4 has 23 blocks); else `figures_small`
    for the stick figures, `torchvision_keypointrcnn_resnet50_fpn` for other keypoints and
    `shapes_small` for instances. num_classes (and num_keypoints) are the data set's. A
    ResNet-50/101 with no pretrained weights at all trains from scratch (`from_scratch`, said in one
    line). Then `--norm`, `--head-norm` and `--freeze-at N`: the stem and the first N - 1 residual
    stages frozen (Detectron2's FREEZE_AT: 0 nothing, 2 the stem and res2 as the ResNet-50 presets,
    5 everything), which is `trainable_stages = 5 - N` (torchvision's trainable_layers).
    """
    num_keypoints = len(getattr(dataset, "keypoint_names", ()))
    if args.config is not None:
        config = PRESETS[args.config]()
    elif checkpoint is not None:
        try:
            config = config_from_checkpoint(checkpoint, args.weights)
        except CheckpointError as error:
            raise UsageError(f"--weights: {error}") from None
    elif state_dict is not None:  # torchvision's Mask R-CNN or Keypoint R-CNN, or an ImageNet ResNet
        config = torchvision_keypointrcnn_resnet50_fpn() if num_keypoints else torchvision_maskrcnn_resnet50_fpn()
        if any(key.endswith("layer3.6.conv1.weight") for key in state_dict):  # res4 of 23 blocks, not 6
            config = config.replace(backbone="resnet101")
    elif num_keypoints:
        figures = tuple(dataset.keypoint_names) == KEYPOINT_NAMES
        config = figures_small() if figures else torchvision_keypointrcnn_resnet50_fpn()
    else:
        config = shapes_small()
    config = config.replace(num_classes=dataset.num_classes, num_keypoints=num_keypoints)
    pretrained = state_dict is not None or getattr(args, "backbone_weights", None) is not None
    if not pretrained and config.backbone != "small":
        config = from_scratch(config)
        if is_first_process():
            print(f"no pretrained weights: the {config.backbone} trains from scratch (config.from_scratch: "
                  f"norm {config.norm}, every stage trained)")  # fmt: skip
    changes = {}
    if getattr(args, "norm", None) is not None:
        changes["norm"] = args.norm
    if getattr(args, "head_norm", None) is not None:
        changes["head_norm"] = None if args.head_norm == "none" else args.head_norm
    if getattr(args, "freeze_at", None) is not None:
        changes["trainable_stages"] = 5 - args.freeze_at
    return config.replace(**changes)


def training_model(args: argparse.Namespace, dataset, output_dir: Path) -> tuple[MaskRCNN, dict]:
    """The model `mrcnn train` starts from, for the data set's classes, and what to say of its start in
    the checkpoint's metadata.

    `--weights` (ours, torchvision's maskrcnn/keypointrcnn, or an ImageNet ResNet) loads through
    `load_pretrained` into the model of `training_config`, whatever the file's class count: what fits
    is loaded, the class-specific layers of another count are re-initialised, and the command names
    them; weights of another architecture are a `UsageError`. `--backbone-weights` then fills the
    backbone with an ImageNet ResNet. A resumed run rebuilds the model of the checkpoint in
    `output_dir` (whose weights `train` then loads) and keeps its metadata.
    """
    if args.resume:
        path = output_dir / CHECKPOINT_NAME
        checkpoint = read_checkpoint(path)
        if checkpoint is None:
            raise UsageError(f"--resume: {path} is not a checkpoint of mrcnn train")
        try:
            return MaskRCNN(config_from_checkpoint(checkpoint, path)), dict(checkpoint.get("metadata", {}))
        except CheckpointError as error:
            raise UsageError(f"--resume: {error}") from None
    checkpoint = state_dict = None
    if args.weights is not None:
        checkpoint = read_checkpoint(args.weights)
        state_dict = checkpoint["model"] if checkpoint is not None else read_state_dict(args.weights)
    model = MaskRCNN(training_config(args, dataset, checkpoint, state_dict))
    started = {}
    if state_dict is not None:
        try:
            report = load_pretrained(model, state_dict, verbose=False)._replace(source=str(args.weights))
        except ValueError as error:
            raise _weights_error(args.weights, error) from None
        if is_first_process():
            print(report.summary(), flush=True)
        started = {"weights": str(args.weights), "kind": report.kind, "reinitialised": report.reinitialised}
    if getattr(args, "backbone_weights", None) is not None:  # the paper's ImageNet initialization
        if not args.backbone_weights.is_file():
            raise UsageError(f"--backbone-weights {args.backbone_weights} does not exist")
        try:
            load_torchvision_resnet_backbone(model, args.backbone_weights)
        except ValueError as error:
            raise UsageError(f"--backbone-weights: {error}") from None
        started["backbone_weights"] = str(args.backbone_weights)
    return model, {"initial_weights": started} if started else {}


def run_training(args: argparse.Namespace, dataset, output_dir: Path) -> tuple:
    """Build the model, train it, return (model, summary); shared by `mrcnn train` and `mrcnn demo`.

    The model's initial weights are drawn after `torch.manual_seed(--seed)`: with the same
    command, seed and thread count, two runs give the same losses and weights, bit for bit.
    """
    prepare_run_directory(output_dir, args.resume, args.overwrite)
    device = choose_device(args.device)
    check_amp(args.amp, device)
    set_threads(args.threads)
    torch.manual_seed(args.seed)  # the initial weights
    model, started = training_model(args, dataset, output_dir)
    if model.config.num_classes != dataset.num_classes:
        raise UsageError(f"the model has {model.config.num_classes} classes, the data set {dataset.num_classes}")
    keypoint_names = list(getattr(dataset, "keypoint_names", ()))
    settings = training_settings(args, len(dataset))
    metadata = {**started, "category_names": list(dataset.category_names),
                "label_to_category_id": {str(k): v for k, v in dataset.label_to_category_id.items()},
                **({"keypoint_names": keypoint_names} if keypoint_names else {})}  # fmt: skip
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
    """COCO metrics {"segm": {...}, "bbox": {...}, "keypoints": {...}} as a small text table (values in %,
    "-": no such objects, or no such metric: keypoint AP has no APs)."""
    lines = ["         " + "".join(f"{c:>7}" for c in METRIC_COLUMNS)]
    for iou_type, name in (("segm", "mask"), ("bbox", "box"), ("keypoints", "keypoint")):
        if iou_type in metrics:
            values = (metrics[iou_type].get(c, -1.0) for c in METRIC_COLUMNS)
            lines.append(f"{name:<9}" + "".join(f"{100 * v:7.1f}" if v >= 0 else f"{'-':>7}" for v in values))
    return "\n".join(lines)

