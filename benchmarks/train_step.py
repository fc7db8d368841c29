"""Benchmark a training iteration: seconds per step of our Mask R-CNN and of torchvision's, same weights, same batch.

    python benchmarks/train_step.py                       # CPU, 2 threads, two 800 x 1066 images, 5 repeats
    /work/tvenv/bin/python benchmarks/train_step.py       # an environment with torchvision: both models
    python benchmarks/train_step.py --device cuda         # on a GPU our model runs the Triton kernels
    python benchmarks/train_step.py --quick               # tiny sizes, seconds: proves the script works

One iteration is what a training step does (paper section 3.1, section 4.4 "Training"): zero
the gradients, the forward pass in training mode on a batch of two images with their targets
(the five losses), the backward pass of their sum, and an SGD step (momentum 0.9, weight
decay 1e-4). The learning rate is 0, so every repeat computes exactly the same thing: the
weights, and with them the proposals and the sampled RoIs, stay as they were. Before each
step torch's generator is reseeded, so both models draw the same anchors and RoIs (our
samplers draw as torchvision's do). The images are synthetic shapes of `--size` with their
boxes, labels and masks; the models are made as in benchmarks/inference.py (random weights
of torchvision's model, frozen norms calibrated on the first image, imported into ours by
`mrcnn.weights.from_torchvision`).

Three ways are timed, interleaved, the median of `--repeats` after one warm-up each:

- ours: `model(images, targets)` with the batch of two, as torchvision is called;
- ours, one image at a time: each image through the model on its own, its losses halved
  (how mrcnn/train.py runs a batch, so that the result does not depend on how the batch is
  split across processes);
- torchvision (when installed).

The losses of ours and torchvision's on the same batch and seed are compared (largest
difference recorded). `--profile` adds the operators with the most self time in one step of
each. Results: benchmarks/results/train_step_<device>.json and .md (`--quick`:
train_step_<device>_quick.*).
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
from benchmarks.inference import QUICK_SIZE  # noqa: E402
from mrcnn.config import torchvision_maskrcnn_resnet50_fpn  # noqa: E402
from mrcnn.model import MaskRCNN  # noqa: E402

SEED = 0


def make_step(model: torch.nn.Module, images: list, targets: list, one_at_a_time: bool = False):
    """One training iteration of `model` (module docstring) as a function returning the losses."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=0.0, momentum=0.9, weight_decay=1e-4)

    def step() -> dict[str, float]:
        torch.manual_seed(SEED)
        optimizer.zero_grad(set_to_none=True)
        if one_at_a_time:
            total = {}
            for image, target in zip(images, targets):
                losses = model([image], [target])
                (sum(losses.values()) / len(images)).backward()
                total = {k: total.get(k, 0.0) + float(v.detach()) / len(images) for k, v in losses.items()}
        else:
            losses = model(images, targets)
            sum(losses.values()).backward()
            total = {k: float(v.detach()) for k, v in losses.items()}
        optimizer.step()
        return total

    return step


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5, help="timed iterations of each (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1066), metavar=("H", "W"), help="image height and width")
    parser.add_argument("--images", type=int, default=2, help="images per batch")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SIZE[0]} x {QUICK_SIZE[1]} images and a preset resized to them, 1 repeat")
    parser.add_argument("--profile", action="store_true", help="also profile one step of each (torch.profiler)")
    parser.add_argument("--no-torchvision", action="store_true", help="time our model only, even where torchvision is installed")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.repeats < 1 or args.threads < 1 or args.images < 1 or min(args.size) < 32:
        parser.error("--repeats, --threads and --images must be at least 1 and the images at least 32 x 32")
    torch.set_num_threads(args.threads)

    height, width = QUICK_SIZE if args.quick else args.size
    repeats = 1 if args.quick else args.repeats
    config = torchvision_maskrcnn_resnet50_fpn()
    if args.quick:
        config = config.replace(min_size=min(height, width), max_size=max(height, width), detections_per_image=10)
    images, targets = benchmark_images(args.images, height, width)
    with_torchvision = torchvision_available() and not args.no_torchvision
    ours, theirs = model_pair(config, images[:1], with_torchvision=with_torchvision)
    images = [image.to(args.device) for image in images]
    targets = [{k: v.to(args.device) for k, v in t.items()} for t in targets]
    models = {"ours": ours} | ({"torchvision": theirs} if theirs is not None else {})
    steps = {}
    for name, model in models.items():
        model.to(args.device).train()
        steps[name] = make_step(model, images, targets)
        if name == "ours" and len(images) > 1:
            steps["ours, one image at a time"] = make_step(model, images, targets, one_at_a_time=True)

    losses = {name: step() for name, step in steps.items()}  # the warm-up, and the losses to compare
    if theirs is not None and getattr(config, "fast_convolutions", False):  # torchvision's arithmetic: equal losses
        exact = MaskRCNN(config.replace(fast_convolutions=False)).to(args.device).train()
        exact.load_state_dict(ours.state_dict())
        losses["ours, fast_convolutions=False"] = make_step(exact, images, targets)()
        del exact
    load_before = load_average()
    timings = interleaved(steps, repeats, warmup=0, device=args.device)
    load_after = load_average()
    profiles = {name: profile_top_ops(step) for name, step in steps.items()} if args.profile else {}

    report = machine_record(args.device) | {
        "load_before": load_before,
        "load_after": load_after,
        "what": f"seconds per training iteration (zero_grad, forward, backward, SGD step), batch of {len(images)}",
        "image_size": [height, width],
        "preset": "torchvision_maskrcnn_resnet50_fpn" + (" (sizes set to the quick images)" if args.quick else ""),
        "roi_align_path": "triton" if args.device == "cuda" else "cpu sparse path (mrcnn.roi_align_cpu)",
        "mask_loss_path": "triton" if args.device == "cuda" else "reference (mrcnn.mask_loss)",
        "objects_per_image": [len(t["boxes"]) for t in targets],
        "repeats": repeats,
        "torchvision": "timed" if theirs is not None else ("not installed" if not torchvision_available() else "not asked for (--no-torchvision)"),
        "losses": losses,
        "results": timings,
        "profile": profiles,
    }
    if theirs is not None:
        report["max_abs_difference_losses"] = max(abs(losses["ours"][k] - losses["torchvision"][k]) for k in losses["torchvision"])
        if "ours, fast_convolutions=False" in losses:
            exact = losses["ours, fast_convolutions=False"]
            report["max_abs_difference_losses_fast_convolutions_off"] = max(abs(exact[k] - losses["torchvision"][k]) for k in exact)
        report["ratio_ours_over_torchvision"] = timings["ours"]["median_s"] / timings["torchvision"]["median_s"]
    write_report(report, args.output_dir, f"train_step_{args.device}" + ("_quick" if args.quick else ""), markdown)
    return report


