r"""Boxes: area, IoU, clipping, the box coding of R-CNN, and non-maximum suppression (paper section 2).

A box is `(x1, y1, x2, y2)` in image pixels, with no "+1": its width is `x2 - x1`.

**Intersection over union** measures how well two boxes agree:

    IoU(a, b) = |a ∩ b| / (|a| + |b| - |a ∩ b|)

**Box coding** (R-CNN, appendix C). A detector does not predict box corners; it predicts how to
move a reference box `P` (an anchor, or a proposal) onto the object `G`, in units of `P`'s own
size, so that the same numbers mean the same move for a small and a large box:

    t_x = w_x (G_x - P_x) / P_w        t_w = w_w log(G_w / P_w)        (encode)
    t_y = w_y (G_y - P_y) / P_h        t_h = w_h log(G_h / P_h)

    G_x = t_x / w_x * P_w + P_x        G_w = exp(min(t_w / w_w, clamp)) * P_w        (decode)

with `(P_x, P_y)` the centre and `(P_w, P_h)` the size of `P`. The weights `(w_x, w_y, w_w, w_h)`
only rescale the targets: `(1, 1, 1, 1)` for the RPN, `(10, 10, 5, 5)` for the box head. The clamp
`log(1000 / 16)` keeps `exp` finite for wild early predictions.

**Non-maximum suppression** keeps the best-scoring box of each cluster: visit the boxes in
decreasing score; keep a box unless a box kept before it overlaps it with IoU > threshold.

Every function follows torchvision's arithmetic operation by operation (same formulas in the
same order, same comparisons against Python numbers), so that given the same inputs it gives
the same bits: the whole model is tested against torchvision's detections.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_boxes(boxes: Tensor, name: str = "boxes") -> None:
    """Raise a `ValueError` unless `boxes` is a `[B, 4]` floating point tensor."""
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must be a [B, 4] tensor of (x1, y1, x2, y2), got shape {tuple(getattr(boxes, 'shape', ()))}")
    if not boxes.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {boxes.dtype}")


def geometry_dtype(values: Tensor) -> Tensor:
    """`values` in float32 at least: box geometry never runs in 16 bits, even under mixed precision
    (a coordinate of 1330 is 1328 in bfloat16). float32 and float64 pass unchanged."""
    return values.to(torch.promote_types(values.dtype, torch.float32))


def box_area(boxes: Tensor) -> Tensor:
    """The area `(x2 - x1) (y2 - y1)` of each box: `[B, 4]` -> `[B]` (float32 or float64)."""
    boxes = geometry_dtype(boxes)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """The IoU of every pair: `boxes1 [A, 4]`, `boxes2 [B, 4]` -> `[A, B]`.

    Boxes that do not overlap have IoU 0; two empty boxes give 0 / 0 = NaN, as in torchvision.
    """
    check_boxes(boxes1, "boxes1")
    check_boxes(boxes2, "boxes2")
    boxes1, boxes2 = geometry_dtype(boxes1), geometry_dtype(boxes2)
    area1, area2 = box_area(boxes1), box_area(boxes2)  # [A], [B]
    corners1 = boxes1.T.contiguous()[:, :, None]  # [4, A, 1]: one contiguous row per coordinate,
    corners2 = boxes2.T.contiguous()[:, None, :]  # [4, 1, B]  so the [A, B] operations vectorize
    x1 = torch.max(corners1[0], corners2[0])  # [A, B]: the intersection's corners
    y1 = torch.max(corners1[1], corners2[1])
    x2 = torch.min(corners1[2], corners2[2])
    y2 = torch.min(corners1[3], corners2[3])
    intersection = (x2 - x1).clamp_(min=0) * (y2 - y1).clamp_(min=0)  # [A, B], 0 when apart
    # IoU = |a ∩ b| / (|a| + |b| - |a ∩ b|)
    union = (area1[:, None] + area2[None, :]).sub_(intersection)  # [A, B]
    return intersection / union


def clip_boxes(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Clip boxes `[..., 4]` to an image of `image_size = (height, width)`; same shape out."""
    height, width = image_size
    x1 = boxes[..., 0].clamp(min=0, max=width)
    y1 = boxes[..., 1].clamp(min=0, max=height)
    x2 = boxes[..., 2].clamp(min=0, max=width)
    y2 = boxes[..., 3].clamp(min=0, max=height)
    return torch.stack((x1, y1, x2, y2), dim=-1)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices (`[B']` int64, increasing) of the boxes `[B, 4]` whose sides are both >= `min_size`."""
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    keep = (widths >= min_size) & (heights >= min_size)
    return torch.where(keep)[0]


class BoxCoder:
    """Encode boxes as deltas from reference boxes, and decode deltas back into boxes.

    Args:
        weights: `(w_x, w_y, w_w, w_h)` of the module docstring.
        clamp: the largest `t_w / w_w` and `t_h / w_h` that `decode` exponentiates.
    """

    def __init__(
        self, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0), clamp: float = math.log(1000.0 / 16)
    ):
        if len(weights) != 4:
            raise ValueError(f"weights must be four numbers (w_x, w_y, w_w, w_h), got {weights}")
        self.weights = tuple(float(w) for w in weights)
        self.clamp = clamp

    def encode(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        """The deltas `t [B, 4]` that move each of `proposals [B, 4]` onto `reference_boxes [B, 4]`.

        `reference_boxes` are the targets (ground truth, `G`), `proposals` the boxes they are
        measured from (anchors or proposals, `P`).
        """
        check_boxes(reference_boxes, "reference_boxes")
        check_boxes(proposals, "proposals")
        if reference_boxes.shape[0] != proposals.shape[0]:
            raise ValueError(f"{reference_boxes.shape[0]} reference boxes but {proposals.shape[0]} proposals; one each")
        weights = torch.as_tensor(self.weights, dtype=reference_boxes.dtype, device=reference_boxes.device)
        w_x, w_y, w_w, w_h = weights[0], weights[1], weights[2], weights[3]
        proposals_w = proposals[:, 2] - proposals[:, 0]  # P_w [B]
        proposals_h = proposals[:, 3] - proposals[:, 1]  # P_h [B]
        proposals_x = proposals[:, 0] + 0.5 * proposals_w  # P_x [B]
        proposals_y = proposals[:, 1] + 0.5 * proposals_h  # P_y [B]
        reference_w = reference_boxes[:, 2] - reference_boxes[:, 0]  # G_w [B]
        reference_h = reference_boxes[:, 3] - reference_boxes[:, 1]  # G_h [B]
        reference_x = reference_boxes[:, 0] + 0.5 * reference_w  # G_x [B]
        reference_y = reference_boxes[:, 1] + 0.5 * reference_h  # G_y [B]
        # t_x = w_x (G_x - P_x) / P_w, t_y likewise; t_w = w_w log(G_w / P_w), t_h likewise  (encode)
        t_x = w_x * (reference_x - proposals_x) / proposals_w
        t_y = w_y * (reference_y - proposals_y) / proposals_h
        t_w = w_w * torch.log(reference_w / proposals_w)
        t_h = w_h * torch.log(reference_h / proposals_h)
        return torch.stack((t_x, t_y, t_w, t_h), dim=1)  # [B, 4]

    def decode(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """Apply deltas `[B, 4k]` (k boxes per reference, e.g. one per class) to `boxes [B, 4]` -> `[B, k, 4]`."""
        check_boxes(boxes, "boxes")
        if deltas.dim() != 2 or deltas.shape[1] % 4 != 0 or deltas.shape[0] != boxes.shape[0]:
            raise ValueError(f"deltas must be [B, 4k] with B = {boxes.shape[0]} boxes, got shape {tuple(deltas.shape)}")
        boxes = boxes.to(deltas.dtype)
        widths = boxes[:, 2] - boxes[:, 0]  # P_w [B]
        heights = boxes[:, 3] - boxes[:, 1]  # P_h [B]
        center_x = boxes[:, 0] + 0.5 * widths  # P_x [B]
        center_y = boxes[:, 1] + 0.5 * heights  # P_y [B]
        deltas = deltas.reshape(deltas.shape[0], deltas.shape[1] // 4, 4)  # [B, k, 4], B = 0 included
        w_x, w_y, w_w, w_h = self.weights
        t_x = deltas[:, :, 0] / w_x  # [B, k]
        t_y = deltas[:, :, 1] / w_y
        t_w = torch.clamp(deltas[:, :, 2] / w_w, max=self.clamp)  # keep exp() finite
        t_h = torch.clamp(deltas[:, :, 3] / w_h, max=self.clamp)
        # G_x = t_x P_w + P_x, G_w = exp(t_w) P_w, likewise for y and h  (decode)
        predicted_x = t_x * widths[:, None] + center_x[:, None]  # [B, k]
        predicted_y = t_y * heights[:, None] + center_y[:, None]
        predicted_w = torch.exp(t_w) * widths[:, None]
        predicted_h = torch.exp(t_h) * heights[:, None]
        half_w, half_h = 0.5 * predicted_w, 0.5 * predicted_h  # halving is exact in binary floating point
        return torch.stack(
            (predicted_x - half_w, predicted_y - half_h, predicted_x + half_w, predicted_y + half_h), dim=2
        )  # [B, k, 4]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, block_size: int = 256) -> Tensor:
    """Non-maximum suppression: the indices (`[D]` int64) of the kept boxes, best score first.

    boxes `[B, 4]`, scores `[B]`. A box is dropped when a kept box with a higher score (or the
    same score and a lower index: the sort is stable) overlaps it with IoU > `iou_threshold`.

    With the boxes ranked by score and `S[i, j]` true when box `i` overlaps the lower-ranked box
    `j` too much, the greedy rule is a triangular system

        keep[j] = not any_{i < j} (keep[i] and S[i, j]),

    solved here a block of `block_size` boxes at a time, with no Python step per box:

    1. Inside a block, among the boxes still alive, iterate `keep <- alive and not any_i (keep[i]
       and S[i, j])` from `keep = alive`. After `t` rounds the first `t` boxes are right (box `j`
       only looks at boxes before it), so the iteration stops at the greedy answer, in practice
       after a few rounds (this is Cluster-NMS, Zheng et al. 2020).
    2. The block's kept boxes then drop the boxes they overlap among the later ones still alive.

    IoUs are computed only between alive boxes (a dropped box suppresses nothing), which is what
    makes this fast when many boxes overlap, as the RPN's proposals do.
    """
    check_boxes(boxes)
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"scores must be [B] with B = {boxes.shape[0]} boxes, got shape {tuple(scores.shape)}")
    num_boxes = boxes.shape[0]
    order = scores.sort(descending=True, stable=True).indices  # [B], best first
    ordered = boxes[order]  # [B, 4]
    # torchvision compares its float IoU to the threshold as a double: IoU > t in float64 is
    # IoU > t' in the boxes' dtype, with t' the largest value of that dtype not above t
    threshold = torch.tensor(iou_threshold, dtype=torch.float64)
    threshold_low = threshold.to(geometry_dtype(boxes).dtype)
    if threshold_low.double() > threshold:
        threshold_low = torch.nextafter(threshold_low, torch.tensor(-math.inf, dtype=threshold_low.dtype))
    threshold_low = float(threshold_low)

    alive = torch.ones(num_boxes, dtype=torch.bool, device=boxes.device)  # [B], in rank order
    for start in range(0, num_boxes, block_size):
        end = min(start + block_size, num_boxes)
        candidates = start + torch.where(alive[start:end])[0]  # [c]: not dropped by an earlier block
        block = ordered[candidates]  # [c, 4]
        within = (box_iou(block, block) > threshold_low).triu(diagonal=1)  # [c, c]: S[i, j], i < j
        kept = torch.ones(candidates.shape[0], dtype=torch.bool, device=boxes.device)  # [c]
        while True:  # step 1: keep[j] = not any_i keep[i] S[i, j]
            updated = ~within[kept].any(dim=0)  # [c]
            if torch.equal(updated, kept):
                break
            kept = updated
        alive[candidates[~kept]] = False
        later = end + torch.where(alive[end:])[0]  # [l]
        if later.numel() == 0:
            continue
        # step 2: the kept boxes of the block drop the later boxes they overlap
        dropped = (box_iou(block[kept], ordered[later]) > threshold_low).any(dim=0)  # [l]
        alive[later[dropped]] = False
    return order[torch.where(alive)[0]]  # [D], best first


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each category: boxes of different `idxs` never suppress each other.

    boxes `[B, 4]`, scores `[B]`, idxs `[B]` int64 category (class, or FPN level) -> kept
    indices `[D]` int64, best score first.

    Two equivalent strategies, chosen as torchvision chooses so the results agree bit for bit:
    few boxes are shifted by `category * (max coordinate + 1)` so that categories cannot overlap
    and one NMS runs over all; many boxes run one NMS per category.
    """
    check_boxes(boxes)
    if idxs.shape != scores.shape or scores.shape != boxes.shape[:1]:
        raise ValueError(
            f"scores and idxs must be [B] with B = {boxes.shape[0]}, got {tuple(scores.shape)}, {tuple(idxs.shape)}"
        )
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if boxes.numel() <= (4000 if boxes.device.type == "cpu" else 100_000):
        offsets = idxs.to(boxes) * (boxes.max() + 1)  # [B]: each category in its own stretch of the plane
        return nms(boxes + offsets[:, None], scores, iou_threshold)
    kept = torch.zeros_like(scores, dtype=torch.bool)  # [B]
    for category in torch.unique(idxs):
        members = torch.where(idxs == category)[0]  # [B_c]
        kept[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    kept = torch.where(kept)[0]  # [D], increasing index
    return kept[scores[kept].sort(descending=True).indices]  # torchvision's (unstable) sort, for equal ties
