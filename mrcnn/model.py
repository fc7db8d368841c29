"""The whole Mask R-CNN, assembled by explicit constructor calls from one config (paper section 3).

    images -> transform -> backbone (C2..C5) -> FPN (P2..P6) -> RPN -> proposals
           -> box branch (RoIAlign 7x7, two fc, classes and boxes)
           -> mask branch (RoIAlign 14x14, four convs, deconv, K masks of 28x28)
           -> keypoint branch, when config.num_keypoints > 0 (section 5: J one-hot masks of 56x56)
           -> paste the masks into the original images

That is the ResNet-FPN model (Figure 4, right). `config.architecture` also builds the ResNet-C4
model of Figure 4 (left: the trunk stops at res4, the RPN and RoIAlign 14x14 read C4 alone, and
res5 is the head of both branches, giving K masks of 14x14) and the stride-32 ResNet-C5 model of
Table 2d (the whole trunk, one map, the FPN heads); mrcnn/architectures.py builds their heads.

In training, `forward(images, targets)` returns the five losses of the multi-task objective
(section 3.1): `L = L_cls + L_box + L_mask`, plus the RPN's two (objectness and its box
regression), which train the proposals jointly. In evaluation it returns one dict of
detections per image, in the coordinates of the original images.

Shapes follow the book's legend: N images, C channels, K classes, R RoIs, D detections, M mask size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mrcnn.anchors import AnchorGenerator
from mrcnn.architectures import backbone_norm, build_roi_pooler, c4_heads, fpn_heads, head_norm
from mrcnn.backbone import ResNet, resnet50, resnet101, resnet_small
from mrcnn.box_head import BoxBranch, BoxPredictor
from mrcnn.config import MaskRCNNConfig
from mrcnn.fpn import FeaturePyramidNetwork
from mrcnn.fuse import fold_frozen_batchnorm
from mrcnn.inference import paste_detection_masks
from mrcnn.keypoint_head import KeypointBranch, KeypointHead, KeypointPredictor
from mrcnn.mask_head import MaskBranch
from mrcnn.rpn import RegionProposalNetwork, RPNHead
from mrcnn.transform import ImageTransform, resize_boxes, resize_keypoints


def build_backbone(config: MaskRCNNConfig) -> ResNet:
    """The ResNet trunk the config names, with the stages before `trainable_stages` frozen; it stops
    after res4 for the C4 model (res5 becomes its head)."""
    frozen_stages = 4 - config.trainable_stages  # torchvision's trainable_layers=3 freezes the stem and res2
    last_stage = 4 if config.architecture == "c4" else 5
    norm = backbone_norm(config)
    if config.backbone == "resnet50":
        return resnet50(frozen_stages=frozen_stages, last_stage=last_stage, norm=norm)
    if config.backbone == "resnet101":
        return resnet101(frozen_stages=frozen_stages, last_stage=last_stage, norm=norm)
    return resnet_small(frozen_stages=frozen_stages, last_stage=last_stage, norm=norm)


class MaskRCNN(nn.Module):
    """Mask R-CNN (paper section 3): ResNet-FPN (Figure 4, right) by default, ResNet-C4 (Figure 4, left)
    or ResNet-C5 (Table 2d) by `config.architecture`; `config.mask=False` gives Faster R-CNN."""

    def __init__(self, config: MaskRCNNConfig):
        super().__init__()
        self.config = config
        self.transform = ImageTransform(
            config.min_size, config.max_size, config.image_mean, config.image_std, config.size_divisible
        )
        self.backbone = build_backbone(config)
        if config.fast_convolutions:
            fold_frozen_batchnorm(self.backbone)  # conv(x, w * scale) + bias: one pass instead of three
        self.fpn = None
        if config.architecture == "fpn":
            self.fpn = FeaturePyramidNetwork(self.backbone.out_channels, config.fpn_channels, extra_max_pool=True,
                                             norm=head_norm(config))  # fmt: skip
            channels, roi_strides = config.fpn_channels, self.fpn.strides[:4]  # RoIs from P2..P5; P6 serves the RPN only
            anchor_sizes = tuple((size,) for size in config.anchor_sizes)  # one size per level P2..P6
        else:  # one map, C4 (stride 16) or C5 (stride 32), for the RPN and the RoIs
            channels, roi_strides = self.backbone.out_channels[-1], (self.backbone.strides[-1],)
            anchor_sizes = (tuple(config.anchor_sizes),)  # every size at the one level
        anchor_generator = AnchorGenerator(anchor_sizes, (tuple(config.aspect_ratios),) * len(anchor_sizes))
        self.rpn = RegionProposalNetwork(
            anchor_generator,
            RPNHead(channels, anchor_generator.num_anchors_per_location()[0]),
            fg_iou_thresh=config.rpn_fg_iou_thresh,
            bg_iou_thresh=config.rpn_bg_iou_thresh,
            batch_size_per_image=config.rpn_batch_size_per_image,
            positive_fraction=config.rpn_positive_fraction,
            pre_nms_top_n=dict(training=config.rpn_pre_nms_top_n_train, testing=config.rpn_pre_nms_top_n_test),
            post_nms_top_n=dict(training=config.rpn_post_nms_top_n_train, testing=config.rpn_post_nms_top_n_test),
            nms_thresh=config.rpn_nms_thresh,
            score_thresh=config.rpn_score_thresh,
        )
        heads = c4_heads(config, channels) if config.architecture == "c4" else fpn_heads(config, channels)

        def pooler(size: int) -> nn.Module:  # the same pooler (Table 2c) for every branch
            return build_roi_pooler(config.roi_pooler, size, roi_strides, config.roi_sampling_ratio, config.roi_aligned)

        self.box_branch = BoxBranch(
            pooler(heads.box_pool_size),
            heads.box_head,
            heads.box_predictor,
            fg_iou_thresh=config.box_fg_iou_thresh,
            bg_iou_thresh=config.box_bg_iou_thresh,
            batch_size_per_image=config.box_batch_size_per_image,
            positive_fraction=config.box_positive_fraction,
            box_coder_weights=config.box_coder_weights,
            score_thresh=config.box_score_thresh,
            nms_thresh=config.box_nms_thresh,
            detections_per_image=config.detections_per_image,
        )
        self.mask_branch = None
        if config.mask:
            self.mask_branch = MaskBranch(pooler(heads.mask_pool_size), heads.mask_head, heads.mask_predictor,
                                          loss=config.mask_loss)  # class-agnostic: a predictor of one channel
        self.keypoint_branch = None
        if config.num_keypoints > 0:  # Keypoint R-CNN (section 5)
            self.keypoint_branch = KeypointBranch(
                pooler(config.keypoint_pool_size),
                KeypointHead(channels, config.keypoint_head_channels, norm=head_norm(config)),
                KeypointPredictor(config.keypoint_head_channels[-1], config.num_keypoints),
            )

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training: a dict of the five losses. Evaluation: per image, a dict of "boxes" `[D, 4]`,
        "labels" `[D]` int64, "scores" `[D]`, (with the mask branch) "masks" `[D, 1, H, W]`
        probabilities and (with the keypoint branch) "keypoints" `[D, J, 3]` and "keypoints_scores"
        `[D, J]`, in the coordinates of the original image `[3, H, W]`."""
        if self.training and targets is None:
            raise ValueError("training mode needs targets: one dict of 'boxes', 'labels' and 'masks' per image")
        if targets is not None:
            self.check_labels(targets)
        original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        batch, image_sizes, targets = self.transform(images, targets)  # [N, 3, H_pad, W_pad]
        if self.config.fast_convolutions:  # the layout oneDNN's CPU convolutions run fastest in
            batch = batch.contiguous(memory_format=torch.channels_last)
        features, roi_features = self.feature_maps(batch)  # FPN: [P2..P6] and [P2..P5]; C4, C5: [C4] or [C5]
        proposals, rpn_losses = self.rpn(features, image_sizes, tuple(batch.shape[-2:]), targets)
        if self.training:
            training_rois, box_losses = self.box_branch(roi_features, proposals, image_sizes, targets)
            losses = {**rpn_losses, **box_losses}
            if self.mask_branch is not None:
                losses.update(self.mask_branch.loss(roi_features, training_rois, targets))
            if self.keypoint_branch is not None:
                losses.update(self.keypoint_branch.loss(roi_features, training_rois, targets))
            return losses

        detections, _ = self.box_branch(roi_features, proposals, image_sizes)
        if self.mask_branch is not None:
            detections = self.mask_branch.predict(roi_features, detections)  # masks [D, 1, M, M]
        if self.keypoint_branch is not None:
            detections = self.keypoint_branch.predict(roi_features, detections)  # keypoints [D, J, 3]
        for detection, size, original in zip(detections, image_sizes, original_sizes):
            detection["boxes"] = resize_boxes(detection["boxes"], size, original)
            if "keypoints" in detection:
                detection["keypoints"] = resize_keypoints(detection["keypoints"], size, original)
        if self.mask_branch is not None:  # pasting is two matrix products: in float32, also under autocast
            with torch.autocast(batch.device.type, enabled=False):
                detections = paste_detection_masks(detections, original_sizes, validate=False)  # masks [D, 1, H, W]
        return detections

    def set_num_classes(self, num_classes: int) -> list[str]:
        """Fine-tuning to other classes: fresh class-specific layers for K = `num_classes` (background
        included), and `config.num_classes` set to K, so the two never disagree.

        Replaced: the box predictor's class scores and deltas, and the mask predictor's last layer
        (a class-agnostic mask has one channel whatever K: kept). Everything else keeps its weights.
        Returns the state-dict keys of the re-initialised tensors.
        """
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and at least one class, got {num_classes}")
        self.config = self.config.replace(num_classes=num_classes)
        device = self.box_branch.predictor.class_logits.weight.device
        self.box_branch.predictor = BoxPredictor(self.box_branch.predictor.class_logits.in_features, num_classes).to(device)
        replaced = ["box_branch.predictor."]
        if self.mask_branch is not None and self.mask_branch.predictor.num_masks > 1:
            self.mask_branch.predictor.reset_classes(num_classes)
            replaced.append("mask_branch.predictor.mask_logits.")
        return [key for key in self.state_dict() if key.startswith(tuple(replaced))]

    def feature_maps(self, batch: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """The maps the RPN reads and the maps the RoIs are pooled from, each `[N, C, H_l, W_l]`.

        FPN: P2..P6 and P2..P5. C4 and C5: the last map of the trunk (stride 16 or 32) for both.
        """
        features = self.backbone(batch)  # [C2, ..., C5] ([C2, C3, C4] for the C4 model)
        if self.fpn is None:
            return features[-1:], features[-1:]
        pyramid = self.fpn(features)  # [P2, ..., P6]
        return pyramid, pyramid[:4]

    def check_labels(self, targets: list[dict[str, Tensor]]) -> None:
        """Raise a `ValueError` naming the image if a label is outside `[1, K)`, or if, in training, a
        target lacks what a branch learns from ("masks" for the mask branch, "keypoints" for the keypoint branch)."""
        branches = {"masks": ("mask", self.mask_branch), "keypoints": ("keypoint", self.keypoint_branch)}
        needed = {field: name for field, (name, branch) in branches.items() if self.training and branch is not None}
        for index, target in enumerate(targets):
            for field, name in needed.items():
                if field not in target:
                    raise ValueError(f"image {index}: training the {name} branch needs target[{field!r}], "
                                     f"but the target has only {sorted(target)}")  # fmt: skip
            keypoints = target.get("keypoints")
            if self.keypoint_branch is not None and keypoints is not None and keypoints.dim() == 3 \
                    and keypoints.shape[1] != self.config.num_keypoints:
                raise ValueError(f"image {index}: targets have {keypoints.shape[1]} keypoints per object, "
                                 f"the model {self.config.num_keypoints}")  # fmt: skip
            labels = target.get("labels")
            if labels is None or labels.numel() == 0:
                continue
            if int(labels.min()) < 1 or int(labels.max()) >= self.config.num_classes:
                raise ValueError(
                    f"image {index}: labels must be in [1, {self.config.num_classes}) "
                    f"(0 is the background), got {labels.tolist()}"
                )
