"""Benchmark the mask loss: forward + backward time and peak extra memory.

    python benchmarks/mask_loss.py                 # the device there is (CUDA if present)
    python benchmarks/mask_loss.py --device cpu

At the training sizes of the paper (R = 512 RoIs per batch, K = 81 classes for COCO as in the
paper, or 91 for torchvision's label space, M = 28) it times, for forward + backward:

- plain:     the plain PyTorch formulation (gather + binary_cross_entropy_with_logits), which is
             what torchvision's maskrcnn_loss runs;
- reference: `mrcnn.mask_loss.mask_loss_reference` (input checks + softplus form);
- kernel:    `kernels.mask_loss.mask_loss` (CUDA only; the interpreter's timings mean nothing).

It also times the mask predictor's last 1x1 convolution plus the loss, in full (K channels, then
the loss) and gathered (`gathered_mask_logits`: only each RoI's class, then the loss on K = 1).

On CUDA, the peak extra memory is `torch.cuda.max_memory_allocated()` during forward + backward
minus the memory allocated before it (inputs), so it includes the gradient itself. On CPU only
times are measured. Results go to benchmarks/results/mask_loss_<device>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import device_name  # noqa: E402
from mrcnn.mask_loss import gathered_mask_logits, mask_loss_reference  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def plain_loss(mask_logits, labels, mask_targets):
    """What torchvision's maskrcnn_loss computes once the targets are known."""
    gathered = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]  # [R, M, M]
    return F.binary_cross_entropy_with_logits(gathered.float(), mask_targets)


def measure(steps: dict, device: str, repeats: int, reset, warmup: int = 2) -> dict:
    """Median and best wall time in ms of each `step()`, on CUDA also its peak extra memory in MiB.

    The steps are timed in turn within each repeat (round robin), so that a change in the load
    of a shared machine affects them alike. `reset()` drops the gradients left by earlier runs
    before the memory baseline is taken.
    """
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    results = {}
    for name, step in steps.items():
        for _ in range(warmup):
            step()
        extra = None
        if device == "cuda":
            reset()
            sync()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step()
            sync()
            extra = (torch.cuda.max_memory_allocated() - before) / 2**20
        results[name] = {"times": [], "peak_extra_mib": extra}
    for _ in range(repeats):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            results[name]["times"].append((time.perf_counter() - start) * 1e3)
    return {name: {"median_ms": statistics.median(r["times"]), "best_ms": min(r["times"]),
                   "peak_extra_mib": r["peak_extra_mib"]} for name, r in results.items()}


