"""mrcnn/inspection.py: every intermediate has its shape and the values the model itself used.

A small untrained model on one 64 x 64 shapes image: its random weights already give
proposals, detections and masks, which is all these checks need. Each stage is compared with
what the model computes on its own (a plain forward, the RPN's forward, NMS of the recorded
candidates), or with the definition (FPN eq. 1 in float64, bilinear sampling at the recorded
points, the IoU rules of the RPN's labels).
"""

import math
from dataclasses import fields

import matplotlib
import pytest
import torch
import torch.nn.functional as F

from mrcnn.boxes import batched_nms, box_iou
from mrcnn.box_head import select_training_rois
from mrcnn.config import shapes_small
from mrcnn.data.shapes import ShapesDataset
from mrcnn.inference import paste_detection_masks
import mrcnn.inspection_figures as figures
from mrcnn.inspection import (
    Inspection,
    inspect_box_branch,
    inspect_features,
    inspect_image,
    inspect_input,
    inspect_mask_branch,
    inspect_rpn,
    record_forward,
)
from mrcnn.mask_loss import mask_loss
from mrcnn.model import MaskRCNN
from mrcnn.transform import resize_boxes

matplotlib.use("Agg")


def small_model(mask: bool = True) -> MaskRCNN:
    torch.manual_seed(0)
    config = shapes_small().replace(min_size=64, max_size=64, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=60,
                                    detections_per_image=20, mask=mask)  # fmt: skip
    return MaskRCNN(config).eval()


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def sample():
    return ShapesDataset(2, seed=3, image_size=64, object_size=(16, 40), max_objects=3)[1]


@pytest.fixture(scope="module")
def inspection(model, sample):
    image, target = sample
    return inspect_image(model, image, target, roi_index=3)


def test_final_detections_are_the_models_own_bit_for_bit(model, sample, inspection):
    image, _ = sample
    with torch.no_grad():
        expected = model([image])[0]
    assert set(inspection.detections) == set(expected) == {"boxes", "labels", "scores", "masks"}
    for key, value in expected.items():
        assert torch.equal(inspection.detections[key], value), key
    assert len(expected["boxes"]) > 0  # the checks below look at real detections


def test_the_named_steps_fill_every_field_once(model, sample, inspection):
    image, target = sample
    with torch.no_grad():
        detections, seen = record_forward(model, image, target)
        steps = [inspect_input(model, seen), inspect_features(model, seen), inspect_rpn(model, seen),
                 inspect_box_branch(model, seen, 3), inspect_mask_branch(model, seen, 0)]  # fmt: skip
    names = [name for step in steps for name in step]
    assert len(names) == len(set(names))  # no field from two steps
    assert set(names) | {"image", "detections"} == {item.name for item in fields(Inspection)}
    for name in ("proposals", "class_logits", "mask_targets"):  # the same as inspect_image's, step by step
        step = next(step for step in steps if name in step)
        assert torch.equal(step[name], getattr(inspection, name)), name
    assert torch.equal(detections["boxes"], inspection.detections["boxes"])


