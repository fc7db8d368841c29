r"""The box branch: classify each RoI and refine its box (paper section 3, Fast R-CNN's second stage).

Every RoI (a proposal from the RPN) is pooled to a `C x 7 x 7` feature by multi-level
RoIAlign, flattened and passed through two 1024-d fully connected layers with ReLU (the FPN
box head of the paper's Figure 4, right). Two sibling linear layers then predict, for each of
the K classes (background included),

    p = softmax(class_logits)          class_logits [R, K]
    t^k = (t_x, t_y, t_w, t_h)^k       box_deltas   [R, 4K], one box refinement per class

**Training** (section 3.1). The ground-truth boxes join the proposals; each RoI is matched to
the ground truth it overlaps most, and is positive (label `u` = that object's class) when
`IoU >= 0.5`, background (`u = 0`) otherwise. 512 RoIs are sampled per image, at most 25% of
them positive. With the box coding of mrcnn/boxes.py (weights 10, 10, 5, 5) giving the
regression target `v` of each positive RoI, the loss is Fast R-CNN's

    L_cls = 1 / R * sum_r -log p_r[u_r]
    L_box = 1 / R * sum_{r: u_r >= 1} sum_{i in x,y,w,h} smooth_L1(t^{u_r}_{r,i} - v_{r,i})

    smooth_L1(x) = 0.5 x^2 / beta   if |x| < beta,   |x| - 0.5 beta   otherwise    (beta = 1/9)

Both are divided by the number R of sampled RoIs (positive or not), as torchvision does.

**Inference** (section 3.1, "Inference"). Each RoI gives one box per foreground class,
decoded from its deltas and clipped to the image, scored by that class's probability. Scores
<= 0.05 and boxes under 0.01 pixel are dropped, non-maximum suppression (IoU 0.5) runs for
each class on its own, and the 100 best-scoring detections remain.

Every step follows torchvision's `RoIHeads` (`select_training_samples`, `fastrcnn_loss`,
`postprocess_detections`) operation by operation, so that the same weights give the same
detections. Shapes (the book's legend): R RoIs, K classes, C channels, P pooled size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrcnn.boxes import BoxCoder, batched_nms, box_iou, clip_boxes, geometry_dtype, remove_small_boxes
from mrcnn.matcher import BalancedSampler, Matcher
from mrcnn.poolers import MultiLevelRoIAlign


class BoxHead(nn.Module):
    """Two fully connected layers with ReLU: `[R, C, P, P]` RoI features -> `[R, representation_size]`.

    The layers keep the names `fc6` and `fc7` (the sixth and seventh layers counted as in VGG,
    Detectron's and torchvision's names), so torchvision's `TwoMLPHead` weights load unchanged.
    """

    def __init__(self, in_channels: int = 256, pooled_size: int = 7, representation_size: int = 1024):
        super().__init__()
        self.fc6 = nn.Linear(in_channels * pooled_size * pooled_size, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, roi_features: Tensor) -> Tensor:
        x = roi_features.flatten(start_dim=1)  # [R, C * P * P]
        x = F.relu(self.fc6(x))  # [R, 1024]
        return F.relu(self.fc7(x))  # [R, 1024]

    def torchvision_key_map(self) -> dict[str, str]:
        """Our state-dict keys -> torchvision's `TwoMLPHead` keys (the same names)."""
        return {key: key for key in self.state_dict()}


class BoxPredictor(nn.Module):
    """The sibling output layers: class logits `[R, K]` and class-specific box deltas `[R, 4K]`."""

    def __init__(self, in_channels: int = 1024, num_classes: int = 91):
        super().__init__()
        self.class_logits = nn.Linear(in_channels, num_classes)
        self.box_deltas = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)  # [R, in_channels]
        return geometry_dtype(self.class_logits(x)), geometry_dtype(self.box_deltas(x))  # [R, K], [R, 4K], float32 at least

    def torchvision_key_map(self) -> dict[str, str]:
        """Our state-dict keys -> torchvision's `FastRCNNPredictor` keys (`cls_score`, `bbox_pred`)."""
        names = {"class_logits": "cls_score", "box_deltas": "bbox_pred"}
        return {key: names[key.split(".")[0]] + "." + key.split(".", 1)[1] for key in self.state_dict()}


def boxes_to_rois(boxes: list[Tensor]) -> Tensor:
    """One `[R_i, 4]` box tensor per image -> rois `[R, 5]` of `(batch_index, x1, y1, x2, y2)`."""
    batch_index = [torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]  # [R_i, 1] each
    return torch.cat([torch.cat([i, b], dim=1) for i, b in zip(batch_index, boxes)], dim=0)  # [R, 5]


