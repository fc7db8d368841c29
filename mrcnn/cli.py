"""The `mrcnn` command: one subcommand per job, each a function that takes the parsed arguments.

    mrcnn shapes   --output-dir data/shapes                       # draw the synthetic data set
    mrcnn train    --data data/shapes --output-dir runs/train     # train (torchrun for several processes)
    mrcnn evaluate --data data/shapes --weights runs/train/checkpoint.pt
    mrcnn predict  --weights runs/train/checkpoint.pt picture.png
    mrcnn demo     --output-dir runs/demo                         # all of it, in minutes on a CPU

A data set is a folder in COCO's layout, `ROOT/annotations/instances_SPLIT.json` with the
images in `ROOT/SPLIT/` (what `mrcnn shapes` writes; COCO itself with `--split val2017`); a
keypoint file, `ROOT/annotations/person_keypoints_SPLIT.json`, is read when there is no instances
file, or named with `--annotations FILE`, and trains and scores the keypoint head.
`--weights` is a checkpoint of ours or a torchvision `maskrcnn_resnet50_fpn` (or
`keypointrcnn_resnet50_fpn`) state dict; `mrcnn train --weights` also takes an ImageNet ResNet, and
any of them for a data set of another class count (fine-tuning: the class-specific layers are
re-initialised, and named). `--amp bf16` runs the model under autocast (on a CPU too, for
evaluate, predict and the demo's scoring), `--amp fp16` on CUDA only.

This module only parses: the services the commands share (opening a data set, loading weights,
running a training) live in mrcnn/jobs.py, the demo in mrcnn/demo.py. A new command is one
`add_<name>_command(subcommands)` function that adds its parser and sets `run=<function>`, plus
one line in `build_parser`.

Nothing is lost by mistake: no command writes over a file it did not make without being told
(`--overwrite`), `mrcnn train` continues a run only with `--resume`, and `mrcnn predict` never
draws over an input picture. A mistake of the user (a bad or absurd option value, a missing file,
an unknown preset, a checkpoint that does not fit, a full disk or a read-only folder) prints one
line and exits with status 2; a training run stopped by a non-finite loss or non-finite weights
prints one line and exits with status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import inspect
import math
import sys
from pathlib import Path

import torch

from mrcnn.config import PRESETS
from mrcnn.data.shapes import MANIFEST_NAME, foreign_files, generate_shapes
from mrcnn.demo import DEMO_DEFAULTS, run_demo
from mrcnn.evaluate import evaluate
from mrcnn.export import OUTPUT_FILES, RUNTIME_NAME, export_onnx
from mrcnn.jobs import (
    LOSS_CURVE_NAME,
    UsageError,
    check_amp,
    check_classes,
    choose_device,
    class_names_for,
    load_weights,
    metrics_table,
    open_dataset,
    output_directory,
    run_training,
    set_threads,
)
from mrcnn.predict import PICTURE_SUFFIX, image_files, predict_files
from mrcnn.train import read_log
from mrcnn.visualize import loss_curve_figure

# What a failed write says, in the user's words (an OSError of another kind is a bug: traceback).
WRITE_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied (a read-only folder?)",
    errno.EPERM: "operation not permitted (a read-only folder?)",
}
AMP_CHOICES = ("off", "bf16", "fp16")
LARGEST_LR = float(torch.finfo(torch.float32).max)  # the weights are float32: a larger rate is no number to them


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage block too
        raise UsageError(f"{message} (see {self.prog} --help)")


# --- option values, checked as they are parsed ----------------------------------------------------


def count(minimum: int):
    """An argparse type: an integer of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def positive_number(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def learning_rate(text: str) -> float:
    """An argparse type: a rate > 0 that a float32 weight can be multiplied by."""
    value = positive_number(text)
    if value > LARGEST_LR:
        raise argparse.ArgumentTypeError(f"must be at most {LARGEST_LR:.3g} (the largest float32), got {text}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def add_amp_option(parser) -> None:
    parser.add_argument("--amp", choices=AMP_CHOICES, default="off",
                        help="run the model under autocast: bf16 (CPU or CUDA) or fp16 (CUDA) (default off)")  # fmt: skip


def add_common_options(parser, weights_help: str | None = None, output: str = "runs") -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--config", choices=sorted(PRESETS), default=None,
                        help="the model preset (default: shapes_small; a checkpoint of ours brings its own)")  # fmt: skip
    parser.add_argument("--weights", type=Path, default=None, help=weights_help or "a checkpoint of ours or a torchvision "
                        "maskrcnn_resnet50_fpn state dict")  # fmt: skip
    parser.add_argument("--output-dir", type=Path, default=Path(output), help=f"where to write (default {output})")
    parser.add_argument("--threads", type=count(1), default=None, help="CPU threads for torch (default: torch's choice)")


# --- the commands ---------------------------------------------------------------------------------


def run_shapes(args: argparse.Namespace) -> int:
    """Draw the synthetic shapes data set (COCO layout) into --output-dir.

    The same data set already there is reused, one drawn there before with other settings is
    redrawn; a folder that holds anything else is refused unless --overwrite, which deletes the
    PNG images of its train/ and val/ folders and replaces the annotation files."""
    largest = inspect.signature(generate_shapes).parameters["object_size"].default[1]
    if args.image_size < largest:
        raise UsageError(f"--image-size {args.image_size} is too small: the shapes are up to {largest} pixels across, "
                         f"so the images need at least {largest}")  # fmt: skip
    directory = output_directory(args.output_dir)
    others = foreign_files(directory)
    if others and not args.overwrite:
        raise UsageError(f"--output-dir {directory} holds {len(others)} files that `mrcnn shapes` did not write (e.g. "
                         f"{others[0].relative_to(directory)}); pass --overwrite to replace them")  # fmt: skip
    manifest = directory / MANIFEST_NAME
    before = manifest.read_text() if manifest.is_file() else None
    annotations = [directory / "annotations" / f"instances_{split}.json" for split in ("train", "val")]
    complete = all(path.is_file() for path in annotations)
    replaced = [p for p in (*directory.glob("train/*.png"), *directory.glob("val/*.png"), *annotations) if p.is_file()]
    paths = generate_shapes(directory, args.num_train, args.num_val, args.image_size, args.seed,
                            max_objects=args.max_objects, overwrite=args.overwrite)  # fmt: skip
    if not args.overwrite and complete and before == manifest.read_text():
        print(f"shapes data set already there with these settings, nothing redrawn: {paths.root}")
        return 0
    if replaced:
        why = "--overwrite" if args.overwrite else "drawn there before with other settings"
        print(f"replaced {len(replaced)} files in {directory} ({why}): the images of train/ and val/ and the annotations")
    print(f"shapes data set ({args.num_train} train, {args.num_val} val images): {paths.root}")
    return 0


def add_shapes_command(subcommands) -> None:
    parser = subcommands.add_parser("shapes", help="draw the synthetic shapes data set", description=run_shapes.__doc__)
    parser.add_argument("--output-dir", type=Path, default=Path("data/shapes"), help="where (default data/shapes)")
    parser.add_argument("--num-train", type=count(0), default=1000, help="training images (default 1000)")
    parser.add_argument("--num-val", type=count(0), default=100, help="held-out images (default 100)")
    parser.add_argument("--image-size", type=count(1), default=128, help="side of the square images (default 128)")
    parser.add_argument("--max-objects", type=count(1), default=4, help="at most this many shapes an image (default 4)")
    parser.add_argument("--seed", type=count(0), default=0)
    parser.add_argument("--overwrite", action="store_true",
                        help="redraw even if the same data set is there, replacing whatever images and annotations the folder holds")  # fmt: skip
    parser.set_defaults(run=run_shapes)


def run_train(args: argparse.Namespace) -> int:
    """Train Mask R-CNN on a COCO-layout data set (paper section 3.1); checkpoints and a log in --output-dir.

    The model has the data set's classes (and keypoints). --weights FILE fine-tunes: a checkpoint of
    ours, a torchvision maskrcnn_resnet50_fpn or keypointrcnn_resnet50_fpn state dict (of any class
    count) or an ImageNet ResNet loads where it fits, and the class-specific layers it cannot fill
    are re-initialised and named. The preset: --config, else the checkpoint's own, else
    torchvision's for a torchvision or ImageNet file, else shapes_small (figures_small for the
    stick figures, torchvision_keypointrcnn_resnet50_fpn for other keypoints); a ResNet preset
    with no pretrained weights trains from scratch (config.from_scratch). Category ids that are
    not 1..K-1 are mapped to contiguous labels, and said.

    A folder that already holds a run is continued with --resume, started over with --overwrite,
    and refused otherwise. The same command with the same --seed and --threads gives the same
    losses and weights, bit for bit."""
    directory = output_directory(args.output_dir)
    dataset = open_dataset(args.data, args.split, train=True, verify_images=not args.no_verify_images,
                           annotations=args.annotations)  # fmt: skip
    _, summary = run_training(args, dataset, directory)
    if summary["rank"] != 0:  # under torchrun, the first process reports
        return 0
    if summary["resumed_from"] == summary["steps"]:
        print(f"the run in {directory} has already done its {summary['steps']} steps: nothing to train")
        return 0
    loss_curve_figure(read_log(directory / "log.jsonl")).savefig(directory / LOSS_CURVE_NAME, dpi=110)
    print(f"trained {summary['steps']} steps ({summary['images_per_second']:.1f} images/s); "
          f"checkpoint {summary['checkpoint']}, log {summary['log']}, loss curve {directory / LOSS_CURVE_NAME}")  # fmt: skip
    return 0


def add_training_options(parser, iterations: int | None = None, batch_size: int = 4) -> None:
    parser.add_argument("--batch-size", type=count(1), default=batch_size, help=f"images per step, all processes (default {batch_size})")
    parser.add_argument("--iterations", type=count(1), default=iterations, help="steps (default: the paper's 160k x 16 / batch x schedule)")
    parser.add_argument("--epochs", type=positive_number, default=None, help="train this many passes over the data instead")
    parser.add_argument("--schedule", type=positive_number, default=1.0, help="multiply the paper's schedule (default 1)")
    parser.add_argument("--lr", type=learning_rate, default=None, help="learning rate (default 0.02 x batch / 16)")
    parser.add_argument("--warmup", type=count(0), default=None, help="linear warm-up steps (default min(1000, steps / 10))")
    parser.add_argument("--clip-grad-norm", type=positive_number, default=None, help="clip the gradient norm (default: off)")
    parser.add_argument("--amp", choices=AMP_CHOICES, default="off", help="mixed precision (training: on CUDA)")
    parser.add_argument("--workers", type=count(0), default=0, help="data-loading processes (default 0)")
    parser.add_argument("--seed", type=count(0), default=0, help="initial weights, data order, flips and sampling (default 0)")
    parser.add_argument("--checkpoint-every", type=count(1), default=500, help="steps between checkpoints (default 500)")
    parser.add_argument("--forward", choices=("batched", "per-image"), default=None,
                        help="a process's images as one padded batch, or one at a time (the same weights for any "
                             "process count); default: batched on CUDA, per image elsewhere")  # fmt: skip
    existing = parser.add_mutually_exclusive_group()  # what to do with a run already in --output-dir
    existing.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint.pt")
    existing.add_argument("--overwrite", action="store_true", help="start over where --output-dir holds a run, replacing it")
    parser.add_argument("--no-flip", action="store_true", help="no horizontal flipping")


def add_data_options(parser, split: str) -> None:
    parser.add_argument("--data", type=Path, default=Path("data/shapes"), help="data set root (default data/shapes)")
    parser.add_argument("--split", default=split, help=f"the split: images in DATA/SPLIT (default {split})")
    parser.add_argument("--annotations", type=Path, default=None,
                        help="the annotation file (default DATA/annotations/instances_SPLIT.json, else "
                             "person_keypoints_SPLIT.json); a person_keypoints_*.json file brings keypoints")  # fmt: skip


def add_train_command(subcommands) -> None:
    parser = subcommands.add_parser("train", help="train on a COCO-layout data set", description=run_train.__doc__)
    add_data_options(parser, "train")
    add_common_options(parser, "initial weights, of any class count: a checkpoint of ours, a torchvision maskrcnn/keypointrcnn "
                       "state dict or an ImageNet ResNet (default: random, from --config)", output="runs/train")  # fmt: skip
    parser.add_argument("--backbone-weights", type=Path, default=None,
                        help="a torchvision ImageNet resnet50/resnet101 state dict for the backbone (the paper's initialization)")  # fmt: skip
    parser.add_argument("--freeze-at", type=count(0), choices=range(6), metavar="{0..5}", default=None,
                        help="freeze the stem and the first N-1 residual stages (Detectron2's FREEZE_AT: 0 nothing, 2 the "
                             "stem and res2 as the ResNet-50 presets, 5 the whole backbone): config.trainable_stages = 5 - N")  # fmt: skip
    parser.add_argument("--norm", choices=("frozen_bn", "bn", "sync_bn", "gn"), default=None,
                        help="the backbone's normalization (default: the preset's)")  # fmt: skip
    parser.add_argument("--head-norm", choices=("none", "bn", "sync_bn", "gn"), default=None,
                        help="the normalization in the FPN and the mask and keypoint heads (default: the preset's)")  # fmt: skip
    parser.add_argument("--no-verify-images", action="store_true",
                        help="do not decode every image before training (for huge data sets); a broken image then stops "
                             "the run when it is read, after saving the steps done")  # fmt: skip
    add_training_options(parser)
    parser.set_defaults(run=run_train)


def run_evaluate(args: argparse.Namespace) -> int:
    """COCO box and mask AP of --weights on a data set split (paper section 4), and keypoint AP on a
    keypoint file (section 5); writes metrics.json and detections.json.

    The model's classes must be the data set's: the count, and the names label by label when the
    checkpoint records them (a data set whose categories are renumbered is refused, not scored)."""
    directory = output_directory(args.output_dir)
    if args.weights is None:
        raise UsageError("evaluate needs --weights (a checkpoint of ours or a torchvision state dict)")
    device = choose_device(args.device)
    check_amp(args.amp, device)
    set_threads(args.threads)
    model, metadata, source = load_weights(args.weights, args.config)
    dataset = open_dataset(args.data, args.split, contiguous_labels=source != "torchvision", annotations=args.annotations)
    check_classes(model, metadata, dataset, args.weights)
    if args.max_images is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(args.max_images, len(dataset))))
    metrics = evaluate(model.to(device), dataset, device, output_dir=directory, progress=True, amp=args.amp)
    print(metrics_table(metrics))
    print(f"metrics: {directory / 'metrics.json'}, detections: {directory / 'detections.json'}")
    return 0


