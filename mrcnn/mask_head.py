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

from mrcnn.box_head import TrainingRoIs
from mrcnn.boxes import geometry_dtype
from mrcnn.branch import RoIBranch
from mrcnn.norms import Norm
from mrcnn.mask_loss import gathered_mask_logits, mask_loss, mask_targets, multinomial_mask_loss


class MaskHead(nn.Module):
    """The FCN: 3x3 convolutions with ReLU, `[R, C, 14, 14]` -> `[R, layers[-1], 14, 14]`.

    Args:
        in_channels: C of the pooled RoI features.
        layers: the output channels of each convolution (four of 256 in the paper).
        dilation: of every convolution (padding follows, so the size is kept).
        norm: a normalization after each convolution (`mrcnn.norms`; Detectron's GN recipe), or None
            (the paper's head).
    """

    def __init__(self, in_channels: int = 256, layers: tuple[int, ...] = (256, 256, 256, 256), dilation: int = 1,
                 norm: Norm | None = None):  # fmt: skip
        super().__init__()
        channels = (in_channels, *layers)
        self.layers = nn.ModuleList(
            nn.Conv2d(c_in, c_out, kernel_size=3, padding=dilation, dilation=dilation)
            for c_in, c_out in zip(channels[:-1], channels[1:])
        )
        self.norms = nn.ModuleList(norm(c) for c in layers) if norm is not None else None
        for conv in self.layers:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def forward(self, roi_features: Tensor) -> Tensor:
        x = roi_features  # [R, C, 14, 14]
        for index, conv in enumerate(self.layers):
            x = conv(x)  # [R, 256, 14, 14]
            x = F.relu(self.norms[index](x) if self.norms is not None else x)
        return x

    def torchvision_key_map(self, legacy: bool = False) -> dict[str, str]:
        """Our keys -> `MaskRCNNHeads` keys: `layers.i.weight -> i.0.weight` (each torchvision layer
        is a conv + ReLU block), or `mask_fcn{i+1}.weight` with `legacy=True` (older checkpoints)."""
        key_map = {}
        if self.norms is not None:
            raise ValueError("a head with norms has no torchvision counterpart (torchvision's v1 heads have none)")
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

    @property
    def num_masks(self) -> int:
        """K, the masks per RoI (1 for the class-agnostic mask)."""
        return self.mask_logits.out_channels

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.deconv(x))  # [R, dim_reduced, 28, 28]
        return self.mask_logits(x)  # [R, K, 28, 28]

    def reset_classes(self, num_classes: int) -> None:
        """A fresh last layer for `num_classes` masks (fine-tuning to other classes); the deconvolution stays."""
        self.mask_logits = nn.Conv2d(self.deconv.out_channels, num_classes, kernel_size=1).to(self.deconv.weight.device)
        nn.init.kaiming_normal_(self.mask_logits.weight, mode="fan_out", nonlinearity="relu")

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

    @property
    def num_masks(self) -> int:
        """K, the masks per RoI (1 for the class-agnostic mask)."""
        return self.mask_logits.out_features // (self.mask_size * self.mask_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.mask_logits(x).reshape(x.shape[0], self.num_masks, self.mask_size, self.mask_size)  # [R, K, M, M]

    def reset_classes(self, num_classes: int) -> None:
        """A fresh last layer for `num_classes` masks (fine-tuning to other classes)."""
        fc = self.mask_logits
        self.mask_logits = nn.Linear(fc.in_features, num_classes * self.mask_size**2).to(fc.weight.device)

    def class_mask_logits(self, x: Tensor, labels: Tensor) -> Tensor:
        """The logits of one class per RoI, `labels` `[R]`: `[R, 1, M, M]` (all K computed: an MLP shares no work)."""
        return self(x)[torch.arange(x.shape[0], device=x.device), labels][:, None]  # [R, 1, M, M]

    def torchvision_key_map(self) -> dict[str, str]:
        raise ValueError("the MLP mask predictor is an ablation; torchvision has no such weights")


def softmax_decision(mask_logits: Tensor, channel: Tensor) -> Tensor:
    """How a per-pixel softmax over classes is read, as a semantic-segmentation FCN reads it: the
    pixel belongs to class k where k wins, `m_k > m_j` for every other channel j (the background
    among them). As a map that pastes and thresholds like a probability:
    `sigmoid(m_k - max_{j != k} m_j)`, above one half exactly where k is the argmax.

    mask_logits `[D, K, M, M]`, channel `[D]` (the class k of each detection) -> `[D, M, M]`.
    """
    index = torch.arange(channel.shape[0], device=channel.device)  # [D]
    own = mask_logits[index, channel]  # [D, M, M]: m_k
    others = mask_logits.clone()
    others[index, channel] = float("-inf")  # [D, K, M, M]: every channel but k
    return (own - others.amax(dim=1)).sigmoid()


