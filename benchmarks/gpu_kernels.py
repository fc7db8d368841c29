"""Step (b) of the prepared GPU run: the two kernels against torchvision at training shapes.

    python benchmarks/gpu_kernels.py --output-dir DIR            # on a GPU
    python benchmarks/gpu_kernels.py --output-dir DIR --dry-run  # CPU, tiny, Triton's interpreter

**Multi-level RoIAlign** (paper section 3, FPN's level assignment), at the shapes of one
training iteration (section 3.1): 2 images padded to 800 x 1344, P2-P5 (strides 4-32) with
C = 256 channels, the box head's 512 RoIs per image pooled to 7 x 7 and the mask head's 128 per
image to 14 x 14, sampling ratio 2, legacy alignment (torchvision's settings). RoI sides are
log-uniform in [16, 800] pixels with aspect ratios in [1/2, 2] (as benchmarks/roi_align.py),
so every level gets RoIs. Compared, forward and forward + backward:

- ours: `mrcnn.poolers.MultiLevelRoIAlign` on the kernel path (the model's pooler: all levels
  in one launch, atomic backward), and the same in torch's deterministic mode (the backward
  of kernels/roi_align_deterministic.py);
- torchvision: `torchvision.ops.MultiScaleRoIAlign`, the pooler of its Mask R-CNN. In bf16
  it runs as its model runs it, under autocast, which computes RoIAlign in float32.

Features are float32 or bfloat16; the RoIs stay float32 (the model's boxes are float32 under
autocast). Recorded per case: median and best ms, the peak memory of one forward + backward
(`torch.cuda.max_memory_allocated`, in all and over what was allocated before), and the
agreement of outputs and gradients with torchvision (float32) and with our float32 kernel
(bfloat16), as relative errors ||a - b|| / ||b||. The forward's bandwidth floor comes from
`benchmarks.roi_align.bandwidth_floor_ms` (4.3 TB/s, measured on an H200 here).

**The mask loss** (section 3, L_mask): R = 512 RoIs, K = 81 classes, M = 28, float32 and
bfloat16 logits: ours (`mrcnn.mask_loss.mask_loss` on the kernel path, as the model calls it)
against torchvision's formula (`maskrcnn_loss`'s last line: gather each RoI's class, then
`binary_cross_entropy_with_logits`, under autocast for bf16 as in its model), with the loss
and the gradient checked against the float64 reference.
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import Results, base_parser, choose_device, peak_memory, relative_error, time_ms  # noqa: E402, I001

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

STRIDES = (4, 8, 16, 32)
LEVELS = ("p2", "p3", "p4", "p5")
SIZES = {  # training shapes on the GPU; tiny ones for the dry run
    "gpu": dict(images=2, height=800, width=1344, channels=256, box_rois=512, mask_rois=128, R=512, K=81, M=28, repeats=30, warmup=3),
    "dry": dict(images=2, height=64, width=96, channels=4, box_rois=6, mask_rois=3, R=6, K=5, M=28, repeats=1, warmup=0),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def pyramid_and_rois(device: str, sizes: dict, seed: int = 0):
    """Float32 features P2-P5 `[N, C, H/s, W/s]` and the box and mask RoIs `[R, 5]` (float32, sorted by image)."""
    generator = torch.Generator().manual_seed(seed)
    n, height, width = sizes["images"], sizes["height"], sizes["width"]
    features = [torch.randn(n, sizes["channels"], height // s, width // s, generator=generator).to(device) for s in STRIDES]
    scale = width / 1344  # RoI sides from 16 to 800 pixels at 1344 wide, in proportion on smaller images

    def rois(count: int) -> torch.Tensor:
        side = torch.empty(count, dtype=torch.float64).uniform_(math.log(16 * scale), math.log(800 * scale), generator=generator).exp()
        aspect = torch.empty(count, dtype=torch.float64).uniform_(math.log(0.5), math.log(2.0), generator=generator).exp()
        box_w, box_h = side * aspect.sqrt(), side / aspect.sqrt()  # [R]
        centre_x = torch.rand(count, generator=generator, dtype=torch.float64) * width
        centre_y = torch.rand(count, generator=generator, dtype=torch.float64) * height
        boxes = torch.stack([centre_x - box_w / 2, centre_y - box_h / 2, centre_x + box_w / 2, centre_y + box_h / 2], 1)  # [R, 4]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)  # proposals are clipped to the image
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        image = torch.arange(count, dtype=torch.float64)[:, None] * n // count  # [R, 1], grouped by image
        return torch.cat([image, boxes], 1).float().to(device)  # [R, 5]

    return features, rois(sizes["box_rois"] * n), rois(sizes["mask_rois"] * n)


@contextmanager
def deterministic(on: bool):
    """torch's deterministic mode on or off, restored afterwards (warn only: other ops may lack one)."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def roi_align_methods(device: str, output_size: int, height: int, width: int, num_images: int) -> dict:
    """name -> pool(features, rois) -> [R, C, P, P]; ours always, torchvision's where it is installed."""
    from mrcnn.poolers import MultiLevelRoIAlign

    pooler = MultiLevelRoIAlign(output_size, STRIDES, sampling_ratio=2, aligned=False)
    methods = {"ours": lambda f, r: pooler(f, r, use_kernel=True)}

    def ours_deterministic(f, r):
        with deterministic(True):
            return pooler(f, r, use_kernel=True)

    methods["ours, deterministic"] = ours_deterministic
    try:
        from torchvision.ops import MultiScaleRoIAlign
    except ImportError:
        print("torchvision is not installed: its RoIAlign is skipped")
        return methods
    theirs = MultiScaleRoIAlign(list(LEVELS), output_size, sampling_ratio=2)
    boxes = {}  # id(rois) -> one [R_n, 4] per image, as torchvision's model passes them: split once, untimed

    def torchvision_pool(f, r):
        if id(r) not in boxes:
            boxes[id(r)] = [r[r[:, 0] == n, 1:] for n in range(num_images)]  # RoIs are grouped by image: same order out
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=f[0].dtype == torch.bfloat16):
            return theirs(dict(zip(LEVELS, f)), boxes[id(r)], [(height, width)] * num_images)

    methods["torchvision"] = torchvision_pool
    return methods


