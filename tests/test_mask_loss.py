"""The mask loss reference (mrcnn/mask_loss.py) against its definition, hand cases and torchvision."""

import math

import pytest
import torch
import torch.nn.functional as F

from mrcnn.mask_loss import (
    gathered_mask_logits,
    mask_loss,
    mask_loss_reference,
    mask_targets,
    multinomial_mask_loss,
)


def naive_mask_loss(mask_logits, labels, targets):
    """L_mask from the paper's definition, one pixel at a time, in float64."""
    num_rois, _, size, _ = mask_logits.shape
    total = 0.0
    for r in range(num_rois):
        k = int(labels[r])
        for i in range(size):
            for j in range(size):
                x, t = float(mask_logits[r, k, i, j].detach()), float(targets[r, i, j])
                sigma = 1.0 / (1.0 + math.exp(-x))
                total += -t * math.log(sigma) - (1.0 - t) * math.log(1.0 - sigma)
    return total / (num_rois * size * size)


def random_case(num_rois=3, num_classes=4, size=5, dtype=torch.float32, soft=True):
    logits = (torch.randn(num_rois, num_classes, size, size, dtype=torch.float64) * 2).to(dtype).requires_grad_()
    labels = torch.randint(0, num_classes, (num_rois,))
    targets = torch.rand(num_rois, size, size) if soft else (torch.rand(num_rois, size, size) > 0.5).float()
    return logits, labels, targets


@pytest.mark.parametrize("soft", [True, False])
def test_matches_naive_definition(soft):
    logits, labels, targets = random_case(soft=soft)
    loss = mask_loss_reference(logits, labels, targets)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(naive_mask_loss(logits, labels, targets), rel=1e-6)


def test_gradient_is_sigmoid_minus_target_on_the_label_channel_only():
    logits, labels, targets = random_case()
    mask_loss_reference(logits, labels, targets).backward()
    expected = torch.zeros_like(logits)
    for r in range(logits.shape[0]):
        expected[r, labels[r]] = (torch.sigmoid(logits[r, labels[r]]) - targets[r]) / targets.numel()
    torch.testing.assert_close(logits.grad, expected.detach())


def test_gradcheck_float64():
    logits, labels, targets = random_case(num_rois=2, num_classes=3, size=3)
    logits = logits.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: mask_loss_reference(x, labels, targets.double()), (logits,))


def test_extreme_logits_are_finite():
    logits = torch.tensor([1e4, -1e4, 1e4, -1e4, 0.0, 0.0]).reshape(6, 1, 1, 1).requires_grad_()
    targets = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0]).reshape(6, 1, 1)
    loss = mask_loss_reference(logits, torch.zeros(6, dtype=torch.int64), targets)
    # per pixel: 1e4, 1e4, 0, 0, log 2, log 2
    assert loss.item() == pytest.approx((2e4 + 2 * math.log(2)) / 6)
    loss.backward()
    torch.testing.assert_close(logits.grad.flatten(), torch.tensor([1.0, -1.0, 0.0, 0.0, -0.5, 0.5]) / 6)


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_constant_targets(value):
    logits, labels, _ = random_case()
    targets = torch.full((3, 5, 5), value)
    x = logits[torch.arange(3), labels].detach().double()
    expected = (F.softplus(-x) if value == 1.0 else F.softplus(x)).mean()  # -log sigmoid(x) or -log(1 - sigmoid(x))
    assert mask_loss_reference(logits, labels, targets).item() == pytest.approx(expected.item(), rel=1e-6)


def test_uint8_and_bool_targets_equal_float():
    logits, labels, targets = random_case(soft=False)
    expected = mask_loss_reference(logits, labels, targets)
    assert mask_loss_reference(logits, labels, targets.to(torch.uint8)).item() == expected.item()
    assert mask_loss_reference(logits, labels, targets.bool()).item() == expected.item()


