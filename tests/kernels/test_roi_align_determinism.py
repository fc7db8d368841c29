"""RoIAlign's deterministic backward (kernels/roi_align_deterministic.py): the same bits every run.

Under Triton's interpreter (no GPU) programs run one after another, so even the atomic backward
repeats itself there; what these tests can prove on a CPU is that the fixed-order backward
computes the right gradient (against a float64 reference and the atomic backward), that the
global switch selects it, and that its bits do not depend on how the work is cut into programs.
On CUDA they also run the same backward many times over RoIs that share pixels and compare bits.
"""

import os

import pytest
import torch

import kernels.roi_align as kernel_module
import kernels.roi_align_deterministic as deterministic_module
from kernels.roi_align import multi_level_roi_align, roi_align
from mrcnn.roi_align import roi_align_reference

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = (["cpu"] if INTERPRETER else []) + (["cuda"] if torch.cuda.is_available() else [])

# 2 images, spatial scale 1/2 on a 7 x 8 map: an ordinary box, one sticking out of the map, one
# entirely outside, one on the bottom-right border, and two that overlap the first (shared pixels).
ROIS = [
    [0, 2.0, 3.0, 9.5, 10.0],
    [1, -4.0, -3.0, 3.0, 5.0],
    [0, 30.0, 30.0, 36.0, 34.0],
    [1, 11.0, 9.0, 16.0, 14.0],
    [0, 3.0, 2.0, 8.0, 11.0],
    [0, 1.0, 1.0, 12.0, 12.0],
]


def gradient(fn, features, rois, grad_output, *args, **kwargs):
    maps = [f.detach().clone().requires_grad_() for f in features]
    out = fn(maps if len(maps) > 1 else maps[0], rois, *args, **kwargs)
    return torch.autograd.grad(out, maps, grad_output)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampling_ratio, aligned", [(2, False), (-1, True), (1, True)])
