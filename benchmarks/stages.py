"""Where the time goes: seconds per stage of inference and of a training step (paper section 4.4, "Timing").

    python benchmarks/stages.py                 # CPU: the torchvision preset at 800 x 1066 (2 threads), shapes_small (1)
    python benchmarks/stages.py --device cuda   # the Triton RoIAlign and mask loss
    python benchmarks/stages.py --quick         # tiny sizes, seconds: proves the script works

The stages are the model's own modules and methods, timed where they are called: nothing of
the model is copied. Each stage opens a `torch.profiler` range (`record_function`) around
its calls: module stages through forward pre-hooks and hooks, the steps inside a module that
are functions or methods (proposal selection, RoI sampling, the losses, NMS, pasting) by
wrapping them for the time of the measurement. A range's own time is its length minus the
ranges inside it (the RPN's own time is its anchors, decoding, top-k and NMS, its head being
a stage of its own), summed over its calls:

    stage                    what runs in it                                         the model's code
    transform                normalize, resize, pad                                  model.transform
    backbone, FPN            ResNet C2..C5, P2..P6                                   model.backbone, model.fpn
    RPN head                 3x3 conv, objectness and deltas on every level          model.rpn.head
    RPN proposals            anchors, decoding, top-k, NMS per level                 model.rpn (the rest), select_proposals
    RPN loss                 anchor labels (IoU, matcher), sampling, the two losses  rpn.assign_targets, rpn.loss
    box RoIAlign, mask ...   multi-level RoIAlign 7x7 / 14x14                        box_branch.pooler, mask_branch.pooler
    box head, mask head      two fc (+ predictor) / four convs, deconv (+ predictor)  box_branch.head, .predictor, mask_branch...
    box sampling and loss    add ground truth, match, sample 512 RoIs, L_cls + L_box  select_training_rois, fast_rcnn_loss
    box NMS                  decode per class, score threshold, per-class NMS        postprocess_detections
    mask targets and loss    28x28 targets from the ground-truth masks, L_mask       mask_branch.loss (the rest)
    mask paste               masks pasted into the image                             mrcnn.inference.paste_detection_masks
    SGD step                 the optimizer's update (training)                       torch.optim.SGD.step
    other                    everything else: glue code, summing the losses, the autograd engine

Backward time is attributed the same way: every node the autograd engine runs
(`autograd::engine::evaluate_function: ...` in the profile) carries the sequence number of
the forward operation that made it, and that operation ran inside some stage's range. The
engine's own time between nodes, and the gradient accumulation into the weights, count as
"other".

The profiler adds a little time to every operation, and each stage's median is taken on its
own, so the stages' sum is close to, not equal to, the plain time of the same call, which is
measured too (median of `--repeats`, interleaved, after a warm-up). Models: the
`torchvision_maskrcnn_resnet50_fpn` preset on `--size` images (weights as in
benchmarks/inference.py: random, frozen norms calibrated, five detecting classes, so that 100
detections reach the mask branch), and `shapes_small` (random weights) on 128 x 128 images,
timed `--small-repeats` times with `--small-threads`; inference on one image, training on a
batch of two with their targets. On CUDA each range synchronizes the device when it opens
and closes, so forward stages include their kernels; backward stages then show the time to
launch, not to run (the backward total is exact). Results: benchmarks/results/stages_<device>.json
and .md (`--quick`: stages_<device>_quick.*).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mrcnn.box_head  # noqa: E402
import mrcnn.model  # noqa: E402
from benchmarks.common import (  # noqa: E402
    RESULTS, benchmark_images, interleaved, load_average, machine_record, model_pair, record_lines, synchronize, write_report,
)
from mrcnn.config import shapes_small, torchvision_maskrcnn_resnet50_fpn  # noqa: E402

PREFIX = "stage:"
BACKWARD_NODE = "autograd::engine::evaluate_function: "
# the order of the tables and of the bars in the book's figure
STAGES = [
    "transform", "backbone", "FPN", "RPN head", "RPN proposals", "RPN loss", "box RoIAlign", "box head",
    "box sampling and loss", "box NMS", "mask RoIAlign", "mask head", "mask targets and loss", "mask paste",
    "SGD step", "other",
]  # fmt: skip


@contextmanager
def stage_ranges(model: mrcnn.model.MaskRCNN, device: str):
    """Open a profiler range `stage:<name>` around every call of each stage of `model` (module docstring)."""
    stack = []

    def enter(name: str) -> None:
        synchronize(device)
        scope = record_function(PREFIX + name)
        scope.__enter__()
        stack.append(scope)

    def leave() -> None:
        synchronize(device)
        stack.pop().__exit__(None, None, None)

    modules = [
        ("other", model), ("transform", model.transform), ("backbone", model.backbone), ("FPN", model.fpn),
        ("RPN proposals", model.rpn), ("RPN head", model.rpn.head), ("RPN proposals", model.rpn.anchor_generator),
        ("box NMS" if not model.training else "box sampling and loss", model.box_branch),
        ("box RoIAlign", model.box_branch.pooler), ("box head", model.box_branch.head),
        ("box head", model.box_branch.predictor),
    ]  # fmt: skip
    calls = [  # (stage, object, attribute): methods of the model's modules and functions of its modules
        ("RPN proposals", model.rpn, "select_proposals"), ("RPN loss", model.rpn, "assign_targets"),
        ("RPN loss", model.rpn, "loss"),
        ("box sampling and loss", mrcnn.box_head, "select_training_rois"),
        ("box sampling and loss", mrcnn.box_head, "fast_rcnn_loss"),
        ("box NMS", mrcnn.box_head, "postprocess_detections"), ("mask paste", mrcnn.model, "paste_detection_masks"),
    ]  # fmt: skip
    if model.mask_branch is not None:
        branch = model.mask_branch
        modules += [("mask RoIAlign", branch.pooler), ("mask head", branch.head), ("mask head", branch.predictor)]
        calls += [("mask targets and loss", branch, "loss"), ("mask head", branch, "predict")]
    handles = []
    for name, module in modules:
        if module is None:  # the C4 and C5 models have no FPN
            continue
        handles.append(module.register_forward_pre_hook(lambda *_, name=name: enter(name)))
        handles.append(module.register_forward_hook(lambda *_: leave()))
    originals = []
    for name, owner, attribute in calls:
        original = getattr(owner, attribute)

        def timed(*args, name=name, original=original, **kwargs):
            enter(name)
            try:
                return original(*args, **kwargs)
            finally:
                leave()

        originals.append((owner, attribute, owner.__dict__.get(attribute)))
        setattr(owner, attribute, timed)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for owner, attribute, original in reversed(originals):
            if original is None:
                delattr(owner, attribute)  # an instance attribute hid the class's method: uncover it
            else:
                setattr(owner, attribute, original)


def own_times(ranges: list[tuple[float, float, str]]) -> tuple[dict[str, float], list[tuple[float, float, str]]]:
    """Each stage's own time (its ranges minus the ranges inside them), in the ranges' unit, and the ranges sorted."""
    ranges = sorted(ranges, key=lambda r: (r[0], -r[1]))
    own = defaultdict(float)
    open_ranges = []  # the chain of ranges containing the current one
    for start, end, name in ranges:
        while open_ranges and open_ranges[-1][1] <= start:
            open_ranges.pop()
        own[name] += end - start
        if open_ranges:
            own[open_ranges[-1][2]] -= end - start
        open_ranges.append((start, end, name))
    return dict(own), ranges


def innermost(ranges: list[tuple[float, float, str]], time: float) -> str:
    """The name of the innermost range (of `ranges`, sorted by start) that contains `time`, or "other"."""
    found = "other"
    for start, end, name in ranges:
        if start > time:
            break
        if time < end:
            found = name  # a later start that still contains `time` is nested deeper
    return found


def breakdown(events, phases: dict[str, str]) -> dict[str, dict[str, float]]:
    """Seconds per stage and phase from one profiled call: `{stage: {"forward": s, "backward": s}}`
    (the SGD step: `{"update": s}`).

    events: the profiler's events; phases: phase name -> the range that wraps it in the call
    ("forward" always, "backward" and "SGD step" in training).
    """
    spans = {e.name: (e.time_range.start, e.time_range.end) for e in events if e.name in phases.values()}
    ranges = [(e.time_range.start, e.time_range.end, e.name[len(PREFIX):]) for e in events if e.name.startswith(PREFIX)]
    forward_start, forward_end = spans[phases["forward"]]
    own, ranges = own_times([r for r in ranges if forward_start <= r[0] < forward_end])
    result = {stage: {"forward": seconds / 1e6} for stage, seconds in own.items()}
    result.setdefault("other", {"forward": 0.0})["forward"] += (forward_end - forward_start - sum(own.values())) / 1e6
    if "backward" in phases:
        backward_start, backward_end = spans[phases["backward"]]
        # Every operation records the sequence number the next autograd node will get; the one that makes
        # the node is the last to record it (the counter moves on after it): sequence number -> its start
        forward_ops = {}
        for e in sorted(events, key=lambda e: e.time_range.start):
            if forward_start <= e.time_range.start < forward_end and e.sequence_nr >= 0:
                forward_ops[e.sequence_nr] = e.time_range.start
        backward = defaultdict(float)
        for e in events:
            if e.name.startswith(BACKWARD_NODE) and backward_start <= e.time_range.start < backward_end:
                start = forward_ops.get(e.sequence_nr)
                backward["other" if start is None else innermost(ranges, start)] += e.time_range.end - e.time_range.start
        backward["other"] += backward_end - backward_start - sum(backward.values())  # the engine between nodes
        for stage, seconds in backward.items():
            result.setdefault(stage, {"forward": 0.0})["backward"] = seconds / 1e6
    if "SGD step" in phases:
        start, end = spans[phases["SGD step"]]
        result["SGD step"] = {"update": (end - start) / 1e6}
    return result


def measure(model, images, targets, training: bool, device: str, repeats: int) -> dict:
    """Stage times (median over `repeats` profiled calls) and the plain time of inference or of a training step."""
    model.train(training)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0, momentum=0.9, weight_decay=1e-4)

    def call() -> None:
        torch.manual_seed(0)  # the same anchors and RoIs sampled every time
        if not training:
            with torch.no_grad(), record_function("phase:forward"):
                model(images)
            return
        optimizer.zero_grad(set_to_none=True)
        with record_function("phase:forward"):
            loss = sum(model(images, targets).values())
        with record_function("phase:backward"):
            loss.backward()
        with record_function("phase:SGD step"):
            optimizer.step()

    phases = {"forward": "phase:forward"} | ({"backward": "phase:backward", "SGD step": "phase:SGD step"} if training else {})
    plain = interleaved({"call": call}, repeats, warmup=1, device=device)["call"]
    samples = []
    for _ in range(repeats):
        with stage_ranges(model, device), profile(activities=[ProfilerActivity.CPU]) as profiler:
            call()
        samples.append(breakdown(profiler.events(), phases))
    stages = {}
    for stage in STAGES:
        for phase in ("forward", "backward", "update"):
            values = [sample.get(stage, {}).get(phase, 0.0) for sample in samples]
            if any(values):
                stages.setdefault(stage, {})[phase] = statistics.median(values)
    with torch.no_grad():
        model.eval()
        detections = [len(d["boxes"]) for d in model(images)] if not training else None
    return {"plain_s": plain["median_s"], "plain_times_s": plain["times_s"],
            "profiled_total_s": sum(sum(v.values()) for v in stages.values()), "stages_s": stages,
            "detections_per_image": detections}  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3, help="profiled calls per model and mode, and plain timed calls")
    parser.add_argument("--small-repeats", type=int, default=15,
                        help="the same for shapes_small, whose milliseconds the load of a shared machine moves most")
    parser.add_argument("--small-threads", type=int, default=1,
                        help="CPU threads for shapes_small: its many small operations wait at every parallel region "
                             "for a second thread that a loaded machine has descheduled")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1066), metavar=("H", "W"), help="image size for the torchvision preset")
    parser.add_argument("--quick", action="store_true", help="64 x 96 and 64 x 64 images, 1 repeat")
    parser.add_argument("--models", nargs="+", default=["torchvision_maskrcnn_resnet50_fpn", "shapes_small"],
                        choices=["torchvision_maskrcnn_resnet50_fpn", "shapes_small"])  # fmt: skip
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if min(args.repeats, args.small_repeats, args.threads, args.small_threads) < 1 or min(args.size) < 32:
        parser.error("--repeats, --threads and their --small- forms must be at least 1 and the image at least 32 x 32")
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats

    load_before = load_average()
    runs = {}
    for name in args.models:
        if name == "shapes_small":
            size = (64, 64) if args.quick else (128, 128)
            config = shapes_small().replace(min_size=size[0], max_size=size[1])
        else:
            size = (64, 96) if args.quick else tuple(args.size)
            config = torchvision_maskrcnn_resnet50_fpn()
            if args.quick:
                config = config.replace(min_size=min(size), max_size=max(size), detections_per_image=10)
        images, targets = benchmark_images(2, *size)
        model, _ = model_pair(config, images[:1], with_torchvision=False)
        model.to(args.device)
        images = [image.to(args.device) for image in images]
        targets = [{k: v.to(args.device) for k, v in t.items()} for t in targets]
        calls = 1 if args.quick else (args.small_repeats if name == "shapes_small" else repeats)
        threads = args.small_threads if name == "shapes_small" else args.threads
        torch.set_num_threads(threads)
        record = {"repeats": calls, "threads": threads}
        runs[f"{name} {size[0]}x{size[1]}"] = {
            "inference (1 image)": measure(model, images[:1], None, False, args.device, calls) | record,
            "training step (2 images)": measure(model, images, targets, True, args.device, calls) | record,
        }
        torch.set_num_threads(args.threads)
    report = machine_record(args.device) | {
        "load_before": load_before,
        "load_after": load_average(),
        "roi_align_path": "triton" if args.device == "cuda" else "cpu sparse path (mrcnn.roi_align_cpu)",
        "mask_loss_path": "triton" if args.device == "cuda" else "reference (mrcnn.mask_loss)",
        "repeats": repeats,
        "stages": STAGES,
        "runs": runs,
    }
    write_report(report, args.output_dir, f"stages_{args.device}" + ("_quick" if args.quick else ""), markdown)
    return report


def markdown(report: dict) -> str:
    lines = [f"# Where the time goes, {report['device']}: seconds per stage", "", *record_lines(report)]
    lines += [f"- RoIAlign: {report['roi_align_path']}; mask loss: {report['mask_loss_path']}; "
              "each stage's median over the profiled calls (benchmarks/stages.py says how stages are cut)"]  # fmt: skip
    for run, modes in report["runs"].items():
        for mode, result in modes.items():
            training = "backward" in str(result["stages_s"])
            lines += ["", f"## {run}, {mode}", "",
                      f"{result['threads']} thread(s). Plain time (no profiler, median of {result['repeats']}): {result['plain_s']:.3f} s; "
                      f"profiled stages (medians of {result['repeats']} calls) sum to {result['profiled_total_s']:.3f} s"
                      + (f"; detections per image {result['detections_per_image']}" if result["detections_per_image"] else "") + ".",
                      "", "| stage | forward s | " + ("backward s | total s | " if training else "") + "share |",
                      "|---|---|" + ("---|---|" if training else "") + "---|"]  # fmt: skip
            for stage, phases in result["stages_s"].items():
                total = sum(phases.values())
                cells = [f"{phases['forward']:.4f}" if "forward" in phases else ""]
                if training:
                    cells += [f"{phases['backward']:.4f}" if "backward" in phases else "", f"{total:.4f}"]
                lines.append(f"| {stage} | " + " | ".join(cells) + f" | {total / result['profiled_total_s']:.1%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
