"""Code written for torchvision runs with this model (mrcnn/torchvision_compat.py): the fine-tuning
tutorial's steps on the shapes, and its names.

torchvision's tutorial (PennFudan) takes a COCO-pretrained model, swaps the box and mask predictors
for its own number of classes, trains, and evaluates box and mask AP. Here the same steps, with the
small preset so that training takes seconds; with torchvision installed, its own predictor classes
are swapped in.
"""

import pytest
import torch

from mrcnn.config import shapes_small
from mrcnn.data.coco import CocoDataset
from mrcnn.data.shapes import generate_shapes
from mrcnn.evaluate import evaluate
from mrcnn.torchvision_compat import FastRCNNPredictor, MaskRCNNPredictor, maskrcnn_resnet50_fpn

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tutorial(tmp_path, box_predictor_class, mask_predictor_class):
    """The tutorial's steps: a pretrained model (91 classes), new predictors for 5, a few steps, COCO AP."""
    paths = generate_shapes(tmp_path / "shapes", num_train=6, num_val=3, workers=0)
    dataset, held_out = CocoDataset(paths.train_images, paths.train_annotations), CocoDataset(paths.val_images, paths.val_annotations)
    torch.manual_seed(0)
    pretrained = maskrcnn_resnet50_fpn(config=shapes_small(num_classes=91))
    torch.save({"format": "mrcnn-checkpoint", "model": pretrained.state_dict()}, tmp_path / "pretrained.pt")

    model = maskrcnn_resnet50_fpn(weights=tmp_path / "pretrained.pt", config=shapes_small(num_classes=91))
    num_classes = dataset.num_classes  # 4 shapes + background
    in_features = model.roi_heads.box_predictor.cls_score.in_features
    model.roi_heads.box_predictor = box_predictor_class(in_features, num_classes)
    in_features_mask = model.roi_heads.mask_predictor.conv5_mask.in_channels
    model.roi_heads.mask_predictor = mask_predictor_class(in_features_mask, 64, num_classes)
    assert model.config.num_classes == num_classes == 5

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.005, momentum=0.9, weight_decay=0.0005)
    model.train()
    for step in range(4):  # engine.train_one_epoch, with a batch of 2 stacked as a 4-D tensor and int boxes
        images, targets = zip(*(dataset[i] for i in (2 * step % 6, (2 * step + 1) % 6)))
        targets = [{**t, "boxes": t["boxes"].round().to(torch.int64)} for t in targets]
        loss_dict = model(torch.stack(images), targets)
        losses = sum(loss for loss in loss_dict.values())
        optimizer.zero_grad()
        losses.backward()
        optimizer.step()
        assert torch.isfinite(losses)
    metrics = evaluate(model, held_out, "cpu", output_dir=tmp_path / "eval", progress=False)
    return model, metrics


def test_the_fine_tuning_tutorial_runs(tmp_path):
    model, metrics = tutorial(tmp_path, FastRCNNPredictor, MaskRCNNPredictor)
    assert set(metrics) == {"bbox", "segm"} and all(0 <= m["AP"] <= 1 for m in metrics.values())
    assert model.box_branch.predictor.class_logits.out_features == 5 and model.mask_branch.predictor.num_masks == 5


def test_the_predictors_are_the_models_own_layers():
    model = maskrcnn_resnet50_fpn(config=shapes_small(num_classes=91))
    new = FastRCNNPredictor(model.roi_heads.box_predictor.cls_score.in_features, 3)
    model.roi_heads.box_predictor = new
    assert model.box_branch.predictor.class_logits is new.cls_score  # no copy: the optimizer sees what trains
    assert model.roi_heads.box_predictor.bbox_pred is new.bbox_pred
    with pytest.raises(ValueError, match="the box predictor has 3 classes but the mask predictor 91"):
        model.eval()([torch.rand(3, 64, 64)])


@pytest.mark.torchvision
def test_the_tutorial_with_torchvisions_own_predictor_classes(tmp_path):
    predictors = pytest.importorskip("torchvision.models.detection.faster_rcnn")
    mask_rcnn = pytest.importorskip("torchvision.models.detection.mask_rcnn")
    model, metrics = tutorial(tmp_path, predictors.FastRCNNPredictor, mask_rcnn.MaskRCNNPredictor)
    assert model.box_branch.predictor.class_logits.out_features == 5 and set(metrics) == {"bbox", "segm"}
