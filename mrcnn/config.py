"""One frozen dataclass holds every setting of the model; named presets fill it in.

The defaults are the paper's (section 3.1, "Implementation Details") as implemented by
torchvision's `maskrcnn_resnet50_fpn`. A variant is a new preset function, not a flag deep
inside a module: `dataclasses.replace(config, field=value)` derives one from another.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class MaskRCNNConfig:
    # --- data and transform -------------------------------------------------------------
    num_classes: int = 91  # K, background included (COCO's 80 categories keep their 1..90 ids in torchvision)
    min_size: int | tuple[int, ...] = 800  # shorter image side after resizing; a tuple picks one at random in training
    max_size: int = 1333  # cap on the longer side
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet statistics: the backbone was pretrained on them
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    size_divisible: int = 32  # pad so that every FPN level divides the image exactly

    # --- backbone and FPN ---------------------------------------------------------------
    backbone: Literal["resnet50", "resnet101", "small"] = "resnet50"
    # Figure 4 (mrcnn/architectures.py): "fpn" (P2..P6, light heads), "c4" (trunk to res4, stride 16,
    # res5 as the per-RoI head, M = 14) or "c5" (the whole trunk, stride 32, the FPN heads; Table 2d)
    architecture: Literal["fpn", "c4", "c5"] = "fpn"
    fpn_channels: int = 256
    trainable_stages: int = 3  # layer2..layer4 train, stem and layer1 stay frozen (paper: frozen BN, ImageNet init)
    # The backbone's normalization (mrcnn/norms.py): "frozen_bn" (the paper's, for ImageNet weights),
    # "bn" (learns, per forward pass), "sync_bn" (learns, statistics over all processes) or "gn"
    # (group norm, Detectron's from-scratch recipe); None: frozen for ResNet-50/101, "bn" for the small trunk
    norm: Literal["frozen_bn", "bn", "sync_bn", "gn"] | None = None
    # The normalization after each convolution of the FPN and the mask and keypoint heads: None (the
    # paper's heads, as torchvision's v1) or "bn", "sync_bn", "gn" (Detectron's GN recipe: "gn" for both)
    head_norm: Literal["bn", "sync_bn", "gn"] | None = None
    # Frozen batch norm folded into the convolutions and a channels-last batch (mrcnn/fuse.py):
    # about 1.3x faster convolutions on a CPU, equal to float rounding; False gives torchvision's bits
    fast_convolutions: bool = True

    # --- anchors and RPN (section 3, "Faster R-CNN"; FPN paper for the sizes) -------------
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # one size per level P2..P6 (C4, C5: all at the one level)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_top_n_train: int = 2000  # per level, before NMS
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000  # per image, after NMS
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_fg_iou_thresh: float = 0.7  # anchors with IoU >= 0.7 are positive ...
    rpn_bg_iou_thresh: float = 0.3  # ... < 0.3 negative, in between ignored
    rpn_batch_size_per_image: int = 256  # anchors sampled per image for the RPN loss
    rpn_positive_fraction: float = 0.5
    rpn_score_thresh: float = 0.0

    # --- RoI heads (section 3.1: "a RoI is positive if its IoU with a ground-truth box is at least 0.5")
    # The RoI pooler of every branch (box, mask, keypoint): "align" (RoIAlign, section 3), "warp"
    # (RoIWarp: bilinear, on the RoI quantized to the feature grid) or "pool" (RoIPool: quantized max);
    # the paper's Table 2c compares them (mrcnn/roi_warp.py)
    roi_pooler: Literal["align", "warp", "pool"] = "align"
    roi_aligned: bool = False  # torchvision keeps the legacy RoIAlign; Detectron2 uses the half-pixel shift
    roi_sampling_ratio: int = 2  # samples per bin side; <= 0 is adaptive
    box_pool_size: int = 7  # C4 pools 2x this and res5 halves it
    mask_pool_size: int = 14  # the mask is twice this (28) with FPN and C5, this (14) with C4
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    box_batch_size_per_image: int = 512  # "N sampled RoIs per image ... 512 for FPN"
    box_positive_fraction: float = 0.25  # "a ratio of 1:3 of positive to negatives"
    box_coder_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    representation_size: int = 1024  # the two fc layers of the box head
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    detections_per_image: int = 100  # "the top 100 scoring boxes"

    # --- mask branch (section 3, "Mask Representation") ---------------------------------
    mask: bool = True  # False gives Faster R-CNN (the box-detection chapter)
    mask_head_channels: tuple[int, ...] = (256, 256, 256, 256)  # four 3x3 convs
    mask_predictor_channels: int = 256  # the 2x2 deconvolution
    # The ablations of Table 2b and 2e (mrcnn/mask_head.py, mrcnn/mask_loss.py):
    mask_loss: Literal["sigmoid", "softmax"] = "sigmoid"  # per-class sigmoid (paper) or per-pixel softmax over classes
    class_agnostic_masks: bool = False  # one mask per RoI (K = 1 output) instead of one per class
    mask_head: Literal["fcn", "mlp"] = "fcn"  # the FCN, or fc 1024 -> fc 1024 -> fc K M^2 on the flattened RoI

    # --- keypoint branch (section 5, "Mask R-CNN for Human Pose Estimation") -------------
    num_keypoints: int = 0  # J; > 0 adds the keypoint branch of mrcnn/keypoint_head.py (17 for COCO persons)
    keypoint_pool_size: int = 14
    keypoint_head_channels: tuple[int, ...] = (512,) * 8  # "eight 3x3 512-d conv layers"

    def __post_init__(self) -> None:
        if self.num_keypoints < 0:
            raise ValueError(f"num_keypoints must be >= 0 (0: no keypoint branch), got {self.num_keypoints}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must count the background and at least one class, got {self.num_classes}")
        if self.backbone not in ("resnet50", "resnet101", "small"):
            raise ValueError(f"unknown backbone {self.backbone!r}; choose resnet50, resnet101 or small")
        if self.roi_pooler not in ("align", "warp", "pool"):
            raise ValueError(f"unknown roi_pooler {self.roi_pooler!r}; choose 'align' (RoIAlign), 'warp' (RoIWarp) or 'pool' (RoIPool)")
        if self.mask_loss not in ("sigmoid", "softmax"):
            raise ValueError(f"unknown mask_loss {self.mask_loss!r}; choose 'sigmoid' (per class) or 'softmax' (over classes)")
        if self.mask_head not in ("fcn", "mlp"):
            raise ValueError(f"unknown mask_head {self.mask_head!r}; choose 'fcn' or 'mlp'")
        if not isinstance(self.class_agnostic_masks, bool):
            raise ValueError(f"class_agnostic_masks must be True or False, got {self.class_agnostic_masks!r}")
        if self.class_agnostic_masks and self.mask_loss == "softmax":
            raise ValueError("class_agnostic_masks=True has one mask channel, a softmax over it is constant; "
                             "use mask_loss='sigmoid'")
        if self.norm not in (None, "frozen_bn", "bn", "sync_bn", "gn"):
            raise ValueError(f"unknown norm {self.norm!r}; choose 'frozen_bn', 'bn', 'sync_bn' or 'gn'")
        if self.head_norm not in (None, "bn", "sync_bn", "gn"):
            raise ValueError(f"unknown head_norm {self.head_norm!r}; choose None, 'bn', 'sync_bn' or 'gn'")
        if self.architecture not in ("fpn", "c4", "c5"):
            raise ValueError(f"unknown architecture {self.architecture!r}; choose 'fpn', 'c4' or 'c5'")
        if len(self.anchor_sizes) != 5 and self.architecture == "fpn":
            raise ValueError(f"the FPN model needs one anchor size per level P2..P6, got {self.anchor_sizes}")
        if len(self.anchor_sizes) == 0:
            raise ValueError("anchor_sizes is empty; the RPN needs at least one anchor size")
        if self.architecture == "c4" and self.mask_pool_size % 2:
            raise ValueError(f"the C4 mask head halves (res5) then doubles (deconv) the {self.mask_pool_size} x "
                             f"{self.mask_pool_size} RoI features; mask_pool_size must be even")

    def replace(self, **changes) -> "MaskRCNNConfig":
        """A copy with some fields changed (the dataclass is frozen)."""
        return dataclasses.replace(self, **changes)


def from_scratch(config: MaskRCNNConfig) -> MaskRCNNConfig:
    """`config` for training without pretrained weights, torchvision's rule: nothing frozen, and a
    norm that learns (batch norm, unless the config names one). Frozen statistics of an untrained
    network are the identity, and a random ResNet-50 then starts with exploding activations (a first
    mask loss of 18 instead of 5)."""
    return config.replace(norm="bn" if config.norm in (None, "frozen_bn") else config.norm, trainable_stages=5)


def torchvision_maskrcnn_resnet50_fpn(num_classes: int = 91) -> MaskRCNNConfig:
    """The exact configuration of torchvision's `maskrcnn_resnet50_fpn` (v1 weights load into it)."""
    return MaskRCNNConfig(num_classes=num_classes)


