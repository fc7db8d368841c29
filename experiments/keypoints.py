"""Keypoint R-CNN on the stick figures, with and without the mask branch (paper section 5, Table 4).

The paper trains Mask R-CNN on COCO persons with keypoints only and with keypoints and masks,
and finds the two tasks help each other a little (keypoint AP 64.2 -> 64.7 with masks, Table 4).
This script runs the same comparison in miniature: both arms train the `figures_small` preset
from scratch with one budget (the demo's recipe: SGD, lr 0.02, batch 4, linear warm-up, gradient
clipping) on `mrcnn/data/keypoints.py`'s figures, and are scored on held-out images with COCO's
box AP and keypoint AP (OKS), plus mask AP for the arm with masks.

    python experiments/keypoints.py                       # both arms, in parallel, one thread each
    python experiments/keypoints.py --iterations 200      # a quick look

Writes `experiments/results/keypoints.json` and `keypoints.md` (the numbers, the command, the
machine); the runs (checkpoints, logs) go to `--output-dir` (default `runs/keypoints`).

Horizontal flipping is off, as when the recorded results were made: the trainer's flip then
mirrored boxes and masks only. It now also swaps left and right keypoints (`horizontal_flip`
with the data set's `flip_index`), so `flip=True` is a fair arm to add.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

import torch

from mrcnn.config import figures_small
from mrcnn.data.keypoints import KeypointCocoDataset, generate_figures
from mrcnn.evaluate import evaluate_keypoints
from mrcnn.model import MaskRCNN
from mrcnn.train import paper_schedule, read_log, train

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"keypoints": False, "keypoints_and_masks": True}  # arm name -> with the mask branch


def run_arm(name: str, args: argparse.Namespace) -> dict:
    """Train one arm and score it on the held-out figures."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = args.output_dir / "figures"
    train_set = KeypointCocoDataset(data / "train", data / "annotations" / "person_keypoints_train.json")
    val_set = KeypointCocoDataset(data / "val", data / "annotations" / "person_keypoints_val.json")
    model = MaskRCNN(figures_small(train_set.num_classes, len(train_set.keypoint_names), mask=ARMS[name]))
    settings = paper_schedule(args.batch_size, lr=args.lr, iterations=args.iterations, warmup_iterations=args.warmup,
                              clip_grad_norm=10.0, flip=False, seed=args.seed,
                              checkpoint_every=args.iterations)  # fmt: skip
    started = time.perf_counter()
    summary = train(model, train_set, settings, args.output_dir / name, progress=False)
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    metrics = evaluate_keypoints(model, val_set)
    log = read_log(args.output_dir / name / "log.jsonl")
    last = log[-50:]  # the mean of the last 50 steps: one step's loss is noisy
    final_losses = {k: sum(r[k] for r in last) / len(last) for k in last[-1] if k.startswith("loss")}
    return {"mask_branch": ARMS[name], "metrics": metrics, "train_seconds": round(train_seconds, 1),
            "evaluate_seconds": round(time.perf_counter() - started, 1), "final_losses_mean_last_50": final_losses,
            "steps": summary["steps"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=ROOT / "runs" / "keypoints")
    parser.add_argument("--results", type=Path, default=ROOT / "experiments" / "results" / "keypoints.json")
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(ARMS))
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per arm (the arms run in parallel)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    generate_figures(args.output_dir / "figures", args.num_train, args.num_val, seed=args.seed)
    draw_seconds = time.perf_counter() - started
    with multiprocessing.get_context("fork").Pool(len(args.arms)) as pool:
        arms = dict(zip(args.arms, pool.starmap(run_arm, [(name, args) for name in args.arms])))
    record = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "load_average_at_end": list(os.getloadavg()),
                    "torch": torch.__version__, "device": "cpu", "threads_per_arm": args.threads},  # fmt: skip
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {"num_train": args.num_train, "num_val": args.num_val, "draw_seconds": round(draw_seconds, 1)},
        "arms": arms,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(record, indent=2))
    rows = ["| arm | box AP | keypoint AP | keypoint AP50 | keypoint AP75 | mask AP | train time |", "|---|---|---|---|---|---|---|"]
    for name, arm in arms.items():
        m = arm["metrics"]
        mask_ap = f"{m['segm']['AP']:.3f}" if "segm" in m else "-"
        rows.append(f"| {name} | {m['bbox']['AP']:.3f} | {m['keypoints']['AP']:.3f} | {m['keypoints']['AP50']:.3f} | "
                    f"{m['keypoints']['AP75']:.3f} | {mask_ap} | {arm['train_seconds'] / 60:.0f} min |")  # fmt: skip
    table = "\n".join(rows)
    args.results.with_suffix(".md").write_text(
        f"# Keypoint R-CNN on the stick figures, with and without masks\n\n{table}\n\n"
        f"Command: `{record['command']}`\n\nMachine: {record['machine']}\n"
    )
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
