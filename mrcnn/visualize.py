"""Figures for the book and the command line, drawn with matplotlib from the library's own code.

Each function returns a `matplotlib.figure.Figure` (no pyplot state): a notebook displays it,
`figure.savefig(path)` writes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from mrcnn.box_head import select_training_rois
from mrcnn.roi_align import roi_align_reference, roi_pool, roi_pool_bins, sampling_grid
from mrcnn.transform import resize_boxes

BIN_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def roi_align_figure(
    box: tuple[float, float, float, float] = (1.3, 1.6, 6.1, 6.4),
    feature_size: tuple[int, int] = (8, 8),
    output_size: int = 2,
    sampling_ratio: int = 2,
    features: torch.Tensor | None = None,
) -> Figure:
    """RoIPool against RoIAlign for one RoI over a feature grid (paper section 3, Figure 3).

    box: `(x1, y1, x2, y2)` in feature-map pixels (spatial scale 1), where pixel `(i, j)` is the
    unit square `[j, j + 1) x [i, i + 1)`; feature_size `(H, W)`; features: an optional `[H, W]`
    map drawn underneath and pooled (a smooth random one by default). Left: RoIPool rounds the
    box to whole pixels and splits it into bins of whole pixels (shaded), and max-pools each bin
    (`draw_roi_pool`). Right: RoIAlign keeps the box, splits it exactly, samples each bin at
    `sampling_ratio ** 2` points by bilinear interpolation (with the half-pixel shift,
    `aligned=True`) and averages (`draw_roi_align`). The number in each bin is the pooled value,
    computed by `roi_pool` and `roi_align_reference`.
    """
    features = smooth_feature_map(feature_size) if features is None else features.to(torch.float64)
    figure = Figure(figsize=(10, 5), layout="constrained")
    pool_axes, align_axes = figure.subplots(1, 2)
    for axes in (pool_axes, align_axes):
        draw_feature_grid(axes, features, box)
    draw_roi_pool(pool_axes, features, box, output_size)
    draw_roi_align(align_axes, features, box, output_size, sampling_ratio)
    return figure


def smooth_feature_map(feature_size: tuple[int, int] = (8, 8), seed: int = 3) -> torch.Tensor:
    """A smooth random float64 `[H, W]` map: 3 x 3 uniform values upsampled bicubically."""
    coarse = torch.rand(1, 1, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.nn.functional.interpolate(coarse, size=feature_size, mode="bicubic", align_corners=True)[0, 0]  # [H, W]


def draw_feature_grid(axes, features: torch.Tensor, box: tuple[float, float, float, float]) -> None:
    """The `[H, W]` map in grey under its pixel grid, and the RoI `box` (feature pixels) outlined in black."""
    height, width = features.shape
    low, high = float(features.min()), float(features.max())
    axes.imshow(features.numpy(), cmap="Greys", extent=(0, width, height, 0), alpha=0.45,
                vmin=low - 0.5 * (high - low), vmax=high + 0.5 * (high - low))  # fmt: skip
    for i in range(height + 1):
        axes.axhline(i, color="0.7", linewidth=0.6)
    for j in range(width + 1):
        axes.axvline(j, color="0.7", linewidth=0.6)
    x1, y1, x2, y2 = box
    axes.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="black", linewidth=2.2, label="RoI"))
    axes.set_xlim(-0.2, width + 0.2)
    axes.set_ylim(height + 0.2, -0.2)
    axes.set_aspect("equal")
    axes.set_xlabel("x (feature pixels)")
    axes.set_ylabel("y")


def draw_roi_pool(axes, features: torch.Tensor, box: tuple[float, float, float, float], output_size: int) -> torch.Tensor:
    """RoIPool's bins, the whole pixels each covers (from the library's own quantization, shaded), and
    the maximum of each. Returns the pooled `[P, P]`."""
    height, width = features.shape
    rois = torch.tensor([[0.0, *box]], dtype=torch.float64)
    pooled = roi_pool(features[None, None].to(torch.float64), rois, output_size)[0, 0]  # [P, P]
    y_low, y_high, x_low, x_high = (t[0].tolist() for t in roi_pool_bins(rois, (output_size, output_size), 1.0, height, width))
    for p in range(output_size):
        for q in range(output_size):
            colour = BIN_COLOURS[(p * output_size + q) % len(BIN_COLOURS)]
            corner, size = (x_low[q], y_low[p]), (x_high[q] - x_low[q], y_high[p] - y_low[p])
            axes.add_patch(Rectangle(corner, *size, color=colour, alpha=0.25, linewidth=0))
            axes.add_patch(Rectangle(corner, *size, fill=False, color=colour, linewidth=1.5, linestyle="--"))
            axes.text(x_low[q] + size[0] / 2, y_low[p] + size[1] / 2, f"max\n{pooled[p, q]:.2f}", ha="center", va="center", fontsize=9)
    axes.set_title("RoIPool: box and bins rounded to whole pixels (shaded),\nmax over each bin")
    return pooled


def draw_roi_align(axes, features: torch.Tensor, box: tuple[float, float, float, float], output_size: int,
                   sampling_ratio: int) -> torch.Tensor:  # fmt: skip
    """RoIAlign's exact bins, the bilinear samples of each (pixel centres are at i + 1/2 here), their
    average, and the four pixels the first sample reads. Returns the pooled `[P, P]`."""
    rois = torch.tensor([[0.0, *box]], dtype=torch.float64)
    pooled = roi_align_reference(features[None, None].to(torch.float64), rois, output_size, 1.0, sampling_ratio, aligned=True)[0, 0]
    x1, y1, x2, y2 = box
    bin_w, bin_h = (x2 - x1) / output_size, (y2 - y1) / output_size
    for k in range(1, output_size):
        axes.plot([x1 + k * bin_w] * 2, [y1, y2], color="black", linewidth=1, linestyle="--")
        axes.plot([x1, x2], [y1 + k * bin_h] * 2, color="black", linewidth=1, linestyle="--")
    y, x, *_ = sampling_grid(rois, (output_size, output_size), 1.0, sampling_ratio, aligned=True)  # [1, P, G] each
    for p in range(output_size):
        for q in range(output_size):
            colour = BIN_COLOURS[(p * output_size + q) % len(BIN_COLOURS)]
            ys, xs = torch.meshgrid(y[0, p] + 0.5, x[0, q] + 0.5, indexing="ij")
            axes.scatter(xs.flatten(), ys.flatten(), s=28, color=colour, zorder=3)
            axes.text(x1 + (q + 0.5) * bin_w, y1 + (p + 0.5) * bin_h, f"avg\n{pooled[p, q]:.2f}", ha="center", va="center", fontsize=9)
    sample_y, sample_x = float(y[0, 0, 0]), float(x[0, 0, 0])
    low_y, low_x = int(sample_y // 1), int(sample_x // 1)
    for cy in (low_y, low_y + 1):
        for cx in (low_x, low_x + 1):
            axes.plot([sample_x + 0.5, cx + 0.5], [sample_y + 0.5, cy + 0.5], color="tab:blue", linewidth=0.8)
            axes.scatter([cx + 0.5], [cy + 0.5], marker="x", color="tab:blue", s=30, zorder=3)
    axes.set_title(f"RoIAlign: exact bins, {sampling_ratio}x{sampling_ratio} bilinear samples\nper bin (x: the 4 pixels one sample reads), averaged")
    return pooled


# --- detections, boxes and training curves -------------------------------------------------------

INSTANCE_COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:cyan", "tab:pink", "tab:olive", "tab:brown")


def image_to_array(image):
    """A float `[3, H, W]` tensor in [0, 1] (or a uint8 `[H, W, 3]` array) as `[H, W, 3]` for imshow."""
    if isinstance(image, torch.Tensor):
        return image.detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy()  # [H, W, 3]
    return image


def draw_boxes(axes, boxes: torch.Tensor, colour="yellow", linewidth: float = 1.0, alpha: float = 1.0, labels=None) -> None:
    """Outline boxes `[B, 4]` (x1, y1, x2, y2, image pixels) on `axes`, with optional text labels."""
    for index, (x1, y1, x2, y2) in enumerate(boxes.detach().cpu().tolist()):
        colours = colour[index] if isinstance(colour, (list, tuple)) else colour
        axes.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colours, linewidth=linewidth, alpha=alpha))
        if labels is not None:
            axes.text(x1, y1 - 1, labels[index], color="white", fontsize=7, va="bottom",
                      bbox={"facecolor": colours, "alpha": 0.8, "pad": 1, "linewidth": 0})  # fmt: skip


def draw_detections(axes, image, detections: dict, class_names, score_threshold: float = 0.5, mask_threshold: float = 0.5) -> int:
    """Draw an image with its detections: masks as translucent colour, boxes, "class score" labels.

    image: float `[3, H, W]` in [0, 1] or uint8 `[H, W, 3]`; detections: the model's dict for this
    image ("boxes" `[D, 4]`, "labels" `[D]`, "scores" `[D]`, optional "masks" `[D, 1, H, W]`
    probabilities) or a target ("boxes", "labels", "masks" `[G, H, W]`, no scores: all drawn).
    class_names: indexed by label. Returns the number of instances drawn.
    """
    picture = np.array(image_to_array(image), dtype=np.float32)  # [H, W, 3]
    if picture.max() > 1:
        picture /= 255
    scores = detections.get("scores")
    keep = torch.ones(len(detections["boxes"]), dtype=torch.bool) if scores is None else scores.detach().cpu() >= score_threshold
    keep_index = torch.where(keep)[0].tolist()
    colours = [INSTANCE_COLOURS[i % len(INSTANCE_COLOURS)] for i in range(len(keep_index))]
    masks = detections.get("masks")
    if masks is not None:
        masks = masks.detach().cpu()
        masks = masks[:, 0] if masks.dim() == 4 else masks  # [D, H, W]
        for index, colour in zip(keep_index, colours):
            region = (masks[index].float() >= mask_threshold).numpy()  # [H, W]
            picture[region] = 0.55 * picture[region] + 0.45 * np.array(to_rgb(colour), dtype=np.float32)
    axes.imshow(picture)
    labels = detections["labels"].detach().cpu().tolist()
    texts = [class_names[labels[i]] + ("" if scores is None else f" {float(scores[i]):.2f}") for i in keep_index]
    draw_boxes(axes, detections["boxes"].detach().cpu()[keep_index].reshape(-1, 4), colours, 1.2, labels=texts)
    axes.set_axis_off()
    return len(keep_index)


def detections_figure(images, detections, class_names, score_threshold: float = 0.5, titles=None,
                      columns: int = 4, size: float = 3.0) -> Figure:  # fmt: skip
    """A grid of images with their detections (see `draw_detections`), one panel per image."""
    rows = max(1, -(-len(images) // columns))
    figure = Figure(figsize=(size * min(columns, len(images)), size * rows), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, min(columns, len(images)), squeeze=False).ravel())
    for index, panel in enumerate(axes):
        if index >= len(images):
            panel.set_axis_off()
            continue
        count = draw_detections(panel, images[index], detections[index], class_names, score_threshold)
        panel.set_title(titles[index] if titles else f"{count} detections >= {score_threshold}", fontsize=9)
    return figure


def loss_curve_figure(records: list[dict], smoothing: int = 20) -> Figure:
    """The training losses (each term and their sum, smoothed by a running mean) and the learning rate.

    records: the lines of a training log (mrcnn/train.py), dicts with "step", "lr", "loss" and
    the "loss_*" terms. Raw values are drawn faintly, the running mean over `smoothing` steps on top.
    """
    steps = np.array([record["step"] for record in records])
    names = ["loss"] + [name for name in records[0] if name.startswith("loss_")] if records else []
    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_axes, lr_axes = figure.subplots(1, 2, width_ratios=(3, 1))
    for name, colour in zip(names, ("black", *INSTANCE_COLOURS)):
        values = np.array([record[name] for record in records], dtype=np.float64)
        window = max(1, min(smoothing, len(values)))
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")  # [S - window + 1]
        loss_axes.plot(steps, values, color=colour, alpha=0.15, linewidth=0.6)
        loss_axes.plot(steps[window - 1 :], smooth, color=colour, linewidth=1.6 if name == "loss" else 1.1,
                       label="L (sum)" if name == "loss" else name.removeprefix("loss_"))  # fmt: skip
    loss_axes.set_yscale("log")
    loss_axes.set_xlabel("step")
    loss_axes.set_ylabel("loss (mean over the batch)")
    loss_axes.legend(fontsize=8, ncols=2)
    loss_axes.grid(True, which="both", alpha=0.3)
    lr_axes.plot(steps, [record["lr"] for record in records], color="tab:blue")
    lr_axes.set_xlabel("step")
    lr_axes.set_title("learning rate", fontsize=10)
    lr_axes.grid(True, alpha=0.3)
    return figure


@dataclass
class TrainingSamples:
    """What one training step samples on one image, in the resized image's pixels (section 3.1)."""

    anchors: torch.Tensor  # [T, 4] every anchor of every level
    positive: torch.Tensor  # [T] bool: the anchors the RPN's sampler drew as positive
    negative: torch.Tensor  # [T] bool: and as negative
    proposals: torch.Tensor  # [R, 4] the RPN's proposals after NMS, best first
    roi_boxes: torch.Tensor  # [S, 4] the RoIs the box branch samples from the proposals and the ground truth
    roi_labels: torch.Tensor  # [S] int64: their classes, 0 for a negative
    image_size: tuple[int, int]  # (h, w) of the resized image


