"""RoIWarp and the multi-level pooler for RoIWarp and RoIPool (mrcnn/roi_warp.py, paper Table 2c)."""

import math

import pytest
import torch

from mrcnn.roi_align import roi_pool
from mrcnn.poolers import MultiLevelRoIAlign, fpn_level, roi_align
from mrcnn.poolers import MultiLevelRoIPooler
from mrcnn.architectures import build_roi_pooler
from mrcnn.roi_warp import quantize_rois, roi_warp

STRIDES = (4, 8, 16, 32)


def naive_roi_warp(features, rois, pooled, spatial_scale, sampling_ratio, aligned=False):
    """RoIWarp from its definition, one float64 sample at a time: round each corner to the nearest
    feature pixel (halves away from zero), then average `sampling_ratio^2` bilinear samples per bin."""
    features = features.double()
    channels, height, width = features.shape[1:]

    def bilinear(feature, y, x):
        if y < -1.0 or y > height or x < -1.0 or x > width:
            return torch.zeros(channels, dtype=torch.float64)
        y, x = max(y, 0.0), max(x, 0.0)
        y0, x0 = min(math.floor(y), height - 1), min(math.floor(x), width - 1)
        y = float(y0) if y0 == height - 1 else y
        x = float(x0) if x0 == width - 1 else x
        y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
        ly, lx = y - y0, x - x0
        return ((1 - ly) * (1 - lx) * feature[:, y0, x0] + (1 - ly) * lx * feature[:, y0, x1]
                + ly * (1 - lx) * feature[:, y1, x0] + ly * lx * feature[:, y1, x1])

    def nearest(v):
        return math.copysign(math.floor(abs(v) + 0.5), v)

    out = torch.zeros(rois.shape[0], channels, pooled, pooled, dtype=torch.float64)
    offset = 0.5 if aligned else 0.0
    for r, (n, x1, y1, x2, y2) in enumerate(rois.double().tolist()):
        x1, y1, x2, y2 = (nearest(v * spatial_scale) for v in (x1, y1, x2, y2))  # the one quantization
        x_start, y_start = x1 - offset, y1 - offset
        roi_w, roi_h = x2 - offset - x_start, y2 - offset - y_start
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / pooled, roi_w / pooled
        for p in range(pooled):
            for q in range(pooled):
                total = torch.zeros(channels, dtype=torch.float64)
                for i in range(sampling_ratio):
                    for j in range(sampling_ratio):
                        y = y_start + p * bin_h + (i + 0.5) * bin_h / sampling_ratio
                        x = x_start + q * bin_w + (j + 0.5) * bin_w / sampling_ratio
                        total += bilinear(features[int(n)], y, x)
                out[r, :, p, q] = total / sampling_ratio**2
    return out


def random_rois(num_rois, num_images, extent):
    corner = torch.rand(num_rois, 2, dtype=torch.float64) * 1.2 * extent - 0.1 * extent
    size = torch.rand(num_rois, 2, dtype=torch.float64) * 0.7 * extent + 1.0
    image = torch.randint(0, num_images, (num_rois, 1)).double()
    return torch.cat([image, corner, corner + size], dim=1)  # [R, 5]


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.25])
def test_roi_warp_matches_naive_definition(aligned, sampling_ratio, spatial_scale):
    features = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    rois = random_rois(9, 2, 10 / spatial_scale)
    expected = naive_roi_warp(features, rois, 4, spatial_scale, sampling_ratio, aligned)
    torch.testing.assert_close(roi_warp(features, rois, 4, spatial_scale, sampling_ratio, aligned), expected)


def test_roi_warp_equals_roi_align_on_grid_boxes_and_differs_off_the_grid():
    features = torch.randn(1, 4, 16, 16, dtype=torch.float64)
    on_grid = torch.tensor([[0, 8.0, 4.0, 40.0, 36.0], [0, 0.0, 0.0, 64.0, 64.0], [0, 12.0, 20.0, 16.0, 52.0]],
                           dtype=torch.float64)  # fmt: skip  # multiples of the stride 4
    scale = 0.25
    warped = roi_warp(features, on_grid, 7, scale, 2)
    torch.testing.assert_close(warped, roi_align(features, on_grid, 7, scale, 2))
    off_grid = on_grid + torch.tensor([0, 1.7, -1.3, 1.1, 1.9], dtype=torch.float64)  # under half a stride
    assert torch.equal(roi_warp(features, off_grid, 7, scale, 2), warped)  # quantized back onto the grid
    assert not torch.allclose(roi_align(features, off_grid, 7, scale, 2), warped, atol=1e-3)