def loss_rows(device: str, num_rois: int, num_classes: int, size: int, dtype: torch.dtype, repeats: int) -> list[dict]:
    logits = torch.randn(num_rois, num_classes, size, size, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(1, num_classes, (num_rois,), device=device)
    targets = (torch.rand(num_rois, size, size, device=device) > 0.5).float()
    methods = {"plain": plain_loss, "reference": mask_loss_reference}
    if device == "cuda":
        from kernels.mask_loss import mask_loss as mask_loss_kernel

        methods["kernel"] = mask_loss_kernel
    def reset():
        logits.grad = None

    def make_step(fn):
        def step():
            reset()
            fn(logits, labels, targets).backward()
        return step

    timings = measure({name: make_step(fn) for name, fn in methods.items()}, device, repeats, reset)
    reset()
    return [{"what": f"loss {name}", "R": num_rois, "K": num_classes, "M": size, "dtype": str(dtype)[6:], **timing}
            for name, timing in timings.items()]


def predictor_rows(device: str, num_rois: int, num_classes: int, size: int, channels: int, repeats: int) -> list[dict]:
    """The last 1x1 conv of the mask predictor + the loss: all K channels vs each RoI's own class."""
    features = torch.randn(num_rois, channels, size, size, device=device, requires_grad=True)
    weight = (torch.randn(num_classes, channels, 1, 1, device=device) * 0.01).requires_grad_()
    bias = torch.zeros(num_classes, device=device, requires_grad=True)
    labels = torch.randint(1, num_classes, (num_rois,), device=device)
    targets = (torch.rand(num_rois, size, size, device=device) > 0.5).float()
    loss = mask_loss_reference
    if device == "cuda":
        from kernels.mask_loss import mask_loss as loss

    def full():
        loss(F.conv2d(features, weight, bias), labels, targets).backward()

    def gathered():
        logits = gathered_mask_logits(features, weight, bias, labels)  # [R, 1, M, M]
        loss(logits, torch.zeros_like(labels), targets).backward()

    def reset():
        features.grad = weight.grad = bias.grad = None

    def make_step(fn):
        def step():
            reset()
            fn()
        return step

    steps = {"full conv + loss": make_step(full), "gathered conv + loss": make_step(gathered)}
    timings = measure(steps, device, repeats, reset)
    return [{"what": f"predictor {name}", "R": num_rois, "K": num_classes, "M": size, "dtype": "float32", **timing}
            for name, timing in timings.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rois", type=int, default=512)
    parser.add_argument("--classes", type=int, nargs="+", default=[81, 91])
    parser.add_argument("--mask-size", type=int, default=28)
    parser.add_argument("--predictor-rois", type=int, default=None,
                        help="R for the predictor timing (default: --rois on CUDA, 128 on CPU)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: steadier timings on a shared machine)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs of each (default 50 on CUDA, 20 on CPU)")
    args = parser.parse_args()
    device = args.device
    repeats = args.repeats or (50 if device == "cuda" else 20)
    predictor_rois = args.predictor_rois or (args.rois if device == "cuda" else 128)
    dtypes = [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32]
    if device == "cpu":
        torch.set_num_threads(args.threads)

    load_average = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    torch.manual_seed(0)
    rows = []
    for num_classes in args.classes:
        for dtype in dtypes:
            rows += loss_rows(device, args.rois, num_classes, args.mask_size, dtype, repeats)
    rows += predictor_rows(device, predictor_rois, args.classes[0], args.mask_size, 256, repeats)

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "threads": torch.get_num_threads() if device == "cpu" else None,
        "load_average_at_start": load_average if device == "cpu" else None,  # the machine may be shared
        "command": "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        "repeats": repeats,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"mask_loss_{device}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")

    lines = [f"# Mask loss, forward + backward, on {meta['device']}", ""]
    lines += [f"- {key}: `{value}`" for key, value in meta.items() if value is not None]
    lines += ["", "| what | R | K | M | dtype | median ms | best ms | peak extra MiB |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        extra = "-" if row["peak_extra_mib"] is None else f"{row['peak_extra_mib']:.1f}"
        lines.append(f"| {row['what']} | {row['R']} | {row['K']} | {row['M']} | {row['dtype']} | "
                     f"{row['median_ms']:.3f} | {row['best_ms']:.3f} | {extra} |")
    lines += ["", "Ratios (of medians; of best times):"]
    median = {(r["what"], r["K"], r["dtype"]): r["median_ms"] for r in rows}
    best = {(r["what"], r["K"], r["dtype"]): r["best_ms"] for r in rows}
    pairs = {"loss reference": ("reference / plain", "loss plain", False),
             "loss kernel": ("plain / kernel", "loss plain", True),
             "predictor gathered conv + loss": ("full / gathered", "predictor full conv + loss", True)}
    for (what, k, dtype) in median:
        if what in pairs:
            label, other, invert = pairs[what]
            ratios = [(t[(other, k, dtype)] / t[(what, k, dtype)]) if invert else (t[(what, k, dtype)] / t[(other, k, dtype)])
                      for t in (median, best)]
            lines.append(f"- {what.split()[0]} K={k} {dtype}: {label} = {ratios[0]:.2f}; {ratios[1]:.2f}")
    (RESULTS / f"mask_loss_{device}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
