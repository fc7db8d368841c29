"""Figures of every stage of an `Inspection` (mrcnn/inspection.py), one call each.

Each function takes the `Inspection` of one image (or the model, for the weights) and returns
a `matplotlib.figure.Figure`, which a notebook displays: `proposals_figure(inspection)`.
They only draw what the inspection recorded; nothing here runs the model.
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Rectangle
from torch import nn

from mrcnn.inspection import Inspection, SamplingPoints
from mrcnn.visualize import INSTANCE_COLOURS, draw_boxes, draw_detections, image_to_array

LEVEL_COLOURS = {2: "tab:blue", 3: "tab:orange", 4: "tab:green", 5: "tab:red", 6: "tab:purple"}


def _panels(count: int, size: float = 3.2, rows: int = 1) -> tuple[Figure, list]:
    columns = -(-count // rows)
    figure = Figure(figsize=(size * columns, size * rows), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False).ravel())
    for extra in axes[count:]:
        extra.set_axis_off()
    return figure, list(axes[:count])


def _image(axes, inspection: Inspection, title: str = "") -> None:
    axes.imshow(image_to_array(inspection.padded_image))
    axes.set_title(title, fontsize=9)
    axes.set_axis_off()


def _class_name(class_names, label: int) -> str:
    return class_names[label] if class_names is not None else str(label)


def input_figure(inspection: Inspection) -> Figure:
    """The original image, and what the backbone sees: resized, normalized (undone here) and zero-padded."""
    figure, (original, padded) = _panels(2)
    original.imshow(image_to_array(inspection.image))
    original.set_title(f"original {list(inspection.image.shape[1:])}", fontsize=9)
    original.set_axis_off()
    height, width = inspection.image_size
    _image(padded, inspection, f"resized {[height, width]}, padded to {list(inspection.padded_image.shape[1:])}")
    padded.add_patch(Rectangle((-0.5, -0.5), width, height, fill=False, edgecolor="yellow", linestyle="--"))
    return figure


def feature_maps_figure(inspection: Inspection) -> Figure:
    """C2..C5 (the backbone) and P2..P6 (the FPN): the norm over channels at every position."""
    maps = {**inspection.backbone_features, **inspection.fpn_features}
    figure, axes = _panels(len(maps), size=2.4, rows=2)
    for panel, (name, feature) in zip(axes, maps.items()):
        panel.imshow(feature.float().norm(dim=0).cpu().numpy(), cmap="magma")  # [H_l, W_l]
        panel.set_title(f"{name} {list(feature.shape)}", fontsize=8)
        panel.set_axis_off()
    return figure


def anchors_at(anchors: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """The anchors `[A, 4]` of the grid cell whose centre is nearest `(x, y)`, out of one level's `[H_l W_l A, 4]`."""
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2  # [H_l W_l A, 2]
    distance = (centres - torch.tensor([x, y], dtype=centres.dtype, device=centres.device)).abs().sum(dim=1)
    return anchors[distance <= distance.min() + 1e-3]  # the A anchors of the nearest cell share its centre


def anchors_figure(inspection: Inspection, location: tuple[float, float] | None = None) -> Figure:
    """The A anchors of every level at the grid cell nearest `location` `(x, y)` (the image centre by default)."""
    figure, (panel,) = _panels(1, size=5)
    _image(panel, inspection, "anchors at one location, by level")
    height, width = inspection.padded_image.shape[1:]
    x, y = location if location is not None else (width / 2, height / 2)
    for name, anchors in inspection.anchors.items():
        draw_boxes(panel, anchors_at(anchors, x, y), LEVEL_COLOURS[int(name[1:])], 1.2)
        panel.plot([], [], color=LEVEL_COLOURS[int(name[1:])], label=f"{name}: {len(anchors)} anchors")
    panel.set_xlim(-0.5, width - 0.5)
    panel.set_ylim(height - 0.5, -0.5)
    panel.legend(fontsize=7, loc="lower right")
    return figure


