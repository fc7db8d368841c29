"""The ResNet backbone: frozen batch norm, shapes and strides, torchvision parity, freezing, speed."""

import pytest
import torch
from torch import nn

from mrcnn.backbone import (
    BasicBlock,
    Bottleneck,
    FrozenBatchNorm2d,
    ResNet,
    from_torchvision_resnet,
    res5_head,
    resnet50,
    resnet101,
    resnet_small,
    torchvision_resnet_key,
)
from mrcnn.fpn import FeaturePyramidNetwork


def randomize_norms(model: nn.Module) -> None:
    """Give every (frozen) batch norm non-trivial statistics, so that a wrong formula shows."""
    for module in model.modules():
        if isinstance(module, (FrozenBatchNorm2d, nn.BatchNorm2d)) or type(module).__name__ == "FrozenBatchNorm2d":
            with torch.no_grad():
                module.weight.copy_(torch.rand_like(module.weight) + 0.5)
                module.bias.copy_(torch.randn_like(module.bias) * 0.1)
                module.running_mean.copy_(torch.randn_like(module.running_mean) * 0.1)
                module.running_var.copy_(torch.rand_like(module.running_var) + 0.5)


def test_frozen_batch_norm_is_the_formula():
    norm = FrozenBatchNorm2d(5, eps=1e-3)
    randomize_norms(norm)
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    w, b, m, v = (t.double()[None, :, None, None] for t in (norm.weight, norm.bias, norm.running_mean, norm.running_var))
    expected = (x - m) / torch.sqrt(v + 1e-3) * w + b
    torch.testing.assert_close(norm.double()(x), expected, rtol=1e-12, atol=1e-12)
    assert not list(norm.parameters()), "a frozen norm has buffers only"


