"""What every benchmark here shares: the record of the machine, the interleaved timer, the test models.

- `machine_record`: device, versions, threads, CPUs and the command, so that a results file
  says where its numbers come from; `os.getloadavg()` is read before and after the timings by
  each script (the machine may be shared: a timing under load says so).
- `interleaved`: times several steps round robin, reversing the order on every repeat
  (A B, B A, A B, ...), after warm-up runs that are not timed, and reports the median and the
  best of the repeats. A change of load then hits every step alike, and neither step always
  runs first.
- The models. Benchmarks of whole models need weights that make the model do its full work:
  untrained, the box classifier of 91 classes scores every class about 1/91, below the 0.05
  threshold of inference, so nothing is detected and the mask branch never runs. Rather than
  lowering the threshold (every (RoI, class) pair would then reach per-class NMS: 90 000
  candidates, which no trained model produces), `detecting_classifier` gives a few classes a
  bias, so that each proposal yields a few candidates and the image its 100 detections, as a
  trained model does on a busy image. `calibrate_frozen_batchnorm` sets the frozen batch norm
  statistics of the random ResNet to those of its input (one pass), so that activations have
  the scale of a trained network instead of growing block after block.
- `benchmark_images`: synthetic shapes (mrcnn/data/shapes.py) drawn at a given size, with
  targets, so that the images have objects to match in training.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    """Python, torch, triton and torchvision versions (None for a package that is not installed)."""
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("triton", "torchvision"):
        try:
            found[module] = __import__(module).__version__
        except ImportError:
            found[module] = None
    return found


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages of the machine."""
    return [round(v, 2) for v in os.getloadavg()]


def machine_record(device: str) -> dict:
    """Where and how a benchmark ran: device, versions, threads, CPUs, the command line."""
    return {
        "device": device,
        "device_name": device_name(device),
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "command": command_line(),
    }


def command_line() -> str:
    """The command that ran this benchmark, the script named from the repository root."""
    script = Path(sys.argv[0]).resolve()
    root = Path(__file__).resolve().parents[1]
    name = str(script.relative_to(root)) if script.is_relative_to(root) else sys.argv[0]
    return " ".join(["python", name, *sys.argv[1:]])


def record_lines(report: dict) -> list[str]:
    """The Markdown bullet lines that state a report's machine record and load."""
    found = ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v is not None)
    missing = [k for k, v in report["versions"].items() if v is None]
    lines = [
        f"- command: `{report['command']}`",
        f"- device: {report['device']} ({report['device_name']}); threads: {report['threads']} of {report['cpu_count']} CPUs",
        f"- versions: {found}" + (f"; not installed: {', '.join(missing)}" if missing else ""),
        f"- load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in report['load_before'])}; "
        f"after: {', '.join(f'{v:.2f}' for v in report['load_after'])}",
    ]
    return lines


def timing_lines(report: dict, per: str) -> list[str]:
    """The markdown table of `report["results"]` (seconds per `per`, median and best of the
    interleaved repeats) and, when torchvision ran, the time ratio ours / torchvision."""
    lines = [f"Seconds per {per}, median (best) of {report['repeats']} interleaved runs after one warm-up:", "",
             "| model | median s | best s |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {name} | {r['median_s']:.3f} | {r['best_s']:.3f} |" for name, r in report["results"].items()]
    if "ratio_ours_over_torchvision" in report:
        ratio = report["ratio_ours_over_torchvision"]
        lines += ["", f"Time ratio ours / torchvision: **{ratio:.2f}** ({1 / ratio:.2f}x {'faster' if ratio < 1 else 'slower'})."]
    else:
        lines += ["", "torchvision is not installed here: its column is absent (run with an environment that has it)."]
    return lines


def write_report(report: dict, output_dir: Path, stem: str, render: Callable[[dict], str]) -> None:
    """Write `<stem>.json` (the report) and `<stem>.md` (`render(report)`: the same numbers as a page), and print the page."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    page = render(report)
    (output_dir / f"{stem}.md").write_text(page)
    print(page)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(steps: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, device: str = "cpu") -> dict:
    """Seconds per call of each step: `{name: {"times_s", "median_s", "best_s"}}`.

    Each step runs `warmup` times untimed, then `repeats` timed rounds run every step once,
    in the given order on even rounds and in reverse on odd ones.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    names = list(steps)
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else names[::-1]:
            synchronize(device)
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {
        name: {"times_s": found, "median_s": statistics.median(found), "best_s": min(found)} for name, found in times.items()
    }


# --- test models and inputs ------------------------------------------------------------------


def torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