def rpn_targets_figure(inspection: Inspection, max_negatives: int = 60) -> Figure:
    """The RPN's labels for the ground truth: positive (IoU >= 0.7, or the best anchor of an object),
    negative (< 0.3; a random few drawn) and neutral anchors, which the loss ignores."""
    if inspection.rpn_labels is None:
        raise ValueError("the inspection has no ground truth: pass target= to inspect_image")
    anchors = torch.cat(list(inspection.anchors.values()))  # [T, 4]
    labels = inspection.rpn_labels
    figure, (panel,) = _panels(1, size=5)
    counts = {name: int((labels == value).sum()) for name, value in (("positive", 1), ("negative", 0), ("neutral", -1))}
    _image(panel, inspection, ", ".join(f"{n} {c}" for n, c in counts.items()))
    negatives = anchors[labels == 0]
    draw_boxes(panel, negatives[torch.randperm(len(negatives), generator=torch.Generator().manual_seed(0))[:max_negatives]],
               "tab:red", 0.5, alpha=0.4)  # fmt: skip
    draw_boxes(panel, anchors[labels == -1], "gold", 0.6, alpha=0.6)
    draw_boxes(panel, anchors[labels == 1], "lime", 1.2)
    draw_boxes(panel, inspection.resized_target["boxes"], "white", 2.0)
    return figure


def objectness_figure(inspection: Inspection) -> Figure:
    """Per level, the objectness probability of the best of the A anchors at each position."""
    figure, axes = _panels(len(inspection.objectness), size=2.4)
    for panel, (name, logits) in zip(axes, inspection.objectness.items()):
        image = panel.imshow(logits.sigmoid().amax(dim=0).cpu().numpy(), cmap="viridis", vmin=0, vmax=1)  # [H_l, W_l]
        panel.set_title(f"{name}: max over A", fontsize=8)
        panel.set_axis_off()
    figure.colorbar(image, ax=axes, shrink=0.8, label="objectness")
    return figure


def proposals_figure(inspection: Inspection, top: int = 30) -> Figure:
    """The RPN's `top` best candidates before NMS (IoU 0.7 within each level), and after it."""
    figure, (before, after) = _panels(2, size=4)
    best = inspection.proposal_scores_before_nms.argsort(descending=True)[:top]
    _image(before, inspection, f"before NMS: {len(inspection.proposals_before_nms)} candidates, best {len(best)}")
    draw_boxes(before, inspection.proposals_before_nms[best], "cyan", 0.8)
    _image(after, inspection, f"after NMS: {len(inspection.proposals)} proposals, best {min(top, len(inspection.proposals))}")
    draw_boxes(after, inspection.proposals[:top], "cyan", 0.8)
    return figure


def roi_levels_figure(inspection: Inspection, top: int = 40) -> Figure:
    """The FPN level each proposal is pooled from (FPN eq. 1: larger RoIs, coarser levels)."""
    figure, (panel, bars) = _panels(2, size=4)
    levels = inspection.roi_levels.cpu()
    _image(panel, inspection, f"the {min(top, len(levels))} best proposals, coloured by level")
    draw_boxes(panel, inspection.proposals[:top], [LEVEL_COLOURS[int(k)] for k in levels[:top]], 1.0)
    names = sorted(LEVEL_COLOURS)[:4]
    bars.bar([f"P{k}" for k in names], [int((levels == k).sum()) for k in names], color=[LEVEL_COLOURS[k] for k in names])
    bars.set_title("proposals per level", fontsize=9)
    return figure


def sampling_figure(inspection: Inspection) -> Figure:
    """RoIAlign on one proposal: its level's feature map, the RoI, its P x P bins and the bilinear samples."""
    sampling = inspection.sampling
    feature = inspection.fpn_features[f"P{sampling.level}"].float().norm(dim=0).cpu()  # [H_l, W_l]
    box = roi_in_feature_map(sampling)
    figure, (panel,) = _panels(1, size=5)
    panel.imshow(feature.numpy(), cmap="gray")  # pixel (i, j) centred on (j, i): where bilinear reads F[i, j]
    draw_bins(panel, box, len(sampling.y))
    draw_sampling_points(panel, sampling)
    panel.set_title(f"proposal {inspection.roi_index} on P{sampling.level}: {len(sampling.y)}x{len(sampling.y)} bins, "
                    f"{sampling.y.shape[1]}x{sampling.x.shape[1]} samples each", fontsize=9)  # fmt: skip
    x1, y1, x2, y2 = box
    pad = 2  # feature pixels around the RoI
    panel.set_xlim(max(x1 - pad, -0.5), min(x2 + pad, feature.shape[1] - 0.5))
    panel.set_ylim(min(y2 + pad, feature.shape[0] - 0.5), max(y1 - pad, -0.5))
    return figure


