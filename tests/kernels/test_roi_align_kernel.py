"""The RoIAlign kernels (kernels/roi_align.py) against the readable reference and the definition.

Without a GPU the kernels run under Triton's interpreter (tests/conftest.py switches it on),
one program at a time: feature maps of about 10 x 10, a handful of RoIs, and RoIs small enough
that the adaptive sampling grid stays at one or two samples per bin side. Outputs and gradients
(for the same random `grad_output`) are compared; float16 against the reference run in float32.
"""

import math
import os

import pytest
import torch

import kernels.roi_align as kernel_module
from kernels.roi_align import multi_level_roi_align, roi_align
from mrcnn.roi_align import roi_align_reference
from mrcnn.poolers import MultiLevelRoIAlign

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
# compiled Triton needs CUDA tensors; the interpreter runs on CPU tensors
DEVICES = (["cpu"] if INTERPRETER else []) + (["cuda"] if torch.cuda.is_available() else [])
# (dtype, atol, rtol) of the outputs and gradients, against the reference in float32
TOLERANCES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-2, 1e-2)]

# Boxes in image pixels for 2 images and spatial scale 1/2 on a 9 x 11 map (an 18 x 22 image),
# at most 2 adaptive samples per side of a 3 x 2 grid of bins: an ordinary box, one sticking
# out of the map, one entirely outside, a thin one, a single point, an inverted one (x2 < x1)
# and one within a pixel of the bottom-right border.
ROIS = [
    [0, 2.0, 3.0, 9.5, 10.0],
    [1, -4.0, -3.0, 3.0, 5.0],
    [0, 30.0, 30.0, 36.0, 34.0],
    [1, 3.0, 4.0, 3.4, 14.0],
    [0, 7.0, 7.0, 7.0, 7.0],
    [1, 9.0, 6.0, 4.0, 11.0],
    [0, 19.0, 15.0, 22.5, 18.9],
]


def pooled_and_grads(fn, features, rois, grad_output, *args, **kwargs):
    """fn's output and the gradient of each feature map for `grad_output`."""
    maps = [f.detach().clone().requires_grad_() for f in features]
    out = fn(maps if len(maps) > 1 else maps[0], rois, *args, **kwargs)
    grads = torch.autograd.grad(out, maps, grad_output, allow_unused=True)
    return out, [torch.zeros_like(m) if g is None else g for m, g in zip(maps, grads)]