def test_half_logits_accumulate_in_float32():
    logits, labels, targets = random_case(dtype=torch.float16)
    loss = mask_loss_reference(logits, labels, targets)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(naive_mask_loss(logits, labels, targets), rel=1e-6)
    loss.backward()
    assert logits.grad.dtype == torch.float16


def test_no_rois_gives_a_zero_that_backpropagates():
    logits = torch.randn(0, 4, 7, 7, requires_grad=True)
    loss = mask_loss(logits, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 7, 7))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert logits.grad.shape == logits.shape and not logits.grad.any()


def test_dispatch_on_cpu_runs_the_reference():
    logits, labels, targets = random_case()
    expected = mask_loss_reference(logits, labels, targets)
    assert mask_loss(logits, labels, targets).item() == expected.item()
    assert mask_loss(logits, labels, targets, use_kernel=False).item() == expected.item()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, l, t: (x, l.clone().fill_(4), t), "outside"),  # label == K
        (lambda x, l, t: (x, l - 5, t), "outside"),  # negative labels
        (lambda x, l, t: (x, l[:2], t), "entries"),  # mismatched R
        (lambda x, l, t: (x, l, t[:, :4]), "mask_targets must be"),  # wrong target shape
        (lambda x, l, t: (x, l, t + 1.5), "outside \\[0, 1\\]"),  # targets above 1
        (lambda x, l, t: (x, l, t - 1.5), "outside \\[0, 1\\]"),  # targets below 0
        (lambda x, l, t: (x, l, t * float("nan")), "outside \\[0, 1\\]"),  # NaN targets
        (lambda x, l, t: (x, l, (t * 3).to(torch.uint8)), "outside \\[0, 1\\]"),  # uint8 values of 2, 3
        (lambda x, l, t: (x, l.float(), t), "integer"),  # float labels
        (lambda x, l, t: (x[0], l, t), "mask_logits must be"),  # 3-D logits
        (lambda x, l, t: (x.long(), l, t), "floating point"),  # integer logits
        (lambda x, l, t: (x, l, t.long()), "float, uint8 or bool"),  # int64 targets
    ],
)
def test_bad_inputs_raise(change, message):
    logits, labels, targets = random_case()
    with pytest.raises(ValueError, match=message):
        mask_loss(*change(logits.detach(), labels, targets))


# ----- mask targets -----

def square_mask():
    """One 16 x 16 ground-truth mask whose object covers rows and columns 4..11."""
    masks = torch.zeros(1, 16, 16, dtype=torch.uint8)
    masks[0, 4:12, 4:12] = 1
    return masks


def test_target_of_a_box_inside_the_object_is_all_ones():
    # box (4, 4, 11, 11), M = 7: one sample per bin at 4.5, 5.5, ..., 10.5, all inside the object
    target = mask_targets(square_mask(), torch.tensor([[4.0, 4.0, 11.0, 11.0]]), torch.tensor([0]), 7)
    torch.testing.assert_close(target, torch.ones(1, 7, 7))


def test_tight_box_target_has_a_half_row_at_the_far_edge():
    # box (4, 4, 12, 12), M = 8: samples at 4.5 .. 11.5; with aligned=False pixel p sits at coordinate p,
    # so the last sample, 11.5, is halfway between object pixel 11 and background pixel 12
    profile = torch.tensor([1.0] * 7 + [0.5])
    target = mask_targets(square_mask(), torch.tensor([[4.0, 4.0, 12.0, 12.0]]), torch.tensor([0]), 8)
    torch.testing.assert_close(target[0], profile[:, None] * profile[None, :])


