"""Code written for torchvision's detection API, run with this project's model: a thin layer, not a lesson.

torchvision's fine-tuning tutorial and its reference scripts (`references/detection/engine.py`)
talk to a Mask R-CNN through a few names. This module gives the project's `MaskRCNN` those names,
so that such code runs with the fewest changes (usually the import lines):

    from mrcnn.torchvision_compat import FastRCNNPredictor, MaskRCNNPredictor, maskrcnn_resnet50_fpn

    model = maskrcnn_resnet50_fpn(weights="maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth")  # a path: nothing is downloaded
    in_features = model.roi_heads.box_predictor.cls_score.in_features
    model.roi_heads.box_predictor = FastRCNNPredictor(in_features, num_classes)
    in_features_mask = model.roi_heads.mask_predictor.conv5_mask.in_channels
    model.roi_heads.mask_predictor = MaskRCNNPredictor(in_features_mask, 256, num_classes)

What it provides:

- `model.roi_heads.box_predictor` / `.mask_predictor` with torchvision's attribute names
  (`cls_score`, `bbox_pred`; `conv5_mask`, `mask_fcn_logits`); assigning a predictor (torchvision's
  own classes, or the ones here with their constructor signatures) installs its layers in the
  model and keeps `model.config.num_classes` equal to the heads' class count.
- `model(images, targets)` also accepts a 4-D batch `[N, 3, H, W]` and integer boxes, as
  torchvision's does.

What stays different is listed in README.md ("Code written for torchvision"), with a one-line
workaround each. The model underneath is the same `MaskRCNN`: everything else works as documented.
"""

from __future__ import annotations

import os

from torch import Tensor, nn

from mrcnn.box_head import BoxPredictor
from mrcnn.config import MaskRCNNConfig, torchvision_maskrcnn_resnet50_fpn
from mrcnn.mask_head import MaskPredictor
from mrcnn.model import MaskRCNN
from mrcnn.weights import load_pretrained


class FastRCNNPredictor(nn.Module):
    """torchvision's `FastRCNNPredictor(in_channels, num_classes)`: `cls_score` and `bbox_pred` layers."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)


class MaskRCNNPredictor(nn.Module):
    """torchvision's `MaskRCNNPredictor(in_channels, dim_reduced, num_classes)`: `conv5_mask` and `mask_fcn_logits`,
    initialized as torchvision does."""

    def __init__(self, in_channels: int, dim_reduced: int, num_classes: int):
        super().__init__()
        self.conv5_mask = nn.ConvTranspose2d(in_channels, dim_reduced, 2, 2, 0)
        self.mask_fcn_logits = nn.Conv2d(dim_reduced, num_classes, 1, 1, 0)
        for layer in (self.conv5_mask, self.mask_fcn_logits):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")


class _BoxPredictorView:
    """Our `BoxPredictor` under torchvision's names (the same layers, not copies)."""

    def __init__(self, predictor: BoxPredictor):
        self.cls_score, self.bbox_pred = predictor.class_logits, predictor.box_deltas


class _MaskPredictorView:
    """Our `MaskPredictor` under torchvision's names (the same layers, not copies)."""

    def __init__(self, predictor: MaskPredictor):
        self.conv5_mask, self.mask_fcn_logits = predictor.deconv, predictor.mask_logits


class RoIHeads:
    """`model.roi_heads`: the box and mask predictors of a `MaskRCNN` under torchvision's names."""

    def __init__(self, model: MaskRCNN):
        self._model = model

    @property
    def box_predictor(self) -> _BoxPredictorView:
        return _BoxPredictorView(self._model.box_branch.predictor)

    @box_predictor.setter
    def box_predictor(self, predictor: nn.Module) -> None:
        """Install a predictor with `cls_score` [K, F] and `bbox_pred` [4K, F] layers; K becomes the model's class count."""
        ours = BoxPredictor(predictor.cls_score.in_features, predictor.cls_score.out_features)
        ours.class_logits, ours.box_deltas = predictor.cls_score, predictor.bbox_pred  # the very layers given
        self._model.box_branch.predictor = ours.to(predictor.cls_score.weight.device)
        self._model.config = self._model.config.replace(num_classes=predictor.cls_score.out_features)

    @property
    def mask_predictor(self) -> _MaskPredictorView:
        if self._model.mask_branch is None:
            raise AttributeError("this model has no mask branch (config.mask=False)")
        return _MaskPredictorView(self._model.mask_branch.predictor)

    @mask_predictor.setter
    def mask_predictor(self, predictor: nn.Module) -> None:
        """Install a predictor with `conv5_mask` and `mask_fcn_logits` layers (K masks)."""
        if self._model.mask_branch is None:
            raise AttributeError("this model has no mask branch (config.mask=False)")
        deconv, logits = predictor.conv5_mask, predictor.mask_fcn_logits
        ours = MaskPredictor(deconv.in_channels, deconv.out_channels, logits.out_channels)
        ours.deconv, ours.mask_logits = deconv, logits  # the very layers given
        self._model.mask_branch.predictor = ours.to(logits.weight.device)


class TorchvisionMaskRCNN(MaskRCNN):
    """`MaskRCNN` with torchvision's interface on top (module docstring). Same weights, same numbers."""

    @property
    def roi_heads(self) -> RoIHeads:
        return RoIHeads(self)

    def forward(self, images: list[Tensor] | Tensor, targets: list[dict[str, Tensor]] | None = None):
        """As `MaskRCNN.forward`; also a batch `[N, 3, H, W]`, and targets with integer boxes."""
        if isinstance(images, Tensor) and images.dim() == 4:
            images = list(images.unbind(0))  # N images [3, H, W]
        if targets is not None:
            targets = [{**t, "boxes": t["boxes"].float()} if "boxes" in t and not t["boxes"].is_floating_point() else t
                       for t in targets]  # fmt: skip
        self.check_predictors()
        return super().forward(images, targets)

    def check_predictors(self) -> None:
        """After a predictor swap, the box and mask predictors must agree on the class count."""
        masks = self.mask_branch.predictor.num_masks if self.mask_branch is not None else 1
        if masks not in (1, self.config.num_classes):
            raise ValueError(f"the box predictor has {self.config.num_classes} classes but the mask predictor {masks}: "
                             "replace model.roi_heads.mask_predictor too")  # fmt: skip


def maskrcnn_resnet50_fpn(weights: str | os.PathLike | None = None, num_classes: int | None = None,
                          config: MaskRCNNConfig | None = None) -> TorchvisionMaskRCNN:  # fmt: skip
    """torchvision's `maskrcnn_resnet50_fpn`, as ours: `weights` is a file path (a torchvision COCO
    state dict, a checkpoint of ours, or an ImageNet ResNet), never a download, loaded by
    `load_pretrained` (layers of another class count are re-initialised, and named); `num_classes`
    defaults to the config's (91, as torchvision's). `config` replaces the preset (e.g. a smaller
    model for tests)."""
    config = config if config is not None else torchvision_maskrcnn_resnet50_fpn()
    if num_classes is not None:
        config = config.replace(num_classes=num_classes)
    model = TorchvisionMaskRCNN(config)
    if weights is not None:
        load_pretrained(model, weights)
    return model

