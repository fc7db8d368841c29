r"""Look inside every stage of a model for one image: each intermediate, by name.

`inspect_image(model, image, target)` runs the model's own `forward` once, in evaluation mode,
with forward hooks on its modules (`record_forward`), and keeps what each module received and
returned: the resized and padded image, the backbone's C2..C5, the FPN's P2..P6, the RPN head's
objectness and deltas, the proposals, the RoI features, the box branch's logits and deltas, the
detections, the mask logits, and the final pasted masks. Nothing is recomputed by a copy of the
model's code. What happens *inside* a module (the proposals before NMS, the per-class boxes
before per-class NMS, the FPN level of each RoI, where RoIAlign samples) is computed by that
module's own public methods, on the inputs it recorded:

    stage                       the model's code that computes it
    ------------------------    ----------------------------------------------------------------
    anchors, objectness         RegionProposalNetwork.predict (the first half of its forward)
    RPN candidates before NMS   RegionProposalNetwork.proposals_before_nms (called by select_proposals)
    RPN targets (given a truth) RegionProposalNetwork.assign_targets (Matcher 0.7 / 0.3)
    FPN level of each RoI       mrcnn.poolers.fpn_level (FPN eq. 1, as MultiLevelRoIAlign)
    RoIAlign sampling points    mrcnn.roi_align.sampling_grid (as every RoIAlign implementation)
    box refinement, candidates  mrcnn.box_head.refine_boxes, detection_candidates (postprocess_detections)
    mask targets (given truth)  select_training_rois, MaskBranch.positive_rois, MaskBranch.mask_targets
    mask probabilities          MaskBranch.predict

`inspect_image` reads the recording in one named step per stage, each returning its fields of
the `Inspection`: `inspect_input` (the transform), `inspect_features` (backbone and FPN),
`inspect_rpn`, `inspect_box_branch` and `inspect_mask_branch`.

tests/test_inspection.py checks that each intermediate is what the model used: the recorded
detections equal a plain `model([image])` bit for bit, NMS of the candidates gives the
recorded proposals and detections, RoIAlign at the sampling points gives the recorded RoI
features. Figures of every stage are in `mrcnn.inspection_figures`.

Shapes (the book's legend): C channels, H x W, A anchors per location, T anchors of the image,
R proposals, K classes, P pooled size, M mask size, G objects, D detections.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn

from mrcnn.box_head import detection_candidates, refine_boxes, select_training_rois
from mrcnn.roi_align import sampling_grid
from mrcnn.poolers import MultiLevelRoIAlign, fpn_level


@dataclass
class SamplingPoints:
    """Where RoIAlign samples one RoI: `P x P` bins, `g_h x g_w` bilinear samples in each (section 3)."""

    box: Tensor  # [4] (x1, y1, x2, y2), image pixels
    level: int  # FPN level k of the RoI (2 = P2)
    spatial_scale: float  # 1 / stride of that level
    y: Tensor  # [P, g_h] row of each sample of each bin row, in pixels of the level's feature map
    x: Tensor  # [P, g_w] column of each sample of each bin column, likewise
    aligned: bool  # the half-pixel offset of section 3's RoIAlign


@dataclass
class Inspection:
    """Every intermediate of one image's pass through the model (module docstring), one name each.

    Tensors are detached, for the one image (no batch dimension). Fields that need a ground
    truth (`rpn_labels`, `rpn_matched_boxes`, `mask_target_*`) are None without one; the mask
    fields are None for a model without a mask branch.
    """

    # the input and the transform
    image: Tensor  # [3, H, W] the original image in [0, 1]
    normalized_image: Tensor  # [3, H_pad, W_pad] normalized, resized and zero-padded: what the backbone sees
    padded_image: Tensor  # [3, H_pad, W_pad] the same in [0, 1] for drawing (the normalization undone)
    image_size: tuple[int, int]  # (h, w) after resizing, before padding
    resized_target: dict[str, Tensor] | None  # the ground truth in resized coordinates
    # backbone and FPN: "C2".."C5" and "P2".."P6", each [C, H_l, W_l]
    backbone_features: dict[str, Tensor]
    fpn_features: dict[str, Tensor]
    # anchors and RPN, per level "P2".."P6"
    anchors: dict[str, Tensor]  # [H_l W_l A, 4], image pixels
    objectness: dict[str, Tensor]  # [A, H_l, W_l] logits
    rpn_box_deltas: dict[str, Tensor]  # [4A, H_l, W_l]
    rpn_labels: Tensor | None  # [T] float32: 1 positive, 0 negative, -1 neutral (ignored), all levels
    rpn_matched_boxes: Tensor | None  # [T, 4] the ground truth each anchor regresses to (positives)
    proposals_before_nms: Tensor  # [K, 4] the RPN's candidates (top-k per level, clipped, filtered)
    proposal_scores_before_nms: Tensor  # [K] their objectness probabilities
    proposal_levels_before_nms: Tensor  # [K] int64 FPN level (2 = P2) of their anchors
    proposals: Tensor  # [R, 4] after NMS: the RPN's output, best first
    # box branch
    roi_levels: Tensor  # [R] int64: the FPN level each proposal is pooled from
    box_roi_features: Tensor  # [R, C, P, P] RoIAlign's output for the box head
    box_head_features: Tensor  # [R, F] after fc6 and fc7
    class_logits: Tensor  # [R, K]
    box_deltas: Tensor  # [R, 4K]
    refined_boxes: Tensor  # [R, K, 4] each proposal refined for every class, clipped
    class_scores: Tensor  # [R, K] softmax probabilities
    detections_before_nms: dict[str, Tensor]  # "boxes" [C, 4], "scores" [C], "labels" [C]: per-class NMS's input
    detections_resized: dict[str, Tensor]  # after per-class NMS, in resized coordinates: "boxes", "scores", "labels"
    sampling: SamplingPoints  # RoIAlign's samples for the box head of proposal `roi_index`
    roi_index: int
    # mask branch
    mask_roi_features: Tensor | None  # [D, C, P_m, P_m]
    mask_logits: Tensor | None  # [D, K, M, M] for the detected boxes
    mask_probabilities: Tensor | None  # [D, 1, M, M] sigmoid of each detection's own class
    mask_target_boxes: Tensor | None  # [R+, 4] positive training RoIs sampled from the proposals and ground truth
    mask_target_labels: Tensor | None  # [R+] int64
    mask_targets: Tensor | None  # [R+, M, M] in [0, 1]
    # the result, in the original image: the model's own return value
    detections: dict[str, Tensor] = field(default_factory=dict)  # "boxes", "labels", "scores", "masks" [D, 1, H, W]

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor by a dotted name (`fpn_features.P3`, `detections.masks`, `sampling.y`), in stage order."""
        named = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, SamplingPoints):
                value = {"box": value.box, "y": value.y, "x": value.x}
            if isinstance(value, Tensor):
                named[item.name] = value
            elif isinstance(value, dict):
                named.update({f"{item.name}.{k}": v for k, v in value.items() if isinstance(v, Tensor)})
        return named

    def summary(self) -> str:
        """One line per tensor: name, shape, dtype."""
        return "\n".join(f"{name:<34} {str(list(t.shape)):<22} {str(t.dtype).removeprefix('torch.')}"
                         for name, t in self.tensors().items())  # fmt: skip


