"""Checkpoint import: torchvision's Mask R-CNN and ImageNet ResNets load strictly and give the same results.

Without torchvision, the loader is tested on state dicts written here with torchvision's key
names and shapes; with torchvision, the whole model is compared with torchvision's own on the
same weights and images, intermediates included.
"""

import pytest
import torch

from mrcnn.config import torchvision_maskrcnn_resnet50_fpn
from mrcnn.model import MaskRCNN
from mrcnn.weights import from_torchvision, load_state_dict_file, load_torchvision_resnet_backbone, torchvision_to_ours


def torchvision_named_state_dict(model: MaskRCNN) -> dict:
    """Our model's weights under torchvision's names (the inverse of the import's key map)."""
    ours = model.state_dict()
    tv = {}
    for key, value in ours.items():
        if key.startswith("backbone."):
            name = key[len("backbone."):]
            for a, b in (("stem.conv.", "conv1."), ("stem.norm.", "bn1."), (".shortcut.conv.", ".downsample.0."),
                         (".shortcut.norm.", ".downsample.1.")):
                name = name.replace(a, b)
            for i in range(1, 4):
                name = name.replace(f".norm{i}.", f".bn{i}.")
            for stage in range(2, 6):
                if name.startswith(f"res{stage}."):
                    name = f"layer{stage - 1}." + name[len(f"res{stage}."):]
            tv[f"backbone.body.{name}"] = value
        elif key.startswith("fpn."):
            name = key[len("fpn."):].replace("lateral_convs.", "inner_blocks.").replace("output_convs.", "layer_blocks.")
            index, rest = name.split(".")[1], name.split(".", 2)[2]
            tv[f"backbone.fpn.{name.split('.')[0]}.{index}.0.{rest}"] = value
        elif key.startswith("rpn.head."):
            name = key[len("rpn.head."):]
            name = name.replace("conv.", "conv.0.0.").replace("objectness.", "cls_logits.").replace("box_deltas.", "bbox_pred.")
            tv[f"rpn.head.{name}"] = value
    for prefix, branch in (("box_branch.", model.box_branch), ("mask_branch.", model.mask_branch)):
        for our_key, their_key in branch.torchvision_key_map().items():
            tv[their_key] = ours[prefix + our_key]
    return tv


@pytest.fixture(scope="module")
def small_torchvision_model():
    torch.manual_seed(0)
    return MaskRCNN(torchvision_maskrcnn_resnet50_fpn(num_classes=3)).eval()


def test_round_trip_through_torchvision_names(small_torchvision_model, tmp_path):
    model = small_torchvision_model
    tv = torchvision_named_state_dict(model)
    assert len(tv) == len(model.state_dict())
    path = tmp_path / "maskrcnn.pth"
    torch.save(tv, path)
    loaded = from_torchvision(path)
    assert loaded.config.num_classes == 3
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    ours, unused = torchvision_to_ours(tv, model)
    assert unused == [] and set(ours) == set(model.state_dict())


def test_import_is_strict(small_torchvision_model, tmp_path):
    tv = torchvision_named_state_dict(small_torchvision_model)
    missing = dict(tv)
    del missing["roi_heads.mask_predictor.conv5_mask.weight"]
    with pytest.raises(ValueError, match="missing from the file"):
        from_torchvision(missing)
    extra = dict(tv, **{"roi_heads.keypoint_head.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unused"):
        from_torchvision(extra)
    wrong = dict(tv, **{"rpn.head.cls_logits.weight": torch.zeros(5, 256, 1, 1)})
    with pytest.raises(ValueError, match="shapes differ"):
        from_torchvision(wrong)
    with pytest.raises(ValueError, match="not a torchvision Mask R-CNN"):
        from_torchvision({"weight": torch.zeros(1)})


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="no such checkpoint file"):
        load_state_dict_file(tmp_path / "absent.pth")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pth: not a readable PyTorch checkpoint"):
        load_state_dict_file(broken)


