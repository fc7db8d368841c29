"""Benchmark inference: seconds per image of our Mask R-CNN and of torchvision's, same weights, same image.

    python benchmarks/inference.py                        # CPU, 2 threads, one 800 x 1066 image, 5 repeats
    /work/tvenv/bin/python benchmarks/inference.py        # an environment with torchvision: both models
    python benchmarks/inference.py --device cuda          # on a GPU our model runs the Triton RoIAlign
    python benchmarks/inference.py --quick                # tiny sizes, seconds: proves the script works

The model is the `torchvision_maskrcnn_resnet50_fpn` preset (ResNet-50-FPN, 1000 proposals,
up to 100 detections, masks pasted into the image), batch of one image, evaluation mode under
`torch.no_grad()`: the paper's section 4.4 "Inference" measurement. The image is a synthetic
shapes picture of `--size` (800 x 1066 by default, which the preset keeps as it is and pads
to 800 x 1088).

With torchvision installed, torchvision's `maskrcnn_resnet50_fpn` (as built for pretrained
weights: frozen batch norm) gets random weights, which `mrcnn.weights.from_torchvision` loads
into ours. Random weights detect nothing (every class scores about 1/91 < 0.05), so before
the import the frozen norms are calibrated on the image and the classifier is given five
detecting classes (benchmarks/common.py says why that and not a lower threshold): both
models then find 100 detections and run the mask branch on them. The two models' detections
are compared (largest differences recorded), and their times are measured interleaved
(ours, theirs, theirs, ours, ...), the median of `--repeats` after one warm-up each. Without
torchvision only our model is timed, and the results say so.

`--profile` adds the operators with the most self time in one call of each model
(`torch.profiler`). Results: benchmarks/results/inference_<device>.json and .md
(`--quick` writes inference_<device>_quick.* instead, into `--output-dir`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS, benchmark_images, interleaved, load_average, machine_record, model_pair, profile_lines,
    profile_top_ops, record_lines, timing_lines, torchvision_available, write_report,
)
from mrcnn.config import torchvision_maskrcnn_resnet50_fpn  # noqa: E402
from mrcnn.model import MaskRCNN  # noqa: E402

QUICK_SIZE = (64, 96)


def compare_detections(ours: list[dict], theirs: list[dict]) -> dict:
    """How far our detections are from torchvision's, per image and over all images.

    Each of our detections is paired with torchvision's detection of the same label whose box
    is nearest (largest coordinate difference); it counts as found when that is under a pixel.
    Near-equal scores may swap places between the two when the convolutions round differently,
    so detections are paired by box, not by rank. Over the found pairs: the largest differences
    of box coordinates, scores and pasted mask probabilities.
    """
    found, total, box, score, mask = 0, 0, 0.0, 0.0, 0.0
    for a, b in zip(ours, theirs):
        total += len(a["boxes"])
        if len(a["boxes"]) == 0 or len(b["boxes"]) == 0:
            continue
        distance = (a["boxes"][:, None] - b["boxes"][None]).abs().amax(dim=2)  # [D_ours, D_theirs]
        distance[a["labels"][:, None] != b["labels"][None]] = float("inf")
        nearest, index = distance.min(dim=1)  # [D_ours]
        pair = nearest < 1.0
        found += int(pair.sum())
        if pair.any():
            box = max(box, float(nearest[pair].max()))
            score = max(score, float((a["scores"][pair] - b["scores"][index[pair]]).abs().max()))
            mask = max(mask, float((a["masks"][pair] - b["masks"][index[pair]]).abs().max()))
    return {
        "detections_ours": [len(d["boxes"]) for d in ours],
        "detections_torchvision": [len(d["boxes"]) for d in theirs],
        "found_in_torchvision": found,
        "of": total,
        "max_abs_difference_boxes": box,
        "max_abs_difference_scores": score,
        "max_abs_difference_masks": mask,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each model (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1066), metavar=("H", "W"), help="image height and width")
    parser.add_argument("--quick", action="store_true", help=f"a {QUICK_SIZE[0]} x {QUICK_SIZE[1]} image and a preset resized to it, 1 repeat")
    parser.add_argument("--profile", action="store_true", help="also profile one call of each model (torch.profiler)")
    parser.add_argument("--no-torchvision", action="store_true", help="time our model only, even where torchvision is installed")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.repeats < 1 or args.threads < 1 or min(args.size) < 32:
        parser.error("--repeats and --threads must be at least 1 and the image at least 32 x 32")
    torch.set_num_threads(args.threads)

    height, width = QUICK_SIZE if args.quick else args.size
    repeats = 1 if args.quick else args.repeats
    config = torchvision_maskrcnn_resnet50_fpn()
    if args.quick:
        config = config.replace(min_size=min(height, width), max_size=max(height, width), detections_per_image=10)
    images, _ = benchmark_images(1, height, width)
    with_torchvision = torchvision_available() and not args.no_torchvision
    ours, theirs = model_pair(config, images, with_torchvision=with_torchvision)
    ours.to(args.device)
    images = [image.to(args.device) for image in images]
    models = {"ours": ours} | ({"torchvision": theirs.to(args.device)} if theirs is not None else {})

    with torch.no_grad():
        outputs = {name: model(images) for name, model in models.items()}
        detections = [len(d["boxes"]) for d in outputs["ours"]]
        agreement = {}
        if theirs is not None:
            agreement["preset"] = compare_detections(outputs["ours"], outputs["torchvision"])
            if getattr(config, "fast_convolutions", False):  # the same model without folded norms: torchvision's arithmetic
                exact = MaskRCNN(config.replace(fast_convolutions=False)).to(args.device).eval()
                exact.load_state_dict(ours.state_dict())
                agreement["fast_convolutions=False"] = compare_detections(exact(images), outputs["torchvision"])
                del exact
        del outputs
        load_before = load_average()
        steps = {name: (lambda model=model: model(images)) for name, model in models.items()}
        timings = interleaved(steps, repeats, warmup=1, device=args.device)
        load_after = load_average()
        profiles = {name: profile_top_ops(step) for name, step in steps.items()} if args.profile else {}

    report = machine_record(args.device) | {
        "load_before": load_before,
        "load_after": load_after,
        "what": "seconds per image, eval mode, batch of 1, torch.no_grad()",
        "image_size": [height, width],
        "preset": "torchvision_maskrcnn_resnet50_fpn" + (" (sizes set to the quick image, 10 detections)" if args.quick else ""),
        "roi_align_path": "triton" if args.device == "cuda" else "cpu sparse path (mrcnn.roi_align_cpu)",
        "repeats": repeats,
        "torchvision": "timed" if theirs is not None else ("not installed" if not torchvision_available() else "not asked for (--no-torchvision)"),
        "detections_per_image": detections,
        "agreement_with_torchvision": agreement or None,
        "results": timings,
        "profile": profiles,
    }
    if theirs is not None:
        report["ratio_ours_over_torchvision"] = timings["ours"]["median_s"] / timings["torchvision"]["median_s"]
    write_report(report, args.output_dir, f"inference_{args.device}" + ("_quick" if args.quick else ""), markdown)
    return report


def markdown(report: dict) -> str:
    height, width = report["image_size"]
    lines = [f"# Mask R-CNN inference, {report['device']}: ours and torchvision's", "", *record_lines(report)]
    lines += [
        f"- model: {report['preset']}; one {height} x {width} image; {report['what']}; RoIAlign: {report['roi_align_path']}",
        f"- detections per image (ours): {report['detections_per_image']}; torchvision: {report['torchvision']}",
        "",
    ]
    lines += timing_lines(report, "image")
    if report["agreement_with_torchvision"]:
        lines += ["", "Agreement with torchvision on the same weights and image (each of our detections paired with "
                  "torchvision's of the same label and nearest box; found: within a pixel):", "",
                  "| our model | detections (ours, torchvision) | found | max abs diff boxes | scores | masks |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for name, a in report["agreement_with_torchvision"].items():
            lines.append(f"| {name} | {a['detections_ours']}, {a['detections_torchvision']} | {a['found_in_torchvision']} of {a['of']} "
                         f"| {a['max_abs_difference_boxes']:.1e} | {a['max_abs_difference_scores']:.1e} | {a['max_abs_difference_masks']:.1e} |")
        lines += ["", "The preset folds the frozen batch norm into the convolutions (`fast_convolutions`), which rounds "
                  "differently: boxes and scores agree to float rounding, but pasting cuts each box to whole pixels "
                  "(mrcnn/inference.py, step 2), so a box a few thousandths of a pixel apart can move a pasted mask's edge "
                  "by one pixel: there the two mask probabilities differ by up to 1. With `fast_convolutions=False` the "
                  "arithmetic is torchvision's and the masks agree to float rounding too."]  # fmt: skip
    for name, table in report["profile"].items():
        lines += profile_lines(f"Operators with the most self time in one call, {name}", table)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
