r"""The keypoint branch: each keypoint is a one-hot mask, found by a softmax over pixels (paper section 5).

"We model a keypoint's location as a one-hot mask, and adopt Mask R-CNN to predict K masks,
one for each of K keypoint types" (the paper's K; J here, since K counts classes). For each of
the J keypoints of an object, the target is an M x M mask (M = 56) in which only the one pixel
that contains the keypoint is foreground. Since exactly one pixel is right, the loss is not a
per-pixel sigmoid but a softmax over the M^2 pixels of that keypoint's map, scored by the
cross-entropy ("this encourages a single point to be detected"):

    z = keypoint_logits[r, j] flattened to M^2 values       t = the index of the target pixel

    L_kp = 1 / |V| * sum_{(r, j) in V}  -log( exp(z_t) / sum_{p=1}^{M^2} exp(z_p) )

where V holds the (RoI, keypoint) pairs whose keypoint is labelled (visibility v > 0) and falls
inside the RoI. Uniform logits give L_kp = log(M^2) = 8.05 for M = 56.

**Target** (`keypoint_targets`). A keypoint (x, y) in a RoI (x1, y1, x2, y2) lands in pixel

    i = floor((x - x1) * M / (x2 - x1)),    j = floor((y - y1) * M / (y2 - y1)),    t = j M + i

with a keypoint exactly on the right (bottom) edge put in the last column (row).

**Decoding** (`heatmaps_to_keypoints`). Each RoI's J maps are resized with bicubic
interpolation to the box's size in pixels, ceil(w) x ceil(h), and the argmax pixel (i, j) of
each gives the keypoint at its centre (a discrete pixel d has continuous centre d + 0.5):

    x = x1 + (i + 0.5) * w / ceil(w),    y = y1 + (j + 0.5) * h / ceil(h)

and its score is the interpolated logit there.

**The head** (the paper's "eight 3x3 512-d conv layers, followed by a deconv layer and 2x
bilinear upscaling, producing an output resolution of 56x56"), on RoIAlign features of 14 x 14:

    [R, C, 14, 14] -> 8 x (conv 3x3, 512, ReLU) -> deconv 4x4 stride 2 -> J x 28 x 28
                   -> bilinear 2x                                        = keypoint_logits [R, J, 56, 56]

Training and inference follow the mask branch: the loss on the positive RoIs, the prediction
on the detected boxes. Every step follows torchvision's Keypoint R-CNN (`KeypointRCNNHeads`,
`KeypointRCNNPredictor`, `keypoints_to_heatmap`, `keypointrcnn_loss`, `heatmaps_to_keypoints`)
operation by operation; `torchvision_key_map` names the matching checkpoint keys.
Shapes (the book's legend): R RoIs, D detections, C channels, G objects, J keypoints, M map size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrcnn.box_head import TrainingRoIs
from mrcnn.branch import RoIBranch
from mrcnn.norms import Norm


class KeypointHead(nn.Module):
    """The FCN: 3x3 convolutions with ReLU, `[R, C, 14, 14]` -> `[R, layers[-1], 14, 14]`.

    Args:
        in_channels: C of the pooled RoI features.
        layers: the output channels of each convolution (eight of 512 in the paper).
        norm: a normalization after each convolution (`mrcnn.norms`), or None (the paper's head).
    """

    def __init__(self, in_channels: int = 256, layers: tuple[int, ...] = (512,) * 8, norm: Norm | None = None):
        super().__init__()
        channels = (in_channels, *layers)
        self.layers = nn.ModuleList(
            nn.Conv2d(c_in, c_out, kernel_size=3, padding=1) for c_in, c_out in zip(channels[:-1], channels[1:])
        )
        self.norms = nn.ModuleList(norm(c) for c in layers) if norm is not None else None
        for conv in self.layers:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def forward(self, roi_features: Tensor) -> Tensor:
        x = roi_features  # [R, C, 14, 14]
        for index, conv in enumerate(self.layers):
            x = conv(x)  # [R, 512, 14, 14]
            x = F.relu(self.norms[index](x) if self.norms is not None else x)
        return x

    def torchvision_key_map(self) -> dict[str, str]:
        """Our keys -> `KeypointRCNNHeads` keys: `layers.i.weight -> {2i}.weight` (a conv, a ReLU, ...)."""
        key_map = {}
        if self.norms is not None:
            raise ValueError("a head with norms has no torchvision counterpart (torchvision's v1 heads have none)")
        for key in self.state_dict():
            _, index, name = key.split(".")  # layers, i, weight|bias
            key_map[key] = f"{2 * int(index)}.{name}"
        return key_map


class KeypointPredictor(nn.Module):
    """Deconvolve 2x and upsample 2x: `[R, C, 14, 14]` -> keypoint logits `[R, J, 56, 56]`."""

    def __init__(self, in_channels: int = 512, num_keypoints: int = 17):
        super().__init__()
        if num_keypoints < 1:
            raise ValueError(f"num_keypoints must be >= 1, got {num_keypoints}")
        self.deconv = nn.ConvTranspose2d(in_channels, num_keypoints, kernel_size=4, stride=2, padding=1)
        nn.init.kaiming_normal_(self.deconv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.deconv.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.deconv(x)  # [R, J, 28, 28]
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)  # [R, J, 56, 56]

    def torchvision_key_map(self) -> dict[str, str]:
        """Our keys -> `KeypointRCNNPredictor` keys (`kps_score_lowres`)."""
        return {key: "kps_score_lowres." + key.split(".", 1)[1] for key in self.state_dict()}


def keypoint_targets(keypoints: Tensor, boxes: Tensor, heatmap_size: int) -> tuple[Tensor, Tensor]:
    """The one-hot target of each keypoint in each box, as a pixel index (module docstring, "Target").

    keypoints: float `[R, J, 3]` (x, y, visibility) in image pixels, the matched object's for
    each RoI; boxes: float `[R, 4]` (x1, y1, x2, y2). Returns `targets` int64 `[R, J]`, the index
    `j M + i` of the target pixel in the flattened M x M map (0 where not valid), and `valid`
    bool `[R, J]`: labelled (v > 0) and inside the box.
    """
    if keypoints.dim() != 3 or keypoints.shape[-1] != 3 or boxes.shape != (keypoints.shape[0], 4):
        raise ValueError(
            f"need keypoints [R, J, 3] and boxes [R, 4], got {tuple(keypoints.shape)} and {tuple(boxes.shape)}"
        )
    x1, y1, x2, y2 = (boxes[:, k, None] for k in range(4))  # each [R, 1]
    x, y, visibility = keypoints.unbind(-1)  # each [R, J]
    i = ((x - x1) * (heatmap_size / (x2 - x1))).floor().long()  # [R, J]: i = floor((x - x1) M / w)
    j = ((y - y1) * (heatmap_size / (y2 - y1))).floor().long()  # [R, J]
    i[x == x2] = heatmap_size - 1  # on the right edge: the last column
    j[y == y2] = heatmap_size - 1
    valid = (i >= 0) & (j >= 0) & (i < heatmap_size) & (j < heatmap_size) & (visibility > 0)  # [R, J]
    targets = (j * heatmap_size + i) * valid  # [R, J]: t = j M + i
    return targets, valid


def keypoint_loss(keypoint_logits: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """L_kp of the module docstring: the mean over valid keypoints of a softmax cross-entropy over M^2 pixels.

    keypoint_logits: `[R, J, M, M]`; targets int64 `[R, J]` and valid bool `[R, J]` from
    `keypoint_targets`. With no valid keypoint it is a zero that still backpropagates.
    """
    if keypoint_logits.dim() != 4 or keypoint_logits.shape[2] != keypoint_logits.shape[3]:
        raise ValueError(f"keypoint_logits must be [R, J, M, M], got {tuple(keypoint_logits.shape)}")
    if targets.shape != keypoint_logits.shape[:2] or valid.shape != targets.shape:
        raise ValueError(f"targets and valid must be [R, J] = {list(keypoint_logits.shape[:2])}, "
                         f"got {list(targets.shape)} and {list(valid.shape)}")  # fmt: skip
    if not bool(valid.any()):
        return keypoint_logits.sum() * 0
    logits = keypoint_logits.flatten(start_dim=2)  # [R, J, M^2]: one softmax over the pixels of each map
    return F.cross_entropy(logits[valid], targets[valid])  # L_kp


def heatmaps_to_keypoints(keypoint_logits: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Decode `[D, J, M, M]` logits in boxes `[D, 4]` to keypoints (module docstring, "Decoding").

    Returns keypoints float32 `[D, J, 3]` (x, y, 1) in the boxes' pixel coordinates and scores
    float32 `[D, J]`, the bicubically interpolated logit at each argmax. Boxes narrower or
    shorter than one pixel are widened to one.
    """
    if keypoint_logits.dim() != 4 or boxes.shape != (keypoint_logits.shape[0], 4):
        raise ValueError(
            f"need logits [D, J, M, M] and boxes [D, 4], got {tuple(keypoint_logits.shape)} and {tuple(boxes.shape)}"
        )
    num_keypoints = keypoint_logits.shape[1]
    widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=1)  # [D]
    heights = (boxes[:, 3] - boxes[:, 1]).clamp(min=1)  # [D]
    keypoints = torch.zeros(len(boxes), num_keypoints, 3, dtype=torch.float32, device=boxes.device)  # [D, J, 3]
    scores = torch.zeros(len(boxes), num_keypoints, dtype=torch.float32, device=boxes.device)  # [D, J]
    for d in range(len(boxes)):  # each box has its own size in pixels
        map_width, map_height = int(widths[d].ceil().item()), int(heights[d].ceil().item())
        roi_map = F.interpolate(keypoint_logits[d][:, None], size=(map_height, map_width), mode="bicubic",
                                align_corners=False)[:, 0]  # [J, ceil(h), ceil(w)]  # fmt: skip
        position = roi_map.reshape(num_keypoints, -1).argmax(dim=1)  # [J]
        i, j = position % map_width, position // map_width  # column and row of the argmax, [J] each
        keypoints[d, :, 0] = boxes[d, 0] + (i.float() + 0.5) * (widths[d] / map_width)  # x = x1 + (i + 0.5) w / ceil(w)
        keypoints[d, :, 1] = boxes[d, 1] + (j.float() + 0.5) * (heights[d] / map_height)
        keypoints[d, :, 2] = 1
        scores[d] = roi_map[torch.arange(num_keypoints, device=roi_map.device), j, i]
    return keypoints, scores


