"""What the mask and keypoint branches share: pool, head, predictor, on the positive RoIs (paper section 3).

Both branches run "in parallel" with the box branch on the same RoIs (section 3): in training
on the positive RoIs the box branch sampled (matched to an object with IoU >= 0.5), at
inference on the box branch's detections. Each is the same three stages,

    RoI pooler (RoIAlign to P x P) -> head (an FCN) -> predictor (upsampling, one map per class or keypoint)

and only its targets, its loss and its decoding differ (mrcnn/mask_head.py,
mrcnn/keypoint_head.py). Shapes (the book's legend): R RoIs, C channels, P pooled size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mrcnn.box_head import TrainingRoIs, pool_rois


class RoIBranch(nn.Module):
    """A branch applied to RoIs: `pooler` -> `head` -> `predictor`.

    Args:
        pooler: multi-level RoIAlign (`mrcnn.poolers.MultiLevelRoIAlign`), or a pooler with its
            interface (`MultiLevelRoIPooler`, Table 2c).
        head: `[R, C, P, P]` -> the predictor's input.
        predictor: -> the branch's logits, `[R, K, M, M]` (masks) or `[R, J, M, M]` (keypoints).
    """

    def __init__(self, pooler: nn.Module, head: nn.Module, predictor: nn.Module):
        super().__init__()
        self.pooler = pooler
        self.head = head
        self.predictor = predictor

    def head_features(self, features: list[Tensor], boxes: list[Tensor]) -> Tensor:
        """The head's output for the boxes `[R_i, 4]` of every image: pool, then the head."""
        return self.head(pool_rois(self.pooler, features, boxes))  # [R, C, P, P] -> the head's output

    def logits(self, features: list[Tensor], boxes: list[Tensor]) -> Tensor:
        """The predictor's logits for the boxes `[R_i, 4]` of every image."""
        return self.predictor(self.head_features(features, boxes))

    @staticmethod
    def positive_rois(rois: TrainingRoIs) -> tuple[list[Tensor], list[Tensor]]:
        """The RoIs a branch trains on: per image, boxes `[R_i+, 4]` and matched_gt_index `[R_i+]` of the positives."""
        positive = [torch.where(labels > 0)[0] for labels in rois.labels]  # [R_i+] per image
        return [b[p] for b, p in zip(rois.boxes, positive)], [m[p] for m, p in zip(rois.matched_gt_index, positive)]

    @staticmethod
    def matched(targets: list[dict[str, Tensor]], field: str, matched_gt_index: list[Tensor]) -> Tensor:
        """`target[field]` of the object each positive RoI matched, all images: `[R+, ...]`."""
        return torch.cat([t[field][i] for t, i in zip(targets, matched_gt_index)])