def torchvision_keypointrcnn_resnet50_fpn(num_classes: int = 2, num_keypoints: int = 17) -> MaskRCNNConfig:
    """torchvision's `keypointrcnn_resnet50_fpn`: person and background, 17 keypoints, no mask branch,
    the shorter side drawn from 640..800 in training (section 5: "[640, 800] pixels")."""
    return MaskRCNNConfig(num_classes=num_classes, min_size=(640, 672, 704, 736, 768, 800), mask=False,
                          num_keypoints=num_keypoints)  # fmt: skip


def detectron2_r50_fpn_1x(num_classes: int = 81) -> MaskRCNNConfig:
    """Detectron2's `mask_rcnn_R_50_FPN_1x`: aligned RoIAlign with adaptive sampling, 80 classes + background."""
    return MaskRCNNConfig(num_classes=num_classes, roi_aligned=True, roi_sampling_ratio=0, rpn_post_nms_top_n_train=1000)


def paper_r50_c4(num_classes: int = 81) -> MaskRCNNConfig:
    """The paper's ResNet-50-C4 Mask R-CNN (Figure 4 left; the model of most of Table 2): one stride-16
    map, res5 as the head, 14 x 14 masks. Section 3.1: "N is 64 for the C4 backbone" RoIs per image
    in training, and "the proposal number is 300 for the C4 backbone" at test time; the RPN's
    12000 / 6000 candidates before NMS are Detectron's C4 settings."""
    return MaskRCNNConfig(
        num_classes=num_classes,
        architecture="c4",
        rpn_pre_nms_top_n_train=12000,
        rpn_pre_nms_top_n_test=6000,
        rpn_post_nms_top_n_test=300,
        box_batch_size_per_image=64,
    )