class KeypointBranch(RoIBranch):
    """Pooler, head and predictor of the keypoint branch, trained on positive RoIs, run on detections.

    Args:
        pooler: multi-level RoIAlign to 14 x 14 (sampling ratio 2 in torchvision).
        head: `KeypointHead`.
        predictor: `KeypointPredictor`, giving `[R, J, 56, 56]` keypoint logits.
    """

    keypoint_logits = RoIBranch.logits  # keypoint logits [R, J, M, M] for the boxes [R_i, 4] of every image

    def loss(self, features: list[Tensor], rois: TrainingRoIs, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """`{"loss_keypoint": L_kp}` over the positive RoIs of the batch.

        rois: the box branch's `TrainingRoIs`; targets: per image, "keypoints" float `[G, J, 3]`.
        """
        boxes, matched_gt_index = self.positive_rois(rois)
        keypoint_logits = self.logits(features, boxes)  # [R+, J, M, M]
        keypoints = self.matched(targets, "keypoints", matched_gt_index)  # [R+, J, 3]
        targets_per_roi, valid = keypoint_targets(keypoints, torch.cat(boxes), keypoint_logits.shape[-1])  # [R+, J] each
        return {"loss_keypoint": keypoint_loss(keypoint_logits, targets_per_roi, valid)}

    def predict(self, features: list[Tensor], detections: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Add "keypoints" float32 `[D, J, 3]` (x, y, 1) and "keypoints_scores" `[D, J]` to each image's
        detections, in the coordinates of `features`' image. Returns new dicts."""
        boxes = [d["boxes"] for d in detections]
        keypoint_logits = self.logits(features, boxes)  # [D, J, M, M]
        keypoints, scores = heatmaps_to_keypoints(keypoint_logits, torch.cat(boxes))  # [D, J, 3], [D, J]
        counts = [len(b) for b in boxes]
        return [{**d, "keypoints": k, "keypoints_scores": s}
                for d, k, s in zip(detections, keypoints.split(counts), scores.split(counts))]  # fmt: skip

    def torchvision_key_map(self) -> dict[str, str]:
        """Our state-dict keys (relative to this branch) -> the keys of torchvision's Keypoint R-CNN.

        For example `head.layers.1.weight -> roi_heads.keypoint_head.2.weight` and
        `predictor.deconv.bias -> roi_heads.keypoint_predictor.kps_score_lowres.bias`.
        """
        key_map = {f"head.{k}": f"roi_heads.keypoint_head.{v}" for k, v in self.head.torchvision_key_map().items()}
        key_map.update(
            {f"predictor.{k}": f"roi_heads.keypoint_predictor.{v}" for k, v in self.predictor.torchvision_key_map().items()}
        )
        return key_map


def uniform_loss(heatmap_size: int = 56) -> float:
    """L_kp for uniform logits: log(M^2), the loss of a head that has learnt nothing (8.05 for M = 56)."""
    return math.log(heatmap_size * heatmap_size)