def test_shifted_box_gives_the_hand_computed_partial_target():
    # box (0, 0, 7, 7), M = 7: samples at 0.5 .. 6.5; 3.5 is halfway between pixel 3 (0) and pixel 4 (1)
    profile = torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0])
    soft = profile[:, None] * profile[None, :]  # the mask is a product of two 1-D profiles
    boxes, index = torch.tensor([[0.0, 0.0, 7.0, 7.0]]), torch.tensor([0])
    torch.testing.assert_close(mask_targets(square_mask(), boxes, index, 7)[0], soft)
    binary = mask_targets(square_mask(), boxes, index, 7, threshold=0.5)[0]
    torch.testing.assert_close(binary, (soft >= 0.5).float())
    assert binary[3, 3] == 0 and binary[3, 4] == 1  # 0.25 drops, 0.5 stays (>= 0.5, as Detectron2)


def test_each_roi_samples_its_matched_mask():
    masks = torch.cat([square_mask(), 1 - square_mask()])  # [2, 16, 16]: the object and its complement
    boxes = torch.tensor([[4.0, 4.0, 11.0, 11.0]] * 2)
    target = mask_targets(masks, boxes, torch.tensor([1, 0]), 7)
    torch.testing.assert_close(target, torch.stack([torch.zeros(7, 7), torch.ones(7, 7)]))


def test_targets_stay_in_zero_one_whatever_the_rounding():
    # an all-object mask and many odd boxes: interpolation must not round a target past 1
    masks = torch.ones(2, 37, 41, dtype=torch.uint8)
    xy = torch.rand(200, 2) * 30
    boxes = torch.cat([xy, xy + 0.3 + torch.rand(200, 2) * 10], dim=1)
    index = torch.randint(0, 2, (200,))
    target = mask_targets(masks, boxes, index, 28)
    assert target.min() >= 0 and target.max() <= 1
    mask_loss(torch.zeros(200, 1, 28, 28), torch.zeros(200, dtype=torch.int64), target)  # passes the input check


def test_mask_targets_bad_inputs_raise():
    masks, boxes = square_mask(), torch.tensor([[0.0, 0.0, 7.0, 7.0]])
    with pytest.raises(ValueError, match="outside \\[0, G\\)"):
        mask_targets(masks, boxes, torch.tensor([1]), 7)
    with pytest.raises(ValueError, match="gt_masks"):
        mask_targets(masks[0], boxes, torch.tensor([0]), 7)
    with pytest.raises(ValueError, match="proposals"):
        mask_targets(masks, boxes[:, :3], torch.tensor([0]), 7)
    with pytest.raises(ValueError, match="matched_gt_index"):
        mask_targets(masks, boxes, torch.tensor([0, 0]), 7)
    with pytest.raises(ValueError, match="threshold"):
        mask_targets(masks, boxes, torch.tensor([0]), 7, threshold=1.5)


# ----- the ablated alternatives (Table 2b) -----

def test_multinomial_hand_case():
    # one RoI, one pixel, K = 3 with logits (a, b, c) = (0, 2, 1), class k = 1
    logits = torch.tensor([0.0, 2.0, 1.0]).reshape(1, 3, 1, 1)
    log_z = math.log(math.exp(0.0) + math.exp(2.0) + math.exp(1.0))
    label = torch.tensor([1])
    assert multinomial_mask_loss(logits, label, torch.ones(1, 1, 1)).item() == pytest.approx(log_z - 2.0)  # -log p_1
    assert multinomial_mask_loss(logits, label, torch.zeros(1, 1, 1)).item() == pytest.approx(log_z - 0.0)  # -log p_0
    soft = multinomial_mask_loss(logits, label, torch.full((1, 1, 1), 0.25)).item()
    assert soft == pytest.approx(0.25 * (log_z - 2.0) + 0.75 * log_z)


def test_multinomial_classes_compete_sigmoid_classes_do_not():
    logits, labels = torch.zeros(1, 3, 2, 2, requires_grad=True), torch.tensor([1])
    targets = torch.ones(1, 2, 2)
    multinomial_mask_loss(logits, labels, targets).backward()
    assert (logits.grad[0, 2] > 0).all()  # pushing the other class's logit down: it competes
    logits.grad = None
    mask_loss_reference(logits, labels, targets).backward()
    assert not logits.grad[0, 0].any() and not logits.grad[0, 2].any()  # the other masks are untouched


