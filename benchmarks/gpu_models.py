"""Steps (c) and (d) of the prepared GPU run: the whole model, ours against torchvision's, training and inference.

    python benchmarks/gpu_models.py training  --output-dir DIR     # (c)
    python benchmarks/gpu_models.py inference --output-dir DIR     # (d)
    python benchmarks/gpu_models.py training  --output-dir DIR --dry-run

The model is the `torchvision_maskrcnn_resnet50_fpn` preset (ResNet-50-FPN, section 3.1's
settings, torchvision's defaults), against torchvision's Mask R-CNN as built for pretrained
weights (frozen batch norm, three trainable stages: `benchmarks.common.torchvision_maskrcnn`;
`maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)` would instead build trainable
batch norm and five trainable stages, another network). `benchmarks.common.model_pair` gives
both the same random weights: torchvision's, its frozen norms calibrated on an image and its
classifier made to detect, loaded into ours by `mrcnn.weights.from_torchvision`.

- **training**: one iteration (zero_grad, forward on the batch with its targets, backward of
  the summed losses, SGD step with learning rate 0: every repeat computes the same thing;
  torch's generator reseeded before each, so both models sample alike), fp32 and bf16
  autocast, batches of 2 and 8 images of 800 x 1344: seconds per iteration (median of the
  repeats, the two models interleaved), images per second, the peak memory of the first
  iteration, and the first iteration's losses of both.
- **inference**: one 800 x 1066 image (a COCO picture after resizing), eval mode,
  `torch.no_grad()`, fp32 and bf16 autocast: seconds per image, peak memory, detections, and
  in fp32 how far our detections are from torchvision's (`benchmarks.inference.compare_detections`).

The images are synthetic shapes with their boxes, labels and masks (`benchmarks.common.
benchmark_images`). Where pycocotools is missing, `mrcnn.data.shapes` does not import; then
`rectangles` draws plain rectangles instead, and the results say so.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import Results, base_parser, choose_device, error_record, peak_memory, synchronize  # noqa: E402, I001

import torch  # noqa: E402

SEED = 0
SIZES = {  # (height, width), batches, repeats
    "gpu": {"training": ((800, 1344), (2, 8), {2: 5, 8: 3}), "inference": ((800, 1066), (1,), {1: 10})},
    "dry": {"training": ((48, 64), (1,), {1: 0}), "inference": ((48, 64), (1,), {1: 0})},  # 0: the first call's time only
}
DTYPES = ("fp32", "bf16")


def rectangles(count: int, height: int, width: int, seed: int = 0) -> tuple[list, list]:
    """`count` noisy images `[3, H, W]` with 2-5 filled rectangles each, and their targets (labels 1..4)."""
    generator = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(count):
        image = torch.rand(3, height, width, generator=generator) * 0.3
        masks, boxes = [], []
        for _ in range(int(torch.randint(2, 6, (1,), generator=generator))):
            h, w = (int(torch.randint(max(4, s // 8), max(5, s // 2), (1,), generator=generator)) for s in (height, width))
            y, x = int(torch.randint(0, height - h, (1,), generator=generator)), int(torch.randint(0, width - w, (1,), generator=generator))
            mask = torch.zeros(height, width, dtype=torch.uint8)
            mask[y : y + h, x : x + w] = 1
            image[:, y : y + h, x : x + w] = torch.rand(3, 1, 1, generator=generator)
            masks.append(mask)
            boxes.append([x, y, x + w, y + h])
        labels = torch.randint(1, 5, (len(masks),), generator=generator)
        images.append(image)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": labels, "masks": torch.stack(masks)})
    return images, targets


def make_images(count: int, height: int, width: int) -> tuple[list, list, str]:
    """Shapes images where `mrcnn.data.shapes` imports, rectangles otherwise; and which."""
    from benchmarks.common import benchmark_images

    try:
        return (*benchmark_images(count, height, width), "synthetic shapes (benchmarks.common.benchmark_images)")
    except ImportError as error:
        print(f"mrcnn.data.shapes does not import ({error}): plain rectangles instead")
        return (*rectangles(count, height, width), f"plain rectangles (mrcnn.data.shapes: {error})")


def models(size: tuple[int, int], dry_run: bool, calibration: list, device: str) -> dict:
    """{"ours": ..., "torchvision": ... where installed}, same weights (module docstring), on `device`."""
    from benchmarks.common import model_pair
    from mrcnn.config import torchvision_maskrcnn_resnet50_fpn

    config = torchvision_maskrcnn_resnet50_fpn()
    if dry_run:
        config = config.replace(min_size=min(size), max_size=max(size), detections_per_image=10)
    ours, theirs = model_pair(config, calibration, seed=SEED)
    found = {"ours": ours} | ({"torchvision": theirs} if theirs is not None else {})
    return {name: model.to(device) for name, model in found.items()}


def autocast(device: str, dtype: str):
    return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bf16")


def training_step(model, images: list, targets: list, device: str, dtype: str):
    """One iteration (module docstring) as a function returning the losses."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0, momentum=0.9, weight_decay=1e-4)

    def step() -> dict:
        torch.manual_seed(SEED)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            losses = model(images, targets)
        sum(losses.values()).backward()
        optimizer.step()
        return {name: float(value.detach()) for name, value in losses.items()}

    return step