def roi_in_feature_map(sampling: SamplingPoints) -> tuple[float, float, float, float]:
    """The RoI `(x1, y1, x2, y2)` in the pixels of its level's map, as imshow places them (pixel centres on integers)."""
    offset = 0.5 if sampling.aligned else 0.0  # the half-pixel shift of RoIAlign
    x1, y1, x2, y2 = (sampling.box.cpu() * sampling.spatial_scale - offset).tolist()
    return x1, y1, x2, y2


def draw_bins(panel, box: tuple[float, float, float, float], bins: int, colour: str = "tab:orange") -> None:
    """The `bins x bins` equal bins of `box`: `bins + 1` lines each way."""
    x1, y1, x2, y2 = box
    for p in range(bins + 1):
        panel.plot([x1, x2], [y1 + p * (y2 - y1) / bins] * 2, color=colour, linewidth=0.6)
        panel.plot([x1 + p * (x2 - x1) / bins] * 2, [y1, y2], color=colour, linewidth=0.6)


def draw_sampling_points(panel, sampling: SamplingPoints, colour: str = "cyan") -> None:
    """Every bilinear sample of the RoI: each row `y` of a bin row with each column `x` of a bin column."""
    y, x = torch.meshgrid(sampling.y.flatten().cpu(), sampling.x.flatten().cpu(), indexing="ij")
    panel.scatter(x.flatten(), y.flatten(), s=6, color=colour)


def source_proposal(inspection: Inspection, box: torch.Tensor, label: int) -> int:
    """The index of the proposal a detection came from: the one whose refinement for the class `label` is `box`."""
    return int((inspection.refined_boxes[:, label] - box).abs().sum(dim=1).argmin())


def draw_refinement(panel, proposal: list[float], box: list[float], colour) -> None:
    """A proposal dashed, and an arrow from its centre to the centre of the `box` it is refined to."""
    panel.add_patch(Rectangle(proposal[:2], proposal[2] - proposal[0], proposal[3] - proposal[1], fill=False,
                              edgecolor=colour, linestyle="--", linewidth=0.8))  # fmt: skip
    start = ((proposal[0] + proposal[2]) / 2, (proposal[1] + proposal[3]) / 2)
    end = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    panel.add_patch(FancyArrowPatch(start, end, arrowstyle="->", color=colour, mutation_scale=8))


def box_refinement_figure(inspection: Inspection, count: int = 8, class_names=None) -> Figure:
    """For the `count` best detections: the proposal (dashed) and the box its class's deltas refine it to."""
    figure, (panel,) = _panels(1, size=5)
    _image(panel, inspection, "proposal (dashed) -> refined box of the detected class")
    boxes, labels = inspection.detections_resized["boxes"][:count], inspection.detections_resized["labels"][:count]
    colours = [INSTANCE_COLOURS[i % len(INSTANCE_COLOURS)] for i in range(len(boxes))]
    for box, label, colour in zip(boxes, labels, colours):
        proposal = inspection.proposals[source_proposal(inspection, box, int(label))]
        draw_refinement(panel, proposal.tolist(), box.tolist(), colour)
    draw_boxes(panel, boxes, colours, 1.4, labels=[_class_name(class_names, int(k)) for k in labels])
    return figure