def test_multinomial_bad_inputs_raise():
    with pytest.raises(ValueError, match="background"):
        multinomial_mask_loss(torch.zeros(1, 3, 2, 2), torch.tensor([0]), torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="K >= 2"):
        multinomial_mask_loss(torch.zeros(1, 1, 2, 2), torch.tensor([0]), torch.ones(1, 2, 2))


def test_class_agnostic_is_the_same_loss_on_one_channel():
    # class-agnostic is a shape: K = 1 channel, and every RoI's label is that channel 0
    logits = torch.randn(4, 1, 6, 6)
    targets = torch.rand(4, 6, 6)
    expected = F.binary_cross_entropy_with_logits(logits[:, 0], targets)
    assert mask_loss(logits, torch.zeros(4, dtype=torch.int64), targets).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match=r"outside \[0, K\) = \[0, 1\)"):
        mask_loss(logits, torch.ones(4, dtype=torch.int64), targets)


def test_validate_false_skips_the_value_checks():
    logits, targets = torch.randn(2, 3, 4, 4), torch.rand(2, 4, 4)
    labels = torch.tensor([1, 2])
    assert mask_loss(logits, labels, targets, validate=False) == mask_loss(logits, labels, targets)
    with pytest.raises(ValueError, match="outside"):
        mask_loss(logits, labels, targets * 2)
    # the model's own targets are in [0, 1] by construction: without validation nothing is read back
    assert torch.isfinite(mask_loss(logits, labels, targets * 2, validate=False))


# ----- the gathered predictor -----

def test_gathered_mask_logits_equal_conv_then_gather():
    features = torch.randn(5, 8, 6, 6, requires_grad=True)
    weight = torch.randn(4, 8, 1, 1, requires_grad=True)
    bias = torch.randn(4, requires_grad=True)
    labels = torch.tensor([0, 3, 1, 3, 2])
    full = F.conv2d(features, weight, bias)[torch.arange(5), labels][:, None]  # [R, 1, M, M]
    gathered = gathered_mask_logits(features, weight, bias, labels)
    torch.testing.assert_close(gathered, full)
    upstream = torch.randn_like(full)
    expected = torch.autograd.grad(full, (features, weight, bias), upstream)
    actual = torch.autograd.grad(gathered, (features, weight, bias), upstream)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


# ----- torchvision -----

@pytest.mark.torchvision
def test_matches_torchvision_maskrcnn_loss():
    roi_heads = pytest.importorskip("torchvision.models.detection.roi_heads")
    torch.manual_seed(1)
    gt_masks = [(torch.rand(3, 40, 50) > 0.5).to(torch.uint8), (torch.rand(2, 30, 30) > 0.3).to(torch.uint8)]
    gt_labels = [torch.tensor([3, 1, 2]), torch.tensor([4, 2])]
    proposals = []
    for n, (h, w) in zip((6, 4), ((40, 50), (30, 30))):
        xy = torch.rand(n, 2) * torch.tensor([w - 10.0, h - 10.0])
        proposals.append(torch.cat([xy, xy + 3 + torch.rand(n, 2) * 20], dim=1))
    matched = [torch.randint(0, 3, (6,)), torch.randint(0, 2, (4,))]
    logits = torch.randn(10, 5, 14, 14, requires_grad=True)

    expected = roi_heads.maskrcnn_loss(logits, proposals, gt_masks, gt_labels, matched)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    for m, p, i in zip(gt_masks, proposals, matched):
        torch.testing.assert_close(mask_targets(m, p, i, 14), roi_heads.project_masks_on_boxes(m, p, i, 14))
    targets = torch.cat([mask_targets(m, p, i, 14) for m, p, i in zip(gt_masks, proposals, matched)])
    labels = torch.cat([lab[i] for lab, i in zip(gt_labels, matched)])
    loss = mask_loss(logits, labels, targets)
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