def test_frozen_batch_norm_equals_batch_norm_in_eval_and_loads_its_state():
    batch_norm = nn.BatchNorm2d(6).eval()
    randomize_norms(batch_norm)
    frozen = FrozenBatchNorm2d(6)
    frozen.load_state_dict(batch_norm.state_dict())  # num_batches_tracked is dropped
    x = torch.randn(3, 6, 5, 5)
    torch.testing.assert_close(frozen(x), batch_norm(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("height, width", [(64, 96), (67, 45)])
def test_resnet50_shapes_and_strides(height, width):
    model = resnet50()
    assert model.out_channels == [256, 512, 1024, 2048]
    assert model.strides == [4, 8, 16, 32]
    with torch.no_grad():
        features = model(torch.rand(2, 3, height, width))
    for feature, channels, stride in zip(features, model.out_channels, model.strides):
        # each stride-2 layer maps n to ceil(n / 2): conv1, max-pool, and the first block of res3..res5
        assert feature.shape == (2, channels, -(-height // stride), -(-width // stride))


def test_c4_backbone_stops_after_res4_and_res5_head_halves_roi_features():
    model = resnet50(last_stage=4)
    assert model.out_channels == [256, 512, 1024] and not hasattr(model, "res5")
    with torch.no_grad():
        features = model(torch.rand(1, 3, 64, 64))
        assert [f.shape[-1] for f in features] == [16, 8, 4]
        head = res5_head()
        assert head(torch.rand(3, 1024, 14, 14)).shape == (3, 2048, 7, 7)


def test_res5_head_of_the_small_trunk_uses_basic_blocks():
    model = resnet_small(last_stage=4)
    head = res5_head(model.out_channels[-1], 128, 1, nn.BatchNorm2d, BasicBlock)
    assert model.out_channels[-1] == 64 and isinstance(head[0], BasicBlock)
    assert head(torch.rand(3, 64, 14, 14)).shape == (3, 128, 7, 7)  # the small trunk's C5 width, stride 2


def test_resnet101_has_23_blocks_in_res4():
    assert len(resnet101().res4) == 23


def test_torchvision_key_map():
    assert torchvision_resnet_key("conv1.weight") == "stem.conv.weight"
    assert torchvision_resnet_key("bn1.running_var") == "stem.norm.running_var"
    assert torchvision_resnet_key("layer3.0.downsample.1.running_var") == "res4.0.shortcut.norm.running_var"
    assert torchvision_resnet_key("layer1.2.bn3.weight") == "res2.2.norm3.weight"
    assert torchvision_resnet_key("layer4.1.conv2.weight") == "res5.1.conv2.weight"
    assert torchvision_resnet_key("fc.weight") is None
    assert torchvision_resnet_key("layer1.0.bn1.num_batches_tracked") is None


@pytest.mark.torchvision
def test_resnet50_matches_torchvision_feature_for_feature():
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozenBatchNorm2d

    reference = torchvision.models.resnet50(weights=None, norm_layer=TorchvisionFrozenBatchNorm2d).eval()
    randomize_norms(reference)
    body = IntermediateLayerGetter(reference, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"})
    ours = resnet50().eval()
    ours.load_state_dict(from_torchvision_resnet(reference.state_dict()), strict=True)

    images = torch.rand(2, 3, 96, 72)
    with torch.no_grad():
        expected = list(body(images).values())
        features = ours(images)
    for ours_map, reference_map in zip(features, expected):
        torch.testing.assert_close(ours_map, reference_map, rtol=1e-5, atol=1e-5)

    # res5 as the C4 model's per-RoI head: torchvision's layer4 on 14 x 14 RoI features
    head = res5_head().eval()
    head.load_state_dict({k[len("res5."):]: v for k, v in from_torchvision_resnet(reference.state_dict()).items() if k.startswith("res5.")})
    roi_features = torch.rand(4, 1024, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(head(roi_features), reference.layer4(roi_features), rtol=1e-5, atol=1e-5)


@pytest.mark.torchvision
def test_loads_the_backbone_of_torchvision_maskrcnn():
    torchvision = pytest.importorskip("torchvision")
    reference = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    ours = resnet50(norm=nn.BatchNorm2d)  # the untrained torchvision model has trainable batch norm
    result = ours.load_state_dict(from_torchvision_resnet(reference.state_dict(), prefix="backbone.body."), strict=False)
    assert not result.unexpected_keys
    assert all(key.endswith("num_batches_tracked") for key in result.missing_keys)
    frozen = resnet50()
    frozen.load_state_dict(from_torchvision_resnet(reference.state_dict(), prefix="backbone.body."), strict=True)


@pytest.mark.torchvision
@pytest.mark.parametrize("frozen_stages", [-1, 0, 1, 2, 3, 4])
def test_frozen_stages_match_torchvision_trainable_layers(frozen_stages):
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    trainable_layers = 5 if frozen_stages == -1 else 4 - frozen_stages
    reference = _resnet_fpn_extractor(torchvision.models.resnet50(weights=None), trainable_layers)
    expected = {torchvision_resnet_key(name[len("body."):]) for name, p in reference.named_parameters() if name.startswith("body.") and p.requires_grad}
    ours = resnet50(norm=nn.BatchNorm2d, frozen_stages=frozen_stages)
    assert {name for name, p in ours.named_parameters() if p.requires_grad} == expected


def test_default_freezes_stem_and_res2_and_they_get_no_gradient():
    model = resnet_small(frozen_stages=1)
    model(torch.rand(1, 3, 64, 64))[-1].sum().backward()
    for name, parameter in model.named_parameters():
        frozen = name.startswith(("stem.", "res2."))
        assert parameter.requires_grad is not frozen, name
        assert (parameter.grad is None) is frozen, name
    assert all(not p.requires_grad for p in resnet50().stem.parameters())
    assert all(p.requires_grad for p in resnet50().res3.parameters())


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="one entry per stage"):
        ResNet(Bottleneck, (3, 4, 6))
    with pytest.raises(ValueError, match="last_stage"):
        ResNet(Bottleneck, (3, 4, 6, 3), last_stage=3)
    with pytest.raises(ValueError, match="frozen_stages"):
        ResNet(BasicBlock, (1, 1, 1, 1), frozen_stages=5)


def convolution_flops(model: nn.Module, *inputs) -> tuple[int, object]:
    """FLOPs (2 per multiply-add) of the convolutions in one forward pass, counted with hooks, and the output."""
    total = 0

    def count(module, _, output):
        nonlocal total
        total += 2 * output.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        output = model(*inputs)
    for handle in handles:
        handle.remove()
    return total, output


def test_small_resnet_is_cheap_enough_to_train_on_a_cpu():
    """Backbone + 64-channel FPN on a 256 x 256 image: 0.2 + 0.4 GFLOP forward.

    ResNet-50 with a 256-channel FPN needs 10.7 + 7.4 GFLOP on the same image. Forward and
    backward of the small pair take about 0.055 s of one CPU core, but many times that on a
    shared, loaded machine, which is why this test counts work instead of timing it.
    """
    backbone = resnet_small()
    fpn = FeaturePyramidNetwork(backbone.out_channels, out_channels=64)
    assert sum(p.numel() for p in backbone.parameters()) < 400_000
    backbone_flops, features = convolution_flops(backbone, torch.rand(1, 3, 256, 256))
    fpn_flops, _ = convolution_flops(fpn, features)
    assert 0.15e9 < backbone_flops < 0.25e9
    assert 0.3e9 < fpn_flops < 0.5e9
    large_flops, _ = convolution_flops(resnet50(), torch.rand(1, 3, 256, 256))
    assert large_flops > 40 * backbone_flops