def shapes_small(num_classes: int = 5) -> MaskRCNNConfig:
    """A small model for the synthetic shapes data set that trains in minutes on a 2-core CPU.

    Small images, a narrow ResNet with basic blocks, fewer proposals and RoIs, and anchors
    sized for objects of 16 to 64 pixels. Everything else is the paper's design.
    """
    return MaskRCNNConfig(
        num_classes=num_classes,
        min_size=128,
        max_size=128,
        backbone="small",
        fpn_channels=64,
        trainable_stages=5,  # trained from scratch: nothing is frozen
        anchor_sizes=(8, 16, 32, 64, 128),
        rpn_pre_nms_top_n_train=600,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_train=300,
        rpn_post_nms_top_n_test=100,
        rpn_batch_size_per_image=128,
        box_batch_size_per_image=128,
        representation_size=256,
        mask_head_channels=(64, 64, 64, 64),
        mask_predictor_channels=64,
        detections_per_image=50,
    )


def shapes_small_c4(num_classes: int = 5) -> MaskRCNNConfig:
    """`shapes_small` as the C4 model (Figure 4 left): the small trunk to res4 (stride 16, 64 channels),
    every anchor at that map, its res5 (one basic block, 128 channels) as the head, 14 x 14 masks,
    and the paper's 64 RoIs per image for C4."""
    return shapes_small(num_classes).replace(architecture="c4", box_batch_size_per_image=64)


def shapes_small_c5(num_classes: int = 5) -> MaskRCNNConfig:
    """`shapes_small` as the stride-32 C5 model of Table 2d: the whole small trunk (128 channels), every
    anchor at C5, the FPN heads on C5 (mrcnn/architectures.py says why)."""
    return shapes_small(num_classes).replace(architecture="c5")


def figures_small(num_classes: int = 2, num_keypoints: int = 11, mask: bool = True) -> MaskRCNNConfig:
    """`shapes_small` as a Keypoint R-CNN for the stick figures of mrcnn/data/keypoints.py (section 5):
    one class, 11 keypoints, the paper's eight-convolution keypoint head at 64 channels, and the
    mask branch or not (the paper's Table 4 compares both)."""
    return shapes_small(num_classes).replace(num_keypoints=num_keypoints, keypoint_head_channels=(64,) * 8, mask=mask)


PRESETS = {
    "torchvision_maskrcnn_resnet50_fpn": torchvision_maskrcnn_resnet50_fpn,
    "torchvision_keypointrcnn_resnet50_fpn": torchvision_keypointrcnn_resnet50_fpn,
    "detectron2_r50_fpn_1x": detectron2_r50_fpn_1x,
    "paper_r50_c4": paper_r50_c4,
    "shapes_small": shapes_small,
    "shapes_small_c4": shapes_small_c4,
    "shapes_small_c5": shapes_small_c5,
    "figures_small": figures_small,
}