def sampling_points(pooler: MultiLevelRoIAlign, box: Tensor) -> SamplingPoints:
    """Where `pooler` samples the RoI `box` `[4]` (image pixels): its FPN level, then `sampling_grid`.

    The samples past the RoI's own grid (adaptive sampling pads every RoI to the largest grid)
    are left out, so `y` is `[P, g_h]` and `x` `[P, g_w]` for this RoI's `g_h x g_w` samples per bin.
    """
    level = int(fpn_level(box[None], pooler.levels[0], pooler.levels[-1])[0])  # as MultiLevelRoIAlign
    scale = 1.0 / pooler.strides[pooler.levels.index(level)]
    roi = torch.cat([box.new_zeros(1), box])[None]  # [1, 5]
    size = (pooler.output_size, pooler.output_size)
    y, x, y_used, x_used, _ = sampling_grid(roi, size, scale, pooler.sampling_ratio, pooler.aligned)
    return SamplingPoints(box, level, scale, y[0][:, y_used[0, 0]], x[0][:, x_used[0, 0]], pooler.aligned)


@contextlib.contextmanager
def recording(modules: dict[str, nn.Module]):
    """Within the block, `seen[name]` holds `(inputs, output)` of each call of `modules[name]` (forward hooks).

    Dicts in an output are copied (shallowly), so that a caller that edits them afterwards, as
    the model does to the boxes of its detections, does not change what was recorded.
    """
    seen: dict[str, list] = {name: [] for name in modules}

    def copy(value):
        if isinstance(value, dict):
            return dict(value)
        if isinstance(value, (list, tuple)):
            return type(value)(copy(v) for v in value)
        return value

    handles = [module.register_forward_hook(lambda _, inputs, output, name=name:
                                            seen[name].append((inputs, copy(output))))
               for name, module in modules.items()]  # fmt: skip
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def check_inspectable(model: nn.Module, image: Tensor) -> None:
    """Raise a `ValueError` unless `model` is an FPN Mask R-CNN (or Faster R-CNN) and `image` one `[3, H, W]` image."""
    if not all(hasattr(model, name) for name in ("transform", "backbone", "rpn", "box_branch")):
        raise ValueError(f"expected a mrcnn.model.MaskRCNN, got {type(model).__name__}")
    if getattr(model, "fpn", None) is None:
        raise ValueError("inspect_image follows the FPN model (P2..P6); this model has no FPN")
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
        raise ValueError(f"image must be one float [3, H, W] tensor in [0, 1], got {tuple(getattr(image, 'shape', ()))}")


