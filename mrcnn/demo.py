"""The demo: Mask R-CNN learns the synthetic shapes on a laptop CPU in minutes, scored like the paper.

`mrcnn demo --output-dir runs/demo` (`make demo`) runs the whole method end to end, one named
step after the other (`run_demo`):

1. `claim_output_directory`: the folder is new, or holds an earlier demo (whose results this
   run replaces), or is refused (it holds files the demo did not write, unless --overwrite);
2. `draw_data`: the shapes data set (mrcnn/data/shapes.py) into `OUTPUT/shapes/`, unless the
   same one is there;
3. `train_model`: the `shapes_small` preset from scratch (mrcnn/train.py) into `OUTPUT/train/`,
   in one process or several (`train_in_processes`);
4. `score`: COCO's AP on the held-out images (mrcnn/evaluate.py, paper section 4.1):
   `OUTPUT/metrics.json`, `OUTPUT/detections.json`;
5. `draw_figures`: `OUTPUT/loss_curve.png`, `OUTPUT/predictions.png` (held-out images: the
   model's detections above the ground truth) and `OUTPUT/roi_align.png` (RoIPool against RoIAlign);
6. `write_report` and `print_report`: `OUTPUT/demo.json` (the AP, the time each part took, the
   settings and versions) and a table on the terminal.

The defaults are tuned so that a 2-core CPU reaches a mask AP of 0.5 and a box AP of 0.55 in
about ten minutes; README.md records the measured figures. The same command with the same
--seed and --threads trains the same weights, bit for bit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mrcnn.checkpoint import load_checkpoint, model_from_checkpoint
from mrcnn.data.shapes import ShapesPaths, generate_shapes
from mrcnn.evaluate import evaluate, mixed_precision
from mrcnn.jobs import (
    LOSS_CURVE_NAME,
    UsageError,
    check_amp,
    choose_device,
    metrics_table,
    open_dataset,
    output_directory,
    run_training,
)
from mrcnn.train import CHECKPOINT_NAME, LOG_NAME, read_log
from mrcnn.visualize import detections_figure, loss_curve_figure, roi_align_figure

DEMO_DEFAULTS = {
    "num_train": 2000,  # more images than steps x batch: every picture is new to the model, nearly
    "num_val": 200,
    "iterations": 1500,
    "batch_size": 4,
    "lr": 0.02,
    "warmup": 100,
    "clip_grad_norm": 10.0,  # from scratch, an early spike of the box losses can otherwise diverge
    "threads": None,
    "processes": 1,
}
SHOWN_IMAGES = 6  # held-out images drawn in predictions.png
REPORT_NAME = "demo.json"  # written when the demo starts (it marks the folder as the demo's) and when it ends
RESULT_NAMES = ("metrics.json", "detections.json", "predictions.png", LOSS_CURVE_NAME, "roi_align.png", REPORT_NAME)


def run_demo(args: argparse.Namespace) -> int:
    """Draw the shapes data set, train the small model, score it on held-out images and draw the
    results, all under --output-dir (see mrcnn/demo.py).

    Run again in the same --output-dir, the demo replaces the results of the earlier demo there
    (and says so), reusing its data set when the settings are the same; with --resume it continues
    the earlier demo's training instead. A folder that holds files the demo did not write is
    refused, unless --overwrite (which replaces the demo's own file names in it, and redraws the
    data). The same command with the same --seed and --threads gives the same weights, bit for bit."""
    if args.batch_size % args.processes:
        raise UsageError(f"--batch-size {args.batch_size} must be a multiple of --processes {args.processes}")
    device = choose_device(args.device)
    check_amp(args.amp, device)  # before anything is drawn
    started, seconds = time.perf_counter(), {}
    directory = claim_output_directory(args)
    with stopwatch(seconds, "data"):
        paths = draw_data(args, directory)
    with stopwatch(seconds, "train"):
        model, summary = train_model(args, paths, directory / "train")
    with stopwatch(seconds, "evaluate"):
        held_out, metrics = score(model, paths, directory, device, args.amp)
    with stopwatch(seconds, "figures"):
        draw_figures(model, held_out, directory, device, args.amp)
    seconds["total"] = time.perf_counter() - started
    write_report(args, directory, metrics, summary, seconds, device)
    print_report(directory, metrics, summary, seconds, len(held_out))
    return 0


@contextlib.contextmanager
def stopwatch(seconds: dict, name: str):
    """Add the seconds the `with` block takes to `seconds[name]`."""
    started = time.perf_counter()
    yield
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started


def arguments(args: argparse.Namespace) -> dict:
    """The command's arguments as JSON values."""
    return {k: str(v) if not isinstance(v, (int, float, bool, type(None))) else v for k, v in vars(args).items() if k != "run"}


