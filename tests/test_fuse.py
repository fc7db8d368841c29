"""Frozen batch norm folded into the convolutions (mrcnn/fuse.py): the same numbers, the same state dict."""

import copy

import pytest
import torch
from torch import nn

from mrcnn.backbone import FrozenBatchNorm2d, resnet50, resnet_small
from mrcnn.config import shapes_small
from mrcnn.fuse import FoldedFrozenBatchNorm2d, FrozenNormConv2d, fold_frozen_batchnorm
from mrcnn.model import MaskRCNN


def randomize_frozen_norms(module: nn.Module, seed: int = 0) -> None:
    """Statistics far from the identity, so that a wrong fold shows."""
    generator = torch.Generator().manual_seed(seed)
    for child in module.modules():
        if type(child) is FrozenBatchNorm2d:
            for name in ("running_mean", "bias"):
                getattr(child, name).copy_(torch.randn(child.weight.shape, generator=generator) * 0.3)
            for name in ("running_var", "weight"):
                getattr(child, name).copy_(torch.rand(child.weight.shape, generator=generator) + 0.5)


def relative_error(value: torch.Tensor, expected: torch.Tensor) -> float:
    return float((value - expected).norm() / expected.norm())


@pytest.fixture(scope="module")
def backbones():
    torch.manual_seed(0)
    plain = resnet50(frozen_stages=1).eval()
    randomize_frozen_norms(plain)
    folded = copy.deepcopy(plain)
    count = fold_frozen_batchnorm(folded)
    return plain, folded, count


def test_every_conv_norm_pair_of_resnet50_is_folded(backbones):
    plain, folded, count = backbones
    pairs = sum(type(m) is FrozenBatchNorm2d for m in plain.modules())
    assert count == pairs == 53  # stem, 16 blocks x 3, 4 projection shortcuts
    assert sum(type(m) is FrozenNormConv2d for m in folded.modules()) == pairs
    assert not any(type(m) is FrozenBatchNorm2d for m in folded.modules())


def test_the_state_dict_is_unchanged(backbones):
    plain, folded, _ = backbones
    assert list(plain.state_dict()) == list(folded.state_dict())
    for key, value in plain.state_dict().items():
        assert torch.equal(value, folded.state_dict()[key]), key


def test_folded_outputs_equal_the_plain_ones_to_float_rounding(backbones):
    plain, folded, _ = backbones
    image = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, outputs = plain(image), folded(image)
        channels_last = folded(image.contiguous(memory_format=torch.channels_last))
    for e, o, c in zip(expected, outputs, channels_last):  # C2..C5, values grow through 16 random blocks
        assert relative_error(o, e) < 1e-5 and relative_error(c, e) < 1e-5


def test_weights_loaded_after_folding_are_used(backbones):
    """The fold happens at every call: a checkpoint loaded into a folded model takes effect."""
    plain, folded, _ = backbones
    other = resnet50(frozen_stages=1).eval()
    randomize_frozen_norms(other, seed=5)
    refolded = copy.deepcopy(folded)
    refolded.load_state_dict(other.state_dict())
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for e, o in zip(other(image), refolded(image)):
            assert relative_error(o, e) < 1e-5


def test_training_the_folded_convolution_gives_the_plain_gradient():
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(4, 6, 3, padding=1, bias=False), FrozenBatchNorm2d(6)
    parent = nn.Sequential()
    parent.conv1, parent.norm1 = conv, norm
    randomize_frozen_norms(parent)
    plain = copy.deepcopy(parent)
    assert fold_frozen_batchnorm(parent) == 1
    assert parent.conv1.weight is conv.weight  # the same parameter: the optimizer's state stays valid
    x = torch.randn(2, 4, 9, 9)
    grad_output = torch.randn(2, 6, 9, 9)
    expected = torch.autograd.grad(plain.norm1(plain.conv1(x)), plain.conv1.weight, grad_output)[0]
    folded = parent.conv1(x)
    assert isinstance(parent.norm1, FoldedFrozenBatchNorm2d) and torch.equal(parent.norm1(folded), folded)
    torch.testing.assert_close(torch.autograd.grad(folded, parent.conv1.weight, grad_output)[0], expected)


def test_trainable_batch_norm_and_biased_convolutions_are_left_alone():
    small = resnet_small()  # nn.BatchNorm2d: its statistics change in training, nothing to fold
    assert fold_frozen_batchnorm(small) == 0
    with pytest.raises(ValueError, match="without bias"):
        FrozenNormConv2d(nn.Conv2d(2, 2, 1, bias=True), FoldedFrozenBatchNorm2d(2))


def test_fast_convolutions_switch_gives_the_same_detections():
    torch.manual_seed(0)
    fast = MaskRCNN(shapes_small().replace(backbone="resnet50", trainable_stages=3, fpn_channels=32)).eval()
    randomize_frozen_norms(fast.backbone)
    slow = MaskRCNN(fast.config.replace(fast_convolutions=False)).eval()
    slow.load_state_dict(fast.state_dict())
    images = [torch.rand(3, 96, 112, generator=torch.Generator().manual_seed(3))]
    with torch.no_grad():
        expected, detections = slow(images), fast(images)
    for e, d in zip(expected, detections):
        torch.testing.assert_close(d["scores"], e["scores"], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(d["boxes"], e["boxes"], rtol=1e-3, atol=1e-2)
