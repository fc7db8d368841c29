r"""Which ground-truth object each anchor or proposal is responsible for, and which to train on.

**Matching** (Faster R-CNN, section 3.1.2). Each prediction `b` (an anchor for the RPN, a
proposal for the box head) takes the ground-truth box it overlaps most, `g*(b) = argmax_g IoU(g, b)`,
and is labelled by that best IoU:

    IoU(g*, b) >= high                  -> matched to g*         (a positive)
    low <= IoU(g*, b) < high            -> BETWEEN_THRESHOLDS    (-2, ignored in training)
    IoU(g*, b) < low                    -> BELOW_LOW_THRESHOLD   (-1, a negative)

With `allow_low_quality_matches` (the RPN's rule), a ground-truth box that no prediction reaches
`high` with still gets positives: every prediction whose IoU with it equals its best IoU
(ties included) is set back to its own best match `g*(b)`, even when that IoU is below `low`.
A quirk kept from the reference implementations: a box that overlaps no prediction at all has
best IoU 0, so every prediction with IoU 0 to it becomes "positive" (matched to its own argmax).

**Sampling** (Fast R-CNN, section 2.3). Of the many labelled predictions, a mini-batch of
`batch_size_per_image` per image is drawn uniformly at random, at most `positive_fraction` of
it positive; negatives fill the rest.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Matcher:
    """Assign each prediction the index of its ground-truth box, or a negative code.

    Args:
        high_threshold: the IoU at or above which a prediction is matched (0.7 for the RPN,
            0.5 for the box head).
        low_threshold: the IoU below which it is background (0.3 for the RPN, 0.5 for the box
            head: then nothing is "between").
        allow_low_quality_matches: give each ground-truth box its best predictions even when
            their IoU is below `high_threshold` (the RPN does).
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(self, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False):
        if low_threshold > high_threshold:
            raise ValueError(f"low_threshold ({low_threshold}) must be <= high_threshold ({high_threshold})")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: Tensor) -> Tensor:
        """iou `[G, B]` (ground truth x predictions) -> matched_gt_index `[B]` int64.

        Entries are in `[0, G)` for matches, or `BELOW_LOW_THRESHOLD` / `BETWEEN_THRESHOLDS`.
        An empty matrix (no ground truth, or no predictions) raises `ValueError`, as in
        torchvision: callers handle images without objects before matching (they are all
        background).
        """
        if iou.dim() != 2:
            raise ValueError(f"iou must be a [G, B] matrix, got shape {tuple(iou.shape)}")
        if iou.shape[0] == 0:
            raise ValueError("no ground-truth boxes to match: handle images without objects before matching")
        if iou.shape[1] == 0:
            raise ValueError("no predictions to match")

        best_iou, best_gt = iou.max(dim=0)  # [B], [B]: IoU(g*, b) and g*(b)
        matched_gt_index = best_gt.clone()  # [B]
        matched_gt_index[best_iou < self.low_threshold] = self.BELOW_LOW_THRESHOLD
        between = (best_iou >= self.low_threshold) & (best_iou < self.high_threshold)  # [B]
        matched_gt_index[between] = self.BETWEEN_THRESHOLDS

        if self.allow_low_quality_matches:
            # for each ground-truth box, all the predictions tied at its best IoU
            best_iou_per_gt = iou.max(dim=1).values  # [G]
            _, best_predictions = torch.where(iou == best_iou_per_gt[:, None])  # [T]
            matched_gt_index[best_predictions] = best_gt[best_predictions]
        return matched_gt_index


class BalancedSampler:
    """Draw a mini-batch of positives and negatives per image (`BalancedPositiveNegativeSampler`).

    Args:
        batch_size_per_image: predictions drawn per image (256 anchors for the RPN, 512 RoIs
            for the box head).
        positive_fraction: the largest share of positives (0.5 for the RPN, 0.25 for the box head).
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float):
        if batch_size_per_image < 0 or not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"need batch_size_per_image >= 0 and positive_fraction in [0, 1], got {batch_size_per_image}, {positive_fraction}")
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """labels: one `[B_i]` tensor per image, `>= 1` positive, `0` negative, `-1` ignored.

        Returns `(positive_masks, negative_masks)`, one `[B_i]` bool tensor each per image.
        The random draws (`torch.randperm` on the labels' device: positives, then negatives,
        image by image) are torchvision's, so the same seed gives the same sample.
        """
        positive_masks, negative_masks = [], []
        for labels_per_image in labels:
            positive = torch.where(labels_per_image >= 1)[0]  # [P]
            negative = torch.where(labels_per_image == 0)[0]  # [Q]
            num_positive = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_negative = min(negative.numel(), self.batch_size_per_image - num_positive)  # negatives fill the rest

            chosen_positive = positive[torch.randperm(positive.numel(), device=positive.device)[:num_positive]]
            chosen_negative = negative[torch.randperm(negative.numel(), device=negative.device)[:num_negative]]

            positive_mask = torch.zeros_like(labels_per_image, dtype=torch.bool)  # [B_i]
            negative_mask = torch.zeros_like(labels_per_image, dtype=torch.bool)  # [B_i]
            positive_mask[chosen_positive] = True
            negative_mask[chosen_negative] = True
            positive_masks.append(positive_mask)
            negative_masks.append(negative_mask)
        return positive_masks, negative_masks
