"""RoIAlign kernels with float32 RoIs and 16-bit features (kernels/roi_align.py, issue 13).

Under mixed precision the features are float16 or bfloat16 but the boxes stay float32 (the
project's rule: box geometry is float32 always). The kernels accept that pair and compute the
sampling coordinates in float32 from the float32 RoIs, so the result must be the float32
reference's on the same features cast up, to the rounding of 16-bit features and outputs. The
RoIs here lie near x = 1030-1100, where float16 spaces its numbers 1 apart: rounding them to the
features' dtype would move samples by up to half a pixel, which each test shows is far outside
its tolerance, so a kernel that rounded the boxes would fail.

The interpreter has no bfloat16 arithmetic: float16 runs everywhere, bfloat16 on CUDA only.
"""

import os

import pytest
import torch

from kernels.roi_align import multi_level_roi_align, roi_align
from mrcnn.roi_align import roi_align_reference

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = (["cpu"] if INTERPRETER else []) + (["cuda"] if torch.cuda.is_available() else [])

# 2 images, a map of 6 x 1100 at scale 1: a box with half-pixel corners, one with quarter-pixel
# corners, a single point, and one sticking out of the right border.
ROIS = [
    [0, 1030.5, 0.5, 1037.5, 4.25],
    [1, 1041.25, 1.75, 1044.75, 5.5],
    [0, 1050.5, 2.0, 1050.5, 2.0],
    [1, 1090.5, -1.0, 1102.5, 3.5],
]


def pooled_and_grads(fn, features, rois, grad_output, *args, **kwargs):
    """fn's output and the gradient of each feature map for `grad_output`."""
    maps = [f.detach().clone().requires_grad_() for f in features]
    out = fn(maps if len(maps) > 1 else maps[0], rois, *args, **kwargs)
    return out, torch.autograd.grad(out, maps, grad_output)


def assert_float32_rois_kept(features, rois, args, atol, rtol, deterministic):
    """The kernel on (16-bit features, float32 rois) against the float32 reference on the features cast up."""
    grad_output = torch.randn(rois.shape[0], features.shape[1], *args[0], device=features.device).to(features.dtype)
    out, (grad,) = pooled_and_grads(roi_align, [features], rois, grad_output, *args, deterministic=deterministic)
    expected, (expected_grad,) = pooled_and_grads(roi_align_reference, [features.float()], rois, grad_output.float(), *args)
    assert rois.dtype == torch.float32 and out.dtype == features.dtype and grad.dtype == features.dtype
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad.float(), expected_grad, atol=atol, rtol=rtol)
    # the boxes rounded to the features' dtype give another answer, far outside the tolerance
    rounded = roi_align_reference(features.float(), rois.to(features.dtype).float(), *args)
    assert (rounded - expected).abs().max() > 10 * atol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("sampling_ratio, aligned", [(2, False), (-1, True)])
def test_float32_rois_with_float16_features(device, sampling_ratio, aligned, deterministic):
    features = torch.randn(2, 3, 6, 1100, device=device).half()
    rois = torch.tensor(ROIS, device=device)
    assert_float32_rois_kept(features, rois, ((2, 3), 1.0, sampling_ratio, aligned), 2e-2, 1e-2, deterministic)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the interpreter has no bfloat16 arithmetic")
@pytest.mark.parametrize("deterministic", [False, True])
def test_float32_rois_with_bfloat16_features_on_cuda(deterministic):
    features = torch.randn(2, 3, 6, 1100, device="cuda").bfloat16()
    rois = torch.tensor(ROIS, device="cuda")
    for sampling_ratio, aligned in ((2, False), (-1, True)):
        assert_float32_rois_kept(features, rois, ((2, 3), 1.0, sampling_ratio, aligned), 5e-2, 2e-2, deterministic)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_multi_level_float32_rois_with_float16_features(device, deterministic):
    """P2, P3 (strides 4, 8) in float16, float32 RoIs of both levels, against the reference per RoI."""
    strides = (4, 8)
    features = [torch.randn(2, 3, 24 // s, 4400 // s, device=device).half() for s in strides]
    rois = torch.tensor([
        [0, 4121.5, 2.0, 4140.5, 19.0],  # sqrt(area) 19: P2
        [1, 4101.5, 1.0, 4230.5, 23.0],  # sqrt(129 * 22) = 53: P2
        [0, 4001.5, -60.0, 4200.5, 100.0],  # sqrt(199 * 160) = 178: P3
    ], device=device)  # fmt: skip
    levels = [2, 2, 3]
    grad_output = torch.randn(3, 3, 2, 2, device=device).half()
    args = (2, [1 / s for s in strides], 2, False)
    out, grads = pooled_and_grads(multi_level_roi_align, features, rois, grad_output, *args, deterministic=deterministic)
    maps = [f.detach().float().requires_grad_() for f in features]
    expected = torch.cat([
        roi_align_reference(maps[k - 2], rois[r : r + 1], 2, 1 / strides[k - 2], 2, False) for r, k in enumerate(levels)
    ])  # fmt: skip
    expected_grads = torch.autograd.grad(expected, maps, grad_output.float())
    assert out.dtype == torch.float16 and all(g.dtype == torch.float16 for g in grads)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=1e-2)
    for grad, expected_grad in zip(grads, expected_grads):
        assert expected_grad.abs().sum() > 0  # both levels are used
        torch.testing.assert_close(grad.float(), expected_grad, atol=2e-2, rtol=1e-2)
    rounded = torch.cat([
        roi_align_reference(maps[k - 2], rois[r : r + 1].half().float(), 2, 1 / strides[k - 2], 2, False)
        for r, k in enumerate(levels)
    ])  # fmt: skip
    assert (rounded - expected).abs().max() > 0.2  # rounding the boxes would have been seen


@pytest.mark.parametrize("device", DEVICES)
def test_only_float32_or_the_features_dtype(device):
    features = torch.randn(1, 2, 6, 6, device=device)
    rois = torch.tensor([[0, 1.0, 1.0, 4.0, 4.0]], device=device)
    for features_dtype, rois_dtype in ((torch.float32, torch.float16), (torch.float16, torch.float64), (torch.float32, torch.float64)):
        with pytest.raises(ValueError, match="rois must be float32 or the features' dtype"):
            roi_align(features.to(features_dtype), rois.to(rois_dtype), 2)
    # float16 rois with float16 features stay accepted (coordinates still computed in float32)
    out = roi_align(features.half(), rois.half(), 2, 1.0, 2)
    torch.testing.assert_close(out.float(), roi_align_reference(features.half().float(), rois, 2, 1.0, 2), atol=2e-3, rtol=1e-3)
