"""Step (e) of the prepared GPU run: a two-minute shapes training through the `mrcnn` command, and its AP.

    python benchmarks/gpu_shapes.py --output-dir DIR --seconds 170     # the whole step within 170 s
    python benchmarks/gpu_shapes.py --output-dir DIR --dry-run         # 8 images, 1 step, no calibration, CPU

The demo's recipe (mrcnn/demo.py: `shapes_small` from scratch, batches of 4, learning rate
0.02 with 100 warm-up steps, gradients clipped at norm 10, 128 x 128 images; 1,000 training
images instead of the demo's 2,000, which take half the time to draw, and its 200 held-out
ones), run as a user runs it, one command after another:

1. `mrcnn shapes` draws the data set (into a scratch folder, not the results);
2. `mrcnn train --iterations 30` measures the steps per second on this device (a first
   run also compiles the Triton kernels into the run's `TRITON_CACHE_DIR`);
3. `mrcnn train --iterations N`, N chosen so that training takes `--train-seconds` (120 by
   default, less when the step's time runs short), with the learning-rate schedule of N steps;
4. `mrcnn evaluate` scores the final checkpoint on the held-out images with COCO's AP.

Recorded: each command with its seconds and exit status, the measured steps per second, N,
the training's images per second and last losses (its log.jsonl), and metrics.json (box and
mask AP, AP50, AP75, ...). Every part needs pycocotools (the data set is written in COCO's
layout); where it is missing the step records "skipped: pycocotools missing" and stops.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import ROOT, Results, base_parser, choose_device, package_version, run_command  # noqa: E402, I001

RECIPE = ["--batch-size", "4", "--lr", "0.02", "--clip-grad-norm", "10"]  # mrcnn/demo.py's DEMO_DEFAULTS
SIZES = {"gpu": {"num_train": 1000, "num_val": 200, "calibration": 30, "workers": 4},
         "dry": {"num_train": 8, "num_val": 4, "calibration": 0, "workers": 1}}  # fmt: skip
EVALUATION_SECONDS = 45  # kept back for `mrcnn evaluate` on 200 images


def mrcnn(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "mrcnn", *arguments]


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def steps_per_second(log: list[dict]) -> float | None:
    """Steps per second after the first third of the log (the first steps compile kernels, warm caches)."""
    if len(log) < 3:
        return None
    first = log[len(log) // 3]
    last = log[-1]
    return (last["step"] - first["step"]) / max(last["seconds"] - first["seconds"], 1e-9)


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=200, help="the whole step's time, all commands together")
    parser.add_argument("--train-seconds", type=float, default=120, help="the training's target duration")
    args = parser.parse_args(argv)
    deadline = time.perf_counter() + args.seconds
    device = choose_device(args)
    sizes = SIZES["dry" if args.dry_run else "gpu"]
    results = Results(args.output_dir, "shapes", "a two-minute shapes training (mrcnn train) and its COCO AP", args.dry_run, device)
    results["recipe"] = {"config": "shapes_small", **sizes, "train_options": RECIPE}
    if package_version("pycocotools") is None:
        results["status"] = "skipped: pycocotools missing"
        print(results.data["status"])
        return 0
    scratch = Path(tempfile.mkdtemp(prefix="gpu_shapes_"))
    env = dict(os.environ)
    commands = {}

    def command(name: str, arguments: list[str], seconds: float) -> bool:
        run = run_command(mrcnn(*arguments), seconds, env=env, cwd=ROOT, tail=8)
        commands[name] = {"command": "mrcnn " + " ".join(arguments), **run}
        results["commands"] = commands
        return run["rc"] == 0

    def left() -> float:
        return deadline - time.perf_counter()

    try:
        data = scratch / "shapes"
        if not command("shapes", ["shapes", "--output-dir", str(data), "--num-train", str(sizes["num_train"]),
                                  "--num-val", str(sizes["num_val"])], min(60, left())):  # fmt: skip
            results["status"] = "failed: mrcnn shapes"
            return 1
        train = ["train", "--data", str(data), "--device", device, "--workers", str(sizes["workers"]), *RECIPE]
        calibration = scratch / "calibration"
        if sizes["calibration"] and not command("calibration", [*train, "--iterations", str(sizes["calibration"]), "--warmup", "10",
                                       "--output-dir", str(calibration)], min(90, left() - EVALUATION_SECONDS)):  # fmt: skip
            results["status"] = "failed: mrcnn train (calibration)"
            return 1
        rate = steps_per_second(read_log(calibration / "log.jsonl"))
        budget = min(args.train_seconds, left() - EVALUATION_SECONDS - 25)  # 25 s: start-up and the last checkpoint
        iterations = 1 if args.dry_run else max(20, int(rate * budget)) if rate else 200
        results["plan"] = {"calibration_steps_per_s": rate, "train_seconds_target": round(budget, 1), "iterations": iterations}
        output = scratch / "train"
        if not command("train", [*train, "--iterations", str(iterations), "--warmup", str(min(100, max(1, iterations // 10))),
                                 "--checkpoint-every", str(iterations), "--output-dir", str(output)],
                       left() - EVALUATION_SECONDS + 15):  # fmt: skip
            results["status"] = "failed: mrcnn train"
            return 1
        log = read_log(output / "log.jsonl")
        results["training"] = {"steps": len(log), "seconds": log[-1]["seconds"] if log else None,
                               "images_per_s": 4 * len(log) / log[-1]["seconds"] if log else None,
                               "steps_per_s_after_warmup": steps_per_second(log), "last": log[-1] if log else None}  # fmt: skip
        evaluation = scratch / "evaluate"
        evaluate = ["evaluate", "--data", str(data), "--weights", str(output / "checkpoint.pt"), "--device", device,
                    "--output-dir", str(evaluation)]  # fmt: skip
        if not command("evaluate", evaluate, max(left(), 20)):
            results["status"] = "failed: mrcnn evaluate"
            return 1
        results["metrics"] = json.loads((evaluation / "metrics.json").read_text())
        results["status"] = "ok"
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