def test_imagenet_resnet_into_backbone(small_torchvision_model):
    tv = torchvision_named_state_dict(small_torchvision_model)
    resnet = {k[len("backbone.body."):]: v.clone() + 1 for k, v in tv.items() if k.startswith("backbone.body.")}
    resnet["fc.weight"], resnet["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    model = MaskRCNN(torchvision_maskrcnn_resnet50_fpn(num_classes=3))
    load_torchvision_resnet_backbone(model, resnet)
    assert torch.equal(model.backbone.stem.conv.weight, resnet["conv1.weight"])
    del resnet["layer4.2.conv3.weight"]
    with pytest.raises(ValueError, match="missing"):
        load_torchvision_resnet_backbone(model, resnet)


def test_imagenet_resnet_into_the_c4_model_fills_its_res5_head(small_torchvision_model):
    from mrcnn.config import paper_r50_c4

    tv = torchvision_named_state_dict(small_torchvision_model)
    resnet = {k[len("backbone.body."):]: v.clone() + 1 for k, v in tv.items() if k.startswith("backbone.body.")}
    model = MaskRCNN(paper_r50_c4(num_classes=3))
    load_torchvision_resnet_backbone(model, resnet)
    assert torch.equal(model.backbone.res4[5].conv3.weight, resnet["layer3.5.conv3.weight"])
    assert torch.equal(model.box_branch.head.res5[2].conv3.weight, resnet["layer4.2.conv3.weight"])
    assert torch.equal(model.mask_branch.head.res5[0].shortcut.norm.running_var, resnet["layer4.0.downsample.1.running_var"])
    del resnet["layer4.1.conv2.weight"]
    with pytest.raises(ValueError, match="missing"):
        load_torchvision_resnet_backbone(model, resnet)


# --- the same detections as torchvision ---------------------------------------------------------


def _randomize_frozen_bn(module: torch.nn.Module, generator: torch.Generator) -> None:
    for name, buffer in module.named_buffers():
        if name.endswith(("running_mean", "bias")):
            buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
        elif name.endswith(("running_var", "weight")) and buffer.dim() == 1:
            buffer.copy_(torch.rand(buffer.shape, generator=generator) * 0.5 + 0.75)


def assert_same_detections(ours: dict, theirs: dict, limit: int, tie: float = 1e-6) -> None:
    """The same detections: each of ours is one of theirs, with the same label, box (to 1e-3 px
    and 1e-4 of the coordinate), score (to `tie`) and mask, both lists best score first.

    The two models compute the scores with the same operations in another order, so they agree to
    a few float32 ulps (9e-8 measured, with torch 2.14.1), not bit for bit. Where `limit`
    detections are kept, the cut can fall between two candidates closer than that, which is a tie:
    either may be kept (torch 2.11 with torchvision 0.26 kept another 100th detection). So a
    detection without a partner must lie at the cut: the list is full and its score is within
    `tie` of the other side's last kept score. Every other detection must pair up.
    """
    for side in (ours, theirs):
        assert torch.all(side["scores"][:-1] >= side["scores"][1:])  # best first
    assert ours["scores"].shape == theirs["scores"].shape
    boxes_close = (ours["boxes"][:, None] - theirs["boxes"][None]).abs() <= 1e-3 + 1e-4 * theirs["boxes"][None].abs()
    pairs = boxes_close.all(-1) & (ours["labels"][:, None] == theirs["labels"][None])  # [D, D]
    assert pairs.sum(0).le(1).all() and pairs.sum(1).le(1).all()  # after NMS no two alike in one class
    i, j = torch.where(pairs)
    torch.testing.assert_close(ours["scores"][i], theirs["scores"][j], atol=tie, rtol=0)
    # pasting sums the same weighted pixels in another order, into boxes that agree to ~1e-3 px: where a
    # mask changes fast, a few pixels differ in the 4th decimal (9.2e-4 at 4 pixels of 6 million, measured
    # with MKL's reproducible mode, which mrcnn asks for: MKL_CBWR=AUTO,STRICT); nearly all agree to 5e-4
    torch.testing.assert_close(ours["masks"][i], theirs["masks"][j], atol=2e-3, rtol=1e-3)
    assert ((ours["masks"][i] - theirs["masks"][j]).abs() > 5e-4).float().mean() < 1e-5
    decided = (theirs["masks"][j] - 0.5).abs() > 1e-3  # untrained masks hover near 0.5
    assert torch.equal((ours["masks"][i] >= 0.5)[decided], (theirs["masks"][j] >= 0.5)[decided])
    alone_ours, alone_theirs = ours["scores"][~pairs.any(1)], theirs["scores"][~pairs.any(0)]
    if alone_ours.numel() or alone_theirs.numel():  # a tie at the top-`limit` cut
        assert ours["scores"].shape[0] == limit, "detections without a partner, and no cut"
        assert torch.all(alone_ours <= theirs["scores"][-1] + tie) and torch.all(alone_theirs <= ours["scores"][-1] + tie)


@pytest.mark.torchvision
@pytest.mark.slow
def test_same_detections_as_torchvision(tmp_path):
    tv = pytest.importorskip("torchvision")
    from torchvision.models import resnet50
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.mask_rcnn import MaskRCNN as TorchvisionMaskRCNN
    from torchvision.ops.misc import FrozenBatchNorm2d

    # maskrcnn_resnet50_fpn as built for pretrained weights (frozen batch norm, 3 trainable stages),
    # with 3 classes so that an untrained model still scores boxes above the 0.05 threshold
    torch.manual_seed(0)
    body = resnet50(norm_layer=FrozenBatchNorm2d)
    reference = TorchvisionMaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=3).eval()
    with torch.no_grad():
        _randomize_frozen_bn(reference.backbone.body, torch.Generator().manual_seed(1))
        # untrained features are large: soften the classifier so that foreground scores pass 0.05
        reference.roi_heads.box_predictor.cls_score.weight.mul_(1e-3)
        reference.roi_heads.box_predictor.cls_score.bias.copy_(torch.tensor([0.0, 0.5, 0.2]))
    path = tmp_path / "maskrcnn_resnet50_fpn.pth"
    torch.save(reference.state_dict(), path)
    # torchvision's bits need its plain convolutions; the default folds the frozen batch norm (mrcnn/fuse.py)
    model = from_torchvision(path, torchvision_maskrcnn_resnet50_fpn(num_classes=3).replace(fast_convolutions=False))

    generator = torch.Generator().manual_seed(2)
    images = [torch.rand(3, 240, 320, generator=generator), torch.rand(3, 300, 200, generator=generator)]
    with torch.no_grad():
        # intermediates: the batch, the feature pyramid and the proposals
        batch, image_sizes, _ = model.transform(images)
        tv_batch, _ = reference.transform(images)
        assert torch.allclose(batch, tv_batch.tensors, atol=1e-6) and image_sizes == tv_batch.image_sizes
        features = model.fpn(model.backbone(batch))
        tv_features = list(reference.backbone(tv_batch.tensors).values())
        for ours, theirs in zip(features, tv_features):
            assert torch.equal(ours, theirs)
        proposals, _ = model.rpn(features, image_sizes, tuple(batch.shape[-2:]))
        tv_proposals, _ = reference.rpn(tv_batch, dict(zip(["0", "1", "2", "3", "pool"], tv_features)))
        for ours, theirs in zip(proposals, tv_proposals):
            assert torch.equal(ours, theirs)
        # the end result
        detections = model(images)
        expected = reference(images)
    for ours, theirs in zip(detections, expected):
        assert ours["boxes"].shape[0] > 10  # the comparison means something
        assert_same_detections(ours, theirs, limit=reference.roi_heads.detections_per_img)

    # the default, folded model: the same features and detections, to float rounding
    fast = from_torchvision(path)
    assert fast.config.fast_convolutions
    with torch.no_grad():
        fast_features = fast.fpn(fast.backbone(batch))
        fast_detections = fast(images)
    for ours, theirs in zip(fast_features, tv_features):
        assert float((ours - theirs).norm() / theirs.norm()) < 1e-5
    for ours, theirs in zip(fast_detections, expected):
        top = min(10, theirs["scores"].shape[0])  # the best-scored ones: far from ties at the NMS threshold
        torch.testing.assert_close(ours["scores"][:top], theirs["scores"][:top], atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(ours["boxes"][:top], theirs["boxes"][:top], atol=0.1, rtol=1e-3)