def markdown(report: dict) -> str:
    height, width = report["image_size"]
    lines = [f"# Mask R-CNN training iteration, {report['device']}: ours and torchvision's", "", *record_lines(report)]
    lines += [
        f"- model: {report['preset']}; {report['what']}; {height} x {width} images with {report['objects_per_image']} objects",
        f"- RoIAlign: {report['roi_align_path']}; mask loss: {report['mask_loss_path']}; torchvision: {report['torchvision']}",
        "",
    ]
    lines += timing_lines(report, "iteration")
    names = list(report["losses"])
    lines += ["", "Losses of the first iteration (same weights, batch and seed):", "",
              "| loss | " + " | ".join(names) + " |", "|---" * (1 + len(names)) + "|"]  # fmt: skip
    for key in report["losses"]["ours"]:
        lines.append(f"| {key} | " + " | ".join(f"{report['losses'][name][key]:.6f}" for name in names) + " |")
    if "max_abs_difference_losses" in report:
        lines += ["", f"Largest |difference| of a loss, ours and torchvision (both called with the batch): "
                  f"{report['max_abs_difference_losses']:.1e}"
                  + (f"; with `fast_convolutions=False` (torchvision's arithmetic): {report['max_abs_difference_losses_fast_convolutions_off']:.1e}"
                     if "max_abs_difference_losses_fast_convolutions_off" in report else "")
                  + ". The preset folds the frozen batch norm into the convolutions, which rounds differently "
                  "(`fast_convolutions`). The one-image-at-a-time losses differ more, by design: each image samples "
                  "its own anchors and RoIs (mrcnn/train.py)."]  # fmt: skip
    for name, table in report["profile"].items():
        lines += profile_lines(f"Operators with the most self time in one iteration, {name}", table)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
