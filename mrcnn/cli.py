"""The `mrcnn` command: one subcommand per job, each a function that takes the parsed arguments.

    mrcnn shapes   --output-dir data/shapes                       # draw the synthetic data set
    mrcnn train    --data data/shapes --output-dir runs/train     # train (torchrun for several processes)
    mrcnn evaluate --data data/shapes --weights runs/train/checkpoint.pt
    mrcnn predict  --weights runs/train/checkpoint.pt picture.png
    mrcnn demo     --output-dir runs/demo                         # all of it, in minutes on a CPU

A data set is a folder in COCO's layout, `ROOT/annotations/instances_SPLIT.json` with the
images in `ROOT/SPLIT/` (what `mrcnn shapes` writes; COCO itself with `--split val2017`).
`--weights` is a checkpoint of ours or a torchvision `maskrcnn_resnet50_fpn` state dict.

A new command is one `add_<name>_command(subcommands)` function that adds its parser and sets
`run=<function>`, plus one line in `build_parser`. A mistake of the user (a bad argument, a
missing file, an unknown preset, a checkpoint that does not fit) prints one line and exits with
status 2; a training run stopped by a non-finite loss prints one line and exits with status 1;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mrcnn.config import PRESETS

METRIC_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class UsageError(Exception):
    """A mistake in how the command was called: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage block too
        raise UsageError(f"{message} (see {self.prog} --help)")