def measure_roi_align(results: Results, device: str, sizes: dict) -> None:
    """Every method x dtype x head (module docstring), each case recorded as it finishes."""
    from mrcnn.poolers import fpn_level

    features32, box_rois, mask_rois = pyramid_and_rois(device, sizes)
    heads = {"box 7x7": (box_rois, 7), "mask 14x14": (mask_rois, 14)}
    results["rois_per_level_P2_P5"] = {head: torch.bincount(fpn_level(r[:, 1:], 2, 5).cpu() - 2, minlength=4).tolist()
                                       for head, (r, _) in heads.items()}  # fmt: skip
    for head, (rois, size) in heads.items():
        generator = torch.Generator().manual_seed(1)
        grad_output = torch.randn(rois.shape[0], sizes["channels"], size, size, generator=generator).to(device)
        methods = roi_align_methods(device, size, sizes["height"], sizes["width"], sizes["images"])
        outputs = {}  # (method, dtype) -> (forward output, feature gradients), for the agreement
        for dtype_name, dtype in DTYPES.items():
            leaves = [f.to(dtype, copy=True).requires_grad_() for f in features32]
            grad = grad_output.to(dtype)

            def reset(leaves=leaves):
                for leaf in leaves:
                    leaf.grad = None

            for name, pool in methods.items():
                def forward(pool=pool, leaves=leaves):
                    with torch.no_grad():
                        return pool(leaves, rois)

                def forward_backward(pool=pool, leaves=leaves, grad=grad):
                    pool(leaves, rois).backward(grad)

                def case(name=name, pool=pool, leaves=leaves, grad=grad, forward=forward, forward_backward=forward_backward, reset=reset):
                    reset()
                    out = pool(leaves, rois)
                    out.backward(grad)
                    outputs[(name, dtype_name)] = (out.detach().float(), [leaf.grad.float() for leaf in leaves])
                    reset()
                    memory = peak_memory(forward_backward, device)
                    reset()
                    return {"fw": time_ms(forward, device, sizes["repeats"], sizes["warmup"]),
                            "fw+bw": time_ms(forward_backward, device, sizes["repeats"], sizes["warmup"], reset=reset), **memory}  # fmt: skip

                results.attempt(f"roi_align | {head} | {name} | {dtype_name}", case)
            del leaves
        results.attempt(f"roi_align | {head} | agreement", lambda: agreement(outputs))
        results.attempt(f"roi_align | {head} | bandwidth floor", lambda rois=rois, size=size: floor(features32, rois, size))
        outputs.clear()


