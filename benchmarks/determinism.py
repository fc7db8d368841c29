"""What determinism costs: RoIAlign's backward and a training step, with and without torch's deterministic mode.

    python benchmarks/determinism.py                  # CPU, 2 threads, 5 repeats
    python benchmarks/determinism.py --device cuda    # the Triton kernels: atomics against sort + fixed-order sum
    python benchmarks/determinism.py --quick          # tiny sizes, seconds: proves the script works

Two things are timed, each in the default mode and under `torch.use_deterministic_algorithms(True)`
(interleaved: default, deterministic, deterministic, default, ..., the median of `--repeats`
after one warm-up each), and each is run twice per mode to see whether the two runs give the
same bits:

- RoIAlign's backward pass: `mrcnn.roi_align.MultiLevelRoIAlign` (7 x 7, sampling ratio 2) at
  training shapes (2 images 800 x 1344, P2-P5 with 256 channels, 1024 RoIs: the box branch of
  a batch; benchmarks/roi_align.py makes them), forward untimed, then the gradient of the four
  feature maps for a fixed output gradient. On a CPU that is the sparse path of
  mrcnn/roi_align_cpu.py, whose sums run in a fixed order anyway; on CUDA the Triton kernel,
  whose default backward adds with atomics (the order of additions to a pixel varies from run
  to run) and whose deterministic backward sorts the terms and sums them in a fixed order
  (kernels/roi_align_deterministic.py).
- A whole training iteration of `shapes_small` (batch of two 128 x 128 shapes images: forward,
  the five losses, backward, SGD step with learning rate 0.02), each run starting from the same
  weights and seed; the bits compared are the losses and every weight after the step.

Deterministic mode also makes `torch.empty` fill new memory (with NaN for floats,
`torch.utils.deterministic.fill_uninitialized_memory`), which costs a write of every buffer
allocated that way. "Same bits" answers: do two runs in this mode agree exactly, and does this
mode agree exactly with the other one. Results: benchmarks/results/determinism_<device>.json
and .md (`--quick`: determinism_<device>_quick.*).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, benchmark_images, load_average, machine_record, record_lines, synchronize, write_report  # noqa: E402
from benchmarks.roi_align import STRIDES, make_inputs  # noqa: E402
from mrcnn.config import shapes_small  # noqa: E402
from mrcnn.model import MaskRCNN  # noqa: E402
from mrcnn.poolers import MultiLevelRoIAlign  # noqa: E402

MODES = ("default", "deterministic")


@contextmanager
def mode(name: str):
    """torch's deterministic mode on (`"deterministic"`) or off (`"default"`), restored afterwards."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(name == "deterministic")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def roi_align_backward(device: str, quick: bool):
    """A function `run() -> (seconds of the backward pass, the gradients)` at training shapes (module docstring)."""
    channels = 16 if quick else 256
    features, rois, _ = make_inputs(device, channels, 2)
    if quick:  # a quarter of the image in each direction, and fewer RoIs
        features = [f[:, :, : f.shape[2] // 4, : f.shape[3] // 4].contiguous() for f in features]
        rois = rois[:64].clone()
        rois[:, 1:] = rois[:, 1:] / 4
    rois = rois[rois[:, 0].argsort(stable=True)]  # grouped by image, as in a batch
    pooler = MultiLevelRoIAlign(7, STRIDES, sampling_ratio=2, aligned=False)
    grad_out = torch.randn(rois.shape[0], channels, 7, 7, generator=torch.Generator().manual_seed(1)).to(device)

    def run():
        leaves = [f.detach().clone().requires_grad_() for f in features]
        out = pooler(leaves, rois)
        synchronize(device)
        start = time.perf_counter()
        grads = torch.autograd.grad(out, leaves, grad_out)
        synchronize(device)
        return time.perf_counter() - start, grads

    return run, {"images": 2, "channels": channels, "feature_sizes": [list(f.shape[2:]) for f in features], "rois": rois.shape[0],
                 "pooled_size": 7, "sampling_ratio": 2}  # fmt: skip


def training_step(device: str, quick: bool):
    """A function `run() -> (seconds of one iteration, losses and weights after it)` (module docstring)."""
    size = 64 if quick else 128
    config = shapes_small().replace(min_size=size, max_size=size)
    images, targets = benchmark_images(2, size, size)
    images = [image.to(device) for image in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    torch.manual_seed(0)
    initial = MaskRCNN(config).state_dict()
    model = MaskRCNN(config).to(device).train()

    def run():
        model.load_state_dict(initial)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
        torch.manual_seed(0)
        synchronize(device)
        start = time.perf_counter()
        losses = model(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        synchronize(device)
        seconds = time.perf_counter() - start
        return seconds, [v.detach().clone() for v in losses.values()] + [p.detach().clone() for p in model.parameters()]

    return run, {"model": "shapes_small", "images": 2, "image_size": [size, size], "objects": [len(t["boxes"]) for t in targets]}


def same_bits(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def max_difference(a: list, b: list) -> float:
    return max(float((x.double() - y.double()).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b))


def compare_modes(run, repeats: int) -> dict:
    """Time `run` in both modes, interleaved, and compare the bits of its results (module docstring)."""
    results = {}
    for name in MODES:  # warm-up, and two runs for the bits
        with mode(name):
            run()
            results[name] = [run()[1], run()[1]]
    times = {name: [] for name in MODES}
    for index in range(repeats):
        for name in MODES if index % 2 == 0 else MODES[::-1]:
            with mode(name):
                times[name].append(run()[0])
    report = {}
    for name in MODES:
        first, second = results[name]
        report[name] = {"times_s": times[name], "median_s": statistics.median(times[name]), "best_s": min(times[name]),
                        "two_runs_same_bits": same_bits(first, second),
                        "two_runs_max_abs_difference": max_difference(first, second)}  # fmt: skip
    report["modes_same_bits"] = same_bits(results["default"][0], results["deterministic"][0])
    report["modes_max_abs_difference"] = max_difference(results["default"][0], results["deterministic"][0])
    report["cost_deterministic_over_default"] = report["deterministic"]["median_s"] / report["default"]["median_s"]
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per mode (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads: more than one, so that a thread-dependent order could show")
    parser.add_argument("--quick", action="store_true", help="small shapes, 1 repeat")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats

    load_before = load_average()
    run, roi_shapes = roi_align_backward(args.device, args.quick)
    roi_align = compare_modes(run, repeats)
    run, step_shapes = training_step(args.device, args.quick)
    step = compare_modes(run, repeats)
    report = machine_record(args.device) | {
        "load_before": load_before,
        "load_after": load_average(),
        "repeats": repeats,
        "roi_align_path": "triton (atomics; deterministic: sort + fixed-order sum)" if args.device == "cuda"
        else "cpu sparse path (mrcnn.roi_align_cpu: embedding_bag in a fixed order)",
        "results": {"RoIAlign backward": roi_align | {"shapes": roi_shapes},
                    "shapes_small training iteration": step | {"shapes": step_shapes}},
    }  # fmt: skip
    write_report(report, args.output_dir, f"determinism_{args.device}" + ("_quick" if args.quick else ""), markdown)
    return report


def markdown(report: dict) -> str:
    lines = [f"# What determinism costs, {report['device']}", "", *record_lines(report), f"- RoIAlign: {report['roi_align_path']}"]
    for name, result in report["results"].items():
        lines += ["", f"## {name}", "", f"Shapes: {result['shapes']}.", "",
                  f"Seconds, median (best) of {report['repeats']} interleaved runs, and whether two runs agree to the bit:", "",
                  "| mode | median s | best s | two runs: same bits | largest difference |", "|---|---|---|---|---|"]  # fmt: skip
        for name in MODES:
            r = result[name]
            lines.append(f"| {name} | {r['median_s']:.4f} | {r['best_s']:.4f} | {'yes' if r['two_runs_same_bits'] else 'no'} "
                         f"| {r['two_runs_max_abs_difference']:.1e} |")
        lines += ["", f"Deterministic / default: **{result['cost_deterministic_over_default']:.2f}x** the time. "
                  f"The two modes give the same bits: {'yes' if result['modes_same_bits'] else 'no'} "
                  f"(largest difference {result['modes_max_abs_difference']:.1e})."]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