def test_deterministic_backward_is_the_gradient(device, sampling_ratio, aligned):
    """Against the float64 reference's gradient, and the atomic backward to float rounding."""
    features = torch.randn(2, 3, 7, 8, device=device)
    rois = torch.tensor(ROIS, device=device)
    grad_output = torch.randn(len(ROIS), 3, 3, 2, device=device)
    args = ((3, 2), 0.5, sampling_ratio, aligned)
    (fixed,) = gradient(roi_align, [features], rois, grad_output, *args, deterministic=True)
    (atomic,) = gradient(roi_align, [features], rois, grad_output, *args, deterministic=False)
    (expected,) = gradient(roi_align_reference, [features.double()], rois.double(), grad_output.double(), *args)
    assert fixed.dtype == torch.float32 and fixed.shape == features.shape
    torch.testing.assert_close(fixed.double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fixed, atomic, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_multi_level_half_precision_and_a_missing_image(device):
    """P2, P3 in float16, adaptive sampling; a RoI of image 5 (validate=False) adds nothing."""
    strides = (4, 8)
    features = [torch.randn(2, 3, 32 // s, 40 // s, device=device).half() for s in strides]
    rois = torch.tensor([[0, 2.0, 3.0, 14.0, 11.0], [1, 0.0, 0.0, 40.0, 32.0], [0, 4.0, 4.0, 20.0, 30.0],
                         [5, 4.0, 4.0, 20.0, 30.0]], device=device).half()  # fmt: skip
    grad_output = torch.randn(4, 3, 2, 2, device=device).half()
    args = (2, [1 / s for s in strides], -1, True, 2, 4, 28.0)
    fixed = gradient(multi_level_roi_align, features, rois, grad_output, *args, validate=False, deterministic=True)
    atomic = gradient(multi_level_roi_align, features, rois, grad_output, *args, validate=False, deterministic=False)
    valid = gradient(multi_level_roi_align, features, rois[:3], grad_output[:3], *args, deterministic=True)
    for a, b, c in zip(fixed, atomic, valid):
        assert a.dtype == torch.float16
        torch.testing.assert_close(a.float(), b.float(), atol=2e-3, rtol=1e-3)
        assert torch.equal(a, c)  # the RoI of a missing image contributes no term at all


@pytest.mark.parametrize("device", DEVICES)
def test_bits_do_not_depend_on_the_tiling(device, monkeypatch):
    """Each sum runs in one program in slot order: other tile sizes (other programs) give the same bits."""
    features = torch.randn(2, 5, 7, 8, device=device)
    rois = torch.tensor(ROIS, device=device)
    grad_output = torch.randn(len(ROIS), 5, 3, 3, device=device)
    args = ((3, 3), 0.5, 2, False)
    (first,) = gradient(roi_align, [features], rois, grad_output, *args, deterministic=True)
    (again,) = gradient(roi_align, [features], rois, grad_output, *args, deterministic=True)
    monkeypatch.setattr(deterministic_module, "_sum_tile", lambda *_: (8, 2))  # 14 x 3 programs instead of 1
    (retiled,) = gradient(roi_align, [features], rois, grad_output, *args, deterministic=True)
    assert torch.equal(first, again) and torch.equal(first, retiled)


@pytest.mark.parametrize("device", DEVICES)
def test_global_switch_selects_the_fixed_order(device, monkeypatch):
    """`torch.use_deterministic_algorithms(True)` picks the fixed-order backward; an explicit argument wins."""
    calls = []
    original = deterministic_module.deterministic_backward
    monkeypatch.setattr(deterministic_module, "deterministic_backward", lambda *a: calls.append(1) or original(*a))
    features = torch.randn(1, 2, 6, 6, device=device)
    rois = torch.tensor([[0, 1.0, 1.0, 9.0, 9.0]], device=device)
    grad_output = torch.ones(1, 2, 2, 2, device=device)
    gradient(roi_align, [features], rois, grad_output, 2, 0.5, 2)
    assert calls == []
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        gradient(roi_align, [features], rois, grad_output, 2, 0.5, 2)
        assert calls == [1]
        gradient(roi_align, [features], rois, grad_output, 2, 0.5, 2, deterministic=False)
        assert calls == [1]
    finally:
        torch.use_deterministic_algorithms(previous)
    gradient(roi_align, [features], rois, grad_output, 2, 0.5, 2, deterministic=True)
    assert calls == [1, 1]


@pytest.mark.parametrize("device", DEVICES)
def test_empty_roi_set_launches_nothing(device, monkeypatch):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("a kernel was launched for an empty RoI set")

    for name in ("_roi_align_terms_kernel", "_segment_sum_kernel", "_roi_grid_kernel"):
        monkeypatch.setattr(deterministic_module, name, NoLaunch())
    monkeypatch.setattr(kernel_module, "_roi_align_kernel", NoLaunch())
    features = torch.randn(2, 3, 8, 8, device=device)
    (grad,) = gradient(roi_align, [features], torch.zeros(0, 5, device=device), torch.zeros(0, 3, 2, 2, device=device),
                       2, 0.25, -1, deterministic=True)  # fmt: skip
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="run-to-run variation needs a GPU's scheduler")
def test_cuda_gradients_are_bit_identical_run_to_run():
    """Thousands of RoIs on one small map: every pixel gets hundreds of terms; 20 runs, one set of bits."""
    torch.manual_seed(0)
    features = [torch.randn(2, 256, 64, 64, device="cuda"), torch.randn(2, 256, 32, 32, device="cuda")]
    xy = torch.rand(4096, 2, device="cuda") * 200
    rois = torch.cat([torch.randint(0, 2, (4096, 1), device="cuda").float(), xy, xy + 8 + torch.rand(4096, 2, device="cuda") * 100], 1)
    grad_output = torch.randn(4096, 256, 7, 7, device="cuda")
    args = (7, [1 / 4, 1 / 8], 2, False, 2)
    first = gradient(multi_level_roi_align, features, rois, grad_output, *args, deterministic=True)
    for _ in range(20):
        again = gradient(multi_level_roi_align, features, rois, grad_output, *args, deterministic=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    atomic = gradient(multi_level_roi_align, features, rois, grad_output, *args, deterministic=False)
    for a, b in zip(first, atomic):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
