"""RoIAlign, RoIPool and multi-level RoIAlign (mrcnn/roi_align.py, mrcnn/roi_align_cpu.py).

The readable reference is checked against a naive float64 loop written from the paper's
definition and against numbers computed by hand; the fast CPU path (a sparse matrix product)
is checked against the reference, outputs and gradients; torchvision, when installed, is the
outside witness.
"""

import math

import pytest
import torch

import mrcnn.poolers as poolers
from mrcnn.architectures import build_roi_pooler
import mrcnn.roi_align_cpu as roi_align_cpu
from mrcnn.roi_align import roi_align_reference, roi_pool
from mrcnn.poolers import MultiLevelRoIAlign, fpn_level, roi_align


def naive_roi_align(features, rois, pooled, spatial_scale, sampling_ratio, aligned):
    """RoIAlign straight from the paper's words (section 3): split the RoI into pooled x pooled
    bins without rounding, sample each bin at a regular grid of points, read each point by
    bilinear interpolation, average. Float64 loops over RoIs, bins and samples. The border
    rules are those of the reference implementations (Detectron, torchvision)."""
    features = features.double()
    _, channels, height, width = features.shape

    def bilinear(feature, y, x):  # feature [C, H, W]
        if y < -1.0 or y > height or x < -1.0 or x > width:  # more than a pixel outside: zero
            return torch.zeros(channels, dtype=torch.float64)
        y, x = min(max(y, 0.0), height - 1.0), min(max(x, 0.0), width - 1.0)  # onto the border
        y0, x0 = math.floor(y), math.floor(x)
        y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
        ly, lx = y - y0, x - x0
        return ((1 - ly) * (1 - lx) * feature[:, y0, x0] + (1 - ly) * lx * feature[:, y0, x1]
                + ly * (1 - lx) * feature[:, y1, x0] + ly * lx * feature[:, y1, x1])

    out = torch.zeros(rois.shape[0], channels, pooled, pooled, dtype=torch.float64)
    offset = 0.5 if aligned else 0.0
    for r, (n, x1, y1, x2, y2) in enumerate(rois.double().tolist()):
        x_start, y_start = x1 * spatial_scale - offset, y1 * spatial_scale - offset
        roi_w, roi_h = x2 * spatial_scale - offset - x_start, y2 * spatial_scale - offset - y_start
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / pooled, roi_w / pooled
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / pooled)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / pooled)
        for p in range(pooled):
            for q in range(pooled):
                total = torch.zeros(channels, dtype=torch.float64)
                for i in range(grid_h):
                    y = y_start + p * bin_h + (i + 0.5) * bin_h / grid_h
                    for j in range(grid_w):
                        x = x_start + q * bin_w + (j + 0.5) * bin_w / grid_w
                        total += bilinear(features[int(n)], y, x)
                out[r, :, p, q] = total / max(grid_h * grid_w, 1)
    return out


def fast(features, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
    return roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned, use_kernel=False)


def random_rois(num_rois, num_images, extent, dtype=torch.float64, generator=None):
    """Boxes of all kinds over a map `extent` image pixels wide: inside, partly and wholly
    outside, zero-size and inverted ones."""
    corner = torch.rand(num_rois, 2, generator=generator, dtype=dtype) * 1.4 * extent - 0.2 * extent
    size = torch.rand(num_rois, 2, generator=generator, dtype=dtype) * 0.6 * extent
    boxes = torch.cat([corner, corner + size], dim=1)
    boxes[0] = torch.tensor([3.0, 4.0, 3.0, 4.0])  # zero size
    boxes[1] = torch.tensor([9.0, 8.0, 2.0, 5.0])  # inverted
    boxes[2] = torch.tensor([-3.0 * extent, -2.0 * extent, -extent, -extent])  # wholly outside
    image = torch.randint(0, num_images, (num_rois, 1), generator=generator).to(dtype)
    return torch.cat([image, boxes.to(dtype)], dim=1)