def measure(results: Results, key: str, steps: dict, repeats: int, device: str, images: int) -> None:
    """Warm-up (with the peak memory and the returned value) of each step, then the steps timed interleaved."""
    from benchmarks.common import interleaved

    def run():
        found = {}
        for name, step in steps.items():
            value, start = {}, time.perf_counter()
            found[name] = peak_memory(lambda step=step, value=value: value.setdefault("first", step()), device)
            synchronize(device)
            found[name] |= {"first_call": value["first"], "first_call_s": time.perf_counter() - start}
        timings = interleaved(steps, repeats, warmup=0, device=device) if repeats else {
            name: {"times_s": [found[name]["first_call_s"]], "median_s": found[name]["first_call_s"], "best_s": found[name]["first_call_s"]}
            for name in steps}  # fmt: skip
        for name, timing in timings.items():
            found[name] |= timing | {"images_per_s": images / timing["median_s"]}
        return found

    results.attempt(key, run)


def training(results: Results, device: str, dry_run: bool) -> None:
    (height, width), batches, repeats = SIZES["dry" if dry_run else "gpu"]["training"]
    images, targets, source = make_images(max(batches), height, width)
    results["images"] = {"size": [height, width], "source": source, "objects": [len(t["boxes"]) for t in targets]}
    pair = models((height, width), dry_run, images[:1], device)
    results["models"] = list(pair)
    images = [image.to(device) for image in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    for model in pair.values():
        model.train()
    for batch in batches:
        for dtype in DTYPES:
            steps = {name: training_step(model, images[:batch], targets[:batch], device, dtype) for name, model in pair.items()}
            measure(results, f"training | batch {batch} | {dtype}", steps, repeats[batch], device, batch)
            torch.cuda.empty_cache() if device == "cuda" else None


def inference(results: Results, device: str, dry_run: bool) -> None:
    (height, width), batches, repeats = SIZES["dry" if dry_run else "gpu"]["inference"]
    images, _, source = make_images(1, height, width)
    results["images"] = {"size": [height, width], "source": source}
    pair = models((height, width), dry_run, images, device)
    results["models"] = list(pair)
    images = [image.to(device) for image in images]
    outputs = {}
    for dtype in DTYPES:
        def step(name, model, dtype=dtype):
            def call():
                with torch.no_grad(), autocast(device, dtype):
                    detections = model(images)
                outputs[(name, dtype)] = detections
                return {"detections": [len(d["boxes"]) for d in detections]}
            return call

        measure(results, f"inference | batch 1 | {dtype}", {name: step(name, model) for name, model in pair.items()}, repeats[1], device, 1)
    if "torchvision" in pair:
        def agreement():
            from benchmarks.inference import compare_detections

            return {dtype: compare_detections(outputs[("ours", dtype)], outputs[("torchvision", dtype)]) for dtype in DTYPES}

        results.attempt("inference | agreement with torchvision", agreement)


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("what", choices=["training", "inference"])
    args = parser.parse_args(argv)
    device = choose_device(args)
    about = {"training": "training iteration, ours and torchvision's", "inference": "inference latency, ours and torchvision's"}
    results = Results(args.output_dir, args.what, about[args.what], args.dry_run, device)
    results["preset"] = "torchvision_maskrcnn_resnet50_fpn" + (" (sizes set to the dry run's images)" if args.dry_run else "")
    try:
        (training if args.what == "training" else inference)(results, device, args.dry_run)
    except Exception as error:  # noqa: BLE001 - the set-up failed: say so in the results
        import traceback

        traceback.print_exc()
        results["setup_error"] = error_record(error)["error"]
    errors = [key for key, value in results.data["results"].items() if isinstance(value, dict) and "error" in value]
    results["errors"] = errors + (["setup"] if "setup_error" in results.data else [])
    return 1 if results.data["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