@torch.compiler.disable  # data-dependent: which feature pixels RoIAlign reads depends on the RoIs' values
def pool_rois(pooler: nn.Module, features: list[Tensor], boxes: list[Tensor]) -> Tensor:
    """`pooler(features, rois)` for the boxes `[R_i, 4]` of every image: `[R, C, P, P]` RoI features.

    RoIAlign's CPU path builds a sparse matrix whose size depends on where the RoIs fall, and on a
    GPU it is a Triton kernel: `torch.compile` leaves it to eager PyTorch and compiles the heads
    around it whole.
    """
    return pooler(features, boxes_to_rois(boxes))


class TrainingRoIs(NamedTuple):
    """The RoIs sampled for training, one tensor per image (`R_i` RoIs in image `i`)."""

    boxes: list[Tensor]  # [R_i, 4] float: proposals and ground-truth boxes
    labels: list[Tensor]  # [R_i] int64: the class of the matched object, 0 for background
    regression_targets: list[Tensor]  # [R_i, 4]: the deltas onto the matched box (meaningful for labels > 0)
    matched_gt_index: list[Tensor]  # [R_i] int64: the matched ground-truth object (0 for background)


def check_targets(proposals: list[Tensor], targets: list[dict[str, Tensor]] | None) -> None:
    """Raise a `ValueError` unless there is one target with float boxes and int64 labels per image."""
    if targets is None:
        raise ValueError("training needs targets: one dict with 'boxes' and 'labels' per image")
    if len(targets) != len(proposals):
        raise ValueError(f"got proposals for {len(proposals)} images but {len(targets)} targets")
    for i, target in enumerate(targets):
        if "boxes" not in target or "labels" not in target:
            raise ValueError(f"targets[{i}] needs 'boxes' and 'labels', got keys {sorted(target)}")
        boxes, labels = target["boxes"], target["labels"]
        if boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
            raise ValueError(f"targets[{i}]['boxes'] must be a float [G, 4] tensor, got {boxes.dtype} {tuple(boxes.shape)}")
        if labels.dtype != torch.int64 or labels.shape != boxes.shape[:1]:
            raise ValueError(f"targets[{i}]['labels'] must be int64 [G] = [{boxes.shape[0]}], got {labels.dtype} {tuple(labels.shape)}")


def select_training_rois(
    proposals: list[Tensor],
    targets: list[dict[str, Tensor]],
    matcher: Matcher,
    sampler: BalancedSampler,
    box_coder: BoxCoder,
) -> TrainingRoIs:
    """Add the ground truth to the proposals, label every RoI, sample a batch, compute its targets.

    proposals: `[R_i, 4]` per image; targets: per image, "boxes" `[G_i, 4]` and "labels" `[G_i]`.
    An image without objects gets only background RoIs, whose (unused) regression targets are
    measured to a dummy all-zero box, as in torchvision.
    """
    check_targets(proposals, targets)
    all_boxes, all_gt_boxes, all_labels, all_matched = [], [], [], []
    for proposals_in_image, target in zip(proposals, targets):
        gt_boxes = target["boxes"].to(proposals_in_image.dtype)  # [G, 4]
        boxes = torch.cat([proposals_in_image, gt_boxes])  # [R_i + G, 4]: the ground truth are RoIs too
        if gt_boxes.shape[0] == 0:  # no object: every RoI is background
            matched_gt_index = torch.zeros(boxes.shape[0], dtype=torch.int64, device=boxes.device)
            labels = torch.zeros(boxes.shape[0], dtype=torch.int64, device=boxes.device)
            gt_boxes = torch.zeros(1, 4, dtype=boxes.dtype, device=boxes.device)  # a dummy box to measure from
        else:
            matches = matcher(box_iou(gt_boxes, boxes))  # [R_i + G]: object index, or -1 (below 0.5), -2 (between)
            matched_gt_index = matches.clamp(min=0)
            labels = target["labels"][matched_gt_index]  # [R_i + G]
            labels[matches == Matcher.BELOW_LOW_THRESHOLD] = 0  # background
            labels[matches == Matcher.BETWEEN_THRESHOLDS] = -1  # ignored by the sampler
        all_boxes.append(boxes)
        all_gt_boxes.append(gt_boxes)
        all_labels.append(labels)
        all_matched.append(matched_gt_index)

    positive, negative = sampler(all_labels)  # one [R_i + G] bool mask each per image
    sampled = TrainingRoIs([], [], [], [])
    for boxes, gt_boxes, labels, matched_gt_index, is_positive, is_negative in zip(
        all_boxes, all_gt_boxes, all_labels, all_matched, positive, negative
    ):
        chosen = torch.where(is_positive | is_negative)[0]  # [R_i'], in increasing order
        sampled.boxes.append(boxes[chosen])
        sampled.labels.append(labels[chosen])
        sampled.matched_gt_index.append(matched_gt_index[chosen])
        sampled.regression_targets.append(box_coder.encode(gt_boxes[matched_gt_index[chosen]], boxes[chosen]))
    return sampled


