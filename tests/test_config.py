"""The config (mrcnn/config.py): paper defaults, presets, the ablation switches and their validation."""

import pytest

from mrcnn.config import PRESETS, MaskRCNNConfig, detectron2_r50_fpn_1x, shapes_small, torchvision_maskrcnn_resnet50_fpn
from mrcnn.mask_head import MaskHead, MaskPredictor, MLPMaskHead, MLPMaskPredictor
from mrcnn.model import MaskRCNN
from mrcnn.roi_align import roi_pool
from mrcnn.poolers import MultiLevelRoIAlign
from mrcnn.poolers import MultiLevelRoIPooler


def test_defaults_are_the_papers_choices():
    config = MaskRCNNConfig()
    assert (config.roi_pooler, config.mask_loss, config.class_agnostic_masks, config.mask_head) == ("align", "sigmoid", False, "fcn")
    assert torchvision_maskrcnn_resnet50_fpn() == config  # torchvision's preset is the paper's design
    assert detectron2_r50_fpn_1x().roi_pooler == "align"


def test_every_preset_builds_a_valid_config():
    for name, preset in PRESETS.items():
        assert isinstance(preset(), MaskRCNNConfig), name


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(roi_pooler="max"), "unknown roi_pooler 'max'"),
        (dict(roi_pooler="RoIAlign"), "unknown roi_pooler"),
        (dict(mask_loss="bce"), "unknown mask_loss 'bce'"),
        (dict(mask_head="conv"), "unknown mask_head 'conv'"),
        (dict(class_agnostic_masks=1), "class_agnostic_masks must be True or False"),
        (dict(class_agnostic_masks=True, mask_loss="softmax"), "softmax over it is constant"),
        (dict(num_classes=1), "num_classes"),
        (dict(backbone="resnet18"), "unknown backbone"),
        (dict(num_keypoints=-1), "num_keypoints"),
        (dict(architecture="c3"), "unknown architecture 'c3'"),
        (dict(anchor_sizes=(32, 64)), "one anchor size per level P2..P6"),
        (dict(architecture="c4", anchor_sizes=()), "anchor_sizes is empty"),
        (dict(architecture="c4", mask_pool_size=13), "mask_pool_size must be even"),
    ],
)
def test_bad_values_are_value_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        MaskRCNNConfig(**changes)
    with pytest.raises(ValueError, match=message):
        shapes_small().replace(**changes)  # replace validates too


def test_architecture_replaces_the_fpn_flag():
    assert MaskRCNNConfig().architecture == "fpn" and not hasattr(MaskRCNNConfig(), "fpn")
    c4 = MaskRCNNConfig(architecture="c4", anchor_sizes=(32, 64, 128))  # one level: any number of sizes
    assert c4.anchor_sizes == (32, 64, 128)


def test_config_is_frozen_and_replace_copies():
    config = shapes_small()
    with pytest.raises(AttributeError):
        config.mask_loss = "softmax"
    variant = config.replace(mask_loss="softmax")
    assert variant.mask_loss == "softmax" and config.mask_loss == "sigmoid"
    assert variant.replace(mask_loss="sigmoid") == config


@pytest.mark.parametrize("roi_pooler", ["align", "warp", "pool"])
def test_roi_pooler_switch_reaches_every_branch(roi_pooler):
    model = MaskRCNN(shapes_small().replace(roi_pooler=roi_pooler, num_keypoints=3, keypoint_head_channels=(8,) * 2))
    for branch in (model.box_branch, model.mask_branch, model.keypoint_branch):
        if roi_pooler == "align":
            assert isinstance(branch.pooler, MultiLevelRoIAlign)
        else:
            assert isinstance(branch.pooler, MultiLevelRoIPooler)
            assert (branch.pooler.pool is roi_pool) == (roi_pooler == "pool")
    assert model.box_branch.pooler.output_size == 7 and model.mask_branch.pooler.output_size == 14


@pytest.mark.parametrize("class_agnostic", [False, True])
@pytest.mark.parametrize("mask_head", ["fcn", "mlp"])
def test_mask_switches_choose_head_predictor_and_loss(class_agnostic, mask_head):
    config = shapes_small(num_classes=5).replace(class_agnostic_masks=class_agnostic, mask_head=mask_head)
    branch = MaskRCNN(config).mask_branch
    masks = 1 if class_agnostic else 5
    if mask_head == "fcn":
        assert type(branch.head) is MaskHead and type(branch.predictor) is MaskPredictor
        assert branch.predictor.mask_logits.out_channels == masks
    else:
        assert type(branch.head) is MLPMaskHead and type(branch.predictor) is MLPMaskPredictor
        assert branch.predictor.mask_logits.out_features == masks * 28 * 28 and branch.predictor.mask_size == 28
    assert (branch.predictor.num_masks == 1) is class_agnostic and branch.loss_function == "sigmoid"
    assert MaskRCNN(shapes_small().replace(mask_loss="softmax")).mask_branch.loss_function == "softmax"