# --- the reference against the paper's definition -------------------------------------------


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2, 3])
def test_reference_matches_naive_loop(aligned, sampling_ratio):
    features = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    rois = random_rois(8, 2, extent=40.0)
    expected = naive_roi_align(features, rois, 3, 0.25, sampling_ratio, aligned)
    torch.testing.assert_close(roi_align_reference(features, rois, 3, 0.25, sampling_ratio, aligned), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast(features, rois, 3, 0.25, sampling_ratio, aligned), expected, rtol=0, atol=1e-12)


# --- by hand, on a 5 x 5 map holding F[y, x] = 5 y + x ---------------------------------------
# Bilinear interpolation of a linear function is exact, so inside the map a sample at (y, x)
# reads 5 y + x, and a bin's average is 5 y + x at the mean of its samples: the bin's centre.

ARANGE = torch.arange(25, dtype=torch.float64).view(1, 1, 5, 5)


def one_roi(x1, y1, x2, y2):
    return torch.tensor([[0.0, x1, y1, x2, y2]], dtype=torch.float64)


@pytest.mark.parametrize("pool", [roi_align_reference, fast])
def test_by_hand_aligned_box_over_pixel_centres(pool):
    # aligned: box (1, 1, 3, 3) covers pixels 1 and 2 on both axes; shifted by -1/2 it starts at
    # 0.5 and is 2 long, so 2 x 2 bins of side 1 have centres 1.0 and 2.0: the pixel centres.
    # out = 5 y + x = [[5 + 1, 5 + 2], [10 + 1, 10 + 2]]
    out = pool(ARANGE, one_roi(1, 1, 3, 3), 2, 1.0, 2, True)
    assert out[0, 0].tolist() == [[6.0, 7.0], [11.0, 12.0]]


@pytest.mark.parametrize("pool", [roi_align_reference, fast])
def test_by_hand_legacy_box_is_half_a_pixel_off(pool):
    # not aligned: the same box starts at 1.0, bin centres 1.5 and 2.5, each the average of a
    # 2 x 2 block of pixels: 5 * 1.5 + 1.5 = 9 = (6 + 7 + 11 + 12) / 4, then 10, 14, 15.
    out = pool(ARANGE, one_roi(1, 1, 3, 3), 2, 1.0, 2, False)
    assert out[0, 0].tolist() == [[9.0, 10.0], [14.0, 15.0]]


@pytest.mark.parametrize("pool", [roi_align_reference, fast])
def test_by_hand_whole_map_is_its_mean(pool):
    # aligned, box (0, 0, 5, 5), one bin: starts at -0.5, side 5, samples at -0.5 + 1.25 = 0.75
    # and -0.5 + 3.75 = 3.25 on each axis, all inside: mean of 5 y + x = 5 * 2 + 2 = 12,
    # the mean of 0..24.
    out = pool(ARANGE, one_roi(0, 0, 5, 5), 1, 1.0, 2, True)
    assert out.item() == pytest.approx(12.0, abs=1e-12)


@pytest.mark.parametrize("pool", [roi_align_reference, fast])
def test_by_hand_border_rules(pool):
    # legacy box (3, 3, 5, 5), one bin, samples at 3.5 and 4.5; 4.5 is past the last pixel (4)
    # but within one pixel, so it is clamped onto it: samples read 5 y + x at y, x in {3.5, 4}:
    # 21, 21.5, 23.5, 24 -> mean 22.5.
    assert pool(ARANGE, one_roi(3, 3, 5, 5), 1, 1.0, 2, False).item() == pytest.approx(22.5, abs=1e-12)
    # legacy box (-1, -1, 1, 1): samples at -0.5 and 0.5; -0.5 is clamped to 0: values at y, x in
    # {0, 0.5}: 0, 0.5, 2.5, 3 -> mean 1.5.
    assert pool(ARANGE, one_roi(-1, -1, 1, 1), 1, 1.0, 2, False).item() == pytest.approx(1.5, abs=1e-12)
    # legacy box (-4, 0, 0, 1): x samples at -3 (more than a pixel outside: reads 0, still counted)
    # and -1 (clamped to 0); y samples at 0.25 and 0.75. Sum 0 + 0 + 1.25 + 3.75 = 5, over 4
    # samples -> 1.25.
    assert pool(ARANGE, one_roi(-4, 0, 0, 1), 1, 1.0, 2, False).item() == pytest.approx(1.25, abs=1e-12)
    # a box wholly outside the map pools zeros
    assert pool(ARANGE, one_roi(10, 10, 12, 12), 2, 1.0, 2, False).abs().max().item() == 0.0