def add_evaluate_command(subcommands) -> None:
    parser = subcommands.add_parser("evaluate", help="COCO AP on a data set split", description=run_evaluate.__doc__)
    add_data_options(parser, "val")
    parser.add_argument("--max-images", type=count(1), default=None, help="only the first N images")
    add_amp_option(parser)
    add_common_options(parser, output="runs/evaluate")
    parser.set_defaults(run=run_evaluate)


def run_predict(args: argparse.Namespace) -> int:
    """Detect objects in image files (PNG, JPEG, BMP, TIFF): a picture per image, and detections.json
    (COCO's results format, with each image's file_name) and images.json in --output-dir.

    IMAGES are files, folders (their images, sorted; subfolders too with --recursive) or glob
    patterns. The images stream through the model --batch-size at a time, never all in memory.
    The picture of `a.png` is `a.pred.png`; inputs that share a name are numbered in the order
    given (`a.pred.png`, `a-2.pred.png`, ...), and an output that would replace an input is refused."""
    directory = output_directory(args.output_dir)
    if args.weights is None:
        raise UsageError("predict needs --weights (a checkpoint of ours or a torchvision state dict)")
    try:
        paths = image_files(args.images, args.recursive)
    except ValueError as error:  # a missing file, a folder without images
        raise UsageError(str(error)) from None
    device = choose_device(args.device)
    check_amp(args.amp, device)
    set_threads(args.threads)
    model, metadata, _ = load_weights(args.weights, args.config)
    category_ids = {int(label): c for label, c in metadata.get("label_to_category_id", {}).items()} or None
    batch_size = args.batch_size or (4 if device.type == "cuda" else 1)
    try:
        summary = predict_files(model.to(device), paths, directory, class_names_for(model, metadata), device,
                                args.score_threshold, batch_size, args.amp, category_ids, args.workers)  # fmt: skip
    except ValueError as error:  # an unreadable or too thin image, an output over an input
        raise UsageError(str(error)) from None
    notes = summary["notes"]
    for note in notes[:5]:
        print(f"note: {note}")
    if len(notes) > 5:
        print(f"note: {len(notes) - 5} more images converted to RGB")
    print(f"{summary['images']} images, {summary['detections']} detections: pictures {directory}/*{PICTURE_SUFFIX}, "
          f"detections {directory / 'detections.json'}, images {directory / 'images.json'}")  # fmt: skip
    return 0