def test_transform_backbone_and_fpn(model, sample, inspection):
    image, target = sample
    assert inspection.image_size == (64, 64) and inspection.normalized_image.shape == (3, 64, 64)
    mean = torch.tensor(model.config.image_mean)[:, None, None]
    std = torch.tensor(model.config.image_std)[:, None, None]
    torch.testing.assert_close(inspection.normalized_image, (image - mean) / std)  # 64 px: no resizing, no padding
    assert list(inspection.backbone_features) == ["C2", "C3", "C4", "C5"]
    assert list(inspection.fpn_features) == ["P2", "P3", "P4", "P5", "P6"]
    # Run again, the backbone and FPN give the recorded maps to float rounding: not always to the
    # bit, since CPU convolutions may sum in another order for another memory layout or address.
    # That is why the inspection records what the model computed instead of computing it again.
    with torch.no_grad():
        features = model.fpn(model.backbone(inspection.normalized_image[None]))
    for (name, recorded), (stride, expected) in zip(inspection.fpn_features.items(), zip(model.fpn.strides, features)):
        assert recorded.shape == (64, 64 // stride, 64 // stride) or name == "P6"
        torch.testing.assert_close(recorded, expected[0], atol=1e-5, rtol=1e-5, msg=name)
    assert torch.equal(inspection.resized_target["boxes"], target["boxes"])


def test_anchors_objectness_and_proposals_are_the_rpns(model, inspection):
    num_anchors = len(model.config.aspect_ratios)
    for name, anchors in inspection.anchors.items():
        height, width = inspection.fpn_features[name].shape[1:]
        assert anchors.shape == (height * width * num_anchors, 4)
        assert inspection.objectness[name].shape == (num_anchors, height, width)
        assert inspection.rpn_box_deltas[name].shape == (4 * num_anchors, height, width)
    # NMS within each level of the recorded candidates gives the recorded proposals, bit for bit
    keep = batched_nms(inspection.proposals_before_nms, inspection.proposal_scores_before_nms,
                       inspection.proposal_levels_before_nms, model.config.rpn_nms_thresh)  # fmt: skip
    assert torch.equal(inspection.proposals_before_nms[keep[: model.config.rpn_post_nms_top_n_test]], inspection.proposals)
    # and those are what the RPN returns in a plain forward of the model
    returned = []
    handle = model.rpn.register_forward_hook(lambda module, inputs, output: returned.append(output[0][0]))
    with torch.no_grad():
        model([inspection.image])
    handle.remove()
    assert torch.equal(returned[0], inspection.proposals)
    # each candidate's score is the sigmoid of an objectness logit of its level (to the last bit or
    # so: a sigmoid over a tensor of another shape may round differently)
    for level in inspection.proposal_levels_before_nms.unique().tolist():
        scores = inspection.proposal_scores_before_nms[inspection.proposal_levels_before_nms == level]
        probabilities = inspection.objectness[f"P{level}"].flatten().sigmoid()
        assert float((scores[:, None] - probabilities[None]).abs().min(dim=1).values.max()) < 1e-6


def test_rpn_targets_follow_the_matcher_thresholds(inspection):
    anchors = torch.cat(list(inspection.anchors.values()))  # [T, 4]
    gt_boxes = inspection.resized_target["boxes"]
    iou = box_iou(gt_boxes, anchors)  # [G, T]
    best = iou.max(dim=0).values  # [T]
    labels = inspection.rpn_labels
    assert labels.shape == (len(anchors),) and set(labels.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert bool((best[labels == 0] < 0.3).all())
    assert bool(((best[labels == -1] >= 0.3) & (best[labels == -1] < 0.7)).all())
    best_for_each_object = iou == iou.max(dim=1, keepdim=True).values  # [G, T]: the low-quality matches
    assert bool(((best[labels == 1] >= 0.7) | best_for_each_object[:, labels == 1].any(dim=0)).all())
    assert bool((labels[best_for_each_object.any(dim=0)] == 1).all())  # every object has a positive anchor
    positive = labels == 1
    assert bool((box_iou(inspection.rpn_matched_boxes[positive], anchors[positive]).diagonal() == best[positive]).all())


def test_roi_levels_are_fpn_equation_1(inspection):
    expected = []
    for x1, y1, x2, y2 in inspection.proposals.double().tolist():
        size = math.sqrt(max((x2 - x1) * (y2 - y1), 0.0))
        level = math.floor(4 + math.log2(size / 224) + 1e-6) if size > 0 else 2
        expected.append(min(max(level, 2), 5))
    assert inspection.roi_levels.tolist() == expected


def test_sampling_points_give_the_recorded_roi_features(model, inspection):
    """Bilinear interpolation of the RoI's level at the recorded points, averaged per bin, is RoIAlign's output."""
    sampling = inspection.sampling
    assert torch.equal(sampling.box, inspection.proposals[3]) and sampling.level == int(inspection.roi_levels[3])
    pooled = model.config.box_pool_size
    assert sampling.y.shape == sampling.x.shape == (pooled, model.config.roi_sampling_ratio)
    feature = inspection.fpn_features[f"P{sampling.level}"][None]  # [1, C, H_l, W_l]
    height, width = feature.shape[-2:]
    y = sampling.y.clamp(0, height - 1)[:, :, None, None].expand(-1, -1, pooled, sampling.x.shape[1])  # inside samples,
    x = sampling.x.clamp(0, width - 1)[None, None].expand(pooled, sampling.y.shape[1], -1, -1)  # clamped onto the border
    grid = torch.stack([x / (width - 1) * 2 - 1, y / (height - 1) * 2 - 1], dim=-1).reshape(1, -1, 1, 2)
    values = F.grid_sample(feature, grid, mode="bilinear", align_corners=True)  # [1, C, P g P g, 1]
    values = values.reshape(feature.shape[1], pooled, sampling.y.shape[1], pooled, sampling.x.shape[1])
    inside = (sampling.y >= -1).all() & (sampling.y <= height).all() & (sampling.x >= -1).all() & (sampling.x <= width).all()
    assert bool(inside)  # a proposal lies in the image, so every sample counts
    torch.testing.assert_close(values.mean(dim=(2, 4)), inspection.box_roi_features[3], atol=1e-5, rtol=1e-5)


def test_box_refinement_and_per_class_nms(model, inspection):
    num_proposals, num_classes = len(inspection.proposals), model.config.num_classes
    assert inspection.refined_boxes.shape == (num_proposals, num_classes, 4)
    torch.testing.assert_close(inspection.class_scores, inspection.class_logits.softmax(dim=-1))
    before, after = inspection.detections_before_nms, inspection.detections_resized
    keep = batched_nms(before["boxes"], before["scores"], before["labels"], model.config.box_nms_thresh)
    keep = keep[: model.config.detections_per_image]
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(before[key][keep], after[key]), key
    for box, score, label in zip(after["boxes"], after["scores"], after["labels"]):
        match = (inspection.refined_boxes[:, label] == box).all(dim=1)  # the box is one proposal's refinement
        assert bool(match.any()) and bool((inspection.class_scores[match, label] == score).any())
    # mapped back to the original image, they are the final detections
    assert torch.equal(resize_boxes(after["boxes"], inspection.image_size, tuple(inspection.image.shape[1:])),
                       inspection.detections["boxes"])  # fmt: skip


def test_mask_logits_probabilities_and_pasting(model, inspection):
    detections = len(inspection.detections_resized["boxes"])
    assert inspection.mask_logits.shape == (detections, model.config.num_classes, 28, 28)
    labels = inspection.detections_resized["labels"]
    assert torch.equal(inspection.mask_probabilities[:, 0], inspection.mask_logits[torch.arange(detections), labels].sigmoid())
    pasted = paste_detection_masks([{"boxes": inspection.detections["boxes"], "masks": inspection.mask_probabilities}],
                                   [tuple(inspection.image.shape[1:])])[0]["masks"]  # fmt: skip
    assert torch.equal(pasted, inspection.detections["masks"])


def test_mask_targets_are_what_the_mask_loss_uses(model, inspection):
    targets, labels, boxes = inspection.mask_targets, inspection.mask_target_labels, inspection.mask_target_boxes
    assert targets.shape == (len(boxes), 28, 28) and labels.shape == (len(boxes),) and len(boxes) > 0
    assert bool(((targets >= 0) & (targets <= 1)).all())
    gt = inspection.resized_target
    assert bool((box_iou(boxes, gt["boxes"]).max(dim=1).values >= 0.5).all())  # positives: IoU >= 0.5
    # the same sampled RoIs through MaskBranch.loss give the loss of these targets
    features = [f[None] for f in list(inspection.fpn_features.values())[:4]]
    with torch.random.fork_rng():
        torch.manual_seed(0)  # inspect_image's default seed
        rois = select_training_rois([inspection.proposals], [gt], model.box_branch.matcher, model.box_branch.sampler,
                                    model.box_branch.box_coder)  # fmt: skip
    with torch.no_grad():
        expected = model.mask_branch.loss(features, rois, [gt])["loss_mask"]
        logits = model.mask_branch.mask_logits(features, [boxes])
    assert torch.equal(mask_loss(logits, labels, targets), expected)


def test_leaves_the_model_and_random_state_as_they_were(sample):
    model = small_model().train()
    image, target = sample
    state = torch.random.get_rng_state()
    inspection = inspect_image(model, image, target)
    assert model.training and torch.equal(torch.random.get_rng_state(), state)
    assert inspection.tensors()["fpn_features.P2"] is inspection.fpn_features["P2"]
    assert "mask_targets" in inspection.summary() and "sampling.y" in inspection.summary()


def test_without_ground_truth_or_mask_branch(sample):
    image, _ = sample
    inspection = inspect_image(small_model(mask=False), image)
    assert inspection.rpn_labels is None and inspection.mask_targets is None and inspection.mask_logits is None
    assert "masks" not in inspection.detections and len(inspection.proposals) > 0


def test_bad_input_raises_before_any_work(model, sample):
    image, _ = sample
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        inspect_image(model, image[None])
    with pytest.raises(ValueError, match="MaskRCNN"):
        inspect_image(torch.nn.Linear(2, 2), image)
    with pytest.raises(ValueError, match="roi_index"):
        inspect_image(model, image, roi_index=10_000)


def test_the_figures_steps_find_anchors_samples_and_source_proposals(model, inspection):
    for anchors in inspection.anchors.values():  # the A anchors of one cell, nearest the point asked for
        chosen = figures.anchors_at(anchors, 29.3, 21.1)  # not halfway between two cells
        assert len(chosen) == len(model.config.aspect_ratios)
        centres = (chosen[:, :2] + chosen[:, 2:]) / 2
        assert bool((centres == centres[0]).all())
        distances = ((anchors[:, :2] + anchors[:, 2:]) / 2 - torch.tensor([29.3, 21.1])).abs().sum(dim=1)
        assert float((centres[0] - torch.tensor([29.3, 21.1])).abs().sum()) == pytest.approx(float(distances.min()))
    x1, y1, x2, y2 = figures.roi_in_feature_map(inspection.sampling)  # every sample lies inside the RoI
    assert bool(((inspection.sampling.y > y1) & (inspection.sampling.y < y2)).all())
    assert bool(((inspection.sampling.x > x1) & (inspection.sampling.x < x2)).all())
    for box, label in zip(inspection.detections_resized["boxes"], inspection.detections_resized["labels"]):
        source = figures.source_proposal(inspection, box, int(label))
        assert torch.equal(inspection.refined_boxes[source, label], box)


@pytest.mark.slow
def test_every_figure_draws(model, inspection, sample):
    names = ShapesDataset.category_names
    drawn = [
        figures.input_figure(inspection), figures.feature_maps_figure(inspection), figures.anchors_figure(inspection),
        figures.rpn_targets_figure(inspection), figures.objectness_figure(inspection), figures.proposals_figure(inspection),
        figures.roi_levels_figure(inspection), figures.sampling_figure(inspection),
        figures.box_refinement_figure(inspection, class_names=names), figures.detection_nms_figure(inspection),
        figures.mask_targets_figure(inspection, class_names=names), figures.mask_logits_figure(inspection, class_names=names),
        figures.pasted_masks_figure(inspection, names, 0.0), figures.weight_histograms_figure(model),
        figures.activation_histograms_figure(inspection),
    ]  # fmt: skip
    for figure in drawn:
        assert figure.axes and any(axes.has_data() for axes in figure.axes)
    assert len(drawn[-3].axes[0].patches) == len(inspection.detections["boxes"])  # every detection's box
    with pytest.raises(ValueError, match="ground truth"):
        figures.rpn_targets_figure(inspect_image(model, sample[0]))