@torch.no_grad()
def inspect_image(model: nn.Module, image: Tensor, target: dict[str, Tensor] | None = None, roi_index: int = 0,
                  seed: int = 0) -> Inspection:  # fmt: skip
    """Run `model` (a `MaskRCNN`) on one image `[3, H, W]` and return every intermediate (`Inspection`).

    target: the image's ground truth (the model's input format), for the RPN targets and the
    mask targets; roi_index: the proposal whose RoIAlign sampling points are recorded; seed:
    of the RoI sampler that draws the training RoIs for the mask targets (the caller's random
    state is left as it was). The model runs in evaluation mode and is put back as it was.
    """
    check_inspectable(model, image)
    was_training = model.training
    model.eval()
    try:
        detections, seen = record_forward(model, image, target)
        return Inspection(image=image.detach(), **inspect_input(model, seen), **inspect_features(model, seen),
                          **inspect_rpn(model, seen), **inspect_box_branch(model, seen, roi_index),
                          **inspect_mask_branch(model, seen, seed), detections=detections)  # fmt: skip
    finally:
        model.train(was_training)


def record_forward(model: nn.Module, image: Tensor, target: dict[str, Tensor] | None) -> tuple[dict, dict[str, list]]:
    """The model's own forward on `[image]`, recorded: its detections for the image, and `seen` (`recording`).

    Recorded modules: the transform, backbone, FPN, the RPN and its head, the box branch with its
    pooler, head and predictor, and the mask branch's pooler and predictor.
    """
    box_branch, mask_branch = model.box_branch, model.mask_branch
    modules = {"transform": model.transform, "backbone": model.backbone, "fpn": model.fpn, "rpn_head": model.rpn.head,
               "rpn": model.rpn, "box_pooler": box_branch.pooler, "box_head": box_branch.head,
               "box_predictor": box_branch.predictor, "box_branch": box_branch}  # fmt: skip
    if mask_branch is not None:
        modules.update(mask_pooler=mask_branch.pooler, mask_predictor=mask_branch.predictor)
    with recording(modules) as seen:
        detections = model([image], None if target is None else [target])[0]
    return detections, seen


