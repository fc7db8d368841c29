"""Benchmark multi-level RoIAlign at Mask R-CNN training shapes: forward and forward + backward.

    python benchmarks/roi_align.py                       # CPU, 2 threads, 5 repeats
    python benchmarks/roi_align.py --device cuda
    PYTHONPATH=. /work/tvenv/bin/python benchmarks/roi_align.py --repeat 7   # with torchvision

Shapes (training, paper section 3.1, torchvision's defaults): 2 images padded to 800 x 1344,
FPN levels P2-P5 (strides 4-32) with C = 256 channels; the box head pools 1024 RoIs (512 per
image) to 7 x 7, the mask head 256 RoIs to 14 x 14, sampling ratio 2, legacy alignment (as
torchvision). RoI sides are log-uniform in [16, 800] pixels with aspect ratios in [1/2, 2], so
that every FPN level gets RoIs (the counts per level are in the results).

Methods (each pools every RoI from its FPN level and returns `[R, C, P, P]` in RoI order):

- kernel:            `kernels.roi_align.multi_level_roi_align`, the Triton kernel (CUDA only);
- fast:              `mrcnn.roi_align.MultiLevelRoIAlign`, the sparse-matrix path of
                     `mrcnn.roi_align_cpu` (what the library runs without the kernel);
- fast, channels-last: the same with the features in `torch.channels_last` memory format,
                     which the sparse path reads without a copy (gradients come back alike);
- reference:         `mrcnn.roi_align.roi_align_reference` once per level (readable, gathers);
- torchvision:       `torchvision.ops.roi_align` once per level (its C++ / CUDA kernel);
- torchvision MSRA:  `torchvision.ops.MultiScaleRoIAlign`, the pooler of its Mask R-CNN.

"fw+bw" runs the forward and `backward` with a fixed random gradient; the features are leaves
that require a gradient, so the time includes writing their `.grad`. Steps are timed round
robin within each repeat, so that a change of load on a shared machine hits all alike; the
load average before and after is recorded. On CUDA the peak extra memory of one fw+bw and the
memory-bandwidth floor are reported: the floor counts the bytes that must move at least
(forward: the distinct feature pixels the RoIs read, once, and the output; backward: the
incoming gradient and the whole feature gradient, which must be written) at `--bandwidth`.
Results go to benchmarks/results/roi_align_<device>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import device_name, versions  # noqa: E402
from mrcnn.roi_align import bilinear_neighbours, roi_align_reference, sampling_grid  # noqa: E402
from mrcnn.poolers import MultiLevelRoIAlign, fpn_level  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STRIDES = (4, 8, 16, 32)
IMAGE_SIZE = (800, 1344)  # H, W after padding
SAMPLING_RATIO = 2


def make_inputs(device: str, channels: int, num_images: int, seed: int = 0):
    """Features `[N, C, H_l, W_l]` for P2-P5 and the two RoI sets `[R, 5]` (box head, mask head)."""
    generator = torch.Generator().manual_seed(seed)
    height, width = IMAGE_SIZE
    features = [torch.randn(num_images, channels, height // s, width // s, generator=generator) for s in STRIDES]

    def rois(count: int) -> torch.Tensor:
        side = torch.empty(count, dtype=torch.float64).uniform_(math.log(16), math.log(800), generator=generator).exp()
        aspect = torch.empty(count, dtype=torch.float64).uniform_(math.log(0.5), math.log(2.0), generator=generator).exp()
        box_w, box_h = side * aspect.sqrt(), side / aspect.sqrt()
        centre_x = torch.rand(count, generator=generator, dtype=torch.float64) * width
        centre_y = torch.rand(count, generator=generator, dtype=torch.float64) * height
        boxes = torch.stack([centre_x - box_w / 2, centre_y - box_h / 2, centre_x + box_w / 2, centre_y + box_h / 2], dim=1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)  # proposals are clipped to the image
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        image = torch.randint(0, num_images, (count, 1), generator=generator).to(torch.float64)
        return torch.cat([image, boxes], dim=1).float()

    box_rois, mask_rois = rois(512 * num_images), rois(128 * num_images)
    return [f.to(device) for f in features], box_rois.to(device), mask_rois.to(device)


def per_level(pool):
    """Run a single-level RoIAlign `pool(features, rois, P, scale)` once per FPN level."""

    def run(features, rois, output_size):
        level = fpn_level(rois[:, 1:], 2, 5) - 2  # [R]
        out = features[0].new_zeros(rois.shape[0], features[0].shape[1], output_size, output_size)
        for index, (feature, stride) in enumerate(zip(features, STRIDES)):
            chosen = torch.nonzero(level == index).squeeze(1)
            if chosen.numel():
                out[chosen] = pool(feature, rois[chosen], output_size, 1.0 / stride)
        return out

    return run


def methods(device: str) -> dict:
    """name -> (run(features, rois, P) -> [R, C, P, P], features in channels-last)."""
    found = {}
    if device == "cuda":
        try:
            from kernels.roi_align import multi_level_roi_align

            found["kernel"] = (lambda f, r, p: multi_level_roi_align(f, r, p, [1.0 / s for s in STRIDES], SAMPLING_RATIO, False, min_level=2), False)
        except ImportError as error:
            print(f"kernel unavailable: {error}")
    poolers = {p: MultiLevelRoIAlign(p, STRIDES, SAMPLING_RATIO, aligned=False) for p in (7, 14)}
    found["fast"] = (lambda f, r, p: poolers[p](f, r, use_kernel=False), False)
    found["fast, channels-last"] = (lambda f, r, p: poolers[p](f, r, use_kernel=False), True)
    found["reference"] = (per_level(lambda f, r, p, s: roi_align_reference(f, r, p, s, SAMPLING_RATIO, False)), False)
    try:
        import torchvision.ops as ops

        found["torchvision"] = (per_level(lambda f, r, p, s: ops.roi_align(f, r, p, s, SAMPLING_RATIO, False)), False)
        names = ["p2", "p3", "p4", "p5"]
        msra = {p: ops.MultiScaleRoIAlign(names, p, SAMPLING_RATIO) for p in (7, 14)}

        def multi_scale(features, rois, output_size):
            boxes = [rois[rois[:, 0] == n, 1:] for n in range(features[0].shape[0])]  # RoIs are sorted by image below
            return msra[output_size](dict(zip(names, features)), boxes, [IMAGE_SIZE] * len(boxes))

        found["torchvision MSRA"] = (multi_scale, False)
    except ImportError as error:
        print(f"torchvision unavailable: {error}")
    return found


def bandwidth_floor_ms(features, rois, output_size: int, bandwidth: float) -> tuple[float, float]:
    """(forward, backward) lower bounds in ms from the bytes that must move (module docstring)."""
    level = fpn_level(rois[:, 1:], 2, 5) - 2
    element = features[0].element_size()
    channels = features[0].shape[1]
    touched = 0
    for index, (feature, stride) in enumerate(zip(features, STRIDES)):
        chosen = rois[level == index]
        if chosen.numel() == 0:
            continue
        height, width = feature.shape[2:]
        y, x, *_ = sampling_grid(chosen, (output_size, output_size), 1.0 / stride, SAMPLING_RATIO, False)
        y_low, y_high, *_ = bilinear_neighbours(y, height)
        x_low, x_high, *_ = bilinear_neighbours(x, width)
        rows = torch.stack([y_low, y_high], -1).flatten(1)  # [R_l, P G 2]
        cols = torch.stack([x_low, x_high], -1).flatten(1)
        pixel = (chosen[:, 0].long()[:, None, None] * height + rows[:, :, None]) * width + cols[:, None, :]
        touched += torch.unique(pixel).numel()
    output = rois.shape[0] * channels * output_size**2 * element
    forward = touched * channels * element + output
    backward = output + sum(f.numel() for f in features) * element
    return forward / bandwidth * 1e3, backward / bandwidth * 1e3


def alternatives(features, rois, output_size: int, repeats: int) -> dict:
    """Time the two products of the sparse path against torch's sparse CSR matrix product.

    On the RoIs of the finest level (P2), with its interpolation matrix `S` and the feature rows
    laid out once: forward `S F` and backward `S^T G`, each as `embedding_bag` (what the
    library runs; the backward one includes sorting the non-zeros by column) and as a CSR
    product (`S^T` as the transpose of the CSR matrix, which torch multiplies as CSC).
    """
    import torch.nn.functional as F

    from mrcnn.roi_align_cpu import interpolation_matrix, transposed_bags

    level_rois = rois[fpn_level(rois[:, 1:], 2, 5) == 2]
    feature = features[0]
    num_images, channels, height, width = feature.shape
    column, weight = interpolation_matrix(level_rois, (output_size, output_size), 1.0 / STRIDES[0], SAMPLING_RATIO, False, height, width)
    rows = feature.permute(0, 2, 3, 1).reshape(-1, channels).contiguous()  # [N H W, C]
    grad = torch.randn(column.shape[0], channels)
    matrix = torch.sparse_csr_tensor(
        torch.arange(0, column.numel() + 1, column.shape[1]), column.flatten(), weight.flatten(), (column.shape[0], rows.shape[0])
    )

    def bag_backward():
        row, row_weight, offsets = transposed_bags(column, weight, rows.shape[0])
        return F.embedding_bag(row, grad, offsets, mode="sum", per_sample_weights=row_weight)

    steps = {
        ("S F", "embedding_bag"): lambda: F.embedding_bag(column, rows, mode="sum", per_sample_weights=weight),
        ("S F", "CSR"): lambda: matrix @ rows,
        ("S^T G", "embedding_bag (with the sort)"): bag_backward,
        ("S^T G", "CSR transposed"): lambda: matrix.t() @ grad,
    }
    assert torch.allclose(steps[("S F", "embedding_bag")](), steps[("S F", "CSR")](), atol=1e-4)
    assert torch.allclose(steps[("S^T G", "embedding_bag (with the sort)")](), steps[("S^T G", "CSR transposed")](), atol=1e-4)
    results = measure(steps, "cpu", repeats)
    return {f"{product} | {method}": result for (product, method), result in results.items()} | {
        "rois": level_rois.shape[0], "nonzeros": column.numel()
    }


def measure(steps: dict, device: str, repeats: int) -> dict:
    """Median and best wall time (ms) of each step, timed round robin; on CUDA also peak extra MiB."""

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    results = {}
    for name, step in steps.items():
        step()  # warm-up (and Triton compilation)
        extra = None
        if device == "cuda":
            sync()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step()
            sync()
            extra = (torch.cuda.max_memory_allocated() - before) / 2**20
        results[name] = {"times_ms": [], "peak_extra_mib": extra}
    for _ in range(repeats):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            results[name]["times_ms"].append((time.perf_counter() - start) * 1e3)
    for result in results.values():
        result["median_ms"] = statistics.median(result["times_ms"])
        result["best_ms"] = min(result["times_ms"])
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per step (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="time only these methods (names as in the table)")
    parser.add_argument("--bandwidth", type=float, default=4.3e12, help="bytes/s for the CUDA floor (H200: 4.3e12 measured)")
    parser.add_argument("--alternatives", action="store_true", help="also time the sparse path's products against torch's CSR product")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    torch.set_num_threads(args.threads)

    features, box_rois, mask_rois = make_inputs(args.device, args.channels, args.images)
    box_rois = box_rois[box_rois[:, 0].argsort(stable=True)]  # RoIs grouped by image, as in a batch
    mask_rois = mask_rois[mask_rois[:, 0].argsort(stable=True)]
    configs = {"box 7x7": (box_rois, 7), "mask 14x14": (mask_rois, 14)}
    found = methods(args.device)
    reference = found["reference"][0]  # the definition every method is checked against, timed or not
    if args.only:
        found = {name: value for name, value in found.items() if name in args.only}

    load_before = os.getloadavg()
    table = {}
    agreement = {}
    for config, (rois, output_size) in configs.items():
        grad_out = torch.randn(rois.shape[0], args.channels, output_size, output_size, generator=torch.Generator().manual_seed(1)).to(args.device)
        steps = {}
        for name, (run, channels_last) in found.items():
            leaves = [f.detach().clone(memory_format=torch.channels_last if channels_last else torch.contiguous_format).requires_grad_() for f in features]

            def forward(run=run, leaves=leaves):
                return run(leaves, rois, output_size)

            def forward_backward(run=run, leaves=leaves):
                run(leaves, rois, output_size).backward(grad_out)
                for leaf in leaves:
                    leaf.grad = None

            steps[(name, "fw")] = forward
            steps[(name, "fw+bw")] = forward_backward
        with torch.no_grad():
            baseline = reference(features, rois, output_size)
            agreement[config] = {name: float((run(features, rois, output_size) - baseline).abs().max())
                                 for name, (run, _) in found.items()}  # fmt: skip
        del baseline
        table[config] = measure(steps, args.device, args.repeat)
    if args.alternatives and args.device == "cpu":
        alternative = alternatives(features, box_rois, 7, args.repeat)
    load_after = os.getloadavg()

    levels = {config: torch.bincount(fpn_level(rois[:, 1:].cpu(), 2, 5) - 2, minlength=4).tolist() for config, (rois, _) in configs.items()}
    floors = {}
    if args.device == "cuda":
        floors = {config: bandwidth_floor_ms(features, rois, output_size, args.bandwidth) for config, (rois, output_size) in configs.items()}
    report = {
        "device": args.device,
        "device_name": device_name(args.device),
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_average_1_5_15_before": load_before,
        "load_average_1_5_15_after": load_after,
        "cpu_count": os.cpu_count(),
        "shapes": {"images": args.images, "image_size": IMAGE_SIZE, "channels": args.channels, "strides": STRIDES,
                   "sampling_ratio": SAMPLING_RATIO, "aligned": False,
                   "rois": {config: [rois.shape[0], output_size] for config, (rois, output_size) in configs.items()},
                   "rois_per_level_P2_P5": levels},
        "max_abs_difference_to_reference": agreement,
        "results": {config: {f"{name} | {mode}": result for (name, mode), result in steps.items()} for config, steps in table.items()},
        "bandwidth_floor_ms": {config: {"fw": fw, "fw+bw": fw + bw} for config, (fw, bw) in floors.items()},
    }
    ratios = {}
    for config, steps in table.items():
        for other in ("torchvision", "torchvision MSRA", "reference"):
            for mode in ("fw", "fw+bw"):
                if (other, mode) in steps and ("fast", mode) in steps:
                    ratios[f"{config} {mode}: {other} / fast"] = steps[(other, mode)]["median_ms"] / steps[("fast", mode)]["median_ms"]
                if (other, mode) in steps and ("kernel", mode) in steps:
                    ratios[f"{config} {mode}: {other} / kernel"] = steps[(other, mode)]["median_ms"] / steps[("kernel", mode)]["median_ms"]
        for mode in ("fw", "fw+bw"):
            if config in floors and ("kernel", mode) in steps:
                ratios[f"{config} {mode}: kernel / bandwidth floor"] = steps[("kernel", mode)]["median_ms"] / report["bandwidth_floor_ms"][config][mode]
    report["ratios"] = ratios
    if args.alternatives and args.device == "cpu":
        report["alternatives_box_7x7_P2"] = alternative

    args.output_dir.mkdir(parents=True, exist_ok=True)
    stem = args.output_dir / f"roi_align_{args.device}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report, table, found))
    print(stem.with_suffix(".md").read_text())
    return 0


def markdown(report: dict, table: dict, found: dict) -> str:
    configs = list(table)
    lines = [
        f"# Multi-level RoIAlign, {report['device']}: {report['device_name']}",
        "",
        f"- command: `{report['command']}`",
        f"- versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}; threads: {report['threads']} of {report['cpu_count']} CPUs",
        f"- load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in report['load_average_1_5_15_before'])}; "
        f"after: {', '.join(f'{v:.2f}' for v in report['load_average_1_5_15_after'])}",
        f"- shapes: {report['shapes']['images']} images {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, P2-P5 with C = {report['shapes']['channels']}, "
        f"sampling ratio {SAMPLING_RATIO}, aligned False; "
        + "; ".join(f"{c}: {report['shapes']['rois'][c][0]} RoIs, per level P2-P5 {report['shapes']['rois_per_level_P2_P5'][c]}" for c in configs),
        "",
        "Median wall time in ms (best in parentheses) over the repeats"
        + (", and peak extra memory of one fw+bw in MiB" if report["device"] == "cuda" else "")
        + ":",
        "",
        "| method | " + " | ".join(f"{c} fw | {c} fw+bw" for c in configs) + (" | " + " | ".join(f"{c} MiB" for c in configs) if report["device"] == "cuda" else "") + " |",
        "|---" * (1 + 2 * len(configs) + (len(configs) if report["device"] == "cuda" else 0)) + "|",
    ]
    for name in found:
        cells = []
        for config in configs:
            for mode in ("fw", "fw+bw"):
                result = table[config][(name, mode)]
                cells.append(f"{result['median_ms']:.1f} ({result['best_ms']:.1f})")
        if report["device"] == "cuda":
            cells += [f"{table[config][(name, 'fw+bw')]['peak_extra_mib']:.0f}" for config in configs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if report["bandwidth_floor_ms"]:
        floors = report["bandwidth_floor_ms"]
        lines.append("| bandwidth floor | " + " | ".join(f"{floors[c]['fw']:.3f} | {floors[c]['fw+bw']:.3f}" for c in configs) + " |")
    lines += ["", "Ratios of medians (> 1: the second is faster):", ""]
    lines += [f"- {key}: {value:.2f}x" for key, value in report["ratios"].items()]
    if "alternatives_box_7x7_P2" in report:
        alternative = report["alternatives_box_7x7_P2"]
        lines += ["", f"The two products alone, box 7x7 RoIs on P2 ({alternative['rois']} RoIs, {alternative['nonzeros']} non-zeros of S), "
                  "median ms (best):", ""]
        lines += [f"- {name}: {result['median_ms']:.1f} ({result['best_ms']:.1f})" for name, result in alternative.items() if isinstance(result, dict)]
    lines += ["", "Largest absolute difference of each method's forward output to the reference (float32):", ""]
    lines += [f"- {config}: " + ", ".join(f"{name} {value:.1e}" for name, value in diffs.items()) for config, diffs in report["max_abs_difference_to_reference"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
