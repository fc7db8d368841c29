"""The fused mask-loss kernel (kernels/mask_loss.py) against the readable reference.

Without a GPU the kernel runs under Triton's interpreter (tests/conftest.py switches it on),
where every program costs about 10 ms: the shapes stay small and the blocks large.
"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels.mask_loss as kernel_module
from kernels.mask_loss import mask_loss as mask_loss_kernel
from mrcnn.mask_loss import mask_loss, mask_loss_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (dtype, atol, rtol) of the loss and of the gradient times R M^2 (so both are of order 1)
TOLERANCES = [(torch.float32, 1e-6, 1e-5), (torch.float16, 1e-3, 1e-3), (torch.bfloat16, 1e-2, 1e-2)]


def loss_and_grad(fn, logits, labels, targets, grad_loss=1.0):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, labels, targets)
    (grad,) = torch.autograd.grad(loss, x, torch.tensor(grad_loss, device=loss.device))
    return loss, grad


def assert_matches_reference(logits, labels, targets, atol, rtol, grad_loss=1.0):
    loss, grad = loss_and_grad(mask_loss_kernel, logits, labels, targets, grad_loss)
    expected_loss, expected_grad = loss_and_grad(mask_loss_reference, logits, labels, targets, grad_loss)
    assert loss.dtype == torch.float32 and grad.dtype == logits.dtype and grad.shape == logits.shape
    torch.testing.assert_close(loss, expected_loss, atol=atol, rtol=rtol)
    count = targets.numel()  # R M^2: the gradient is (sigmoid - t) / count
    torch.testing.assert_close(grad.float() * count, expected_grad.float() * count, atol=atol, rtol=rtol)
    return grad


def make_case(num_rois, num_classes, size, dtype, device, scale=3.0):
    logits = (torch.randn(num_rois, num_classes, size, size) * scale).to(device=device, dtype=dtype)
    labels = torch.randint(0, num_classes, (num_rois,), device=device)
    targets = torch.rand(num_rois, size, size, device=device)
    return logits, labels, targets


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES[:2])
@pytest.mark.parametrize("num_rois", [1, 7])
@pytest.mark.parametrize("num_classes", [1, 2, 81])
@pytest.mark.parametrize("size", [14, 28])
def test_matches_reference(device, dtype, atol, rtol, num_rois, num_classes, size):
    logits, labels, targets = make_case(num_rois, num_classes, size, dtype, device)
    grad = assert_matches_reference(logits, labels, targets, atol, rtol)
    others = torch.ones_like(grad, dtype=torch.bool)
    others[torch.arange(num_rois, device=device), labels] = False
    assert not grad[others].any()  # the other K - 1 masks get exactly zero gradient


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16(device):
    _, atol, rtol = TOLERANCES[2]
    assert_matches_reference(*make_case(3, 5, 14, torch.bfloat16, device), atol, rtol)


@pytest.mark.parametrize("device", DEVICES)
def test_many_rois_and_several_programs(device):
    # 100 * 28 * 28 = 78400 pixels: more than one program even with the interpreter's large blocks
    assert_matches_reference(*make_case(100, 3, 28, torch.float32, device), 1e-6, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_matches_naive_float64_loop(device):
    logits, labels, targets = make_case(2, 3, 14, torch.float32, device)
    total = 0.0
    for r in range(2):
        for i in range(14):
            for j in range(14):
                x, t = float(logits[r, labels[r], i, j]), float(targets[r, i, j])
                total += -t * math.log(1 / (1 + math.exp(-x))) - (1 - t) * math.log(1 - 1 / (1 + math.exp(-x)))
    assert mask_loss_kernel(logits, labels, targets).item() == pytest.approx(total / (2 * 14 * 14), rel=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extreme_logits(device, dtype):
    # every combination of a +-1e4 logit with a 0 / 1 target, one pixel each
    logits = torch.tensor([1e4, -1e4, 1e4, -1e4], device=device, dtype=dtype).reshape(4, 1, 1, 1).expand(4, 2, 14, 14)
    logits = logits.contiguous()
    labels = torch.tensor([0, 1, 1, 0], device=device)
    targets = torch.tensor([0.0, 1.0, 1.0, 0.0], device=device).reshape(4, 1, 1).expand(4, 14, 14).contiguous()
    loss, grad = loss_and_grad(mask_loss_kernel, logits, labels, targets)
    assert loss.item() == pytest.approx(0.5e4)  # two RoIs lose 1e4 per pixel, two lose 0
    assert torch.isfinite(grad).all()
    assert_matches_reference(logits, labels, targets, 1e-6, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value", [0.0, 1.0])
def test_all_zero_and_all_one_targets(device, value):
    logits, labels, targets = make_case(3, 4, 14, torch.float32, device)
    assert_matches_reference(logits, labels, torch.full_like(targets, value), 1e-6, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_uint8_and_bool_targets(device):
    logits, labels, targets = make_case(3, 4, 14, torch.float32, device)
    binary = targets > 0.5
    expected = mask_loss_kernel(logits, labels, binary.float())
    assert mask_loss_kernel(logits, labels, binary.to(torch.uint8)).item() == expected.item()
    assert mask_loss_kernel(logits, labels, binary).item() == expected.item()
    assert_matches_reference(logits, labels, binary, 1e-6, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_logits_and_targets(device):
    base, labels, targets = make_case(3, 8, 14, torch.float32, device)
    logits = base[:, ::2].transpose(2, 3)  # [3, 4, 14, 14], strided channels, swapped axes
    labels = labels % 4
    assert not logits.is_contiguous()
    assert_matches_reference(logits, labels, targets.transpose(1, 2), 1e-6, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_incoming_gradient_scales_and_backward_can_run_twice(device):
    logits, labels, targets = make_case(3, 4, 14, torch.float32, device)
    assert_matches_reference(logits, labels, targets, 1e-6, 1e-5, grad_loss=-2.5)
    x = logits.clone().requires_grad_()
    loss = mask_loss_kernel(x, labels, targets)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first)  # the saved gradient is not consumed by the first call


@pytest.mark.parametrize("device", DEVICES)
def test_bit_identical_from_run_to_run(device):
    logits, labels, targets = make_case(100, 3, 28, torch.float32, device)
    first, first_grad = loss_and_grad(mask_loss_kernel, logits, labels, targets)
    second, second_grad = loss_and_grad(mask_loss_kernel, logits, labels, targets)
    assert torch.equal(first, second) and torch.equal(first_grad, second_grad)


@pytest.mark.parametrize("device", DEVICES)
def test_logits_without_gradient(device):
    logits, labels, targets = make_case(3, 4, 14, torch.float32, device)
    loss = mask_loss_kernel(logits, labels, targets)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, mask_loss_reference(logits, labels, targets))


@pytest.mark.parametrize("device", DEVICES)
def test_no_rois(device):
    logits = torch.randn(0, 4, 14, 14, device=device, requires_grad=True)
    loss = mask_loss_kernel(logits, torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, 14, 14, device=device))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.shape == logits.shape and not logits.grad.any()


@pytest.mark.parametrize("device", DEVICES)
def test_dispatch_with_use_kernel(device):
    logits, labels, targets = make_case(3, 4, 14, torch.float32, device)
    torch.testing.assert_close(mask_loss(logits, labels, targets, use_kernel=True),
                               mask_loss(logits, labels, targets, use_kernel=False))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, l, t: (x, l.clone().fill_(4), t), "outside"),
        (lambda x, l, t: (x, l - 5, t), "outside"),
        (lambda x, l, t: (x, l[:2], t), "entries"),
        (lambda x, l, t: (x, l, t[:, :13]), "mask_targets must be"),
        (lambda x, l, t: (x, l, t + 1.5), "outside \\[0, 1\\]"),
        (lambda x, l, t: (x, l, (t * 3).to(torch.uint8)), "outside \\[0, 1\\]"),
        (lambda x, l, t: (x.double(), l, t), "float32, float16 or bfloat16"),
        (lambda x, l, t: (x, l.float(), t), "integer"),
    ],
)
def test_bad_inputs_raise_before_any_launch(monkeypatch, change, message):
    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(kernel_module, "_forward", no_launch)
    logits, labels, targets = make_case(3, 4, 14, torch.float32, "cpu")
    with pytest.raises(ValueError, match=message):
        mask_loss_kernel(*change(logits, labels, targets))


METADATA_CHANGES = [  # what validate=False still checks: shapes, dtypes, devices (no value read)
    (lambda x, l, t: (x, l[:2], t), "entries"),
    (lambda x, l, t: (x, l, t[:, :13]), "mask_targets must be"),
    (lambda x, l, t: (x.double(), l, t), "float32, float16 or bfloat16"),
    (lambda x, l, t: (x, l.float(), t), "integer"),
    (lambda x, l, t: (x[:, :, :13], l, t), "\\[R, K, M, M\\]"),
]


@pytest.mark.parametrize("change, message", METADATA_CHANGES)
def test_without_validation_metadata_is_still_checked(monkeypatch, change, message):
    monkeypatch.setattr(kernel_module, "_forward", lambda *args, **kwargs: pytest.fail("a kernel was launched"))
    logits, labels, targets = make_case(3, 4, 14, torch.float32, "cpu")
    with pytest.raises(ValueError, match=message):
        mask_loss_kernel(*change(logits, labels, targets), validate=False)


@pytest.mark.parametrize("device", DEVICES)
def test_without_validation_values_are_not_checked(device):
    """A target of 1.5 raises by default; with validate=False it enters the formula, as in the reference's."""
    logits, labels, targets = make_case(3, 4, 14, torch.float32, device)
    targets[1, 2, 3] = 1.5
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        mask_loss_kernel(logits, labels, targets)
    loss, grad = loss_and_grad(lambda *a: mask_loss_kernel(*a, validate=False), logits, labels, targets)
    expected_loss, expected_grad = loss_and_grad(lambda *a: mask_loss_reference(*a, validate=False), logits, labels, targets)
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad * targets.numel(), expected_grad * targets.numel(), atol=1e-6, rtol=1e-5)


class HostReads(TorchDispatchMode):
    """Records the operators that read a tensor's value back to the host (a synchronisation on a GPU)."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.seen.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
def test_without_validation_nothing_is_read_back(device):
    logits, labels, targets = make_case(5, 3, 14, torch.float32, device)
    for validate, reads in ((True, 1), (False, 0)):  # the check's one read, or none at all
        x = logits.clone().requires_grad_()
        with HostReads() as recorder:
            loss = mask_loss_kernel(x, labels, targets, validate=validate)
            loss.backward()
        assert len(recorder.seen) == reads, (validate, recorder.seen)
        torch.testing.assert_close(loss, mask_loss_reference(logits, labels, targets))