def add_predict_command(subcommands) -> None:
    parser = subcommands.add_parser("predict", help="detect objects in image files", description=run_predict.__doc__)
    parser.add_argument("images", type=Path, nargs="+", metavar="IMAGES",
                        help="image files (png, jpg, bmp, tif), folders of them, or glob patterns")  # fmt: skip
    parser.add_argument("--recursive", action="store_true", help="take the images in the folders' subfolders too")
    parser.add_argument("--score-threshold", type=fraction, default=0.5, help="keep detections scoring at least this")
    parser.add_argument("--batch-size", type=count(1), default=None, help="images per forward pass (default 4 on CUDA, 1 on a CPU)")
    parser.add_argument("--workers", type=count(0), default=0, help="processes that read the next images ahead (default 0)")
    add_amp_option(parser)
    add_common_options(parser, output="runs/predict")
    parser.set_defaults(run=run_predict)


def add_demo_command(subcommands) -> None:
    parser = subcommands.add_parser("demo", help="draw data, train, evaluate and draw predictions, in minutes",
                                    description=run_demo.__doc__)  # fmt: skip
    parser.add_argument("--num-train", type=count(1), default=DEMO_DEFAULTS["num_train"], help="training images")
    parser.add_argument("--num-val", type=count(1), default=DEMO_DEFAULTS["num_val"], help="held-out images to score")
    parser.add_argument("--processes", type=count(1), default=DEMO_DEFAULTS["processes"],
                        help="training processes on the CPU, with DistributedDataParallel (the same weights as one)")  # fmt: skip
    add_common_options(parser, "initial weights (default: random)", output="runs/demo")
    add_training_options(parser, iterations=DEMO_DEFAULTS["iterations"], batch_size=DEMO_DEFAULTS["batch_size"])
    parser.set_defaults(run=run_demo, config="shapes_small", lr=DEMO_DEFAULTS["lr"], warmup=DEMO_DEFAULTS["warmup"],
                        clip_grad_norm=DEMO_DEFAULTS["clip_grad_norm"], threads=DEMO_DEFAULTS["threads"])  # fmt: skip


