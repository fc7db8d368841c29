r"""The mask branch: a small FCN predicts an M x M mask per RoI and class (paper section 3, "Mask Representation").

"A mask encodes an input object's spatial layout": rather than flattening the RoI into a
vector, the mask branch keeps it a `C x 14 x 14` map and stays convolutional, so that every
output pixel keeps its place. With FPN (the paper's Figure 4, right):

    RoIAlign 14 x 14 x 256  ->  4 x (conv 3x3, 256, ReLU)  ->  deconv 2x2 stride 2, 256, ReLU
                            ->  conv 1x1, K                 =  mask_logits [R, K, 28, 28]

One mask per class, each with its own sigmoid: the branch says which pixels belong to the
object, the box branch says which class it is (the loss is in mrcnn/mask_loss.py).

**Training** runs on the positive RoIs only (those matched to an object with IoU >= 0.5): the
target of a RoI is its object's mask cropped by the RoI and resampled to 28 x 28, and only
the mask of the object's class `k` is scored, `L_mask = mean BCE(sigmoid(mask_logits[r, k]), target_r)`.

**Inference** runs on the detected boxes (at most 100 per image): the mask of the predicted
class goes through the sigmoid, giving probabilities `[D, 1, 28, 28]` that mrcnn/inference.py
pastes into the image.

The ablation of Table 2e replaces the FCN by a multi-layer perceptron on the flattened RoI
features, `fc 1024 -> fc 1024 -> fc K * 28^2` (`MLPMaskHead` and `MLPMaskPredictor`), and loses
2.1 mask AP: the fully connected layers discard the spatial layout the convolutions keep.

Same layers, initialization and order of operations as torchvision's `MaskRCNNHeads` and
`MaskRCNNPredictor`; the `torchvision_key_map` methods name the matching checkpoint keys.
Shapes (the book's legend): R RoIs, D detections, C channels, K classes, M mask size.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrcnn.box_head import TrainingRoIs, boxes_to_rois
from mrcnn.mask_loss import class_agnostic_mask_loss, gathered_mask_logits, mask_loss, mask_targets, multinomial_mask_loss


class MaskHead(nn.Module):
    """The FCN: 3x3 convolutions with ReLU, `[R, C, 14, 14]` -> `[R, layers[-1], 14, 14]`.

    Args:
        in_channels: C of the pooled RoI features.
        layers: the output channels of each convolution (four of 256 in the paper).
        dilation: of every convolution (padding follows, so the size is kept).
    """

    def __init__(self, in_channels: int = 256, layers: tuple[int, ...] = (256, 256, 256, 256), dilation: int = 1):
        super().__init__()
        channels = (in_channels, *layers)
        self.layers = nn.ModuleList(
            nn.Conv2d(c_in, c_out, kernel_size=3, padding=dilation, dilation=dilation)
            for c_in, c_out in zip(channels[:-1], channels[1:])
        )
        for conv in self.layers:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def forward(self, roi_features: Tensor) -> Tensor:
        x = roi_features  # [R, C, 14, 14]
        for conv in self.layers:
            x = F.relu(conv(x))  # [R, 256, 14, 14]
        return x

    def torchvision_key_map(self, legacy: bool = False) -> dict[str, str]:
        """Our keys -> `MaskRCNNHeads` keys: `layers.i.weight -> i.0.weight` (each torchvision layer
        is a conv + ReLU block), or `mask_fcn{i+1}.weight` with `legacy=True` (older checkpoints)."""
        key_map = {}
        for key in self.state_dict():
            _, index, name = key.split(".")  # layers, i, weight|bias
            key_map[key] = f"mask_fcn{int(index) + 1}.{name}" if legacy else f"{index}.0.{name}"
        return key_map


class MaskPredictor(nn.Module):
    """Upsample 2x and predict K mask logits: `[R, C, 14, 14]` -> `[R, K, 28, 28]`."""

    def __init__(self, in_channels: int = 256, dim_reduced: int = 256, num_classes: int = 91):
        super().__init__()
        self.deconv = nn.ConvTranspose2d(in_channels, dim_reduced, kernel_size=2, stride=2)
        self.mask_logits = nn.Conv2d(dim_reduced, num_classes, kernel_size=1)
        for layer in (self.deconv, self.mask_logits):  # the biases keep PyTorch's default initialization
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.deconv(x))  # [R, dim_reduced, 28, 28]
        return self.mask_logits(x)  # [R, K, 28, 28]

    def class_mask_logits(self, x: Tensor, labels: Tensor) -> Tensor:
        """The logits of one class per RoI, `labels` `[R]`: `[R, 1, 28, 28]`, equal to
        `self(x)[arange(R), labels][:, None]` with K times less work in the last layer, forward
        and backward (`mrcnn.mask_loss.gathered_mask_logits`). The training loss reads no other."""
        x = F.relu(self.deconv(x))  # [R, dim_reduced, 28, 28]
        return gathered_mask_logits(x, self.mask_logits.weight, self.mask_logits.bias, labels)  # [R, 1, 28, 28]

    def torchvision_key_map(self) -> dict[str, str]:
        """Our keys -> `MaskRCNNPredictor` keys (`conv5_mask`, `mask_fcn_logits`)."""
        names = {"deconv": "conv5_mask", "mask_logits": "mask_fcn_logits"}
        return {key: names[key.split(".")[0]] + "." + key.split(".", 1)[1] for key in self.state_dict()}


class MLPMaskHead(nn.Module):
    """Table 2e's alternative to the FCN: fully connected layers with ReLU on the flattened RoI.

    `[R, C, P, P]` -> `[R, hidden[-1]]`; the paper's MLP has `hidden = (1024, 1024)` (or three).
    """

    def __init__(self, in_channels: int = 256, pooled_size: int = 14, hidden: tuple[int, ...] = (1024, 1024)):
        super().__init__()
        sizes = (in_channels * pooled_size * pooled_size, *hidden)
        self.layers = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in zip(sizes[:-1], sizes[1:]))

    def forward(self, roi_features: Tensor) -> Tensor:
        x = roi_features.flatten(start_dim=1)  # [R, C * P * P]
        for fc in self.layers:
            x = F.relu(fc(x))  # [R, 1024]
        return x

    def torchvision_key_map(self, legacy: bool = False) -> dict[str, str]:
        raise ValueError("the MLP mask head is an ablation; torchvision has no such weights")


class MLPMaskPredictor(nn.Module):
    """The last fully connected layer of Table 2e's MLP: `[R, F]` -> `[R, K, M, M]` mask logits."""

    def __init__(self, in_features: int = 1024, num_classes: int = 91, mask_size: int = 28):
        super().__init__()
        self.mask_size = mask_size
        self.mask_logits = nn.Linear(in_features, num_classes * mask_size * mask_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.mask_logits(x).reshape(x.shape[0], -1, self.mask_size, self.mask_size)  # [R, K, M, M]

    def torchvision_key_map(self) -> dict[str, str]:
        raise ValueError("the MLP mask predictor is an ablation; torchvision has no such weights")


class MaskBranch(nn.Module):
    """Pooler, head and predictor of the mask branch, trained on positive RoIs, run on detections.

    Args:
        pooler: multi-level RoIAlign to 14 x 14 (sampling ratio 2 in torchvision), or another
            pooler with its interface (`mrcnn.roi_warp.MultiLevelRoIPooler`, Table 2c).
        head: `MaskHead` (the paper's FCN) or `MLPMaskHead` (the ablation).
        predictor: `MaskPredictor` or `MLPMaskPredictor`, giving `[R, K, M, M]` mask logits
            (`[R, 1, M, M]` when `class_agnostic`).
        loss: "sigmoid", the paper's per-class sigmoid (`mask_loss`), or "softmax", a per-pixel
            softmax over the K classes (`multinomial_mask_loss`, Table 2b). At inference a
            detection's mask is the sigmoid, or the softmax probability, of its own class.
        class_agnostic: one mask per RoI whatever its class (`class_agnostic_mask_loss`,
            Table 2b); the predictor must then have one output channel. Sigmoid only.
    """

    def __init__(self, pooler: nn.Module, head: nn.Module, predictor: nn.Module,
                 loss: Literal["sigmoid", "softmax"] = "sigmoid", class_agnostic: bool = False):  # fmt: skip
        super().__init__()
        if loss not in ("sigmoid", "softmax"):
            raise ValueError(f"unknown mask loss {loss!r}; choose 'sigmoid' or 'softmax'")
        if class_agnostic and loss == "softmax":
            raise ValueError("a class-agnostic mask has one channel: a softmax over it is constant; use loss='sigmoid'")
        self.pooler = pooler
        self.head = head
        self.predictor = predictor
        self.loss_function = loss
        self.class_agnostic = class_agnostic

    def mask_logits(self, features: list[Tensor], boxes: list[Tensor]) -> Tensor:
        """Mask logits `[R, K, M, M]` for the boxes `[R_i, 4]` of every image."""
        roi_features = self.pooler(features, boxes_to_rois(boxes))  # [R, C, 14, 14]
        return self.predictor(self.head(roi_features))

    def forward(
        self,
        features: list[Tensor],
        rois: TrainingRoIs | list[dict[str, Tensor]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[TrainingRoIs | list[dict[str, Tensor]], dict[str, Tensor]]:
        """Training: `(rois, self.loss(...))`; inference: `(self.predict(...), {})`, as for `BoxBranch`."""
        if self.training:
            return rois, self.loss(features, rois, targets)
        return self.predict(features, rois), {}

    def loss(self, features: list[Tensor], rois: TrainingRoIs, targets: list[dict[str, Tensor]] | None) -> dict[str, Tensor]:
        """`{"loss_mask": L_mask}` over the positive RoIs of the batch (a zero that backpropagates when there are none).

        rois: the box branch's `TrainingRoIs`; targets: per image, "masks" `[G, H, W]` and "labels" `[G]`.
        """
        if targets is None or len(targets) != len(rois.boxes) or any("masks" not in t for t in targets):
            raise ValueError("training the mask branch needs one target with 'masks' [G, H, W] per image")
        boxes, matched_gt_index = self.positive_rois(rois)
        if self.loss_function == "sigmoid" and not self.class_agnostic and isinstance(self.predictor, MaskPredictor):
            # L_mask reads only the channel of each RoI's class (section 3): compute that one alone
            roi_features = self.head(self.pooler(features, boxes_to_rois(boxes)))  # [R+, C, M/2, M/2]
            mask_size = 2 * roi_features.shape[-1]  # the predictor's 2x2 stride-2 deconvolution doubles it
            labels, targets_per_roi = self.training_targets(targets, boxes, matched_gt_index, mask_size)
            class_logits = self.predictor.class_mask_logits(roi_features, labels)  # [R+, 1, M, M]
            return {"loss_mask": class_agnostic_mask_loss(class_logits, targets_per_roi)}  # = mask_loss of the K logits
        mask_logits = self.mask_logits(features, boxes)  # [R+, K, M, M]
        labels, targets_per_roi = self.training_targets(targets, boxes, matched_gt_index, mask_logits.shape[-1])
        if self.class_agnostic:  # Table 2b: one mask, whatever the class
            return {"loss_mask": class_agnostic_mask_loss(mask_logits, targets_per_roi)}
        if self.loss_function == "softmax":  # Table 2b: the K classes compete for each pixel
            return {"loss_mask": multinomial_mask_loss(mask_logits, labels, targets_per_roi)}
        return {"loss_mask": mask_loss(mask_logits, labels, targets_per_roi)}

    @staticmethod
    def positive_rois(rois: TrainingRoIs) -> tuple[list[Tensor], list[Tensor]]:
        """The RoIs the mask branch trains on: per image, boxes `[R_i+, 4]` and matched_gt_index `[R_i+]` of the positives."""
        positive = [torch.where(labels > 0)[0] for labels in rois.labels]  # [R_i+] per image
        return [b[p] for b, p in zip(rois.boxes, positive)], [m[p] for m, p in zip(rois.matched_gt_index, positive)]

    @staticmethod
    def training_targets(
        targets: list[dict[str, Tensor]], boxes: list[Tensor], matched_gt_index: list[Tensor], mask_size: int
    ) -> tuple[Tensor, Tensor]:
        """The class `[R+]` int64 and the `M x M` mask target `[R+, M, M]` in [0, 1] of each positive RoI.

        A RoI's target is its object's mask ("masks" `[G, H, W]` of its image), cropped by the RoI
        and resampled to M x M; RoIAlign's average of ones can round to 1 + 1e-7, hence the clamp
        (the loss checks [0, 1]).
        """
        targets_per_roi = torch.cat(
            [mask_targets(t["masks"], b, i, mask_size) for t, b, i in zip(targets, boxes, matched_gt_index)]
        ).clamp(0, 1)  # [R+, M, M]
        labels = torch.cat([t["labels"][i] for t, i in zip(targets, matched_gt_index)])  # [R+]
        return labels, targets_per_roi

    def predict(self, features: list[Tensor], detections: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Add "masks" `[D, 1, M, M]` to each image's detections: the sigmoid probabilities of the
        mask of each detection's own class (of the one mask when class-agnostic; the softmax
        probability of that class with the softmax loss). Returns new dicts; the other fields
        are the same tensors."""
        mask_logits = self.mask_logits(features, [d["boxes"] for d in detections])  # [D, K, M, M] ([D, 1, M, M])
        labels = torch.cat([d["labels"] for d in detections])  # [D]
        if self.class_agnostic:
            labels = torch.zeros_like(labels)  # [D]: channel 0 is every class's mask
        detection_index = torch.arange(labels.shape[0], device=labels.device)  # [D]
        if self.loss_function == "softmax":
            probabilities = mask_logits.softmax(dim=1)[detection_index, labels][:, None]  # [D, 1, M, M]
        else:
            probabilities = mask_logits[detection_index, labels].sigmoid()[:, None]  # [D, 1, M, M]: the predicted class only
        per_image = probabilities.split([d["labels"].shape[0] for d in detections])
        return [{**d, "masks": masks} for d, masks in zip(detections, per_image)]

    def torchvision_key_map(self, legacy: bool = False) -> dict[str, str]:
        """Our state-dict keys (relative to this branch) -> the keys of torchvision's Mask R-CNN.

        For example `head.layers.0.weight -> roi_heads.mask_head.0.0.weight` (or
        `roi_heads.mask_head.mask_fcn1.weight` with `legacy=True`) and
        `predictor.deconv.weight -> roi_heads.mask_predictor.conv5_mask.weight`.
        """
        key_map = {f"head.{k}": f"roi_heads.mask_head.{v}" for k, v in self.head.torchvision_key_map(legacy).items()}
        key_map.update(
            {f"predictor.{k}": f"roi_heads.mask_predictor.{v}" for k, v in self.predictor.torchvision_key_map().items()}
        )
        return key_map