# What the recorded modules returned (one call each): the transform's batch, the FPN's levels, the RPN's proposals.


def _transformed(seen: dict) -> tuple[Tensor, list[tuple[int, int]], list[dict] | None]:
    batch, image_sizes, resized_targets = seen["transform"][0][1]  # [1, 3, H_pad, W_pad], [(h, w)], targets
    return batch, image_sizes, resized_targets


def _fpn_levels(model: nn.Module, seen: dict) -> tuple[list[Tensor], list[str]]:
    features = seen["fpn"][0][1]  # [P2, ..., P6], each [1, C, H_l, W_l]
    first_level = round(math.log2(model.fpn.strides[0]))  # 2: P2 has stride 4
    return features, [f"P{k}" for k in range(first_level, first_level + len(features))]


def _proposals(seen: dict) -> Tensor:
    return seen["rpn"][0][1][0][0]  # [R, 4], the RPN's output for the image


def inspect_input(model: nn.Module, seen: dict) -> dict:
    """The transform's output: the normalized, resized, padded image, its size, the resized ground truth."""
    batch, image_sizes, resized_targets = _transformed(seen)
    mean, std = (torch.as_tensor(v, dtype=batch.dtype, device=batch.device)
                 for v in (model.transform.image_mean, model.transform.image_std))  # fmt: skip
    padded_image = (batch[0] * std[:, None, None] + mean[:, None, None]).clamp(0, 1)  # [3, H_pad, W_pad]
    padded_image[:, image_sizes[0][0]:] = 0  # the padding, black
    padded_image[:, :, image_sizes[0][1]:] = 0
    return dict(
        normalized_image=seen["backbone"][0][0][0][0],  # the backbone's input (the model may change its layout)
        padded_image=padded_image,
        image_size=image_sizes[0],
        resized_target=None if resized_targets is None else resized_targets[0],
    )


def inspect_features(model: nn.Module, seen: dict) -> dict:
    """The backbone's C2..C5 and the FPN's P2..P6 for the image, by name, each `[C, H_l, W_l]`."""
    features, levels = _fpn_levels(model, seen)
    first_level = int(levels[0][1:])
    return dict(
        backbone_features={f"C{k}": c[0] for k, c in enumerate(seen["backbone"][0][1], start=first_level)},
        fpn_features={name: p[0] for name, p in zip(levels, features)},
    )


def inspect_rpn(model: nn.Module, seen: dict) -> dict:
    """Inside the RPN: its anchors, objectness and deltas per level, its candidates before NMS and its
    proposals after, computed by its own methods on the features it received; with a ground truth,
    the label and matched box of every anchor."""
    batch, image_sizes, resized_targets = _transformed(seen)
    features, levels = _fpn_levels(model, seen)
    objectness_maps, delta_maps = seen["rpn_head"][0][1]
    anchors_per_level, objectness, _, decoded = model.rpn.predict(features, tuple(batch.shape[-2:]))
    num_anchors = [a.shape[0] for a in anchors_per_level]
    candidates, scores, candidate_levels = model.rpn.proposals_before_nms(
        decoded, objectness, image_sizes, num_anchors
    )[0]
    rpn_labels = rpn_matched = None
    if resized_targets is not None:
        labels, matched = model.rpn.assign_targets(torch.cat(anchors_per_level), resized_targets)
        rpn_labels, rpn_matched = labels[0], matched[0]
    return dict(
        anchors=dict(zip(levels, anchors_per_level)),
        objectness={name: o[0] for name, o in zip(levels, objectness_maps)},
        rpn_box_deltas={name: d[0] for name, d in zip(levels, delta_maps)},
        rpn_labels=rpn_labels,
        rpn_matched_boxes=rpn_matched,
        proposals_before_nms=candidates,
        proposal_scores_before_nms=scores,
        proposal_levels_before_nms=candidate_levels + int(levels[0][1:]),
        proposals=_proposals(seen),
    )