def assert_matches_reference(features, rois, output_size, spatial_scale, sampling_ratio, aligned, atol, rtol):
    """The kernel against `roi_align_reference` run in float32 on the same (rounded) inputs."""
    args = (output_size, spatial_scale, sampling_ratio, aligned)
    grad_output = torch.randn(rois.shape[0], features.shape[1], *output_size, device=features.device)
    out, (grad,) = pooled_and_grads(roi_align, [features], rois, grad_output.to(features.dtype), *args)
    expected, (expected_grad,) = pooled_and_grads(roi_align_reference, [features.float()], rois.float(), grad_output, *args)
    assert out.shape == expected.shape and out.dtype == features.dtype and grad.dtype == features.dtype
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad.float(), expected_grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize(
    "dtype, atol, rtol, sampling_ratio",
    [(*TOLERANCES[0], ratio) for ratio in (-1, 0, 1, 2)] + [(*TOLERANCES[1], ratio) for ratio in (-1, 2)],
)
def test_matches_reference(device, dtype, atol, rtol, aligned, sampling_ratio):
    features = torch.randn(2, 5, 9, 11, device=device).to(dtype)
    rois = torch.tensor(ROIS, device=device).to(dtype)
    assert_matches_reference(features, rois, (3, 2), 0.5, sampling_ratio, aligned, atol, rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aligned", [False, True])
def test_linear_ramp_from_the_definition(device, aligned):
    """On F[y, x] = 5 y + x bilinear sampling is exact, so each bin is 5 (mean y) + (mean x).

    The first case is detectron2's hand-computed 5 x 5 example (tests/layers/test_roi_align.py).
    """
    features = (5 * torch.arange(5.0)[:, None] + torch.arange(5.0)).reshape(1, 1, 5, 5).to(device)
    out = roi_align(features, torch.tensor([[0, 1.0, 1.0, 3.0, 3.0]], device=device), 4, 1.0, 0, aligned)
    if aligned:  # bins of half a pixel, starting at 0.5
        expected = [[4.5, 5.0, 5.5, 6.0], [7.0, 7.5, 8.0, 8.5], [9.5, 10.0, 10.5, 11.0], [12.0, 12.5, 13.0, 13.5]]
    else:  # no half-pixel shift: the same grid, starting at 1
        expected = [[7.5, 8.0, 8.5, 9.0], [10.0, 10.5, 11.0, 11.5], [12.5, 13.0, 13.5, 14.0], [15.0, 15.5, 16.0, 16.5]]
    torch.testing.assert_close(out[0, 0], torch.tensor(expected, device=device))

    # an RoI well inside, 3 x 2 bins, 2 x 2 samples: the mean sample of bin p is y_start + (p + 1/2) b_h
    x1, y1, x2, y2, offset = 0.6, 0.9, 3.2, 3.5, 0.5 if aligned else 0.0
    out = roi_align(features, torch.tensor([[0, x1, y1, x2, y2]], device=device), (3, 2), 1.0, 2, aligned)
    bin_h, bin_w = (y2 - y1) / 3, (x2 - x1) / 2
    mean_y = torch.tensor([y1 - offset + (p + 0.5) * bin_h for p in range(3)])
    mean_x = torch.tensor([x1 - offset + (q + 0.5) * bin_w for q in range(2)])
    torch.testing.assert_close(out[0, 0].cpu(), 5 * mean_y[:, None] + mean_x[None, :], atol=1e-5, rtol=1e-5)


def fpn_level_float64(rois, min_level, max_level):
    """FPN eq. 1 in float64: floor(4 + log2(sqrt(w h) / 224) + 1e-6), clamped; no area: the finest level."""
    levels = []
    for _, x1, y1, x2, y2 in rois.double().tolist():
        area = (x2 - x1) * (y2 - y1)
        k = math.floor(4 + math.log2(math.sqrt(area) / 224) + 1e-6) if area > 0 else min_level
        levels.append(min(max(k, min_level), max_level))
    return levels


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
def test_multi_level_matches_reference_per_level(device, dtype, atol, rtol):
    """Levels P2-P4 (strides 4, 8, 16) of a 64 x 80 image, RoIs for each and clamped at both ends."""
    strides = (4, 8, 16)
    features = [torch.randn(2, 3, 64 // s, 80 // s, device=device).to(dtype) for s in strides]
    rois = torch.tensor([
        [0, 4.0, 4.0, 20.0, 24.0],  # k = 2.1 -> P2
        [1, 0.0, 0.0, 10.0, 6.0],  # k < 2 -> clamped to P2
        [1, 3.0, 5.0, 115.0, 117.0],  # exactly 112 x 112 -> P3 thanks to eps
        [0, 10.0, 6.0, 140.0, 156.0],  # k = 3.3 -> P3
        [0, 1.0, 2.0, 225.0, 226.0],  # exactly 224 x 224 -> P4
        [1, 0.0, 0.0, 80.0, 900.0],  # k = 4.2 -> P4
        [1, -100.0, -50.0, 1000.0, 600.0],  # k = 5.3 -> clamped to P4
    ], device=device).to(dtype)
    levels = fpn_level_float64(rois, 2, 4)
    assert levels == [2, 2, 3, 3, 4, 4, 4]
    grad_output = torch.randn(rois.shape[0], 3, 2, 2, device=device)
    args = (2, [1.0 / s for s in strides], 2, False)
    out, grads = pooled_and_grads(multi_level_roi_align, features, rois, grad_output.to(dtype), *args)
    assert out.shape == (7, 3, 2, 2) and out.dtype == dtype

    # the same from the reference, one RoI at a time on the level FPN eq. 1 gives it
    maps = [f.detach().float().requires_grad_() for f in features]
    expected = torch.cat([
        roi_align_reference(maps[k - 2], rois[r : r + 1].float(), 2, 1.0 / strides[k - 2], 2, False)
        for r, k in enumerate(levels)
    ])
    expected_grads = torch.autograd.grad(expected, maps, grad_output)
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)
    for grad, expected_grad in zip(grads, expected_grads):
        assert expected_grad.abs().sum() > 0  # every level is used
        torch.testing.assert_close(grad.float(), expected_grad, atol=atol, rtol=rtol)

    # and from mrcnn's MultiLevelRoIAlign on its PyTorch path
    pooler = MultiLevelRoIAlign(2, strides=strides, sampling_ratio=2, aligned=False)
    torch.testing.assert_close(out.float(), pooler([f.float() for f in features], rois.float(), use_kernel=False), atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
def test_multi_level_adaptive_aligned_other_canonical_size(device):
    """P2, P3 (strides 4, 8) of a 48 x 40 image, adaptive sampling, half-pixel offset, s0 = 28."""
    features = [torch.randn(1, 4, 12, 10, device=device), torch.randn(1, 4, 6, 5, device=device)]
    rois = torch.tensor([
        [0, 2.0, 3.0, 12.0, 11.0],  # k = 4 + log2(8.9 / 28) = 2.3 -> P2
        [0, 0.0, 0.0, 40.0, 48.0],  # k = 4.6 -> clamped to P3
        [0, 4.0, 4.0, 18.0, 18.0],  # exactly 14 x 14: k = 3 -> P3 thanks to eps
        [0, 4.0, 4.0, 17.9, 18.0],  # just below: P2
        [0, 8.0, 8.0, 8.0, 8.0],  # an empty box: the finest level, P2
    ], device=device)
    levels = [min(max(math.floor(4 + math.log2(math.sqrt((x2 - x1) * (y2 - y1)) / 28) + 1e-6), 2), 3)
              for _, x1, y1, x2, y2 in rois[:4].tolist()] + [2]
    assert levels == [2, 3, 3, 2, 2]
    grad_output = torch.randn(5, 4, 2, 3, device=device)
    args = ((2, 3), [1 / 4, 1 / 8], -1, True, 2, 4, 28.0)
    out, grads = pooled_and_grads(multi_level_roi_align, features, rois, grad_output, *args)
    maps = [f.detach().requires_grad_() for f in features]
    expected = torch.cat([
        roi_align_reference(maps[k - 2], rois[r : r + 1], (2, 3), 1 / 2**k, -1, True) for r, k in enumerate(levels)
    ])
    expected_grads = torch.autograd.grad(expected, maps, grad_output)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("a kernel was launched for an empty RoI set")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_roi_set(device, monkeypatch):
    monkeypatch.setattr(kernel_module, "_roi_align_kernel", _NoLaunch())
    features = [torch.randn(2, 3, 8, 8, device=device, requires_grad=True), torch.randn(2, 3, 4, 4, device=device, requires_grad=True)]
    rois = torch.zeros(0, 5, device=device)
    out = roi_align(features[0], rois, 7, 0.25)
    assert out.shape == (0, 3, 7, 7)
    (grad,) = torch.autograd.grad(out.sum(), features[0])
    assert torch.equal(grad, torch.zeros_like(grad))
    out = multi_level_roi_align(features, rois, (7, 5), [0.25, 0.125])
    assert out.shape == (0, 3, 7, 5)
    grads = torch.autograd.grad(out.sum(), features)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_and_channels_last_inputs(device):
    base = torch.randn(2, 10, 11, 9, device=device)
    rois = torch.tensor(ROIS[:3], device=device)
    for features in (
        base.transpose(2, 3),  # [2, 10, 9, 11], non-contiguous
        base.transpose(2, 3).contiguous(memory_format=torch.channels_last),
        base[:, ::2].transpose(2, 3),  # every other channel
    ):
        assert_matches_reference(features, rois, (3, 2), 0.5, 1, False, 1e-5, 1e-5)
    # non-contiguous rois and grad_output
    features = base.transpose(2, 3).contiguous()
    rois_strided = torch.stack([rois, rois], dim=2)[:, :, 0]  # strides (10, 2)
    assert not rois_strided.is_contiguous() and torch.equal(rois_strided, rois)
    grad_output = torch.randn(3, 2, 3, 10, device=device).transpose(1, 3)  # [3, 10, 3, 2]
    out, (grad,) = pooled_and_grads(roi_align, [features], rois_strided, grad_output, (3, 2), 0.5, 2, True)
    expected, (expected_grad,) = pooled_and_grads(roi_align_reference, [features], rois, grad_output, (3, 2), 0.5, 2, True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the interpreter has no bfloat16 arithmetic")
def test_bfloat16_on_cuda():
    features = torch.randn(2, 5, 9, 11, device="cuda").bfloat16()
    rois = torch.tensor(ROIS, device="cuda").bfloat16()
    for sampling_ratio in (-1, 2):
        assert_matches_reference(features, rois, (3, 2), 0.5, sampling_ratio, False, 5e-2, 2e-2)


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETER, reason="host synchronization is a CUDA matter")
def test_multi_level_without_validation_never_synchronizes():
    features = [torch.randn(2, 8, 64 // s, 80 // s, device="cuda", requires_grad=True) for s in (4, 8, 16)]
    rois = torch.tensor([[0, 4.0, 4.0, 20.0, 24.0], [1, 3.0, 5.0, 115.0, 117.0], [1, 0.0, 0.0, 80.0, 900.0]], device="cuda")
    multi_level_roi_align(features, rois, 7, [1 / 4, 1 / 8, 1 / 16], 2, validate=False).sum().backward()  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = multi_level_roi_align(features, rois, 7, [1 / 4, 1 / 8, 1 / 16], 2, validate=False)
        torch.autograd.grad(out, features, torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("device", DEVICES)
def test_without_validation_a_bad_batch_index_pools_zeros(device):
    features = torch.randn(2, 3, 9, 11, device=device)
    rois = torch.tensor([[0, 1.0, 1.0, 8.0, 8.0], [5, 1.0, 1.0, 8.0, 8.0], [-1, 1.0, 1.0, 8.0, 8.0]], device=device)
    out = roi_align(features, rois, 2, 1.0, 2, validate=False)
    torch.testing.assert_close(out[0], roi_align_reference(features, rois[:1], 2, 1.0, 2)[0])
    assert torch.equal(out[1:], torch.zeros_like(out[1:]))
    multi = multi_level_roi_align([features, features[:, :, ::2, ::2]], rois, 2, [1.0, 0.5], 2, validate=False)
    assert torch.equal(multi[1:], torch.zeros_like(multi[1:]))


def _bad_inputs():
    features, rois = torch.randn(2, 3, 8, 8), torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]])
    yield "rois must be a \\[R, 5\\]", features, rois[:, :4]
    yield "rois must be a \\[R, 5\\]", features, rois[0]
    yield "batch index", features, torch.tensor([[2, 1.0, 1.0, 5.0, 5.0]])
    yield "batch index", features, torch.tensor([[-1, 1.0, 1.0, 5.0, 5.0]])
    yield "batch index", features, torch.tensor([[0.5, 1.0, 1.0, 5.0, 5.0]])
    yield "finite", features, torch.tensor([[0, 1.0, float("nan"), 5.0, 5.0]])
    yield "finite", features, torch.tensor([[0, 1.0, 1.0, float("inf"), 5.0]])
    yield "float32 or the features' dtype", features, rois.double()
    yield "float32 or the features' dtype", features, rois.half()  # (float32 rois with 16-bit features are fine)
    yield "float32, float16 or bfloat16", features.double(), rois.double()
    yield "float32, float16 or bfloat16", features.long(), rois
    yield "\\[N, C, H, W\\]", features[0], rois
    if torch.cuda.is_available():
        yield "are on", features.cuda(), rois


@pytest.mark.parametrize("message, features, rois", list(_bad_inputs()))
def test_bad_input_raises_before_launch(message, features, rois, monkeypatch):
    monkeypatch.setattr(kernel_module, "_roi_align_kernel", _NoLaunch())
    with pytest.raises(ValueError, match=message):
        roi_align(features, rois, 2)
    with pytest.raises(ValueError, match=message):
        multi_level_roi_align([features, features], rois, 2, [1.0, 0.5])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_empty_batch(device, deterministic, monkeypatch):
    """No image at all (N = 0) and no RoI: `[0, C, P, P]` and a gradient of the maps' shape, no launch."""
    monkeypatch.setattr(kernel_module, "_roi_align_kernel", _NoLaunch())
    features = [torch.randn(0, 3, 8, 10, device=device, requires_grad=True), torch.randn(0, 3, 4, 5, device=device, requires_grad=True)]
    rois = torch.zeros(0, 5, device=device)
    out = roi_align(features[0], rois, (2, 3), 0.5, deterministic=deterministic)
    assert out.shape == (0, 3, 2, 3)
    (grad,) = torch.autograd.grad(out, features[0], torch.ones_like(out))
    assert grad.shape == (0, 3, 8, 10)
    out = multi_level_roi_align(features, rois, 2, [0.25, 0.125], deterministic=deterministic)
    assert out.shape == (0, 3, 2, 2)
    grads = torch.autograd.grad(out, features, torch.ones_like(out))
    assert [tuple(g.shape) for g in grads] == [(0, 3, 8, 10), (0, 3, 4, 5)]


def pooled_with_missing_levels(features, rois, strides, output_size, sampling_ratio, aligned):
    """The definition, one RoI at a time: FPN eq. 1 in float64, clamped to the first and last maps'
    levels; the reference on the map of that level, or zeros where the strides skip it."""
    levels = [round(math.log2(s)) for s in strides]
    pooled = []
    for r, level in enumerate(fpn_level_float64(rois, levels[0], levels[-1])):
        if level in levels:
            index = levels.index(level)
            pooled.append(roi_align_reference(features[index], rois[r : r + 1], output_size, 1 / strides[index], sampling_ratio, aligned))
        else:
            pooled.append(features[0].new_zeros(1, features[0].shape[1], *output_size))
    return torch.cat(pooled)  # [R, C, P_h, P_w]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("strides", [(8, 32), (4, 16, 32)])
def test_strides_that_skip_a_level_pool_zeros(device, strides, deterministic):
    """Levels 3 and 5 (or 2, 4, 5): a RoI whose level has no map pools zeros and gets no gradient."""
    features = [torch.randn(2, 3, 128 // s, 160 // s, device=device) for s in strides]
    rois = torch.tensor([
        [0, 4.0, 4.0, 40.0, 50.0],  # sqrt(area) 41: k = 1, clamped to the first map
        [1, 3.0, 5.0, 115.0, 117.0],  # 112: k = 3
        [0, 1.0, 2.0, 225.0, 226.0],  # 224: k = 4
        [1, -50.0, -40.0, 300.0, 310.0],  # 350: k = 4
        [0, 0.0, 0.0, 460.0, 460.0],  # 460: k = 5
        [1, -100.0, -100.0, 1000.0, 900.0],  # 1049: k = 6, clamped to the last map
        [0, 8.0, 8.0, 8.0, 8.0],  # an empty box: the first map
    ], device=device)  # fmt: skip
    levels = [round(math.log2(s)) for s in strides]
    expected_levels = [min(max(k, levels[0]), levels[-1]) for k in (1, 3, 4, 4, 5, 6)]
    assert fpn_level_float64(rois[:6], levels[0], levels[-1]) == expected_levels
    missing = [k not in levels for k in expected_levels] + [False]
    assert any(missing) and not all(missing)
    grad_output = torch.randn(7, 3, 2, 3, device=device)
    args = ((2, 3), [1 / s for s in strides], 2, True)
    out, grads = pooled_and_grads(multi_level_roi_align, features, rois, grad_output, *args, levels[0], deterministic=deterministic)
    maps = [f.detach().requires_grad_() for f in features]
    expected = pooled_with_missing_levels(maps, rois, strides, (2, 3), 2, True)
    expected_grads = torch.autograd.grad(expected, maps, grad_output)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[torch.tensor(missing)], torch.zeros_like(out[torch.tensor(missing)]))
    assert out[~torch.tensor(missing)].abs().amax(dim=(1, 2, 3)).gt(0).all()  # the others pool something
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)
    # and mrcnn's MultiLevelRoIAlign on its PyTorch path, which the model takes without a GPU
    pooler = MultiLevelRoIAlign((2, 3), strides=strides, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(out, pooler([f.detach() for f in features], rois, use_kernel=False), atol=1e-5, rtol=1e-5)


def test_spatial_scales_must_be_finest_first():
    features, rois = torch.randn(1, 3, 8, 8), torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]])
    for scales in ([0.5, 1.0], [0.5, 0.5], [0.25, 0.2]):  # coarser first, the same level twice (0.2: level 2 again)
        with pytest.raises(ValueError, match="finest first"):
            multi_level_roi_align([features, features], rois, 2, scales)


def test_bad_settings_raise():
    features, rois = torch.randn(1, 3, 8, 8), torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]])
    with pytest.raises(ValueError, match="output_size"):
        roi_align(features, rois, 0)
    with pytest.raises(ValueError, match="spatial scale"):
        multi_level_roi_align([features, features], rois, 2, [1.0])
    with pytest.raises(ValueError, match="N, C, dtype and device"):
        multi_level_roi_align([features, torch.randn(1, 4, 4, 4)], rois, 2, [1.0, 0.5])
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align(features, rois, 2, 1.0, 2.0)
