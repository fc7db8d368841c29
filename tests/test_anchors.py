"""Anchors: cell anchors by hand, counts, centres and strides per level, and torchvision's exact anchors."""

import math

import pytest
import torch

from mrcnn.anchors import AnchorGenerator, cell_anchors


def test_cell_anchors_by_hand():
    # size 32: ratio h/w = 1/2 -> w = 32 sqrt 2 = 45.25, h = 22.63; halves 22.63 and 11.31 round to 23 and 11
    anchors = cell_anchors((32,), (0.5, 1.0, 2.0))
    assert anchors.dtype == torch.float32
    assert anchors.tolist() == [[-23.0, -11.0, 23.0, 11.0], [-16.0, -16.0, 16.0, 16.0], [-11.0, -23.0, 11.0, 23.0]]


def test_cell_anchors_keep_the_area_and_the_ratio():
    for size in (32, 64, 128, 256, 512):
        for ratio, anchor in zip((0.5, 1.0, 2.0), cell_anchors((size,), (0.5, 1.0, 2.0))):
            width, height = (anchor[2] - anchor[0]).item(), (anchor[3] - anchor[1]).item()
            assert width * height == pytest.approx(size * size, rel=0.05)  # rounding to whole pixels
            assert height / width == pytest.approx(ratio, rel=0.1)
            assert anchor[0].item() == -anchor[2].item() and anchor[1].item() == -anchor[3].item()  # zero-centred


def test_cell_anchors_are_ratio_major():
    anchors = cell_anchors((32, 64), (0.5, 2.0))  # ratio 0.5 at sizes 32, 64; then ratio 2 at 32, 64
    widths = (anchors[:, 2] - anchors[:, 0]).tolist()
    assert widths == [46.0, 90.0, 22.0, 46.0]


@pytest.mark.torchvision
def test_cell_anchors_match_torchvision():
    pytest.importorskip("torchvision")
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator

    sizes, ratios = ((32, 40, 50), (64,), (128,)), ((0.5, 1.0, 2.0), (0.25, 1.0), (1.0, 3.0))
    theirs = TorchvisionAnchorGenerator(sizes, ratios)
    ours = AnchorGenerator(sizes, ratios)
    for a, b in zip(ours.cell_anchors, theirs.cell_anchors):
        assert torch.equal(a, b)
    assert ours.num_anchors_per_location() == theirs.num_anchors_per_location() == [9, 2, 2]


def test_counts_centres_and_strides_per_level():
    generator = AnchorGenerator()
    image_size = (64, 96)
    feature_sizes = [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]  # strides 4, 8, 16, 32, and 64 / 48
    anchors = generator(image_size, feature_sizes)
    assert generator.num_anchors_per_location() == [3] * 5
    for (grid_h, grid_w), level_anchors, base in zip(feature_sizes, anchors, generator.cell_anchors):
        assert level_anchors.shape == (grid_h * grid_w * 3, 4)
        stride_y, stride_x = image_size[0] // grid_h, image_size[1] // grid_w
        grid = level_anchors.view(grid_h, grid_w, 3, 4)
        assert torch.equal(grid[0, 0], base)  # the first location is centred on (0, 0)
        centre_x = (grid[..., 0] + grid[..., 2]) / 2  # [H_l, W_l, A]
        centre_y = (grid[..., 1] + grid[..., 3]) / 2
        expected_x = (torch.arange(grid_w) * stride_x).float()[None, :, None].expand(grid_h, grid_w, 3)
        expected_y = (torch.arange(grid_h) * stride_y).float()[:, None, None].expand(grid_h, grid_w, 3)
        assert torch.equal(centre_x, expected_x) and torch.equal(centre_y, expected_y)
        sizes = grid[..., 2:] - grid[..., :2]  # every location has the same A anchor shapes
        assert torch.equal(sizes, (base[:, 2:] - base[:, :2]).expand_as(sizes))
    # the last level: 64 // 1 = 64 rows apart (one row), 96 // 2 = 48 columns apart
    assert anchors[4][3:6, 0].tolist() == [48 + b for b in generator.cell_anchors[4][:, 0].tolist()]


def test_strides_use_integer_division():
    # a 800 x 1216 image: P6 is 13 x 19 and its stride is 800 // 13 = 61, 1216 // 19 = 64 (not 64 x 64)
    anchors = AnchorGenerator(((512,),), ((1.0,),))((800, 1216), [(13, 19)])[0]
    grid = anchors.view(13, 19, 4)
    assert (grid[1, 0, 1] - grid[0, 0, 1]).item() == 800 // 13
    assert (grid[0, 1, 0] - grid[0, 0, 0]).item() == 1216 // 19


@pytest.mark.torchvision
def test_anchors_match_torchvision():
    pytest.importorskip("torchvision")
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    sizes, ratios = ((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5
    image_size = (800, 1088)
    feature_maps = [torch.zeros(1, 1, math.ceil(image_size[0] / s), math.ceil(image_size[1] / s)) for s in (4, 8, 16, 32, 64)]
    images = ImageList(torch.zeros(2, 3, *image_size), [image_size, image_size])
    theirs = TorchvisionAnchorGenerator(sizes, ratios)(images, feature_maps)[0]
    ours = AnchorGenerator(sizes, ratios)(image_size, [f.shape[-2:] for f in feature_maps])
    assert torch.equal(torch.cat(ours), theirs)


def test_cache_and_dtype():
    generator = AnchorGenerator()
    feature_sizes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    first = generator((32, 32), feature_sizes)
    assert generator((32, 32), feature_sizes) is first  # cached
    doubles = generator((32, 32), feature_sizes, dtype=torch.float64)
    assert doubles[0].dtype == torch.float64 and torch.equal(doubles[0].float(), first[0])
    with pytest.raises(ValueError, match="feature maps"):
        generator((32, 32), feature_sizes[:3])
