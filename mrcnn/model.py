"""The whole Mask R-CNN, assembled by explicit constructor calls from one config (paper section 3).

    images -> transform -> backbone (C2..C5) -> FPN (P2..P6) -> RPN -> proposals
           -> box branch (RoIAlign 7x7, two fc, classes and boxes)
           -> mask branch (RoIAlign 14x14, four convs, deconv, K masks of 28x28)
           -> keypoint branch, when config.num_keypoints > 0 (section 5: J one-hot masks of 56x56)
           -> paste the masks into the original images

In training, `forward(images, targets)` returns the five losses of the multi-task objective
(section 3.1): `L = L_cls + L_box + L_mask`, plus the RPN's two (objectness and its box
regression), which train the proposals jointly. In evaluation it returns one dict of
detections per image, in the coordinates of the original images.

Shapes follow the book's legend: N images, C channels, K classes, R RoIs, D detections.
"""

from __future__ import annotations

from torch import Tensor, nn

from mrcnn.anchors import AnchorGenerator
from mrcnn.backbone import ResNet, resnet50, resnet101, resnet_small
from mrcnn.box_head import BoxBranch, BoxHead, BoxPredictor
from mrcnn.config import MaskRCNNConfig
from mrcnn.fpn import FeaturePyramidNetwork
from mrcnn.inference import paste_detection_masks
from mrcnn.keypoint_head import KeypointBranch, KeypointHead, KeypointPredictor
from mrcnn.mask_head import MaskBranch, MaskHead, MaskPredictor, MLPMaskHead, MLPMaskPredictor
from mrcnn.roi_warp import build_roi_pooler
from mrcnn.rpn import RegionProposalNetwork, RPNHead
from mrcnn.transform import ImageTransform, resize_boxes, resize_keypoints


def build_backbone(config: MaskRCNNConfig) -> ResNet:
    """The ResNet trunk the config names, with the stages before `trainable_stages` frozen."""
    frozen_stages = 4 - config.trainable_stages  # torchvision's trainable_layers=3 freezes the stem and res2
    if config.backbone == "resnet50":
        return resnet50(frozen_stages=frozen_stages)
    if config.backbone == "resnet101":
        return resnet101(frozen_stages=frozen_stages)
    return resnet_small(frozen_stages=frozen_stages)


def build_mask_head(config: MaskRCNNConfig, in_channels: int, pooled_size: int) -> tuple[nn.Module, nn.Module]:
    """The mask head and predictor the config names: the FCN (`[R, C, P, P]` -> `[R, K, 2P, 2P]`) or
    Table 2e's MLP (fc, fc, fc to `K x 2P x 2P`); K = 1 with `class_agnostic_masks` (Table 2b)."""
    num_masks = 1 if config.class_agnostic_masks else config.num_classes
    if config.mask_head == "mlp":
        hidden = (config.representation_size,) * 2  # the paper's 1024, 1024
        return MLPMaskHead(in_channels, pooled_size, hidden), MLPMaskPredictor(hidden[-1], num_masks, 2 * pooled_size)
    head = MaskHead(in_channels, config.mask_head_channels)
    return head, MaskPredictor(config.mask_head_channels[-1], config.mask_predictor_channels, num_masks)


class MaskRCNN(nn.Module):
    """Mask R-CNN with a ResNet-FPN backbone (paper Figure 4, right); `config.mask=False` gives Faster R-CNN."""

    def __init__(self, config: MaskRCNNConfig):
        super().__init__()
        self.config = config
        self.transform = ImageTransform(
            config.min_size, config.max_size, config.image_mean, config.image_std, config.size_divisible
        )
        self.backbone = build_backbone(config)
        self.fpn = FeaturePyramidNetwork(self.backbone.out_channels, config.fpn_channels, extra_max_pool=True)
        anchor_generator = AnchorGenerator(
            sizes=tuple((size,) for size in config.anchor_sizes),
            aspect_ratios=(tuple(config.aspect_ratios),) * len(config.anchor_sizes),
        )
        self.rpn = RegionProposalNetwork(
            anchor_generator,
            RPNHead(config.fpn_channels, len(config.aspect_ratios)),
            fg_iou_thresh=config.rpn_fg_iou_thresh,
            bg_iou_thresh=config.rpn_bg_iou_thresh,
            batch_size_per_image=config.rpn_batch_size_per_image,
            positive_fraction=config.rpn_positive_fraction,
            pre_nms_top_n=dict(training=config.rpn_pre_nms_top_n_train, testing=config.rpn_pre_nms_top_n_test),
            post_nms_top_n=dict(training=config.rpn_post_nms_top_n_train, testing=config.rpn_post_nms_top_n_test),
            nms_thresh=config.rpn_nms_thresh,
            score_thresh=config.rpn_score_thresh,
        )
        roi_strides = self.fpn.strides[:4]  # RoIs are pooled from P2..P5; P6 serves the RPN only
        self.box_branch = BoxBranch(
            build_roi_pooler(config.roi_pooler, config.box_pool_size, roi_strides, config.roi_sampling_ratio, config.roi_aligned),
            BoxHead(config.fpn_channels, config.box_pool_size, config.representation_size),
            BoxPredictor(config.representation_size, config.num_classes),
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
            self.mask_branch = MaskBranch(
                build_roi_pooler(config.roi_pooler, config.mask_pool_size, roi_strides, config.roi_sampling_ratio, config.roi_aligned),
                *build_mask_head(config, config.fpn_channels, config.mask_pool_size),
                loss=config.mask_loss,
                class_agnostic=config.class_agnostic_masks,
            )
        self.keypoint_branch = None
        if config.num_keypoints > 0:  # Keypoint R-CNN (section 5)
            self.keypoint_branch = KeypointBranch(
                build_roi_pooler(config.roi_pooler, config.keypoint_pool_size, roi_strides, config.roi_sampling_ratio, config.roi_aligned),
                KeypointHead(config.fpn_channels, config.keypoint_head_channels),
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
        features = self.fpn(self.backbone(batch))  # [P2, ..., P6], each [N, C, H_l, W_l]
        proposals, rpn_losses = self.rpn(features, image_sizes, tuple(batch.shape[-2:]), targets)
        roi_features = features[:4]  # P2..P5
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
            detections = self.mask_branch.predict(roi_features, detections)  # masks [D, 1, 28, 28]
        if self.keypoint_branch is not None:
            detections = self.keypoint_branch.predict(roi_features, detections)  # keypoints [D, J, 3]
        for detection, size, original in zip(detections, image_sizes, original_sizes):
            detection["boxes"] = resize_boxes(detection["boxes"], size, original)
            if "keypoints" in detection:
                detection["keypoints"] = resize_keypoints(detection["keypoints"], size, original)
        if self.mask_branch is not None:
            detections = paste_detection_masks(detections, original_sizes)  # masks [D, 1, H, W]
        return detections

    def check_labels(self, targets: list[dict[str, Tensor]]) -> None:
        """Raise a `ValueError` naming the image if a label is outside `[1, K)`."""
        for index, target in enumerate(targets):
            labels = target.get("labels")
            if labels is None or labels.numel() == 0:
                continue
            if int(labels.min()) < 1 or int(labels.max()) >= self.config.num_classes:
                raise ValueError(
                    f"image {index}: labels must be in [1, {self.config.num_classes}) "
                    f"(0 is the background), got {labels.tolist()}"
                )