def output_directory(path: Path) -> Path:
    """Create `path` if needed; a `UsageError` if it is a file or cannot be created."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output-dir {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create --output-dir {path}: {error.strerror or error}") from None
    return path


# --- pieces shared by the commands ----------------------------------------------------------------


def choose_device(name: str | None):
    """`--device` as a torch.device (default: CUDA when there is one); a `UsageError` if unusable."""
    import torch

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
    import torch

    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def open_dataset(root: Path, split: str, contiguous_labels: bool = True, train: bool = False):
    """The `CocoDataset` of `ROOT/SPLIT` (module docstring); a `UsageError` if it is missing or broken."""
    from mrcnn.data.coco import CocoDataset, DatasetError

    annotations = root / "annotations" / f"instances_{split}.json"
    if not annotations.is_file():
        raise UsageError(f"no annotation file {annotations} (expected ROOT/annotations/instances_{split}.json; "
                         "make one with `mrcnn shapes`)")  # fmt: skip
    try:
        return CocoDataset(root / split, annotations, remove_images_without_annotations=train,
                           contiguous_labels=contiguous_labels)  # fmt: skip
    except DatasetError as error:
        raise UsageError(str(error)) from None


def load_weights(path: Path | None, config_name: str | None, num_classes: int | None = None):
    """A model and its metadata: fresh from the preset, or with the weights in `path`.

    Our checkpoints bring their own config (a `--config` is then ignored); a torchvision state
    dict takes `--config` (default: its preset). Returns `(model, metadata, source)` with source
    "new", "checkpoint" or "torchvision".
    """
    from mrcnn.checkpoint import CheckpointError, NotACheckpointError, load_checkpoint, model_from_checkpoint
    from mrcnn.model import MaskRCNN

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
        from mrcnn.weights import from_torchvision
    except ImportError as error:
        raise UsageError(f"--weights {path} is not our checkpoint, and the torchvision import is unavailable ({error})") from None
    try:
        model = from_torchvision(path, PRESETS[config_name]() if config_name else None)
    except ValueError as error:
        raise UsageError(f"--weights: {error}") from None
    return model, {}, "torchvision"


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


def add_common_options(parser, weights_help: str | None = None, output: str = "runs") -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--config", choices=sorted(PRESETS), default=None,
                        help="the model preset (default: shapes_small; a checkpoint of ours brings its own)")  # fmt: skip
    parser.add_argument("--weights", type=Path, default=None, help=weights_help or "a checkpoint of ours or a torchvision "
                        "maskrcnn_resnet50_fpn state dict")  # fmt: skip
    parser.add_argument("--output-dir", type=Path, default=Path(output), help=f"where to write (default {output})")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")


# --- the commands ---------------------------------------------------------------------------------


def run_shapes(args: argparse.Namespace) -> int:
    """Draw the synthetic shapes data set (COCO layout) into --output-dir."""
    from mrcnn.data.shapes import generate_shapes

    directory = output_directory(args.output_dir)
    try:
        paths = generate_shapes(directory, args.num_train, args.num_val, args.image_size, args.seed,
                                max_objects=args.max_objects, overwrite=args.overwrite)  # fmt: skip
    except ValueError as error:
        raise UsageError(str(error)) from None
    print(f"shapes data set ({args.num_train} train, {args.num_val} val images): {paths.root}")
    return 0


def add_shapes_command(subcommands) -> None:
    parser = subcommands.add_parser("shapes", help="draw the synthetic shapes data set", description=run_shapes.__doc__)
    parser.add_argument("--output-dir", type=Path, default=Path("data/shapes"), help="where (default data/shapes)")
    parser.add_argument("--num-train", type=int, default=1000, help="training images (default 1000)")
    parser.add_argument("--num-val", type=int, default=100, help="held-out images (default 100)")
    parser.add_argument("--image-size", type=int, default=128, help="side of the square images (default 128)")
    parser.add_argument("--max-objects", type=int, default=4, help="at most this many shapes an image (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="redraw even if the same data set is there")
    parser.set_defaults(run=run_shapes)


def settings_from_args(args: argparse.Namespace, num_images: int):
    """The training settings of `mrcnn train` and `mrcnn demo`: the paper's schedule, scaled."""
    from mrcnn.train import paper_schedule

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
    """Build the model, train it, return (model, summary); shared by `train` and `demo`."""
    from mrcnn.checkpoint import CheckpointError
    from mrcnn.train import NonFiniteLossError, train

    device = choose_device(args.device)
    set_threads(args.threads)
    model, _, _ = load_weights(args.weights, args.config, dataset.num_classes)
    if getattr(args, "backbone_weights", None) is not None:  # the paper's ImageNet initialization
        from mrcnn.weights import load_torchvision_resnet_backbone

        if not args.backbone_weights.is_file():
            raise UsageError(f"--backbone-weights {args.backbone_weights} does not exist")
        try:
            load_torchvision_resnet_backbone(model, args.backbone_weights)
        except ValueError as error:
            raise UsageError(f"--backbone-weights: {error}") from None
    if model.config.num_classes != dataset.num_classes:
        raise UsageError(f"the model has {model.config.num_classes} classes, the data set {dataset.num_classes}")
    settings = settings_from_args(args, len(dataset))
    metadata = {"category_names": list(dataset.category_names),
                "label_to_category_id": {str(k): v for k, v in dataset.label_to_category_id.items()}}  # fmt: skip
    try:
        summary = train(model, dataset, settings, output_dir, device, resume=args.resume, metadata=metadata)
    except CheckpointError as error:
        raise UsageError(f"--resume: {error}") from None
    except NonFiniteLossError as error:
        print(f"mrcnn: training stopped: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except ValueError as error:  # settings that do not fit the data or the resumed run
        raise UsageError(str(error)) from None
    return model, summary


def run_train(args: argparse.Namespace) -> int:
    """Train Mask R-CNN on a COCO-layout data set (paper section 3.1); checkpoints and a log in --output-dir."""
    directory = output_directory(args.output_dir)
    dataset = open_dataset(args.data, args.split, train=True)
    _, summary = run_training(args, dataset, directory)
    if summary["rank"] == 0 and summary["final"]:  # under torchrun, the first process reports
        from mrcnn.train import read_log
        from mrcnn.visualize import loss_curve_figure

        loss_curve_figure(read_log(directory / "log.jsonl")).savefig(directory / "loss_curve.png", dpi=110)
        print(f"trained {summary['steps']} steps ({summary['images_per_second']:.1f} images/s); "
              f"checkpoint {summary['checkpoint']}, log {summary['log']}, loss curve {directory / 'loss_curve.png'}")  # fmt: skip
    return 0


def add_training_options(parser, iterations: int | None = None, batch_size: int = 4) -> None:
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"images per step, all processes (default {batch_size})")
    parser.add_argument("--iterations", type=int, default=iterations, help="steps (default: the paper's 160k x 16 / batch x schedule)")
    parser.add_argument("--epochs", type=float, default=None, help="train this many passes over the data instead")
    parser.add_argument("--schedule", type=float, default=1.0, help="multiply the paper's schedule (default 1)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default 0.02 x batch / 16)")
    parser.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default min(1000, steps / 10))")
    parser.add_argument("--clip-grad-norm", type=float, default=None, help="clip the gradient norm (default: off)")
    parser.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off", help="mixed precision on CUDA")
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes (default 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    parser.add_argument("--resume", action="store_true", help="continue from --output-dir/checkpoint.pt")
    parser.add_argument("--no-flip", action="store_true", help="no horizontal flipping")


def add_train_command(subcommands) -> None:
    parser = subcommands.add_parser("train", help="train on a COCO-layout data set", description=run_train.__doc__)
    parser.add_argument("--data", type=Path, default=Path("data/shapes"), help="data set root (default data/shapes)")
    parser.add_argument("--split", default="train", help="the training split (default train)")
    add_common_options(parser, "initial weights (default: random, from --config)", output="runs/train")
    parser.add_argument("--backbone-weights", type=Path, default=None,
                        help="a torchvision ImageNet resnet50/resnet101 state dict for the backbone (the paper's initialization)")  # fmt: skip
    add_training_options(parser)
    parser.set_defaults(run=run_train)


def run_evaluate(args: argparse.Namespace) -> int:
    """COCO box and mask AP of --weights on a data set split (paper section 4); writes metrics.json."""
    from mrcnn.evaluate import evaluate
    import torch

    directory = output_directory(args.output_dir)
    if args.weights is None:
        raise UsageError("evaluate needs --weights (a checkpoint of ours or a torchvision state dict)")
    device = choose_device(args.device)
    set_threads(args.threads)
    model, _, source = load_weights(args.weights, args.config)
    dataset = open_dataset(args.data, args.split, contiguous_labels=source != "torchvision")
    if args.max_images is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(args.max_images, len(dataset))))
    metrics = evaluate(model.to(device), dataset, device, output_dir=directory, progress=True)
    print(metrics_table(metrics))
    print(f"metrics: {directory / 'metrics.json'}, detections: {directory / 'detections.json'}")
    return 0