@torch.no_grad()
def training_samples(model, image: torch.Tensor, target: dict, seed: int = 0) -> TrainingSamples:
    """Run the first half of a training step of `model` (a `MaskRCNN`) on one image and return what
    its samplers draw: the RPN's anchors and the box branch's RoIs. The model's current weights
    give the proposals; torch's generator is seeded with `seed` for the samplers; the model's
    train/eval mode is put back."""
    was_training = model.training
    model.train()
    torch.manual_seed(seed)
    try:
        batch, sizes, targets = model.transform([image], [target])  # [1, 3, H', W']
        features, _ = model.feature_maps(batch)  # the maps the RPN reads: P2..P6, or C4 / C5 alone
        anchors_per_level, objectness, _, proposals = model.rpn.predict(features, tuple(batch.shape[-2:]))
        anchors = torch.cat(anchors_per_level)  # [T, 4]
        anchor_labels, _ = model.rpn.assign_targets(anchors, targets)
        positive, negative = (mask[0] for mask in model.rpn.sampler(anchor_labels))  # [T] each
        boxes = model.rpn.select_proposals(proposals, objectness, sizes, [a.shape[0] for a in anchors_per_level])
        branch = model.box_branch
        rois = select_training_rois(boxes, targets, branch.matcher, branch.sampler, branch.box_coder)
    finally:
        model.train(was_training)
    return TrainingSamples(anchors, positive, negative, boxes[0], rois.boxes[0], rois.labels[0], sizes[0])