def detection_nms_figure(inspection: Inspection, score_threshold: float = 0.3) -> Figure:
    """Per-class NMS (IoU 0.5): the (RoI, class) candidates scoring above `score_threshold`, before and after."""
    figure, axes = _panels(2, size=4)
    for panel, (name, found) in zip(axes, (("before", inspection.detections_before_nms), ("after", inspection.detections_resized))):
        keep = found["scores"] >= score_threshold
        labels = found["labels"][keep].tolist()
        _image(panel, inspection, f"{name} per-class NMS: {int(keep.sum())} with score >= {score_threshold}")
        draw_boxes(panel, found["boxes"][keep], [INSTANCE_COLOURS[k % len(INSTANCE_COLOURS)] for k in labels], 0.9)
    return figure


def mask_targets_figure(inspection: Inspection, count: int = 8, class_names=None) -> Figure:
    """The M x M targets of the positive training RoIs: each object's mask, cropped by the RoI and resampled."""
    if inspection.mask_targets is None:
        raise ValueError("the inspection has no mask targets: pass target= to inspect_image, with a mask branch")
    shown = min(count, len(inspection.mask_targets))
    figure, axes = _panels(max(shown, 1), size=1.8)
    for panel, target, label in zip(axes, inspection.mask_targets, inspection.mask_target_labels):
        panel.imshow(target.cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        panel.set_title(_class_name(class_names, int(label)), fontsize=8)
        panel.set_axis_off()
    return figure


def mask_logits_figure(inspection: Inspection, detection: int = 0, class_names=None) -> Figure:
    """One detection's K mask logits (one M x M map per class; only its own class is used) and its probability."""
    logits = inspection.mask_logits[detection]  # [K, M, M]
    label = int(inspection.detections_resized["labels"][detection])
    figure, axes = _panels(len(logits) + 1, size=1.8)
    bound = float(logits.abs().max())
    for k, (panel, logit) in enumerate(zip(axes, logits)):
        panel.imshow(logit.cpu().numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound)
        panel.set_title(("* " if k == label else "") + _class_name(class_names, k), fontsize=8)
        panel.set_axis_off()
    axes[-1].imshow(inspection.mask_probabilities[detection, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
    axes[-1].set_title("sigmoid of *", fontsize=8)
    axes[-1].set_axis_off()
    return figure


def pasted_masks_figure(inspection: Inspection, class_names, score_threshold: float = 0.5) -> Figure:
    """The result: each detection's mask pasted into the original image (binarized at 0.5), with its box."""
    figure, (panel,) = _panels(1, size=5)
    shown = draw_detections(panel, inspection.image, inspection.detections, class_names, score_threshold)
    panel.set_title(f"{shown} detections with score >= {score_threshold}", fontsize=9)
    return figure


def _histograms(named: dict[str, torch.Tensor], title: str) -> Figure:
    figure, axes = _panels(len(named), size=2.4, rows=max(1, -(-len(named) // 5)))
    for panel, (name, values) in zip(axes, named.items()):
        values = values.detach().float().flatten().cpu().numpy()
        panel.hist(values, bins=60, color="tab:blue", log=True)
        panel.set_title(f"{name}\nmean {values.mean():.2g}, std {values.std():.2g}", fontsize=7)
        panel.tick_params(labelsize=6)
    figure.suptitle(title, fontsize=10)
    return figure


def weight_histograms_figure(model: nn.Module) -> Figure:
    """The weights of each part of the model (convolutions and linear layers; biases and norms left out)."""
    parts: dict[str, list[torch.Tensor]] = {}
    for name, parameter in model.named_parameters():
        if parameter.dim() > 1:
            parts.setdefault(name.split(".")[0] + ("." + name.split(".")[1] if name.startswith("backbone") else ""), []).append(parameter)
    return _histograms({name: torch.cat([p.detach().flatten() for p in ps]) for name, ps in parts.items()}, "weights")


def activation_histograms_figure(inspection: Inspection) -> Figure:
    """The values each stage produced for this image: feature maps, RoI features, head outputs, mask logits."""
    named = {**inspection.backbone_features, **inspection.fpn_features, "box RoI features": inspection.box_roi_features,
             "box head": inspection.box_head_features, "class logits": inspection.class_logits}  # fmt: skip
    if inspection.mask_logits is not None:
        named.update({"mask RoI features": inspection.mask_roi_features, "mask logits": inspection.mask_logits})
    return _histograms(named, "activations")