def add_evaluate_command(subcommands) -> None:
    parser = subcommands.add_parser("evaluate", help="COCO AP on a data set split", description=run_evaluate.__doc__)
    parser.add_argument("--data", type=Path, default=Path("data/shapes"), help="data set root (default data/shapes)")
    parser.add_argument("--split", default="val", help="the split to score (default val)")
    parser.add_argument("--max-images", type=int, default=None, help="only the first N images")
    add_common_options(parser, output="runs/evaluate")
    parser.set_defaults(run=run_evaluate)


def run_predict(args: argparse.Namespace) -> int:
    """Detect objects in PNG/JPEG files: a picture per image and detections.json in --output-dir."""
    from mrcnn.predict import predict_files

    directory = output_directory(args.output_dir)
    if args.weights is None:
        raise UsageError("predict needs --weights (a checkpoint of ours or a torchvision state dict)")
    for path in args.images:
        if not path.is_file():
            raise UsageError(f"image {path} does not exist")
    device = choose_device(args.device)
    set_threads(args.threads)
    model, metadata, _ = load_weights(args.weights, args.config)
    try:
        records = predict_files(model.to(device), args.images, directory, class_names_for(model, metadata), device,
                                args.score_threshold)  # fmt: skip
    except ValueError as error:  # an unreadable image
        raise UsageError(str(error)) from None
    for record in records:
        print(f"{record['file']}: {len(record['detections'])} detections -> {record['picture']}")
    print(f"detections: {directory / 'detections.json'}")
    return 0


def add_predict_command(subcommands) -> None:
    parser = subcommands.add_parser("predict", help="detect objects in image files", description=run_predict.__doc__)
    parser.add_argument("images", type=Path, nargs="+", help="PNG or JPEG files")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="keep detections scoring at least this")
    add_common_options(parser, output="runs/predict")
    parser.set_defaults(run=run_predict)


def add_demo_command(subcommands) -> None:
    from mrcnn.demo import run_demo, DEMO_DEFAULTS

    parser = subcommands.add_parser("demo", help="draw data, train, evaluate and draw predictions, in minutes",
                                    description=run_demo.__doc__)  # fmt: skip
    parser.add_argument("--num-train", type=int, default=DEMO_DEFAULTS["num_train"], help="training images")
    parser.add_argument("--num-val", type=int, default=DEMO_DEFAULTS["num_val"], help="held-out images to score")
    parser.add_argument("--processes", type=int, default=DEMO_DEFAULTS["processes"],
                        help="training processes on the CPU, with DistributedDataParallel (the same weights as one)")  # fmt: skip
    add_common_options(parser, "initial weights (default: random)", output="runs/demo")
    add_training_options(parser, iterations=DEMO_DEFAULTS["iterations"], batch_size=DEMO_DEFAULTS["batch_size"])
    parser.set_defaults(run=run_demo, config="shapes_small", lr=DEMO_DEFAULTS["lr"], warmup=DEMO_DEFAULTS["warmup"],
                        clip_grad_norm=DEMO_DEFAULTS["clip_grad_norm"], threads=DEMO_DEFAULTS["threads"])  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mrcnn", description="Mask R-CNN, read and run.")
    subcommands = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command", required=True, parser_class=_Parser)
    add_shapes_command(subcommands)
    add_train_command(subcommands)
    add_evaluate_command(subcommands)
    add_predict_command(subcommands)
    add_demo_command(subcommands)
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
    except SystemExit as stop:  # --help and --version end here
        return stop.code if isinstance(stop.code, int) else 0