def fast_rcnn_loss(class_logits: Tensor, box_deltas: Tensor, labels: Tensor, regression_targets: Tensor) -> tuple[Tensor, Tensor]:
    """L_cls and L_box of the module docstring, for all sampled RoIs of the batch.

    class_logits `[R, K]`, box_deltas `[R, 4K]`, labels `[R]` int64, regression_targets `[R, 4]`
    -> two scalars. Only the deltas of each positive RoI's own class are trained.
    """
    if class_logits.dim() != 2 or box_deltas.shape != (class_logits.shape[0], 4 * class_logits.shape[1]):
        raise ValueError(f"expected class_logits [R, K] and box_deltas [R, 4K], got {tuple(class_logits.shape)}, {tuple(box_deltas.shape)}")
    if labels.shape != class_logits.shape[:1] or regression_targets.shape != (class_logits.shape[0], 4):
        raise ValueError(f"expected labels [R] and regression_targets [R, 4], got {tuple(labels.shape)}, {tuple(regression_targets.shape)}")
    # L_cls = 1 / R * sum_r -log p_r[u_r]
    loss_classifier = F.cross_entropy(class_logits, labels)
    positive = torch.where(labels > 0)[0]  # [R+]
    box_deltas = box_deltas.reshape(box_deltas.shape[0], -1, 4)  # [R, K, 4]
    # L_box = 1 / R * sum over positive RoIs of smooth_L1(t^u - v), beta = 1/9
    loss_box_reg = F.smooth_l1_loss(
        box_deltas[positive, labels[positive]], regression_targets[positive], beta=1 / 9, reduction="sum"
    ) / labels.numel()
    return loss_classifier, loss_box_reg


def refine_boxes(
    class_logits: Tensor,
    box_deltas: Tensor,
    proposals: list[Tensor],
    image_sizes: list[tuple[int, int]],
    box_coder: BoxCoder,
) -> tuple[list[Tensor], list[Tensor]]:
    """Every RoI refined once per class, and scored: the box branch's predictions before any selection.

    class_logits `[R, K]` and box_deltas `[R, 4K]` for the RoIs of all images, proposals `[R_i, 4]`
    per image, image_sizes `(h, w)` per image. Returns, per image, boxes `[R_i, K, 4]` (decoded
    from each class's deltas and clipped to the image) and class probabilities `[R_i, K]`.
    """
    boxes_per_image = [p.shape[0] for p in proposals]
    predicted_boxes = box_coder.decode(box_deltas, torch.cat(proposals))  # [R, K, 4]: one box per class
    predicted_scores = F.softmax(class_logits, dim=-1)  # [R, K]
    boxes = [clip_boxes(b, size) for b, size in zip(predicted_boxes.split(boxes_per_image), image_sizes)]  # [R_i, K, 4]
    return boxes, list(predicted_scores.split(boxes_per_image))


def detection_candidates(boxes: Tensor, scores: Tensor, score_thresh: float = 0.05) -> tuple[Tensor, Tensor, Tensor]:
    """The (RoI, foreground class) pairs that per-class NMS sees, for one image.

    boxes `[R_i, K, 4]` and scores `[R_i, K]` from `refine_boxes` -> boxes `[C, 4]`, scores `[C]`
    and labels `[C]` int64 of the pairs scoring above `score_thresh` with a box of at least 0.01 pixel.
    """
    labels = torch.arange(scores.shape[-1], device=boxes.device).view(1, -1).expand_as(scores)  # [R_i, K]
    # every (RoI, foreground class) pair is a candidate detection; class 0 is the background
    boxes = boxes[:, 1:].reshape(-1, 4)  # [R_i (K-1), 4]
    scores = scores[:, 1:].reshape(-1)  # [R_i (K-1)]
    labels = labels[:, 1:].reshape(-1)  # [R_i (K-1)]
    keep = torch.where(scores > score_thresh)[0]
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = remove_small_boxes(boxes, min_size=1e-2)
    return boxes[keep], scores[keep], labels[keep]