def run_export(args: argparse.Namespace) -> int:
    """Export --weights for deployment into the folder --output: ONNX graphs (backbone, FPN and RPN head;
    box head; mask head) that onnxruntime runs, and detector.py, the steps between them in numpy
    (mrcnn/export.py). The folder runs without torch and without this library:
    `python OUTPUT/detector.py picture.png`. An earlier export there is replaced only with --overwrite."""
    if args.weights is None:
        raise UsageError("export needs --weights (a checkpoint of ours or a torchvision state dict)")
    directory = output_directory(args.output)
    existing = [name for name in OUTPUT_FILES if (directory / name).exists()]
    if existing and not args.overwrite:
        raise UsageError(f"--output {directory} already holds {existing[0]}; pass --overwrite to replace it")
    set_threads(args.threads)
    model, _, _ = load_weights(args.weights, args.config)
    try:
        export_onnx(model, directory)
    except ValueError as error:  # a model the export does not cover (keypoints, RoIPool, adaptive sampling)
        raise UsageError(f"cannot export {args.weights}: {error}") from None
    print(f"exported to {directory}: {', '.join(n for n in OUTPUT_FILES if (directory / n).exists())}")
    print(f"run it with numpy and onnxruntime: python {directory / RUNTIME_NAME} picture.png")
    return 0