@pytest.mark.parametrize("pool", [roi_align_reference, fast])
def test_by_hand_degenerate_boxes(pool):
    # aligned, zero size, adaptive sampling: ceil(0 / P) = 0 samples per bin -> the bins are 0
    assert pool(ARANGE, one_roi(2, 2, 2, 2), 2, 1.0, 0, True).abs().max().item() == 0.0
    # legacy, zero size: the RoI is stretched to 1 x 1 from (2, 2): one bin, samples at 2.25 and
    # 2.75 -> centre (2.5, 2.5) -> 5 * 2.5 + 2.5 = 15
    assert pool(ARANGE, one_roi(2, 2, 2, 2), 1, 1.0, 2, False).item() == pytest.approx(15.0, abs=1e-12)
    # aligned, inverted: start 2.5, side -2 (x2 < x1), fixed 2 x 2 samples walk backwards from the
    # start: y, x at 2.5 - 0.5 = 2.0 and 2.5 - 1.5 = 1.0 -> centre (1.5, 1.5) -> 9
    assert pool(ARANGE, one_roi(3, 3, 1, 1), 1, 1.0, 2, True).item() == pytest.approx(9.0, abs=1e-12)


# --- edge cases, reference and fast path together ----------------------------------------------


@pytest.mark.parametrize("pool", [roi_align_reference, fast])
def test_empty_roi_set_gives_empty_output_and_zero_gradient(pool):
    features = torch.randn(2, 3, 6, 7, requires_grad=True)
    out = pool(features, torch.zeros(0, 5), (4, 5), 0.5, 2, False)
    assert out.shape == (0, 3, 4, 5)
    out.sum().backward()
    assert features.grad is not None and features.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("aligned", [False, True])