def benchmark_images(count: int, height: int, width: int, seed: int = 0) -> tuple[list[torch.Tensor], list[dict]]:
    """`count` synthetic shapes images `[3, H, W]` in [0, 1] and their targets (boxes, labels 1..4, masks).

    Drawn square at the longer side with objects of 1/8 to 1/2 of it, then cropped to `H x W`;
    objects cut to fewer than 64 pixels are dropped.
    """
    from mrcnn.data.shapes import masks_to_boxes, render_image

    side = max(height, width)
    images, targets = [], []
    for index in range(count):
        image, masks, labels = render_image(index, seed, "train", image_size=side, max_objects=6,
                                            object_size=(max(4, side // 8), max(4, side // 2)))  # fmt: skip
        image, masks = image[:height, :width], masks[:, :height, :width]
        keep = masks.reshape(len(masks), -1).sum(1) >= 64
        masks, labels = np.ascontiguousarray(masks[keep]), labels[keep]
        images.append(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255)
        targets.append({"boxes": masks_to_boxes(masks), "labels": torch.from_numpy(labels), "masks": torch.from_numpy(masks)})
    return images, targets


@torch.no_grad()
def calibrate_frozen_batchnorm(model: nn.Module, run: Callable[[], object]) -> int:
    """Set every frozen batch norm's statistics to those of its input during `run()`, in order.

    A forward pre-hook on each module with `running_mean` and `running_var` buffers and no
    trainable statistics (a frozen norm) sets them to the per-channel mean and variance of what
    it is about to normalize, so each norm outputs `weight * x_hat + bias` with `x_hat` of
    zero mean and unit variance: the scale of a trained network. Returns the norms calibrated.
    """

    def calibrate(module, inputs):
        x = inputs[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))

    frozen = [m for m in model.modules() if hasattr(m, "running_var") and not isinstance(m, nn.modules.batchnorm._BatchNorm)]
    handles = [m.register_forward_pre_hook(calibrate) for m in frozen]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return len(frozen)


@torch.no_grad()
def detecting_classifier(bias: torch.Tensor, detecting_classes: int = 5, logit: float = 3.0) -> None:
    """Make an untrained classifier score `detecting_classes` classes above 0.05, by its bias `[K]`.

    Classes 1..detecting_classes get the bias `logit`, the others 0: with K = 91 each of them
    scores about e^3 / (5 e^3 + 86) = 0.11 and the rest about 0.005. The weights keep their
    random values, so the scores still vary from RoI to RoI (after `calibrate_frozen_batchnorm`
    the logits spread by about 0.2) and the ranking of the detections has no near-ties.
    """
    bias.zero_()
    bias[1 : 1 + detecting_classes] = logit


def torchvision_maskrcnn(num_classes: int = 91, **kwargs) -> nn.Module:
    """torchvision's `maskrcnn_resnet50_fpn` as built for pretrained weights (frozen batch norm,
    three trainable stages), with random weights: torchvision's own initialization. `kwargs` go
    to its `MaskRCNN` (for example `min_size`, `max_size`)."""
    from torchvision.models import resnet50
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.mask_rcnn import MaskRCNN as TorchvisionMaskRCNN
    from torchvision.ops.misc import FrozenBatchNorm2d

    body = resnet50(norm_layer=FrozenBatchNorm2d)
    return TorchvisionMaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=num_classes, **kwargs)


def model_pair(config, calibration_images: list[torch.Tensor], seed: int = 0, with_torchvision: bool = True):
    """Our Mask R-CNN for `config` and, when torchvision is installed, torchvision's, with the same weights.

    With torchvision: its model is built with random weights (seed), its frozen norms
    calibrated on `calibration_images`, its classifier made to detect, and the state dict
    loaded into ours by `mrcnn.weights.from_torchvision`. Without it, our own model gets the
    same treatment (other random numbers). Returns `(ours, theirs or None)`, both in eval mode.
    """
    from mrcnn.model import MaskRCNN
    from mrcnn.weights import from_torchvision

    torch.manual_seed(seed)
    if with_torchvision and torchvision_available():
        theirs = torchvision_maskrcnn(config.num_classes, min_size=config.min_size, max_size=config.max_size,
                                      box_detections_per_img=config.detections_per_image).eval()  # fmt: skip
        calibrate_frozen_batchnorm(theirs, lambda: theirs(calibration_images))
        detecting_classifier(theirs.roi_heads.box_predictor.cls_score.bias)
        return from_torchvision(theirs.state_dict(), config).eval(), theirs
    unfolded = config.replace(fast_convolutions=False) if hasattr(config, "fast_convolutions") else config
    plain = MaskRCNN(unfolded).eval()  # norms not folded into the convolutions, so the hooks see them
    calibrate_frozen_batchnorm(plain, lambda: plain(calibration_images))
    detecting_classifier(plain.box_branch.predictor.class_logits.bias)
    ours = MaskRCNN(config)
    ours.load_state_dict(plain.state_dict())
    return ours.eval(), None


def profile_top_ops(run: Callable[[], object], rows: int = 12) -> list[dict]:
    """Run `run()` once under `torch.profiler` and return the operators with the most self time.

    Each row: operator name, calls, self seconds (time in the operator itself, not in the
    operators it calls) and its share of the total self time.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        run()
    events = list(profiler.key_averages())
    total = sum(event.self_cpu_time_total for event in events) or 1.0
    events.sort(key=lambda event: event.self_cpu_time_total, reverse=True)
    return [
        {"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total}
        for e in events[:rows]
    ]


def profile_lines(title: str, table: list[dict]) -> list[str]:
    """A Markdown table of `profile_top_ops` rows."""
    lines = ["", f"{title}:", "", "| operator | calls | self s | share |", "|---|---|---|---|"]
    lines += [f"| `{row['op']}` | {row['calls']} | {row['self_s']:.3f} | {row['share']:.1%} |" for row in table]
    return lines
