"""Fine-tuning to your own classes: pretrained weights into a model of any class count (mrcnn/weights.py).

The file is written here with torchvision's names and shapes (tests/test_weights.py's inverse key
map), so nothing is downloaded: a 91-class `maskrcnn_resnet50_fpn` state dict, an ImageNet
ResNet-50, and a checkpoint of ours.
"""

import pytest
import torch

from mrcnn.config import paper_r50_c4, shapes_small, torchvision_maskrcnn_resnet50_fpn
from mrcnn.model import MaskRCNN
from mrcnn.weights import CLASS_SPECIFIC, from_torchvision, load_pretrained
from test_weights import torchvision_named_state_dict

COCO_CLASSES = 91


@pytest.fixture(scope="module")
def coco_file(tmp_path_factory):
    """A torchvision-format 91-class Mask R-CNN state dict on disk, and the model it was made from."""
    torch.manual_seed(0)
    source = MaskRCNN(torchvision_maskrcnn_resnet50_fpn(COCO_CLASSES))
    path = tmp_path_factory.mktemp("weights") / "maskrcnn_resnet50_fpn_coco.pth"
    torch.save(torchvision_named_state_dict(source), path)
    return path, source.state_dict()


def test_torchvision_coco_weights_into_a_four_class_model(coco_file, capsys):
    path, source = coco_file
    torch.manual_seed(1)
    model = MaskRCNN(torchvision_maskrcnn_resnet50_fpn(num_classes=4))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_pretrained(model, path)
    assert report.kind == "torchvision Mask R-CNN"
    assert report.reinitialised == sorted(k for k in model.state_dict() if k.startswith(CLASS_SPECIFIC))
    assert report.reinitialised == [
        "box_branch.predictor.box_deltas.bias", "box_branch.predictor.box_deltas.weight",
        "box_branch.predictor.class_logits.bias", "box_branch.predictor.class_logits.weight",
        "mask_branch.predictor.mask_logits.bias", "mask_branch.predictor.mask_logits.weight"]  # fmt: skip
    assert report.not_in_file == [] and report.unused == []
    for key, value in model.state_dict().items():
        expected = fresh[key] if key in report.reinitialised else source[key]
        assert torch.equal(value, expected), key
    assert model.config.num_classes == 4 and model.box_branch.predictor.class_logits.out_features == 4
    assert "re-initialised for this model's classes: box_branch.predictor.box_deltas.bias" in capsys.readouterr().out


def test_the_same_class_count_loads_everything(coco_file):
    path, source = coco_file
    model = MaskRCNN(torchvision_maskrcnn_resnet50_fpn(COCO_CLASSES))
    report = load_pretrained(model, path, verbose=False)
    assert report.reinitialised == [] and len(report.loaded) == len(source)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.items())


def test_a_class_count_mismatch_without_the_explicit_call_names_both_counts(coco_file):
    path, _ = coco_file
    with pytest.raises(ValueError, match="the file has 91 classes .* the config 4; .* load_pretrained"):
        from_torchvision(path, torchvision_maskrcnn_resnet50_fpn(num_classes=4))
    assert from_torchvision(path).config.num_classes == COCO_CLASSES  # without a config: the file's


def test_imagenet_resnet_fills_the_backbone_only(coco_file):
    path, source = coco_file
    resnet = {k[len("backbone.body."):]: v for k, v in torch.load(path).items() if k.startswith("backbone.body.")}
    resnet["fc.weight"], resnet["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    model = MaskRCNN(torchvision_maskrcnn_resnet50_fpn(num_classes=3))
    report = load_pretrained(model, resnet, verbose=False)
    assert report.kind == "ImageNet ResNet" and report.reinitialised == []
    assert set(report.loaded) == {k for k in source if k.startswith("backbone.")}
    assert report.not_in_file and all(not k.startswith("backbone.") for k in report.not_in_file)
    assert torch.equal(model.backbone.res5[2].conv3.weight, source["backbone.res5.2.conv3.weight"])
    c4 = MaskRCNN(paper_r50_c4(num_classes=3))
    load_pretrained(c4, resnet, verbose=False)
    assert torch.equal(c4.box_branch.head.res5[2].conv3.weight, source["backbone.res5.2.conv3.weight"])


def test_our_own_checkpoint_into_other_classes(tmp_path):
    torch.manual_seed(0)
    pretrained = MaskRCNN(shapes_small(num_classes=5))
    torch.save({"format": "mrcnn-checkpoint", "model": pretrained.state_dict()}, tmp_path / "checkpoint.pt")
    model = MaskRCNN(shapes_small(num_classes=3))
    report = load_pretrained(model, tmp_path / "checkpoint.pt", verbose=False)
    assert report.kind == "mrcnn checkpoint" and len(report.reinitialised) == 6
    assert torch.equal(model.fpn.output_convs[0].weight, pretrained.fpn.output_convs[0].weight)


def test_bad_files_are_named(tmp_path, coco_file):
    path, _ = coco_file
    other = {"encoder.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match="state dict: not a Mask R-CNN or ResNet weights file"):
        load_pretrained(MaskRCNN(shapes_small()), other)
    # the torchvision file into the small trunk: the first tensor of another shape is named, nothing loads
    model = MaskRCNN(shapes_small())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"maskrcnn_resnet50_fpn_coco.pth: backbone\..* in the file but .* another architecture"):
        load_pretrained(model, path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_set_num_classes_keeps_the_config_and_the_heads_in_step():
    torch.manual_seed(0)
    model = MaskRCNN(shapes_small(num_classes=5))
    deconv = model.mask_branch.predictor.deconv.weight.clone()
    replaced = model.set_num_classes(8)
    assert model.config.num_classes == 8
    assert model.box_branch.predictor.class_logits.out_features == 8 and model.mask_branch.predictor.num_masks == 8
    assert set(replaced) == {k for k in model.state_dict() if k.startswith(CLASS_SPECIFIC)}
    assert torch.equal(model.mask_branch.predictor.deconv.weight, deconv)
    # a label of the new classes trains (the old K = 5 would have refused 7), and the model reloads
    image = torch.rand(3, 128, 128)
    target = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0]]), "labels": torch.tensor([7]),
              "masks": torch.zeros(1, 128, 128, dtype=torch.uint8)}  # fmt: skip
    target["masks"][0, 10:60, 10:60] = 1
    losses = model.train()([image], [target])
    assert all(torch.isfinite(v) for v in losses.values())
    again = MaskRCNN(model.config)
    again.load_state_dict(model.state_dict())
    agnostic = MaskRCNN(shapes_small().replace(class_agnostic_masks=True))
    agnostic.set_num_classes(3)
    assert agnostic.mask_branch.predictor.num_masks == 1  # one mask whatever the classes