def test_outside_zero_size_and_inverted_boxes_match_naive(aligned):
    features = torch.randn(1, 2, 7, 6, dtype=torch.float64)
    boxes = [(-30, -30, -10, -10), (20, 25, 60, 70), (-8, -8, 10, 12), (15, 10, 40, 30), (12, 12, 12, 12),
             (12, 12, 12.5, 30), (20, 18, 4, 6), (20, 4, 4, 18)]
    rois = torch.tensor([(0.0, *box) for box in boxes], dtype=torch.float64)
    for sampling_ratio in (-1, 2):
        expected = naive_roi_align(features, rois, 2, 0.25, sampling_ratio, aligned)
        torch.testing.assert_close(roi_align_reference(features, rois, 2, 0.25, sampling_ratio, aligned), expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(fast(features, rois, 2, 0.25, sampling_ratio, aligned), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("pool", [roi_align_reference, fast])
def test_each_roi_reads_its_own_image(pool):
    features = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    rois = random_rois(12, 3, extent=16.0)
    out = pool(features, rois, 3, 0.5, 2, True)
    for r in range(rois.shape[0]):
        n = int(rois[r, 0])
        alone = roi_align_reference(features[n : n + 1], torch.cat([torch.zeros(1, 1, dtype=torch.float64), rois[r : r + 1, 1:]], 1), 3, 0.5, 2, True)
        torch.testing.assert_close(out[r : r + 1], alone, rtol=0, atol=1e-12)


@pytest.mark.parametrize("pool", [roi_align_reference, fast])
def test_non_contiguous_and_channels_last_features(pool):
    base = torch.randn(2, 5, 9, 7)
    wider = torch.zeros(2, 5, 9, 14)
    wider[..., ::2] = base
    variants = [
        base,
        base.transpose(2, 3).contiguous().transpose(2, 3),  # same values, W before H in memory
        base.contiguous(memory_format=torch.channels_last),
        wider[..., ::2],  # every other column of a wider map
    ]
    rois = random_rois(10, 2, extent=30.0, dtype=torch.float32)
    grad_out = torch.randn(10, 5, 3, 3)
    results = []
    for features in variants:
        features = features.detach().requires_grad_()
        out = pool(features, rois, 3, 0.25, 2, False)
        (grad,) = torch.autograd.grad(out, features, grad_out)
        results.append((out, grad))
    for out, grad in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=0, atol=0)
        torch.testing.assert_close(grad, results[0][1], rtol=0, atol=0)
    assert results[0][0].is_contiguous()


# --- the fast path against the reference ------------------------------------------------------

TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5, 0.125])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 3])
@pytest.mark.parametrize("aligned", [False, True])
def test_fast_path_matches_reference(aligned, sampling_ratio, spatial_scale, dtype):
    generator = torch.Generator().manual_seed(sampling_ratio * 7 + int(aligned))
    features = torch.randn(2, 3, 11, 13, dtype=dtype, generator=generator, requires_grad=True)
    rois = random_rois(9, 2, extent=13.0 / spatial_scale, dtype=dtype, generator=generator)
    output_size = (3, 5)  # odd and non-square
    expected = roi_align_reference(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    out = fast(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    assert out.dtype == dtype and out.shape == (9, 3, 3, 5)
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])
    grad_out = torch.randn(expected.shape, dtype=dtype, generator=generator)
    (expected_grad,) = torch.autograd.grad(expected, features, grad_out)
    (grad,) = torch.autograd.grad(out, features, grad_out)
    torch.testing.assert_close(grad, expected_grad, **TOLERANCES[dtype])


def test_fast_path_builds_the_matrix_in_chunks(monkeypatch):
    features = torch.randn(2, 3, 10, 12, dtype=torch.float64, requires_grad=True)
    rois = random_rois(20, 2, extent=40.0)
    grad_out = torch.randn(20, 3, 4, 4, dtype=torch.float64)
    whole = fast(features, rois, 4, 0.25, 0, True)
    (whole_grad,) = torch.autograd.grad(whole, features, grad_out)
    monkeypatch.setattr(roi_align_cpu, "MAX_ENTRIES", 500)  # a few RoIs per chunk
    chunked = fast(features, rois, 4, 0.25, 0, True)
    (chunked_grad,) = torch.autograd.grad(chunked, features, grad_out)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(chunked_grad, whole_grad, rtol=0, atol=1e-12)


def test_roi_align_on_cpu_takes_the_sparse_path(monkeypatch):
    calls = []
    real = roi_align_cpu.sparse_roi_align
    monkeypatch.setattr(poolers, "sparse_roi_align", lambda *args: calls.append(args) or real(*args))
    roi_align(torch.randn(1, 2, 5, 5), one_roi(0, 0, 4, 4).float(), 2)
    MultiLevelRoIAlign(2, strides=(1, 2))([torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4)], one_roi(0, 0, 4, 4).float())
    assert len(calls) == 2


