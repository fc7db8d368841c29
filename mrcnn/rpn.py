r"""The Region Proposal Network (Faster R-CNN section 3.1; with FPN, FPN section 4.1).

A small network slides over every FPN level. At each location it predicts, for each of the `A`
anchors there, an *objectness* logit (object or not) and four deltas that refine the anchor
(the box coding of `mrcnn.boxes`). The same head weights serve all levels.

**Proposals** (inference and training alike): decode every anchor; on each level keep the
`pre_nms_top_n` highest logits; scores `sigmoid(logit)`; clip to the image; drop boxes
narrower than 1e-3 pixels and scores below `score_thresh`; NMS at IoU 0.7 within each level;
keep the `post_nms_top_n` best across levels.

**Loss** (training). Anchors are labelled by `Matcher(0.7, 0.3, allow_low_quality_matches=True)`
(an image without objects makes all its anchors negative), and 256 per image are sampled, at
most half positive. With `S` the sampled anchors and `S+` the sampled positives:

    L_objectness = 1/|S| sum_{a in S} BCE(logit_a, label_a)
    L_box        = 1/|S| sum_{a in S+} smoothL1_{beta=1/9}(t_a - t*_a)       (summed over x, y, w, h)

where `t*_a` encodes the matched ground-truth box from anchor `a`. Proposals do not
backpropagate into the RPN (the deltas are detached before decoding), as in Faster R-CNN's
approximate joint training.

Under `torch.compile` the head, the anchors and the decoding are one graph; `select_proposals`
(top-k, clipping, NMS: how many boxes survive is known only once computed) is the one step left
to eager PyTorch, a single graph break.

Tensors that go through `exp`, `sigmoid` or a reduction are given the same shapes as in
torchvision (the whole batch at once), since vectorized and scalar code paths may differ in the
last bit; that makes the proposals equal to torchvision's, not just close.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrcnn.anchors import AnchorGenerator
from mrcnn.boxes import BoxCoder, batched_nms, box_iou, clip_boxes, geometry_dtype, remove_small_boxes
from mrcnn.matcher import BalancedSampler, Matcher


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then two sibling 1x1 convs: `A` objectness logits and `4A` box deltas.

    Args:
        in_channels: channels of every FPN level (256).
        num_anchors: `A`, anchors per location (3).
    """

    def __init__(self, in_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1)
        self.objectness = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.box_deltas = nn.Conv2d(in_channels, 4 * num_anchors, kernel_size=1)
        for layer in (self.conv, self.objectness, self.box_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """features: per level `[N, C, H_l, W_l]` -> (objectness `[N, A, H_l, W_l]`, deltas `[N, 4A, H_l, W_l]`)
        per level."""
        objectness, box_deltas = [], []
        for feature in features:
            hidden = F.relu(self.conv(feature))
            objectness.append(self.objectness(hidden))
            box_deltas.append(self.box_deltas(hidden))
        return objectness, box_deltas


def flatten_predictions(objectness: list[Tensor], box_deltas: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Put the head's outputs in anchor order (location-major, then anchor), levels concatenated.

    Returns objectness `[N, sum_l H_l W_l A]` and deltas `[N, sum_l H_l W_l A, 4]`, float32 at least: box
    geometry is float32 always, also when the head ran in 16 bits under mixed precision.
    """
    flat_objectness, flat_deltas = [], []
    for logits, deltas in zip(objectness, box_deltas):
        n, a, h, w = logits.shape
        flat_objectness.append(logits.permute(0, 2, 3, 1).reshape(n, h * w * a))  # [N, H_l W_l A]
        deltas = deltas.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2)  # [N, H_l, W_l, A, 4]
        flat_deltas.append(deltas.reshape(n, h * w * a, 4))  # [N, H_l W_l A, 4]
    return geometry_dtype(torch.cat(flat_objectness, dim=1)), geometry_dtype(torch.cat(flat_deltas, dim=1))


class RegionProposalNetwork(nn.Module):
    """Anchors + head -> proposals, and in training the RPN losses.

    Args:
        anchor_generator, head: an `AnchorGenerator` and an `RPNHead` with matching `A`.
        fg_iou_thresh, bg_iou_thresh: the matcher's high and low IoU thresholds.
        batch_size_per_image, positive_fraction: the sampler's.
        pre_nms_top_n, post_nms_top_n: `{"training": n, "testing": n}`: proposals kept per level
            before NMS, and per image after it.
        nms_thresh: IoU above which a proposal suppresses a lower-scoring one of its level.
        score_thresh: proposals scoring below it (after the sigmoid) are dropped.
    """

    def __init__(
        self,
        anchor_generator: AnchorGenerator,
        head: RPNHead,
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        pre_nms_top_n: dict[str, int] | None = None,
        post_nms_top_n: dict[str, int] | None = None,
        nms_thresh: float = 0.7,
        score_thresh: float = 0.0,
    ):
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        self.pre_nms_top_n = dict(training=2000, testing=1000) if pre_nms_top_n is None else dict(pre_nms_top_n)
        self.post_nms_top_n = dict(training=2000, testing=1000) if post_nms_top_n is None else dict(post_nms_top_n)
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh
        self.min_size = 1e-3

    def forward(
        self,
        features: list[Tensor],
        image_sizes: list[tuple[int, int]],
        padded_size: tuple[int, int],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Proposals `[R_i, 4]` per image (best first), and the losses (empty dict in eval mode).

        features: per level `[N, C, H_l, W_l]`; image_sizes: `(h, w)` of each resized image
        before padding; padded_size: `(H, W)` of the padded batch; targets: per image a dict
        with "boxes" `[G_i, 4]` (required in training).
        """
        if self.training and targets is None:
            raise ValueError("the RPN needs targets (ground-truth boxes) in training mode")
        if len(image_sizes) != features[0].shape[0]:
            raise ValueError(f"{len(image_sizes)} image sizes for a batch of {features[0].shape[0]} feature maps")
        anchors_per_level, objectness, box_deltas, proposals = self.predict(features, padded_size)
        num_anchors_per_level = [a.shape[0] for a in anchors_per_level]
        boxes = self.select_proposals(proposals, objectness.detach(), image_sizes, num_anchors_per_level)

        losses = {}
        if self.training:
            anchors = torch.cat(anchors_per_level)  # [T, 4], T anchors per image
            labels, matched_boxes = self.assign_targets(anchors, targets)
            all_anchors = anchors.repeat(len(image_sizes), 1)  # [N T, 4]
            regression_targets = self.box_coder.encode(torch.cat(matched_boxes), all_anchors)  # [N T, 4]
            losses = self.loss(objectness, box_deltas, labels, regression_targets)
        return boxes, losses

    def predict(self, features: list[Tensor], padded_size: tuple[int, int]) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
        """The head on every level, and every anchor decoded: the RPN's raw predictions, before any selection.

        features: per level `[N, C, H_l, W_l]`; padded_size `(H, W)`. Returns the anchors of each
        level `[H_l W_l A, 4]`, objectness logits `[N, T]`, deltas `[N, T, 4]` and the decoded
        boxes `[N, T, 4]` (detached: no gradient flows through the proposals), `T = sum_l H_l W_l A`
        in anchor order (`flatten_predictions`).
        """
        num_images = features[0].shape[0]
        objectness, box_deltas = self.head(features)
        anchors_per_level = self.anchor_generator(padded_size, [f.shape[-2:] for f in features], device=features[0].device,
                                                  dtype=torch.promote_types(features[0].dtype, torch.float32))  # fmt: skip
        anchors = torch.cat(anchors_per_level)  # [T, 4], T anchors per image
        objectness, box_deltas = flatten_predictions(objectness, box_deltas)  # [N, T], [N, T, 4]

        # decode every anchor of every image at once
        all_anchors = anchors.repeat(num_images, 1)  # [N T, 4]
        proposals = self.box_coder.decode(box_deltas.detach().reshape(-1, 4), all_anchors)  # [N T, 1, 4]
        return anchors_per_level, objectness, box_deltas, proposals.view(num_images, -1, 4)  # [N, T, 4]

    @torch.compiler.disable  # data-dependent: how many boxes survive each step is known only once it ran
    def select_proposals(
        self, proposals: Tensor, objectness: Tensor, image_sizes: list[tuple[int, int]], num_anchors_per_level: list[int]
    ) -> list[Tensor]:
        """proposals `[N, T, 4]`, objectness `[N, T]` logits -> per image `[R_i, 4]`, best first.

        The top candidates of each level (`top_candidates`), clipped and filtered (`candidates_in_image`),
        NMS within each level, the `post_nms_top_n` best. This is the RPN's data-dependent step:
        `torch.compile` leaves it to eager PyTorch (a graph break) and compiles the head before it whole.
        """
        post_nms_top_n = self.post_nms_top_n["training" if self.training else "testing"]
        selected = []
        candidates = self.top_candidates(proposals, objectness, num_anchors_per_level)
        for boxes, scores, levels, image_size in zip(*candidates, image_sizes):
            boxes, scores, levels = self.candidates_in_image(boxes, scores, levels, image_size)
            keep = batched_nms(boxes, scores, levels, self.nms_thresh)  # NMS within each level, best first
            selected.append(boxes[keep[:post_nms_top_n]])  # [R_i, 4]
        return selected

    def top_candidates(self, proposals: Tensor, objectness: Tensor, num_anchors_per_level: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """The `pre_nms_top_n` highest logits of each level, for every image at once (sizes fixed by the shapes).

        proposals `[N, T, 4]`, objectness `[N, T]` logits -> boxes `[N, K, 4]`, scores `[N, K]`
        (sigmoid of the logits) and levels `[N, K]` int64 (0 for the first level), with `K = sum_l
        min(pre_nms_top_n, T_l)`.
        """
        mode = "training" if self.training else "testing"
        num_images = proposals.shape[0]
        levels = torch.cat(
            [torch.full((n,), level, dtype=torch.int64, device=proposals.device) for level, n in enumerate(num_anchors_per_level)]
        )  # [T]
        top_indices, offset = [], 0
        for logits in objectness.split(num_anchors_per_level, dim=1):  # [N, T_l]
            k = torch.sym_min(self.pre_nms_top_n[mode], logits.shape[1])  # min(), also of a symbolic size (torch.export)
            top_indices.append(logits.topk(k, dim=1).indices + offset)  # [N, k]
            offset += logits.shape[1]
        top_indices = torch.cat(top_indices, dim=1)  # [N, K]
        image_index = torch.arange(num_images, device=proposals.device)[:, None]  # [N, 1]
        scores = torch.sigmoid(objectness[image_index, top_indices])  # [N, K]
        return proposals[image_index, top_indices], scores, levels[top_indices]  # [N, K, 4], [N, K], [N, K]

    def candidates_in_image(
        self, boxes: Tensor, scores: Tensor, levels: Tensor, image_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One image's top candidates `[K, 4]`, `[K]`, `[K]` clipped to it, without tiny or low-scoring boxes."""
        boxes = clip_boxes(boxes, image_size)  # [K, 4]
        keep = remove_small_boxes(boxes, self.min_size)
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        keep = torch.where(scores >= self.score_thresh)[0]
        return boxes[keep], scores[keep], levels[keep]

    def proposals_before_nms(
        self, proposals: Tensor, objectness: Tensor, image_sizes: list[tuple[int, int]], num_anchors_per_level: list[int]
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """The candidates NMS sees: per level the `pre_nms_top_n` best, clipped, without tiny or low-scoring boxes.

        proposals `[N, T, 4]`, objectness `[N, T]` logits -> per image `(boxes [K_i, 4], scores
        [K_i] (sigmoid of the logits), levels [K_i] int64 (0 for the first level))`.
        """
        boxes, scores, levels = self.top_candidates(proposals, objectness, num_anchors_per_level)
        return [self.candidates_in_image(*candidate, size) for *candidate, size in zip(boxes, scores, levels, image_sizes)]

    def assign_targets(self, anchors: Tensor, targets: list[dict[str, Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
        """Label each anchor of each image, and give it the box it should regress to.

        anchors `[T, 4]` -> labels per image `[T]` float32 (1 object, 0 background, -1 ignored),
        matched boxes per image `[T, 4]` (meaningful for the positives only).
        """
        labels, matched_boxes = [], []
        for target in targets:
            gt_boxes = target["boxes"]  # [G, 4]
            if gt_boxes.numel() == 0:  # an image without objects: every anchor is background
                labels.append(torch.zeros(anchors.shape[0], dtype=torch.float32, device=anchors.device))
                matched_boxes.append(torch.zeros(anchors.shape, dtype=torch.float32, device=anchors.device))
                continue
            matched_gt_index = self.matcher(box_iou(gt_boxes, anchors))  # [T]
            matched_boxes.append(gt_boxes[matched_gt_index.clamp(min=0)])  # [T, 4]
            label = (matched_gt_index >= 0).to(torch.float32)  # [T]
            label[matched_gt_index == Matcher.BETWEEN_THRESHOLDS] = -1.0
            labels.append(label)
        return labels, matched_boxes

    def loss(self, objectness: Tensor, box_deltas: Tensor, labels: list[Tensor], regression_targets: Tensor) -> dict[str, Tensor]:
        """objectness `[N, T]`, box_deltas `[N, T, 4]`, labels per image `[T]`, regression_targets `[N T, 4]`."""
        positive_masks, negative_masks = self.sampler(labels)
        positive = torch.where(torch.cat(positive_masks))[0]  # [S+], indices into N T
        negative = torch.where(torch.cat(negative_masks))[0]  # [S-]
        sampled = torch.cat([positive, negative])  # [S]
        labels = torch.cat(labels)  # [N T]
        # L_objectness = mean over S of BCE(logit, label)
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled])
        # L_box = sum over S+ of smoothL1_{1/9}(t - t*) / |S|
        box_loss = F.smooth_l1_loss(
            box_deltas.reshape(-1, 4)[positive], regression_targets[positive], beta=1 / 9, reduction="sum"
        ) / sampled.numel()
        return {"loss_objectness": objectness_loss, "loss_rpn_box_reg": box_loss}
