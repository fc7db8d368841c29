"""The feature pyramid: the top-down sum by hand, shapes, initialization, torchvision parity."""

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from mrcnn.fpn import FeaturePyramidNetwork, from_torchvision_fpn, torchvision_fpn_key


def odd_sized_features(channels=(8, 16, 24, 32), height=37, width=50, batch=2):
    """C2..C5 as a ResNet gives them for an image of 4 * (height, width): each level ceil-halves."""
    features = []
    for c in channels:
        features.append(torch.randn(batch, c, height, width))
        height, width = -(-height // 2), -(-width // 2)
    return features


def test_top_down_sum_by_hand():
    """One channel, lateral = identity, output conv = identity: P_i = C_i + up(C_{i+1}) + up(up(C_{i+2})) ..."""
    fpn = FeaturePyramidNetwork([1, 1, 1], out_channels=1, in_strides=(4, 8, 16))
    with torch.no_grad():
        for conv in fpn.lateral_convs:
            conv.weight.fill_(1.0)
        for conv in fpn.output_convs:
            conv.weight.zero_()
            conv.weight[0, 0, 1, 1] = 1.0
    c2 = torch.arange(16.0).reshape(1, 1, 4, 4)
    c3 = torch.tensor([[[[100.0, 200.0], [300.0, 400.0]]]])
    c4 = torch.tensor([[[[1000.0]]]])
    p2, p3, p4, p5 = fpn([c2, c3, c4])  # the last is the extra level (here "P5" by subsampling P4)
    assert torch.equal(p4, c4)
    assert torch.equal(p3, c3 + 1000.0)
    # each pixel of M3 = C3 + 1000 covers a 2 x 2 block of C2 (nearest-neighbour upsampling)
    m3_upsampled = torch.tensor(
        [[1100.0, 1100, 1200, 1200], [1100, 1100, 1200, 1200], [1300, 1300, 1400, 1400], [1300, 1300, 1400, 1400]]
    )
    expected_p2 = c2 + m3_upsampled
    assert torch.equal(p2, expected_p2)
    assert torch.equal(p5, p4[:, :, ::2, ::2])


def test_shapes_strides_and_p6_is_a_subsampling():
    features = odd_sized_features()
    fpn = FeaturePyramidNetwork([8, 16, 24, 32], out_channels=12)
    assert fpn.strides == (4, 8, 16, 32, 64)
    pyramid = fpn(features)
    assert len(pyramid) == 5
    for level, feature in zip(pyramid, features):
        assert level.shape == (2, 12, *feature.shape[-2:])
    assert torch.equal(pyramid[4], pyramid[3][:, :, ::2, ::2])
    assert pyramid[4].shape[-2:] == (3, 4)  # ceil(5 / 2), ceil(7 / 2)
    assert len(FeaturePyramidNetwork([8, 16, 24, 32], 12, extra_max_pool=False)(features)) == 4


def test_initialization_is_kaiming_uniform_with_a_equal_one():
    fpn = FeaturePyramidNetwork([64, 128], out_channels=32, in_strides=(4, 8))
    for conv in [*fpn.lateral_convs, *fpn.output_convs]:
        fan_in = conv.weight[0].numel()
        bound = math.sqrt(6.0 / ((1 + 1**2) * fan_in))  # gain sqrt(2 / (1 + a^2)) times sqrt(3 / fan_in)
        assert conv.weight.abs().max() <= bound
        assert conv.weight.abs().max() > 0.9 * bound  # uniform, so it gets near the bound
        assert torch.equal(conv.bias, torch.zeros_like(conv.bias))


def test_gradients_reach_every_input():
    features = [f.requires_grad_() for f in odd_sized_features()]
    fpn = FeaturePyramidNetwork([8, 16, 24, 32], out_channels=4)
    sum(level.sum() for level in fpn(features)).backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in features)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="strides"):
        FeaturePyramidNetwork([8, 16, 24], 4)
    with pytest.raises(ValueError, match="positive"):
        FeaturePyramidNetwork([8, 0, 24, 32], 4)
    with pytest.raises(ValueError, match="expected 4 feature maps"):
        FeaturePyramidNetwork([8, 16, 24, 32], 4)(odd_sized_features()[:3])


def test_key_map_accepts_both_torchvision_layouts():
    assert torchvision_fpn_key("inner_blocks.2.0.weight") == "lateral_convs.2.weight"
    assert torchvision_fpn_key("layer_blocks.3.0.bias") == "output_convs.3.bias"
    assert torchvision_fpn_key("inner_blocks.1.weight") == "lateral_convs.1.weight"  # before torchvision 0.13


@pytest.mark.torchvision
def test_matches_torchvision_fpn_with_last_level_max_pool():
    pytest.importorskip("torchvision")
    from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork as Reference, LastLevelMaxPool

    in_channels = [8, 16, 24, 32]
    reference = Reference(in_channels, 12, extra_blocks=LastLevelMaxPool())
    ours = FeaturePyramidNetwork(in_channels, 12)
    ours.load_state_dict(from_torchvision_fpn(reference.state_dict(), prefix=""), strict=True)
    features = odd_sized_features(tuple(in_channels))
    expected = reference(OrderedDict((str(i), f) for i, f in enumerate(features)))
    assert list(expected) == ["0", "1", "2", "3", "pool"]
    for ours_level, reference_level in zip(ours(features), expected.values()):
        torch.testing.assert_close(ours_level, reference_level, rtol=0, atol=0)


@pytest.mark.torchvision
def test_loads_the_fpn_of_torchvision_maskrcnn():
    torchvision = pytest.importorskip("torchvision")
    reference = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    ours = FeaturePyramidNetwork([256, 512, 1024, 2048], 256)
    ours.load_state_dict(from_torchvision_fpn(reference.state_dict()), strict=True)
    features = odd_sized_features((256, 512, 1024, 2048), height=10, width=13, batch=1)
    with torch.no_grad():
        expected = reference.backbone.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))
        for ours_level, reference_level in zip(ours(features), expected.values()):
            torch.testing.assert_close(ours_level, reference_level, rtol=0, atol=0)