@pytest.mark.parametrize("aligned", [False, True])
def test_gradcheck(aligned):
    features = torch.randn(2, 1, 6, 7, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 1.5, 2.2, 15.3, 20.1], [1, -3.0, -2.0, 5.0, 4.0], [1, 20.0, 3.0, 30.0, 27.0], [0, 9.0, 9.0, 3.0, 4.0]],
                        dtype=torch.float64)
    for pool in (roi_align_reference, fast):
        assert torch.autograd.gradcheck(lambda f: pool(f, rois, (2, 3), 0.25, -1, aligned), (features,))
    # two levels, strides 4 and 8 (P2, P3): RoIs of side 9 and 28 go to P2, side 130 to P3
    levels = [torch.randn(1, 1, 6, 6, dtype=torch.float64, requires_grad=True), torch.randn(1, 1, 3, 3, dtype=torch.float64, requires_grad=True)]
    rois = torch.tensor([[0, 1.0, 2.0, 9.0, 12.0], [0, 2.0, 1.0, 30.0, 29.0], [0, -70.0, -60.0, 60.0, 70.0]], dtype=torch.float64)
    assert fpn_level(rois[:, 1:], 2, 3).tolist() == [2, 2, 3]
    pooler = MultiLevelRoIAlign(2, strides=(4, 8), sampling_ratio=2, aligned=aligned)
    assert torch.autograd.gradcheck(lambda a, b: pooler([a, b], rois), tuple(levels))


# --- RoIPool -----------------------------------------------------------------------------------


def test_roi_pool_by_hand():
    # box (1, 1, 3, 3) rounds to itself: 3 x 3 pixels (ends included), one bin: max F = F[3, 3] = 18
    assert roi_pool(ARANGE, one_roi(1, 1, 3, 3), 1).item() == 18.0
    # 2 x 2 bins of 1.5 pixels: bin p covers rows [floor(1.5 p), ceil(1.5 (p + 1))) past row 1:
    # rows {1, 2} and {2, 3}; the maxima are at the bottom-right corners: F[2, 2] = 12, F[2, 3] =
    # 13, F[3, 2] = 17, F[3, 3] = 18
    assert roi_pool(ARANGE, one_roi(1, 1, 3, 3), 2)[0, 0].tolist() == [[12.0, 13.0], [17.0, 18.0]]
    # RoIPool's first quantization: a shift of 0.2 pixel rounds away, the output does not move
    assert torch.equal(roi_pool(ARANGE, one_roi(1.2, 1.2, 3.2, 3.2), 2), roi_pool(ARANGE, one_roi(1, 1, 3, 3), 2))
    # spatial scale 0.5: (2.4, 2.4, 6.6, 6.6) -> (1.2, 1.2, 3.3, 3.3) -> rounds to (1, 1, 3, 3)
    assert torch.equal(roi_pool(ARANGE, one_roi(2.4, 2.4, 6.6, 6.6), 2, 0.5), roi_pool(ARANGE, one_roi(1, 1, 3, 3), 2))
    # a box outside the map has only empty bins: 0
    assert roi_pool(ARANGE, one_roi(20, 20, 30, 30), 2).abs().max().item() == 0.0
    # empty RoI set
    assert roi_pool(ARANGE, torch.zeros(0, 5, dtype=torch.float64), 2).shape == (0, 1, 2, 2)


# --- FPN levels ----------------------------------------------------------------------------------


def square(side):
    return torch.tensor([[0.0, 0.0, side, side]], dtype=torch.float64)


def test_fpn_level_by_hand():
    # k = floor(4 + log2(side / 224)): 224 -> 4, 112 -> 3, 448 -> 5, 150 -> floor(3.42) = 3
    assert fpn_level(square(224), 2, 5).item() == 4
    assert fpn_level(square(112), 2, 5).item() == 3
    assert fpn_level(square(448), 2, 5).item() == 5
    assert fpn_level(square(150), 2, 5).item() == 3
    # clamping: 20 -> floor(0.51) = 0 -> 2; 2000 -> floor(7.16) = 7 -> 5; an empty or inverted box -> 2
    assert fpn_level(square(20), 2, 5).item() == 2
    assert fpn_level(square(2000), 2, 5).item() == 5
    assert fpn_level(square(0), 2, 5).item() == 2
    assert fpn_level(torch.tensor([[10.0, 0.0, 0.0, 10.0]]), 2, 5).item() == 2
    # a non-square box counts by sqrt(w h): 112 x 448 has side 224 -> 4
    assert fpn_level(torch.tensor([[0.0, 0.0, 112.0, 448.0]]), 2, 5).item() == 4