def agreement(outputs: dict) -> dict:
    """Relative errors of forward outputs and feature gradients: against torchvision (fp32) and our fp32 kernel (bf16)."""
    found = {}
    pairs = [(("ours", "fp32"), ("torchvision", "fp32")), (("ours, deterministic", "fp32"), ("torchvision", "fp32")),
             (("ours, deterministic", "fp32"), ("ours", "fp32")), (("ours", "bf16"), ("ours", "fp32")),
             (("torchvision", "bf16"), ("ours", "fp32"))]  # fmt: skip
    for a, b in pairs:
        if a in outputs and b in outputs:
            (out_a, grads_a), (out_b, grads_b) = outputs[a], outputs[b]
            found[f"{' '.join(a)} vs {' '.join(b)}"] = {
                "forward": relative_error(out_a, out_b),
                "backward": max(relative_error(g_a, g_b) for g_a, g_b in zip(grads_a, grads_b)),
            }
    return found


def floor(features: list, rois: torch.Tensor, output_size: int) -> dict:
    """The forward and backward bandwidth floors in ms at 4.3 TB/s (benchmarks/roi_align.py), fp32 and bf16."""
    from benchmarks.roi_align import bandwidth_floor_ms

    found = {}
    for dtype_name, dtype in DTYPES.items():
        forward, backward = bandwidth_floor_ms([f.to(dtype) for f in features], rois, output_size, 4.3e12)
        found[dtype_name] = {"fw_ms": forward, "fw+bw_ms": forward + backward}
    return found


def torchvision_mask_loss(mask_logits, labels, mask_targets):
    """The last line of torchvision's `maskrcnn_loss`: each RoI's own class, then the mean binary cross-entropy."""
    return F.binary_cross_entropy_with_logits(mask_logits[torch.arange(labels.shape[0], device=labels.device), labels], mask_targets)


def measure_mask_loss(results: Results, device: str, sizes: dict) -> None:
    """Ours and torchvision's formula, fp32 and bf16 (module docstring)."""
    from mrcnn.mask_loss import mask_loss, mask_loss_reference

    num_rois, num_classes, size = sizes["R"], sizes["K"], sizes["M"]
    generator = torch.Generator().manual_seed(2)
    logits32 = torch.randn(num_rois, num_classes, size, size, generator=generator)
    labels = torch.randint(1, num_classes, (num_rois,), generator=generator).to(device)
    targets = (torch.rand(num_rois, size, size, generator=generator) > 0.5).float().to(device)
    methods = {"ours": lambda x: mask_loss(x, labels, targets, use_kernel=True, validate=False), "torchvision's formula": None}
    for dtype_name, dtype in DTYPES.items():
        logits = logits32.to(device, dtype, copy=True).requires_grad_()
        exact = logits.detach().double().requires_grad_()
        expected = mask_loss_reference(exact, labels, targets)
        expected.backward()

        def theirs(x, dtype=dtype):
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                return torchvision_mask_loss(x, labels, targets)

        methods["torchvision's formula"] = theirs
        for name, loss in methods.items():
            def reset(logits=logits):
                logits.grad = None

            def case(loss=loss, logits=logits, reset=reset, expected=expected, exact=exact):
                reset()
                value = loss(logits)
                value.backward()
                errors = {"loss_relative_error": relative_error(value, expected), "grad_relative_error": relative_error(logits.grad, exact.grad)}
                reset()
                memory = peak_memory(lambda: loss(logits).backward(), device)
                reset()
                forward = time_ms(lambda: loss(logits.detach()), device, sizes["repeats"], sizes["warmup"])
                forward_backward = time_ms(lambda: loss(logits).backward(), device, sizes["repeats"], sizes["warmup"], reset=reset)
                return {"fw": forward, "fw+bw": forward_backward, **memory, **errors}

            results.attempt(f"mask_loss | R={num_rois} K={num_classes} M={size} | {name} | {dtype_name}", case)


def main(argv=None) -> int:
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)
    device = choose_device(args)
    sizes = SIZES["dry" if args.dry_run else "gpu"]
    results = Results(args.output_dir, "kernels", "RoIAlign and mask loss, ours against torchvision", args.dry_run, device)
    results["sizes"] = sizes
    torch.manual_seed(0)
    measure_roi_align(results, device, sizes)
    measure_mask_loss(results, device, sizes)
    errors = [key for key, value in results.data["results"].items() if isinstance(value, dict) and "error" in value]
    results["errors"] = errors
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