def add_export_command(subcommands) -> None:
    parser = subcommands.add_parser("export", help="ONNX graphs and a numpy runner, for deployment", description=run_export.__doc__)
    parser.add_argument("--weights", type=Path, default=None,
                        help="a checkpoint of ours or a torchvision maskrcnn_resnet50_fpn state dict")  # fmt: skip
    parser.add_argument("--output", type=Path, default=Path("runs/export"), help="the folder to write (default runs/export)")
    parser.add_argument("--config", choices=sorted(PRESETS), default=None,
                        help="the preset of a torchvision state dict (a checkpoint of ours brings its own)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --output")
    parser.add_argument("--threads", type=count(1), default=None, help="CPU threads for torch (default: torch's choice)")
    parser.set_defaults(run=run_export)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mrcnn", description="Mask R-CNN, read and run.")
    subcommands = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command", required=True, parser_class=_Parser)
    add_shapes_command(subcommands)
    add_train_command(subcommands)
    add_evaluate_command(subcommands)
    add_predict_command(subcommands)
    add_demo_command(subcommands)
    add_export_command(subcommands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: `sys.argv[1:]`); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.run(args)
    except UsageError as error:
        print(f"mrcnn: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a read-only folder: the user's to fix, in one line
        if error.errno not in WRITE_ERRORS:
            raise
        where = f": {error.filename}" if error.filename else ""
        print(f"mrcnn: error: {WRITE_ERRORS[error.errno]}{where}", file=sys.stderr)
        return 2
    except SystemExit as stop:  # --help and --version end here
        return stop.code if isinstance(stop.code, int) else 0