def test_fpn_level_eps_boundary_at_112():
    # side = 112 * 2^-d gives k = floor(3 - d + eps): eps = 1e-6 keeps a side a hair under 112
    # (d = 0.5e-6, as rounding in the box coordinates would make) on P3; d = 2e-6 drops to P2.
    assert fpn_level(square(112 * 2 ** -0.5e-6), 2, 5).item() == 3
    assert fpn_level(square(112 * 2 ** -2e-6), 2, 5).item() == 2
    assert fpn_level(square(112 * 2 ** -0.5e-6), 2, 5, eps=0.0).item() == 2


# --- multi-level RoIAlign ------------------------------------------------------------------------


@pytest.mark.parametrize("sampling_ratio, aligned", [(2, False), (0, True)])
def test_multi_level_pools_each_roi_from_its_level(sampling_ratio, aligned):
    strides = (4, 8, 16, 32)
    features = [torch.randn(2, 3, 256 // s, 320 // s, dtype=torch.float64, requires_grad=True) for s in strides]
    # sides 50 -> P2 (clamped from 1), 150 -> P3, 300 -> P4, 600 -> P5, 1000 -> P5 (clamped from 6)
    sides_and_levels = [(50, 0), (150, 1), (300, 2), (600, 3), (1000, 3), (60, 0), (200, 1)]
    rois = torch.tensor([[r % 2, 10.0 + r, 5.0 + 2 * r, 10.0 + r + side, 5.0 + 2 * r + side] for r, (side, _) in enumerate(sides_and_levels)],
                        dtype=torch.float64)
    pooler = MultiLevelRoIAlign(7, strides, sampling_ratio, aligned)
    out = pooler(features, rois, use_kernel=False)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, features, grad_out)
    expected_grads = [torch.zeros_like(f) for f in features]
    for r, (_, level) in enumerate(sides_and_levels):
        alone = roi_align_reference(features[level], rois[r : r + 1], 7, 1.0 / strides[level], sampling_ratio, aligned)
        torch.testing.assert_close(out[r : r + 1], alone, rtol=0, atol=1e-12)
        (grad,) = torch.autograd.grad(alone, features[level], grad_out[r : r + 1])
        expected_grads[level] += grad
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", [roi_align_reference, fast, lambda f, r, *a: roi_pool(f, r, *a[:2])])
def test_bad_input_is_a_value_error(pool):
    features = torch.randn(2, 3, 5, 5)
    good = torch.tensor([[1.0, 0.0, 0.0, 2.0, 2.0]])
    cases = [
        (features, good[:, 1:], "rois must be a \\[R, 5\\]"),
        (features, good[0], "rois must be a \\[R, 5\\]"),
        (features[0], good, "features must be a \\[N, C, H, W\\]"),
        (features.long(), good.long(), "floating point"),
        (features, torch.tensor([[2.0, 0.0, 0.0, 2.0, 2.0]]), "batch index 2.0, outside \\[0, 2\\)"),
        (features, torch.tensor([[-1.0, 0.0, 0.0, 2.0, 2.0]]), "batch index -1.0"),
        (features, torch.tensor([[0.5, 0.0, 0.0, 2.0, 2.0]]), "batch index 0.5"),
        (features, torch.tensor([[0.0, 0.0, float("nan"), 2.0, 2.0]]), "finite"),
        (features, torch.tensor([[0.0, 0.0, 0.0, float("inf"), 2.0]]), "finite"),
        (features, good.to("meta"), "features are on cpu but rois are on meta"),
        (features, good.double(), "use float32 or the features' dtype"),
        (torch.randn(2, 3, 0, 5), good, "empty 0 x 5 map"),
    ]
    for bad_features, bad_rois, message in cases:
        with pytest.raises(ValueError, match=message):
            pool(bad_features, bad_rois, 2, 1.0, 2)


def test_multi_level_bad_input_is_a_value_error():
    pooler = MultiLevelRoIAlign(2, strides=(4, 8))
    rois = torch.tensor([[0.0, 0.0, 0.0, 8.0, 8.0]])
    with pytest.raises(ValueError, match="expected 2 feature maps"):
        pooler([torch.randn(1, 2, 8, 8)], rois)
    with pytest.raises(ValueError, match="N, C, dtype and device of the first"):
        pooler([torch.randn(1, 2, 8, 8), torch.randn(1, 3, 4, 4)], rois)
    with pytest.raises(ValueError, match="rois must be"):
        pooler([torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4)], rois.double())
    # the pooler is an inner layer: it reads no value of the RoIs (tests/test_no_sync.py), the door does
    with pytest.raises(ValueError, match="batch index"):
        roi_align(torch.randn(1, 2, 8, 8), rois + torch.tensor([1.0, 0, 0, 0, 0]), 2)