def inspect_box_branch(model: nn.Module, seen: dict, roi_index: int) -> dict:
    """Inside the box branch: each proposal's FPN level and RoI features, the head's outputs, every
    proposal refined for every class, the candidates of per-class NMS and the detections after it,
    and where RoIAlign samples proposal `roi_index`."""
    box_branch, proposals = model.box_branch, _proposals(seen)
    if not 0 <= roi_index < max(len(proposals), 1):
        raise ValueError(f"roi_index {roi_index} is outside the {len(proposals)} proposals")
    _, image_sizes, _ = _transformed(seen)
    rois = seen["box_pooler"][0][0][1]  # [R, 5], what the pooler received
    pooler = box_branch.pooler
    class_logits, box_deltas = seen["box_predictor"][0][1]
    refined, class_scores = refine_boxes(class_logits, box_deltas, [proposals], image_sizes, box_branch.box_coder)
    before_nms = detection_candidates(refined[0], class_scores[0], box_branch.score_thresh)
    return dict(
        roi_levels=fpn_level(rois[:, 1:], pooler.levels[0], pooler.levels[-1]),
        box_roi_features=seen["box_pooler"][0][1],
        box_head_features=seen["box_head"][0][1],
        class_logits=class_logits,
        box_deltas=box_deltas,
        refined_boxes=refined[0],
        class_scores=class_scores[0],
        detections_before_nms=dict(zip(("boxes", "scores", "labels"), before_nms)),
        detections_resized=seen["box_branch"][0][1][0][0],
        sampling=sampling_points(pooler, proposals[roi_index] if len(proposals) else proposals.new_zeros(4)),
        roi_index=roi_index,
    )


def inspect_mask_branch(model: nn.Module, seen: dict, seed: int) -> dict:
    """Inside the mask branch: the detections' RoI features, K mask logits and own-class probabilities;
    with a ground truth, the positive RoIs a training step would sample (seed `seed`) and their targets.
    All None without a mask branch."""
    mask_branch = model.mask_branch
    mask = dict(mask_roi_features=None, mask_logits=None, mask_probabilities=None, mask_target_boxes=None,
                mask_target_labels=None, mask_targets=None)  # fmt: skip
    if mask_branch is None:
        return mask
    batch, _, resized_targets = _transformed(seen)
    features, _ = _fpn_levels(model, seen)
    detections_resized = seen["box_branch"][0][1][0][0]
    mask_logits = seen["mask_predictor"][0][1]  # [D, K, M, M]
    mask.update(mask_roi_features=seen["mask_pooler"][0][1], mask_logits=mask_logits,
                mask_probabilities=mask_branch.predict(features[:4], [detections_resized])[0]["masks"])  # fmt: skip
    if resized_targets is not None:  # the RoIs a training step would sample from these proposals
        box_branch = model.box_branch
        with torch.random.fork_rng(devices=[batch.device] if batch.is_cuda else []):
            torch.manual_seed(seed)
            training_rois = select_training_rois([_proposals(seen)], resized_targets, box_branch.matcher,
                                                 box_branch.sampler, box_branch.box_coder)  # fmt: skip
        boxes, matched_gt_index = mask_branch.positive_rois(training_rois)
        labels = mask_branch.matched(resized_targets, "labels", matched_gt_index)
        targets = mask_branch.mask_targets(resized_targets, boxes, matched_gt_index, mask_logits.shape[-1])
        mask.update(mask_target_boxes=boxes[0], mask_target_labels=labels, mask_targets=targets)
    return mask
