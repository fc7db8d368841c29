"""Training throughput of `mrcnn.train`: one image per forward pass against the process's images as one batch.

    python benchmarks/train_forward.py                              # CPU, 1 thread, 4 rounds of 20 steps per mode
    python benchmarks/train_forward.py --device cuda --workers 4    # the same on a GPU
    python benchmarks/train_forward.py --quick                      # 3 steps, 1 round: proves the script works

The demo's recipe (mrcnn/demo.py: `shapes_small` from scratch, batches of 4 128 x 128 shapes
images, learning rate 0.02 with 10 warm-up steps, gradients clipped at norm 10) run by the real
trainer, `mrcnn.train.train`, in one process, in three modes (`TrainSettings`):

- **per image**: `batched_forward=False`, the losses read every step (the CPU's default; the
  same weights for any number of processes);
- **batched**: `batched_forward=True` (one padded batch through backbone, FPN and RPN; the
  RoIs sampled per image), the losses still read every step;
- **batched, read every 20**: and the losses read back from the device every 20 steps
  (`log_every=20`: CUDA's default), so that the trainer itself never waits for the device.

The modes alternate in blocks of `--steps` steps (each block a fresh run from the same initial
weights and data order), `--rounds` times. A step's time is the difference of consecutive
`seconds` in the run's log.jsonl, the first step of each block left out (it builds the CPU's
kernels or compiles the GPU's); the median over all blocks is reported (the CPU's first steps
with a new RoI count are slow, and a shared machine stalls now and then), with the mean.

One thread by default: on this project's shared two-core machine, two torch threads under a load
of about 4 stall for seconds at a time (OpenMP threads waiting on each other while the other is
descheduled), and the medians then measure the neighbours. Results:
benchmarks/results/train_forward_<device>.json and .md (`--quick`: train_forward_<device>_quick.*).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, load_average, machine_record, record_lines, write_report  # noqa: E402
from mrcnn.config import shapes_small  # noqa: E402
from mrcnn.data.shapes import ShapesDataset  # noqa: E402
from mrcnn.model import MaskRCNN  # noqa: E402
from mrcnn.train import TrainSettings, train  # noqa: E402

MODES = {"per image": {"batched_forward": False, "log_every": 1},
         "batched": {"batched_forward": True, "log_every": 1},
         "batched, read every 20": {"batched_forward": True, "log_every": 20}}  # fmt: skip


def step_seconds(data, mode: dict, steps: int, batch_size: int, device: str, workers: int) -> tuple[list[float], float]:
    """One fresh run of `steps` steps in `mode`: the seconds of steps 2..steps, and the last loss."""
    torch.manual_seed(0)
    settings = TrainSettings(iterations=steps, batch_size=batch_size, lr=0.02, warmup_iterations=10, clip_grad_norm=10.0,
                             checkpoint_every=10**6, workers=workers, **mode)  # fmt: skip
    with tempfile.TemporaryDirectory() as directory:
        train(MaskRCNN(shapes_small()), data, settings, directory, device=device, progress=False)
        log = [json.loads(line) for line in (Path(directory) / "log.jsonl").read_text().splitlines()]
    clock = [record["seconds"] for record in log]
    return [b - a for a, b in zip(clock, clock[1:])], log[-1]["loss"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: see the module docstring)")
    parser.add_argument("--steps", type=int, default=20, help="steps per block (default 20)")
    parser.add_argument("--rounds", type=int, default=4, help="blocks per mode, interleaved (default 4)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per step (default 4, the demo's)")
    parser.add_argument("--workers", type=int, default=0, help="data-loader processes (default 0)")
    parser.add_argument("--quick", action="store_true", help="3 steps, 1 round")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    steps, rounds = (3, 1) if args.quick else (args.steps, args.rounds)
    if steps < 3 or rounds < 1 or args.threads < 1:
        parser.error("need --steps >= 3, --rounds >= 1 and --threads >= 1")
    torch.set_num_threads(args.threads)
    data = ShapesDataset(max(100, steps * args.batch_size))  # the demo's draw: 128 x 128, up to 4 objects

    load_before = load_average()
    seconds = {name: [] for name in MODES}
    blocks = {name: [] for name in MODES}
    for _ in range(rounds):
        for name, mode in MODES.items():
            found, loss = step_seconds(data, mode, steps, args.batch_size, args.device, args.workers)
            seconds[name] += found
            blocks[name].append({"median_s": statistics.median(found), "mean_s": statistics.fmean(found), "last_loss": loss})
            print(f"{name}: median {blocks[name][-1]['median_s']:.3f} s/step, last loss {loss:.4f}", flush=True)
    results = {}
    for name, found in seconds.items():
        median = statistics.median(found)
        results[name] = {"median_s_per_step": median, "mean_s_per_step": statistics.fmean(found),
                         "steps_per_s": 1 / median, "images_per_s": args.batch_size / median, "blocks": blocks[name]}  # fmt: skip
    baseline = results["per image"]["median_s_per_step"]
    for result in results.values():
        result["speedup_over_per_image"] = baseline / result["median_s_per_step"]
    report = machine_record(args.device) | {
        "load_before": load_before, "load_after": load_average(), "steps_per_block": steps, "rounds": rounds,
        "batch_size": args.batch_size, "workers": args.workers, "modes": MODES, "results": results,
    }  # fmt: skip
    write_report(report, args.output_dir, f"train_forward_{args.device}" + ("_quick" if args.quick else ""), markdown)
    return report


def markdown(report: dict) -> str:
    lines = [f"# Training throughput, per image against batched, {report['device']}", "", *record_lines(report),
             f"- shapes_small, batches of {report['batch_size']} 128 x 128 images, {report['workers']} data-loader "
             f"workers; {report['rounds']} interleaved blocks of {report['steps_per_block']} steps per mode", "",
             "Seconds per step: the median (and mean) over every block's steps 2 onwards.", "",
             "| mode | median s/step | mean s/step | steps/s | images/s | speed-up |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in report["results"].items():
        lines.append(f"| {name} | {r['median_s_per_step']:.3f} | {r['mean_s_per_step']:.3f} | {r['steps_per_s']:.2f} | "
                     f"{r['images_per_s']:.1f} | {r['speedup_over_per_image']:.2f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