@pytest.mark.parametrize("low_precision", [torch.float16, torch.bfloat16])
def test_float32_rois_with_low_precision_features_sample_in_float32(low_precision):
    # mixed precision: boxes stay float32, only the features are 16 bits; 1330 is 1328 in bfloat16
    torch.manual_seed(0)
    features = torch.randn(1, 3, 40, 360).to(low_precision)
    rois = torch.tensor([[0.0, 1325.3, 20.7, 1338.9, 140.2]])
    expected = roi_align_reference(features.double(), rois.double(), 5, 0.25, 2).to(low_precision)
    for pooled in (roi_align_reference(features, rois, 5, 0.25, 2), roi_align(features, rois, 5, 0.25, 2),
                   MultiLevelRoIAlign(5, (4,))([features], rois)):  # fmt: skip
        assert pooled.dtype == low_precision
        torch.testing.assert_close(pooled, expected, atol=0.02, rtol=0.02)  # sums rounded to 16 bits, samples exact
    # RoIs rounded to the features' dtype move the samples (1325.3 is 1325 in float16, 1328 in bfloat16)
    moved = roi_align_reference(features.double(), rois.to(low_precision).double(), 5, 0.25, 2)
    assert (moved - expected.double()).abs().max() > 0.1


# --- torchvision, the outside witness ------------------------------------------------------------


@pytest.mark.torchvision
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2, 3])
def test_matches_torchvision_roi_align(aligned, sampling_ratio):
    ops = pytest.importorskip("torchvision.ops")
    features = torch.randn(2, 4, 12, 15, requires_grad=True)
    rois = random_rois(16, 2, extent=48.0, dtype=torch.float32)
    expected = ops.roi_align(features, rois, (3, 4), 0.25, sampling_ratio, aligned)
    out = fast(features, rois, (3, 4), 0.25, sampling_ratio, aligned)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(roi_align_reference(features, rois, (3, 4), 0.25, sampling_ratio, aligned), expected, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad(expected, features, grad_out)
    (grad,) = torch.autograd.grad(out, features, grad_out)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.torchvision
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5, 0.25])
def test_matches_torchvision_roi_pool(spatial_scale):
    ops = pytest.importorskip("torchvision.ops")
    features = torch.randn(2, 4, 12, 15)
    rois = random_rois(16, 2, extent=15.0 / spatial_scale, dtype=torch.float32)
    assert torch.equal(roi_pool(features, rois, (3, 4), spatial_scale), ops.roi_pool(features, rois, (3, 4), spatial_scale))