def test_quantize_rois_rounds_to_the_stride():
    rois = torch.tensor([[1.0, 5.9, 6.0, 9.99, 2.0], [0.0, -2.0, -1.9, 0.1, 14.0]])
    # in strides: 1.475 -> 1, 1.5 -> 2, 2.4975 -> 2, 0.5 -> 1; -0.5 -> -1, -0.475 -> 0, 3.5 -> 4 (halves away from zero)
    expected = torch.tensor([[1.0, 4.0, 8.0, 8.0, 4.0], [0.0, -4.0, 0.0, 0.0, 16.0]])
    assert torch.equal(quantize_rois(rois, 0.25), expected)


def test_roi_warp_gradient_reaches_the_features():
    features = torch.randn(1, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 1.2, 2.6, 5.3, 7.1]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: roi_warp(f, rois, 3, 1.0, 2), (features,))


@pytest.mark.parametrize("method, pool", [("warp", lambda f, r, p, s: roi_warp(f, r, p, s, 2)), ("pool", roi_pool)])
def test_multi_level_pooler_pools_each_roi_from_its_level(method, pool):
    features = [torch.randn(2, 3, 64 // s, 96 // s, dtype=torch.float64) for s in STRIDES]
    rois = random_rois(12, 2, 64)
    rois[:3, 3:] = rois[:3, 1:3] + torch.tensor([480.0, 500.0], dtype=torch.float64)  # large: P5
    pooler = build_roi_pooler(method, 5, STRIDES, 2, False)
    assert isinstance(pooler, MultiLevelRoIPooler)
    pooled = pooler(features, rois)  # [R, C, P, P]
    level = fpn_level(rois[:, 1:], 2, 5) - 2
    assert set(level.tolist()) >= {0, 3}
    for r in range(rois.shape[0]):
        expected = pool(features[level[r]], rois[r : r + 1], 5, 1.0 / STRIDES[level[r]])
        torch.testing.assert_close(pooled[r : r + 1], expected)


def test_single_level_pooler_and_empty_rois():
    features = [torch.randn(1, 3, 8, 8, requires_grad=True)]
    pooler = build_roi_pooler("pool", 7, (16,), 2, False)
    rois = torch.tensor([[0, 4.0, 4.0, 100.0, 90.0], [0, 0.0, 0.0, 8.0, 8.0]])
    torch.testing.assert_close(pooler(features, rois), roi_pool(features[0], rois, 7, 1 / 16))
    empty = pooler(features, torch.zeros(0, 5))
    assert empty.shape == (0, 3, 7, 7)
    empty.sum().backward()
    assert features[0].grad is not None and torch.equal(features[0].grad, torch.zeros_like(features[0]))


def test_build_roi_pooler_dispatch():
    align = build_roi_pooler("align", 14, STRIDES, 0, True)
    assert isinstance(align, MultiLevelRoIAlign) and (align.sampling_ratio, align.aligned) == (0, True)
    assert build_roi_pooler("pool", 7, STRIDES, 2, False).pool is roi_pool
    assert "roi_warp" in repr(build_roi_pooler("warp", 7, STRIDES, 2, False))
    with pytest.raises(ValueError, match="unknown RoI pooler 'max'"):
        build_roi_pooler("max", 7, STRIDES, 2, False)


def test_multi_level_pooler_bad_input_is_a_value_error():
    pooler = build_roi_pooler("warp", 7, STRIDES, 2, False)
    with pytest.raises(ValueError, match="expected 4 feature maps"):
        pooler([torch.randn(1, 3, 8, 8)], torch.zeros(0, 5))
    with pytest.raises(ValueError, match="batch index"):
        pooler([torch.randn(1, 3, 8, 8)] * 4, torch.tensor([[1.0, 0, 0, 4, 4]]))
