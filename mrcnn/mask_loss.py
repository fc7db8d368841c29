r"""The mask loss: one sigmoid per class, only the ground-truth class counts (paper section 3).

The mask branch predicts K binary masks of M x M for every RoI, one per class ("Mask
Representation"). For a positive RoI r whose ground-truth class is k_r, only the k_r-th mask
is trained; the other K - 1 masks get no loss and no gradient. Each pixel of that mask is an
independent binary classification, scored by the binary cross-entropy of its sigmoid:

    x = mask_logits[r, k_r, i, j]            t = mask_targets[r, i, j] in [0, 1]

    L_mask = 1 / (R M^2) * sum_{r, i, j}  -t log(sigmoid(x)) - (1 - t) log(1 - sigmoid(x))
           = 1 / (R M^2) * sum_{r, i, j}  softplus(x) - t x          (softplus(x) = log(1 + e^x))

The second form is the one computed: `softplus` never takes the log of a sigmoid that rounded
to 0 or 1, so the loss is finite for any logit (+-1e4 included). Its gradient is

    d L_mask / d x = (sigmoid(x) - t) / (R M^2)      on the k_r-th channel, 0 on the others.

Because no softmax runs across the K masks, the classes do not compete for a pixel: the class
is chosen by the box branch, the mask branch only says which pixels belong to the object. The
paper's ablations (section 4.2) compare this with a per-pixel softmax over classes
(`multinomial_mask_loss`, Table 2b: -5.5 mask AP) and with a single class-agnostic mask (29.7
against 30.3 mask AP, nearly as good). Class-agnostic is only a shape: K = 1 mask channel, and
every RoI's "class" is that channel, so `mask_loss` computes it unchanged with labels of 0.

The target of a RoI (`mask_targets`) is its matched ground-truth mask cropped by the proposal
box and resampled to M x M with RoIAlign. Shapes follow the book's legend: R RoIs, K classes
(background included), M mask size, G ground-truth objects, H x W image.

Two implementations of `mask_loss`: the readable reference below, and the fused Triton kernel
in `kernels.mask_loss`, used for CUDA tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mrcnn.poolers import roi_align

try:  # optional: Triton is there on Linux with a GPU build, the reference needs none of it
    from kernels.mask_loss import mask_loss as mask_loss_kernel
except ImportError:
    mask_loss_kernel = None

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what kernels.mask_loss computes in


def check_mask_loss_inputs(mask_logits: Tensor, labels: Tensor, mask_targets: Tensor) -> None:
    """Raise a `ValueError` naming the problem unless the three tensors make a mask loss.

    mask_logits `[R, K, M, M]` floating point; labels `[R]` integer in `[0, K)`; mask_targets
    `[R, M, M]` float, uint8 or bool with values in `[0, 1]`, all on one device. The value
    checks cost one device-to-host synchronisation (two only when something is wrong).

    Targets need not be binary: the cross-entropy is defined for any `t` in `[0, 1]`, and the
    soft targets that resampling gives (`mask_targets(..., threshold=None)`, as torchvision
    trains) must pass. A value outside `[0, 1]` (NaN included) would make the loss unbounded
    below, so it raises.
    """
    if not isinstance(mask_logits, Tensor) or mask_logits.dim() != 4 or mask_logits.shape[2] != mask_logits.shape[3]:
        raise ValueError(f"mask_logits must be [R, K, M, M], got shape {tuple(getattr(mask_logits, 'shape', ()))}")
    if not mask_logits.is_floating_point():
        raise ValueError(f"mask_logits must be floating point, got {mask_logits.dtype}")
    num_rois, num_classes, mask_size = mask_logits.shape[0], mask_logits.shape[1], mask_logits.shape[2]
    if num_classes == 0:
        raise ValueError("mask_logits has K = 0 classes")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be a [R] integer tensor, got {getattr(labels, 'dtype', type(labels))} "
                         f"of shape {tuple(getattr(labels, 'shape', ()))}")
    if labels.shape[0] != num_rois:
        raise ValueError(f"labels has {labels.shape[0]} entries but mask_logits has R = {num_rois} RoIs")
    if not isinstance(mask_targets, Tensor) or tuple(mask_targets.shape) != (num_rois, mask_size, mask_size):
        raise ValueError(f"mask_targets must be [R, M, M] = {(num_rois, mask_size, mask_size)}, "
                         f"got shape {tuple(getattr(mask_targets, 'shape', ()))}")
    if not (mask_targets.is_floating_point() or mask_targets.dtype in (torch.uint8, torch.bool)):
        raise ValueError(f"mask_targets must be float, uint8 or bool, got {mask_targets.dtype}")
    if labels.device != mask_logits.device or mask_targets.device != mask_logits.device:
        raise ValueError(f"mask_logits ({mask_logits.device}), labels ({labels.device}) and "
                         f"mask_targets ({mask_targets.device}) must be on one device")
    if num_rois == 0:
        return
    bad_labels = (labels < 0) | (labels >= num_classes)  # [R]
    # NaN fails both comparisons, so it counts as outside [0, 1] too
    bad_targets = ~((mask_targets >= 0) & (mask_targets <= 1))  # [R, M, M]
    if bool(bad_labels.any() | bad_targets.any()):
        if bool(bad_labels.any()):
            r = int(bad_labels.nonzero()[0, 0])
            raise ValueError(f"labels[{r}] = {int(labels[r])} is outside [0, K) = [0, {num_classes})")
        r, i, j = (int(v) for v in bad_targets.nonzero()[0])
        raise ValueError(f"mask_targets[{r}, {i}, {j}] = {float(mask_targets[r, i, j])} is outside [0, 1]")


def mask_loss_reference(mask_logits: Tensor, labels: Tensor, mask_targets: Tensor, validate: bool = True) -> Tensor:
    """L_mask as defined in the module docstring: readable, vectorized, differentiable.

    mask_logits `[R, K, M, M]` (float32, float16 or bfloat16), labels `[R]` int64,
    mask_targets `[R, M, M]` -> scalar float32, computed in float32 whatever the logits dtype
    (float64 for float64 logits, which the gradient checks use). `validate=False` skips the
    checks of `check_mask_loss_inputs` (the model's own inputs are valid by construction).
    """
    if validate:
        check_mask_loss_inputs(mask_logits, labels, mask_targets)
    num_rois = mask_logits.shape[0]
    dtype = torch.promote_types(mask_logits.dtype, torch.float32)  # accumulate in float32 at least
    if num_rois == 0:  # no positive RoI: a zero that still backpropagates (a zero gradient)
        return mask_logits.sum().to(dtype) * 0
    roi_index = torch.arange(num_rois, device=labels.device)  # [R]
    x = mask_logits[roi_index, labels].to(dtype)  # [R, M, M]: the mask of each RoI's own class only
    t = mask_targets.to(dtype)  # [R, M, M]
    # L_mask = mean over r, i, j of softplus(x) - t x
    return (F.softplus(x) - t * x).mean()


def mask_loss(mask_logits: Tensor, labels: Tensor, mask_targets: Tensor, use_kernel: bool | None = None,
              validate: bool = True) -> Tensor:  # fmt: skip
    """L_mask, dispatched to the fastest implementation for the device.

    Same arguments and result as `mask_loss_reference`. `use_kernel=None` (the default) runs the
    fused Triton kernel when `mask_logits` are on CUDA in float32, float16 or bfloat16 and
    Triton imports, the reference otherwise (float64 included); `True` or `False` forces the
    choice. `validate` (default) checks the inputs first, values included: one host
    synchronisation on a GPU, which the model skips (`validate=False`).
    """
    if validate:
        check_mask_loss_inputs(mask_logits, labels, mask_targets)
    if use_kernel is None:
        use_kernel = mask_logits.is_cuda and mask_logits.dtype in KERNEL_DTYPES and mask_loss_kernel is not None
    if use_kernel:
        return mask_loss_kernel(mask_logits, labels, mask_targets, validate=False)
    return mask_loss_reference(mask_logits, labels, mask_targets, validate=False)


def multinomial_mask_loss(mask_logits: Tensor, labels: Tensor, mask_targets: Tensor) -> Tensor:
    """The multinomial variant (Table 2b): a per-pixel softmax over the K classes.

    This is how an FCN for semantic segmentation scores pixels, and it makes the K masks
    compete. The formulation here: at every pixel of RoI r, the K logits go through a softmax
    `p = softmax_k(mask_logits[r, :, i, j])`; the target distribution puts weight `t` on the
    RoI's class k_r (the object) and `1 - t` on class 0 (the background), so

        L = 1 / (R M^2) * sum_{r, i, j}  -t log p[k_r] - (1 - t) log p[0].

    With a binary target that is the cross-entropy of the pixel's true class (k_r inside the
    object, background outside); a soft target splits the weight. Labels must therefore be
    foreground classes, in `[1, K)`, and K >= 2.

    mask_logits `[R, K, M, M]`, labels `[R]`, mask_targets `[R, M, M]` -> scalar float32.
    """
    check_mask_loss_inputs(mask_logits, labels, mask_targets)
    num_rois, num_classes = mask_logits.shape[0], mask_logits.shape[1]
    if num_classes < 2:
        raise ValueError(
            f"a multinomial mask loss needs K >= 2 classes (background and one object), got K = {num_classes}"
        )
    dtype = torch.promote_types(mask_logits.dtype, torch.float32)  # accumulate in float32 at least
    if num_rois == 0:
        return mask_logits.sum().to(dtype) * 0
    if bool((labels == 0).any()):
        raise ValueError(f"labels[{int((labels == 0).nonzero()[0, 0])}] = 0 is the background; the multinomial "
                         "loss needs foreground labels in [1, K)")
    roi_index = torch.arange(num_rois, device=labels.device)  # [R]
    log_p = F.log_softmax(mask_logits.to(dtype), dim=1)  # [R, K, M, M]: a softmax over classes, per pixel
    t = mask_targets.to(dtype)  # [R, M, M]
    # L = mean over r, i, j of -t log p[k_r] - (1 - t) log p[0]
    return -(t * log_p[roi_index, labels] + (1 - t) * log_p[:, 0]).mean()


def check_mask_target_inputs(gt_masks: Tensor, proposals: Tensor, matched_gt_index: Tensor, mask_size: int,
                             threshold: float | None) -> None:  # fmt: skip
    """Raise a `ValueError` naming the problem unless `mask_targets` can run on these arguments."""
    if not isinstance(gt_masks, Tensor) or gt_masks.dim() != 3:
        raise ValueError(f"gt_masks must be [G, H, W], got shape {tuple(getattr(gt_masks, 'shape', ()))}")
    if not isinstance(proposals, Tensor) or proposals.dim() != 2 or proposals.shape[1] != 4 or not proposals.is_floating_point():
        raise ValueError(f"proposals must be a float [R, 4] tensor, got {getattr(proposals, 'dtype', None)} "
                         f"of shape {tuple(getattr(proposals, 'shape', ()))}")
    if not isinstance(matched_gt_index, Tensor) or tuple(matched_gt_index.shape) != (proposals.shape[0],) \
            or matched_gt_index.is_floating_point():
        raise ValueError(f"matched_gt_index must be an integer [R] = [{proposals.shape[0]}] tensor, "
                         f"got shape {tuple(getattr(matched_gt_index, 'shape', ()))}")
    if not isinstance(mask_size, int) or mask_size < 1:
        raise ValueError(f"mask_size must be a positive int, got {mask_size!r}")
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be None or in (0, 1), got {threshold}")
    num_gt = gt_masks.shape[0]
    if matched_gt_index.numel() and bool(((matched_gt_index < 0) | (matched_gt_index >= num_gt)).any()):
        bad = int(((matched_gt_index < 0) | (matched_gt_index >= num_gt)).nonzero()[0, 0])
        raise ValueError(f"matched_gt_index[{bad}] = {int(matched_gt_index[bad])} is outside [0, G) = [0, {num_gt})")


def mask_targets(
    gt_masks: Tensor, proposals: Tensor, matched_gt_index: Tensor, mask_size: int, threshold: float | None = None
) -> Tensor:
    """The M x M training target of each positive RoI (paper section 3, "Mask Representation").

    The RoI's matched ground-truth mask is cropped by the proposal box and resampled to M x M
    with RoIAlign, under torchvision's conventions (`project_masks_on_boxes`: spatial scale 1,
    adaptive sampling ratio, `aligned=False`). The result is the fraction of each target cell
    covered by the object, a soft value in [0, 1] along the object's edge.

    `threshold`: the paper describes binary targets; Detectron2 binarizes with `>= 0.5`
    (`threshold=0.5`). torchvision's `maskrcnn_loss` trains on the soft values unchanged, so the
    default `None` keeps them, and the torchvision-compatible model matches it exactly. Either
    way the targets lie in [0, 1], which is all the binary cross-entropy needs (the resampled
    values are clamped to it: bilinear weights sum to 1 only up to rounding, so an all-object
    cell can come out as 1.0000001; torchvision keeps that last bit, a difference of one ulp).

    gt_masks `[G, H, W]` uint8, bool or float; proposals `[R, 4]` float (x1, y1, x2, y2) in image
    pixels; matched_gt_index `[R]` int64 in `[0, G)` -> `[R, M, M]` in the proposals' dtype.
    """
    check_mask_target_inputs(gt_masks, proposals, matched_gt_index, mask_size, threshold)
    # each RoI samples the ground-truth mask it matched: that mask's index is its "batch index"
    rois = torch.cat([matched_gt_index[:, None].to(proposals.dtype), proposals], dim=1)  # [R, 5]
    masks = gt_masks[:, None].to(proposals.dtype)  # [G, 1, H, W]
    targets = roi_align(
        masks, rois, (mask_size, mask_size), spatial_scale=1.0, sampling_ratio=-1, aligned=False
    )[:, 0]  # [R, M, M]
    # bilinear weights sum to 1 only up to rounding: 1.0000001 inside an object is not a target
    targets = targets.clamp(0.0, 1.0)
    if threshold is not None:
        targets = (targets >= threshold).to(proposals.dtype)
    return targets


def gathered_mask_logits(features: Tensor, weight: Tensor, bias: Tensor, labels: Tensor) -> Tensor:
    """The mask predictor's last 1x1 convolution, computed for each RoI's own class only.

    During training the loss reads one of the K output channels per RoI, so the other K - 1 need
    not be computed at all: channel k_r of a 1x1 convolution is the dot product of the features
    with row k_r of the weight, `logit[r, i, j] = w[k_r] . f[r, :, i, j] + b[k_r]`, a batched
    matrix product. Compute and memory drop K-fold, in the forward and the backward pass.

    features `[R, C, M, M]`, weight `[K, C, 1, 1]`, bias `[K]`, labels `[R]` -> `[R, 1, M, M]`,
    equal to `conv2d(features, weight, bias)[arange(R), labels][:, None]`.
    """
    if features.dim() != 4 or weight.dim() != 4 or weight.shape[1] != features.shape[1] or weight.shape[2:] != (1, 1):
        raise ValueError(f"need features [R, C, M, M] and a 1x1 weight [K, C, 1, 1], got {tuple(features.shape)} "
                         f"and {tuple(weight.shape)}")
    if tuple(bias.shape) != (weight.shape[0],) or tuple(labels.shape) != (features.shape[0],):
        raise ValueError(f"need bias [K] = [{weight.shape[0]}] and labels [R] = [{features.shape[0]}], "
                         f"got {tuple(bias.shape)} and {tuple(labels.shape)}")
    num_rois, channels, height, width = features.shape
    w = weight[labels, :, 0, 0]  # [R, C]: the weight row of each RoI's class
    logits = torch.bmm(w[:, None, :], features.reshape(num_rois, channels, height * width))  # [R, 1, M*M]
    return logits.reshape(num_rois, 1, height, width) + bias[labels][:, None, None, None]  # [R, 1, M, M]
