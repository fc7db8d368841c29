"""The demo: Mask R-CNN learns the synthetic shapes on a laptop CPU in minutes, scored like the paper.

`mrcnn demo --output-dir runs/demo` (`make demo`) runs the whole method end to end:

1. draws the shapes data set (mrcnn/data/shapes.py) into `OUTPUT/shapes/` unless it is there;
2. trains the `shapes_small` preset from scratch (mrcnn/train.py) into `OUTPUT/train/`;
3. scores it on the held-out images with COCO's AP (mrcnn/evaluate.py, paper section 4.1):
   `OUTPUT/metrics.json`, `OUTPUT/detections.json`, and a table on the terminal;
4. draws `OUTPUT/loss_curve.png`, `OUTPUT/predictions.png` (held-out images: the model's
   detections above the ground truth) and `OUTPUT/roi_align.png` (RoIPool against RoIAlign);
5. writes `OUTPUT/demo.json`: the AP, the time each part took, the settings and versions.

The defaults are tuned so that a 2-core CPU reaches a mask AP of 0.5 and a box AP of 0.55 in
about ten minutes; README.md records the measured figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import time

from mrcnn.cli import UsageError, choose_device, metrics_table, open_dataset, output_directory, run_training

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


def _training_process(rank: int, world_size: int, port: int, args: argparse.Namespace, root, output_dir) -> None:
    """One of `world_size` training processes (what torchrun would start), on the CPU with gloo."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
                      LOCAL_RANK=str(rank))  # fmt: skip
    import torch.distributed as dist

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
    import torch
    import torch.multiprocessing as mp

    from mrcnn.checkpoint import load_checkpoint, model_from_checkpoint
    from mrcnn.train import read_log

    if args.batch_size % args.processes:
        raise UsageError(f"--batch-size {args.batch_size} must be a multiple of --processes {args.processes}")
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
    checkpoint = load_checkpoint(output_dir / "checkpoint.pt")
    model = model_from_checkpoint(checkpoint, output_dir / "checkpoint.pt")
    records = read_log(output_dir / "log.jsonl")
    summary = {"steps": checkpoint["step"], "seconds": seconds, "final": records[-1] if records else None,
               "images_per_second": checkpoint["step"] * args.batch_size / seconds,  # process start-up included
               "checkpoint": str(output_dir / "checkpoint.pt")}  # fmt: skip
    return model.to(choose_device(args.device)), summary


def run_demo(args: argparse.Namespace) -> int:
    """Draw the shapes data set, train the small model, score it on held-out images and draw the
    results, all under --output-dir (see mrcnn/demo.py)."""
    import torch

    from mrcnn.data.shapes import generate_shapes
    from mrcnn.evaluate import evaluate
    from mrcnn.train import read_log
    from mrcnn.visualize import detections_figure, loss_curve_figure, roi_align_figure

    started = time.perf_counter()
    directory = output_directory(args.output_dir)
    if args.num_val < 1:
        raise UsageError(f"--num-val must be >= 1, got {args.num_val}")
    seconds = {}
    try:
        paths = generate_shapes(directory / "shapes", args.num_train, args.num_val, seed=args.seed)
    except ValueError as error:
        raise UsageError(str(error)) from None
    seconds["data"] = time.perf_counter() - started
    print(f"data: {paths.root} ({args.num_train} training, {args.num_val} held-out images)", flush=True)

    mark = time.perf_counter()
    if args.processes == 1:
        model, summary = run_training(args, open_dataset(paths.root, "train", train=True), directory / "train")
    else:
        model, summary = train_in_processes(args, paths.root, directory / "train")
    seconds["train"] = time.perf_counter() - mark

    mark = time.perf_counter()
    device = choose_device(args.device)
    held_out = open_dataset(paths.root, "val")
    metrics = evaluate(model, held_out, device, output_dir=directory, progress=True)
    seconds["evaluate"] = time.perf_counter() - mark

    mark = time.perf_counter()
    loss_curve_figure(read_log(directory / "train" / "log.jsonl")).savefig(directory / "loss_curve.png", dpi=110)
    model.eval()
    shown = [held_out[i] for i in range(min(SHOWN_IMAGES, len(held_out)))]
    with torch.inference_mode():
        detections = [{k: v.cpu() for k, v in model([image.to(device)])[0].items()} for image, _ in shown]
    images = [image for image, _ in shown] * 2
    titles = [f"prediction, image {t['image_id']}" for _, t in shown] + [f"ground truth, image {t['image_id']}" for _, t in shown]
    figure = detections_figure(images, detections + [target for _, target in shown], held_out.category_names, 0.5,
                               titles=titles, columns=len(shown))  # fmt: skip
    figure.savefig(directory / "predictions.png", dpi=110)
    roi_align_figure().savefig(directory / "roi_align.png", dpi=120)
    seconds["figures"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - started

    report = {
        "mask_AP": metrics["segm"]["AP"], "box_AP": metrics["bbox"]["AP"], "metrics": metrics, "seconds": seconds,
        "train_images_per_second": summary["images_per_second"], "steps": summary["steps"],
        "threads": torch.get_num_threads(), "device": str(device), "torch": torch.__version__,
        "machine": f"{platform.machine()}, {platform.system()}, {torch.get_num_threads()} threads",
        "arguments": {k: str(v) if not isinstance(v, (int, float, bool, type(None))) else v
                      for k, v in vars(args).items() if k != "run"},
    }  # fmt: skip
    (directory / "demo.json").write_text(json.dumps(report, indent=2))
    print()
    print(f"COCO AP on {len(held_out)} held-out images (%), after {summary['steps']} steps "
          f"({summary['images_per_second']:.1f} training images/s):")  # fmt: skip
    print(metrics_table(metrics))
    print(f"time: {seconds['total']:.0f} s (data {seconds['data']:.0f}, train {seconds['train']:.0f}, "
          f"evaluate {seconds['evaluate']:.0f}, figures {seconds['figures']:.0f})")  # fmt: skip
    for name, what in (("metrics.json", "COCO metrics"), ("loss_curve.png", "loss curve"),
                       ("predictions.png", "held-out predictions and ground truth"),
                       ("roi_align.png", "RoIPool against RoIAlign"), ("demo.json", "figures and timings"),
                       ("train/checkpoint.pt", "the trained model")):  # fmt: skip
        print(f"{what}: {directory / name}")
    return 0