class MaskBranch(RoIBranch):
    """Pooler, head and predictor of the mask branch, trained on positive RoIs, run on detections.

    Args:
        pooler: multi-level RoIAlign to 14 x 14 (sampling ratio 2 in torchvision), or another
            pooler with its interface (`mrcnn.poolers.MultiLevelRoIPooler`, Table 2c).
        head: `MaskHead` (the paper's FCN) or `MLPMaskHead` (the ablation).
        predictor: `MaskPredictor` or `MLPMaskPredictor`, giving `[R, K, M, M]` mask logits; a
            predictor of one channel (`num_masks == 1`) is the class-agnostic mask of Table 2b.
        loss: "sigmoid", the paper's per-class sigmoid (`mask_loss`), or "softmax", a per-pixel
            softmax over the K classes (`multinomial_mask_loss`, Table 2b). At inference a
            detection's mask is the sigmoid of its own class's mask, or, with the softmax, where
            its class wins the pixel (`softmax_decision`).
    """

    def __init__(self, pooler: nn.Module, head: nn.Module, predictor: nn.Module,
                 loss: Literal["sigmoid", "softmax"] = "sigmoid"):  # fmt: skip
        super().__init__(pooler, head, predictor)
        if loss not in ("sigmoid", "softmax"):
            raise ValueError(f"unknown mask loss {loss!r}; choose 'sigmoid' or 'softmax'")
        if predictor.num_masks == 1 and loss == "softmax":
            raise ValueError("a class-agnostic mask has one channel: a softmax over it is constant; use loss='sigmoid'")
        self.loss_function = loss

    mask_logits = RoIBranch.logits  # mask logits [R, K, M, M] for the boxes [R_i, 4] of every image

    def mask_channel(self, labels: Tensor) -> Tensor:
        """The mask channel of each RoI `[R]`: its class, or 0 for every class when there is one mask."""
        return labels if self.predictor.num_masks > 1 else torch.zeros_like(labels)

    def loss(self, features: list[Tensor], rois: TrainingRoIs, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """`{"loss_mask": L_mask}` over the positive RoIs of the batch (a zero that backpropagates when there are none).

        rois: the box branch's `TrainingRoIs`; targets: per image, "masks" `[G, H, W]` and "labels" `[G]`.
        """
        boxes, matched_gt_index = self.positive_rois(rois)
        roi_features = self.head_features(features, boxes)  # [R+, C, M/2, M/2]
        labels = self.matched(targets, "labels", matched_gt_index)  # [R+]: k_r, the class of each RoI's object
        if self.loss_function == "softmax":  # Table 2b: the K classes compete for each pixel
            mask_logits = self.predictor(roi_features)  # [R+, K, M, M]
            mask_targets = self.mask_targets(targets, boxes, matched_gt_index, mask_logits.shape[-1])  # [R+, M, M]
            return {"loss_mask": multinomial_mask_loss(mask_logits, labels, mask_targets)}
        # L_mask reads one channel per RoI, mask_logits[r, k_r] (section 3): compute that channel alone
        class_logits = self.predictor.class_mask_logits(roi_features, self.mask_channel(labels))  # [R+, 1, M, M]
        mask_targets = self.mask_targets(targets, boxes, matched_gt_index, class_logits.shape[-1])  # [R+, M, M]
        own_channel = torch.zeros_like(labels)  # [R+]: channel 0 of class_logits is each RoI's class k_r
        return {"loss_mask": mask_loss(class_logits, own_channel, mask_targets, validate=False)}

    @staticmethod
    def mask_targets(targets: list[dict[str, Tensor]], boxes: list[Tensor], matched_gt_index: list[Tensor],
                     mask_size: int) -> Tensor:  # fmt: skip
        """The M x M target `[R+, M, M]` in [0, 1] of each positive RoI: its object's mask ("masks"
        `[G, H, W]` of its image) cropped by the RoI and resampled to M x M (`mrcnn.mask_loss.mask_targets`)."""
        return torch.cat([mask_targets(t["masks"], b, i, mask_size) for t, b, i in zip(targets, boxes, matched_gt_index)])

    def predict(self, features: list[Tensor], detections: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Add "masks" `[D, 1, M, M]` to each image's detections: the sigmoid probabilities of the
        mask of each detection's own class (of the one mask when class-agnostic; with the softmax
        loss, `softmax_decision`, above one half where that class wins the pixel). Returns new
        dicts; the other fields are the same tensors."""
        mask_logits = self.logits(features, [d["boxes"] for d in detections])  # [D, K, M, M] ([D, 1, M, M])
        channel = self.mask_channel(torch.cat([d["labels"] for d in detections]))  # [D]
        detection_index = torch.arange(channel.shape[0], device=channel.device)  # [D]
        mask_logits = geometry_dtype(mask_logits)  # the probabilities are pasted into the image in float32
        if self.loss_function == "softmax":  # a per-pixel softmax decides by its largest class
            probabilities = softmax_decision(mask_logits, channel)[:, None]  # [D, 1, M, M]
        else:
            # [D, 1, M, M]: the predicted class only
            probabilities = mask_logits[detection_index, channel].sigmoid()[:, None]
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