def training_samples_figure(model, image: torch.Tensor, target: dict, seed: int = 0, shown_negatives: int = 25) -> Figure:
    """What one training step samples on one image (paper section 3.1, `training_samples`), in three panels.

    1. The RPN's anchors: those sampled as positive (IoU >= 0.7 with an object, or an object's
       best anchor) and some sampled as negative (IoU < 0.3).
    2. The 25 best proposals after NMS (the RPN's output, which the heads train on).
    3. The RoIs the box branch samples from the proposals and the ground truth: positive at
       IoU >= 0.5 (at most a quarter of the sample), negative below.

    model: a `MaskRCNN` (its current weights; a fresh one proposes almost at random); image
    float `[3, H, W]`; target with "boxes" `[G, 4]` and "labels" `[G]`. Ground truth is white.
    """
    samples = training_samples(model, image, target, seed)
    original = tuple(image.shape[-2:])
    generator = torch.Generator().manual_seed(seed)

    def some(boxes: torch.Tensor) -> torch.Tensor:
        return boxes[torch.randperm(len(boxes), generator=generator)[:shown_negatives]]

    roi_positive, roi_negative = samples.roi_boxes[samples.roi_labels > 0], samples.roi_boxes[samples.roi_labels == 0]
    proposals = samples.proposals
    content = [
        (f"RPN anchors: {int(samples.positive.sum())} positive (green), {int(samples.negative.sum())} negative\n(red, "
         f"{shown_negatives} shown)", [(samples.anchors[samples.positive], "lime", 1.2), (some(samples.anchors[samples.negative]), "red", 0.6)]),
        (f"the {min(25, len(proposals))} best of {len(proposals)} proposals after NMS", [(proposals[:25], "yellow", 0.8)]),
        (f"sampled RoIs: {len(roi_positive)} positive (IoU >= 0.5), {len(roi_negative)}\nnegative ({shown_negatives} shown)",
         [(roi_positive, "lime", 0.8), (some(roi_negative), "red", 0.6)]),
    ]  # fmt: skip
    figure = Figure(figsize=(12, 4.8), layout="constrained")  # shown about 1000 px wide: titles of 12 points stay legible
    for axes, (title, layers) in zip(figure.subplots(1, 3), content):
        axes.imshow(image_to_array(image))
        for boxes, colour, width in layers:
            draw_boxes(axes, resize_boxes(boxes, samples.image_size, original), colour, width)  # in the original image
        draw_boxes(axes, target["boxes"], "white", 1.6)
        axes.set_title(title, fontsize=12)
        axes.set_axis_off()
    return figure