@torch.compiler.disable  # data-dependent: how many candidates pass the threshold and survive NMS
def postprocess_detections(
    class_logits: Tensor,
    box_deltas: Tensor,
    proposals: list[Tensor],
    image_sizes: list[tuple[int, int]],
    box_coder: BoxCoder,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Scores and refined boxes of every RoI and class -> the detections of each image.

    class_logits `[R, K]` and box_deltas `[R, 4K]` for the RoIs of all images, proposals `[R_i, 4]`
    per image, image_sizes `(h, w)` per image. Returns, per image, boxes `[D_i, 4]`, scores `[D_i]`
    and labels `[D_i]` int64 in `[1, K)`, best score first, `D_i <= detections_per_img`. The box
    branch's data-dependent step: `torch.compile` leaves it to eager PyTorch (a graph break).
    """
    all_boxes, all_scores, all_labels = [], [], []
    for boxes, scores in zip(*refine_boxes(class_logits, box_deltas, proposals, image_sizes, box_coder)):
        boxes, scores, labels = detection_candidates(boxes, scores, score_thresh)
        keep = batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_img]  # per class, best first
        all_boxes.append(boxes[keep])
        all_scores.append(scores[keep])
        all_labels.append(labels[keep])
    return all_boxes, all_scores, all_labels


class BoxBranch(nn.Module):
    """Pooler, head and predictor of the box branch, with its training and inference rules.

    Args:
        pooler: multi-level RoIAlign to `P x P` (7 in the paper).
        head: `[R, C, P, P]` -> `[R, F]`, for example `BoxHead`.
        predictor: `[R, F]` -> class logits `[R, K]`, box deltas `[R, 4K]`, for example `BoxPredictor`.
        fg_iou_thresh, bg_iou_thresh: a RoI is positive at IoU >= fg, background below bg.
        batch_size_per_image, positive_fraction: RoIs sampled per image, and the most that are positive.
        box_coder_weights: `(w_x, w_y, w_w, w_h)` of the regression targets.
        score_thresh, nms_thresh, detections_per_image: the inference rules.
    """

    def __init__(
        self,
        pooler: MultiLevelRoIAlign,
        head: nn.Module,
        predictor: nn.Module,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        box_coder_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_image: int = 100,
    ):
        super().__init__()
        self.pooler = pooler
        self.head = head
        self.predictor = predictor
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        self.box_coder = BoxCoder(box_coder_weights)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_image = detections_per_image

    def logits_and_deltas(self, features: list[Tensor], boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Class logits `[R, K]` and box deltas `[R, 4K]` for the boxes `[R_i, 4]` of every image."""
        roi_features = pool_rois(self.pooler, features, boxes)  # [R, C, P, P]
        return self.predictor(self.head(roi_features))

    def forward(
        self,
        features: list[Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[TrainingRoIs | list[dict[str, Tensor]], dict[str, Tensor]]:
        """Training: `(TrainingRoIs, {"loss_classifier", "loss_box_reg"})`; inference: `(detections, {})`.

        features: the FPN maps `[N, C, H_l, W_l]` the pooler expects; proposals `[R_i, 4]` per
        image; image_sizes `(h, w)` of each resized image; targets as in `select_training_rois`.
        A detection is a dict of "boxes" `[D, 4]`, "scores" `[D]` and "labels" `[D]` int64.
        """
        if self.training:
            sampled = select_training_rois(proposals, targets, self.matcher, self.sampler, self.box_coder)
            class_logits, box_deltas = self.logits_and_deltas(features, sampled.boxes)
            loss_classifier, loss_box_reg = fast_rcnn_loss(
                class_logits, box_deltas, torch.cat(sampled.labels), torch.cat(sampled.regression_targets)
            )
            return sampled, {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}

        class_logits, box_deltas = self.logits_and_deltas(features, proposals)
        boxes, scores, labels = postprocess_detections(
            class_logits, box_deltas, proposals, image_sizes, self.box_coder,
            self.score_thresh, self.nms_thresh, self.detections_per_image,
        )
        detections = [{"boxes": b, "scores": s, "labels": c} for b, s, c in zip(boxes, scores, labels)]
        return detections, {}

    def torchvision_key_map(self) -> dict[str, str]:
        """Our state-dict keys (relative to this branch) -> the keys of torchvision's Mask R-CNN.

        For example `head.fc6.weight -> roi_heads.box_head.fc6.weight` and
        `predictor.class_logits.bias -> roi_heads.box_predictor.cls_score.bias`.
        """
        key_map = {f"head.{k}": f"roi_heads.box_head.{v}" for k, v in self.head.torchvision_key_map().items()}
        key_map.update({f"predictor.{k}": f"roi_heads.box_predictor.{v}" for k, v in self.predictor.torchvision_key_map().items()})
        return key_map