@pytest.mark.torchvision
def test_matches_torchvision_multi_scale_roi_align():
    ops = pytest.importorskip("torchvision.ops")
    image_size = (256, 320)
    strides = (4, 8, 16, 32)
    features = [torch.randn(2, 8, image_size[0] // s, image_size[1] // s, requires_grad=True) for s in strides]
    generator = torch.Generator().manual_seed(1)
    boxes = []
    for _ in range(2):
        side = torch.exp(torch.empty(40).uniform_(math.log(8), math.log(900), generator=generator))
        corner = torch.rand(40, 2, generator=generator) * torch.tensor([image_size[1], image_size[0]])
        boxes.append(torch.cat([corner, corner + side[:, None] * torch.rand(40, 2, generator=generator).add(0.5)], dim=1))
    pooler = ops.MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 7, 2)
    expected = pooler(dict(zip(["p2", "p3", "p4", "p5"], features)), boxes, [image_size, image_size])
    rois = torch.cat([torch.cat([torch.full((40, 1), float(n)), b], dim=1) for n, b in enumerate(boxes)])
    out = MultiLevelRoIAlign(7, strides, sampling_ratio=2, aligned=False)(features, rois, use_kernel=False)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert len(set(fpn_level(rois[:, 1:], 2, 5).tolist())) == 4  # all levels used
    grad_out = torch.randn_like(expected)
    for grad, expected_grad in zip(torch.autograd.grad(out, features, grad_out), torch.autograd.grad(expected, features, grad_out)):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


# --- the demonstration figure (the demo writes it) and the command line ---------------------------


def test_roi_align_figure_draws_roipool_and_roialign_side_by_side(tmp_path):
    """The figure the demo writes (roi_align.png): two panels, RoIPool's bins and RoIAlign's samples."""
    from mrcnn.visualize import roi_align_figure

    figure = roi_align_figure()
    assert len(figure.axes) >= 2
    titles = " ".join(axes.get_title() for axes in figure.axes)
    assert "RoIPool" in titles and "RoIAlign" in titles
    path = tmp_path / "roi_align.png"
    figure.savefig(path, dpi=60)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    ([], "required: COMMAND"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["demo", "--nope"], "unrecognized arguments: --nope"),
    (["demo", "--output-dir", "FILE"], "exists and is not a directory"),
])
def test_command_line_mistakes_are_one_line_and_status_2(argv, message, tmp_path, capsys):
    from mrcnn.cli import main

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert main([str(a_file) if arg == "FILE" else arg for arg in argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err and captured.err.count("\n") == 1 and "Traceback" not in captured.err


@pytest.mark.parametrize("method", ["align", "pool"])
def test_strides_that_skip_a_level_pool_zeros_for_the_missing_level(method):
    # torchvision's ['feat1', 'feat3'] example: maps of stride 8 and 32 (levels 3 and 5), none for level 4
    torch.manual_seed(0)
    features = [torch.randn(1, 2, 32, 32), torch.randn(1, 2, 8, 8)]
    rois = torch.tensor([[0.0, 0, 0, 100, 100],     # sqrt(area) 100: level 3
                         [0.0, 0, 0, 224, 224],     # level 4: no map
                         [0.0, 0, 0, 250, 250],     # level 4: no map
                         [0.0, 0, 0, 250, 500]])    # sqrt(area) 354: level 4 too
    rois = torch.cat([rois, torch.tensor([[0.0, 0, 0, 255, 255 * 4.0]])])  # sqrt(area) 510: level 5
    pooler = MultiLevelRoIAlign(3, (8, 32)) if method == "align" else build_roi_pooler("pool", 3, (8, 32), 2, False)
    out = pooler(features, rois)
    single = (lambda f, r, s: roi_align(f, r, 3, s, 2)) if method == "align" else (lambda f, r, s: roi_pool(f, r, 3, s))
    torch.testing.assert_close(out[0], single(features[0], rois[:1], 1 / 8)[0])
    assert torch.equal(out[1:4], torch.zeros(3, 2, 3, 3))  # never memory nobody wrote
    torch.testing.assert_close(out[4], single(features[1], rois[4:], 1 / 32)[0])