def earlier_demo(directory: Path) -> dict | None:
    """The report an earlier demo left in `directory` (at its start or its end), or None."""
    try:
        report = json.loads((directory / REPORT_NAME).read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and "arguments" in report else None


def claim_output_directory(args: argparse.Namespace) -> Path:
    """Make --output-dir the demo's: new, an earlier demo's (its results are replaced, or its training
    continued with --resume), or, with --overwrite, any folder; mark it with a `demo.json`."""
    directory = output_directory(args.output_dir)
    files = sorted(path for path in directory.rglob("*") if not path.is_dir())
    if files and earlier_demo(directory) is None and not args.overwrite:
        raise UsageError(f"--output-dir {directory} holds files the demo did not write (e.g. "
                         f"{files[0].relative_to(directory)}); choose another folder, or pass --overwrite")  # fmt: skip
    ours = [directory / name for name in RESULT_NAMES] + [directory / "train" / name for name in (CHECKPOINT_NAME, LOG_NAME)]
    replaced = [path for path in ours if path.is_file() and not (args.resume and path.parent.name == "train")]
    if replaced:
        why = "--overwrite" if earlier_demo(directory) is None else "the earlier demo's"
        print(f"replacing {', '.join(str(path.relative_to(directory)) for path in replaced)} in {directory} ({why})")
        for path in replaced:
            path.unlink()
    (directory / REPORT_NAME).write_text(json.dumps({"status": "running", "arguments": arguments(args)}, indent=2))
    return directory


def draw_data(args: argparse.Namespace, directory: Path) -> ShapesPaths:
    """The shapes data set in `directory/shapes`: drawn, or the same one reused."""
    try:
        paths = generate_shapes(directory / "shapes", args.num_train, args.num_val, seed=args.seed,
                                overwrite=args.overwrite)  # fmt: skip
    except FileExistsError:
        raise UsageError(f"{directory / 'shapes'} holds files the demo did not write; "
                         "choose another --output-dir, or pass --overwrite to replace them") from None
    print(f"data: {paths.root} ({args.num_train} training, {args.num_val} held-out images)", flush=True)
    return paths


def train_model(args: argparse.Namespace, paths: ShapesPaths, output_dir: Path) -> tuple:
    """Train on the shapes' training split into `output_dir`: (model, summary of the run)."""
    if args.processes == 1:
        return run_training(args, open_dataset(paths.root, "train", train=True), output_dir)
    return train_in_processes(args, paths.root, output_dir)


def score(model: torch.nn.Module, paths: ShapesPaths, directory: Path, device: torch.device, amp: str = "off") -> tuple:
    """COCO's box and mask AP on the held-out split, written to `directory/metrics.json`: (held-out set, metrics)."""
    held_out = open_dataset(paths.root, "val")
    return held_out, evaluate(model, held_out, device, output_dir=directory, progress=True, amp=amp)


def _training_process(rank: int, world_size: int, port: int, args: argparse.Namespace, root, output_dir) -> None:
    """One of `world_size` training processes (what torchrun would start), on the CPU with gloo."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
                      LOCAL_RANK=str(rank))  # fmt: skip
    try:
        run_training(args, open_dataset(root, "train", train=True), output_dir)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train_in_processes(args: argparse.Namespace, root, output_dir) -> tuple:
    """Train with `args.processes` CPU processes under DistributedDataParallel; the same weights as one.

    The batch is split between the processes (mrcnn/train.py makes the result independent of
    the split), each with `--threads` threads (default: the cores shared out). Returns the model
    read back from the final checkpoint, and the summary of the run.
    """
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // args.processes)
    with socket.socket() as probe:  # a free port for the processes to meet on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.perf_counter()
    try:
        mp.spawn(_training_process, args=(args.processes, port, args, root, output_dir), nprocs=args.processes, join=True)
    except mp.ProcessExitedException as error:  # a process stopped itself (a non-finite loss was printed)
        raise SystemExit(error.exit_code or 1) from None
    seconds = time.perf_counter() - started
    checkpoint = load_checkpoint(output_dir / CHECKPOINT_NAME)
    model = model_from_checkpoint(checkpoint, output_dir / CHECKPOINT_NAME)
    records = read_log(output_dir / LOG_NAME)
    summary = {"steps": checkpoint["step"], "seconds": seconds, "final": records[-1] if records else None,
               "images_per_second": checkpoint["step"] * args.batch_size / seconds,  # process start-up included
               "checkpoint": str(output_dir / CHECKPOINT_NAME)}  # fmt: skip
    return model.to(choose_device(args.device)), summary


def draw_figures(model: torch.nn.Module, held_out, directory: Path, device: torch.device, amp: str = "off") -> None:
    """The loss curve, the first held-out images with the model's detections above the ground truth,
    and RoIPool's bins against RoIAlign's samples."""
    loss_curve_figure(read_log(directory / "train" / LOG_NAME)).savefig(directory / LOSS_CURVE_NAME, dpi=110)
    model.eval()
    shown = [held_out[i] for i in range(min(SHOWN_IMAGES, len(held_out)))]
    with torch.inference_mode(), mixed_precision(device, amp):
        found = [model([image.to(device)])[0] for image, _ in shown]
    detections = [{k: (v.float() if v.is_floating_point() else v).cpu() for k, v in d.items()} for d in found]  # bf16 -> float32
    images = [image for image, _ in shown] * 2
    titles = [f"prediction, image {t['image_id']}" for _, t in shown] + [f"ground truth, image {t['image_id']}" for _, t in shown]
    figure = detections_figure(images, detections + [target for _, target in shown], held_out.category_names, 0.5,
                               titles=titles, columns=len(shown))  # fmt: skip
    figure.savefig(directory / "predictions.png", dpi=110)
    roi_align_figure().savefig(directory / "roi_align.png", dpi=120)


def write_report(args: argparse.Namespace, directory: Path, metrics: dict, summary: dict, seconds: dict,
                 device: torch.device) -> None:  # fmt: skip
    """`demo.json`: the AP, the seconds of each part, the settings and the versions."""
    report = {
        "status": "finished",
        "mask_AP": metrics["segm"]["AP"], "box_AP": metrics["bbox"]["AP"], "metrics": metrics, "seconds": seconds,
        "train_images_per_second": summary["images_per_second"], "steps": summary["steps"],
        "threads": torch.get_num_threads(), "device": str(device), "torch": torch.__version__,
        "machine": f"{platform.machine()}, {platform.system()}, {torch.get_num_threads()} threads",
        "arguments": arguments(args),
    }  # fmt: skip
    (directory / REPORT_NAME).write_text(json.dumps(report, indent=2))


def print_report(directory: Path, metrics: dict, summary: dict, seconds: dict, num_held_out: int) -> None:
    print()
    print(f"COCO AP on {num_held_out} held-out images (%), after {summary['steps']} steps "
          f"({summary['images_per_second']:.1f} training images/s):")  # fmt: skip
    print(metrics_table(metrics))
    print(f"time: {seconds['total']:.0f} s (data {seconds['data']:.0f}, train {seconds['train']:.0f}, "
          f"evaluate {seconds['evaluate']:.0f}, figures {seconds['figures']:.0f})")  # fmt: skip
    for name, what in (("metrics.json", "COCO metrics"), (LOSS_CURVE_NAME, "loss curve"),
                       ("predictions.png", "held-out predictions and ground truth"),
                       ("roi_align.png", "RoIPool against RoIAlign"), (REPORT_NAME, "figures and timings"),
                       ("train/checkpoint.pt", "the trained model")):  # fmt: skip
        print(f"{what}: {directory / name}")
