r"""The Mask R-CNN mask loss as one fused Triton kernel (paper section 3, "Mask Representation").

Readable reference: `mrcnn.mask_loss.mask_loss_reference`; this module does not import it.

Forward
-------
mask_logits `[R, K, M, M]`, labels `[R]` (the class k_r of each RoI), mask_targets `[R, M, M]`.
Only channel k_r of each RoI enters the loss. With `x` that channel and `t` the target,

    u         = exp(-|x|)                                   (in (0, 1]: never overflows)
    softplus  = max(x, 0) + log1p(u)                        (= log(1 + e^x), for any x)
    l         = softplus - t x                              (binary cross-entropy of sigmoid(x))
    sigma     = 1 / (1 + u)  if x >= 0  else  u / (1 + u)   (= sigmoid(x), for any x)
    L_mask    = 1 / (R M^2) * sum_{r, i, j} l

The loss is a scalar, so its gradient is known in the forward pass already:

    d L_mask / d x = (sigma - t) / (R M^2)     on channel k_r,   0 on the other K - 1 channels.

One program of the forward kernel takes BLOCK consecutive pixels of the `R * M * M` gathered
pixels (a block may straddle RoIs), loads each pixel's RoI label, the logit at channel k_r
(through the logits' strides, so a non-contiguous tensor is read in place) and the target,
and writes (1) the sum of its BLOCK losses to a partial-sum buffer and (2) the per-pixel
gradient `(sigma - t) / (R M^2)` to a compact `[R, M, M]` float32 buffer. A second kernel, a
single program, adds the partial sums in a fixed order: no atomics, so the loss is
bit-identical from run to run. All arithmetic is float32 whatever the logits dtype.

Backward
--------
The incoming gradient g (a scalar, read from device memory: no synchronisation) scales the
saved gradient. One program of the backward kernel writes BLOCK consecutive entries of one
RoI's `K * M * M` gradient row: `g * grad_pixels[r, i, j]` where the channel is k_r, and 0
elsewhere. The gradient tensor is allocated with `torch.empty`; the kernel writes every entry,
so no separate zero fill runs.

Memory traffic, and why it remains
----------------------------------
forward:  reads R M^2 logits (channel k_r only) + R M^2 targets, writes R M^2 float32 gradients.
backward: reads R M^2 float32 gradients, writes R K M^2 logit gradients.
Between the two passes only the compact `[R, M, M]` gradient is held (1/K of the logits).
The one large cost left is the write of the dense `[R, K, M, M]` gradient, K - 1 channels of
which are zeros: autograd needs a gradient of the logits' shape, and the mask predictor's 1x1
convolution that produced them reads all of it in its own backward. The plain PyTorch loss
(gather + binary_cross_entropy_with_logits) writes that tensor twice (a zero fill, then the
scatter of the gathered gradient), and makes separate passes over the gathered pixels for the
gather, the loss, its gradient and the scatter.

The bigger saving is upstream: during training the last 1x1 convolution of the mask predictor
need compute only channel k_r of each RoI (a batched dot product with row k_r of its weight,
`mrcnn.mask_loss.gathered_mask_logits`, which the library's mask branch trains with). Then no `[R, K, M, M]` tensor exists at all, neither
logits nor gradient, and the predictor's work drops K-fold; this kernel is used with K = 1. At
R = 512, K = 81, M = 28, C = 256 input channels: the logits and their gradient shrink from 130 MB
to 1.6 MB each (float32), and the convolution's forward from 8.3 G to 0.10 G multiply-adds
(its backward likewise). On a CPU, benchmarks/mask_loss.py measures the predictor + loss about
6x faster at R = 128 (benchmarks/results/mask_loss_cpu.md); the GPU figure is for the GPU run.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# Triton's interpreter (no GPU) runs programs one after the other, about 10 ms each, with numpy
# work inside a program nearly free: there the blocks are as large as the problem allows.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _mask_loss_forward_kernel(
    logits_ptr,  # [R, K, M, M] mask logits, any strides, float32 / float16 / bfloat16
    targets_ptr,  # [R, M, M] contiguous targets in [0, 1], float or uint8
    labels_ptr,  # [R] int64, the class k_r of each RoI
    partial_ptr,  # [num_programs] float32 out: the loss summed over this program's pixels
    grad_pixels_ptr,  # [R, M, M] float32 out: d L_mask / d x at channel k_r
    num_pixels,  # R * M * M
    mask_size,  # M
    stride_r,  # strides of mask_logits, in elements
    stride_k,
    stride_y,
    stride_x,
    inv_count,  # 1 / (R M^2)
    WRITE_GRAD: tl.constexpr,  # False when the logits need no gradient
    BLOCK: tl.constexpr,  # pixels per program
):
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # flat index of (r, i, j)
    in_range = offsets < num_pixels
    mask_area = mask_size * mask_size
    r = offsets // mask_area
    pixel = offsets % mask_area
    i = pixel // mask_size
    j = pixel % mask_size
    k = tl.load(labels_ptr + r, mask=in_range, other=0).to(tl.int64)
    x = tl.load(logits_ptr + r * stride_r + k * stride_k + i * stride_y + j * stride_x, mask=in_range, other=0.0)
    x = x.to(tl.float32)
    t = tl.load(targets_ptr + offsets, mask=in_range, other=0).to(tl.float32)

    u = tl.exp(-tl.abs(x))
    # log1p(u) without a log1p: log(w) * u / (w - 1) with w = 1 + u corrects the rounding of w
    w = 1.0 + u
    rounded_away = w == 1.0  # u below half an ulp of 1: log1p(u) = u to float32 precision
    log1p_u = tl.where(rounded_away, u, tl.log(w) * (u / tl.where(rounded_away, 1.0, w - 1.0)))
    softplus = tl.maximum(x, 0.0) + log1p_u
    loss = tl.where(in_range, softplus - t * x, 0.0)  # l = softplus(x) - t x
    tl.store(partial_ptr + pid, tl.sum(loss, axis=0))

    if WRITE_GRAD:
        sigma = tl.where(x >= 0, 1.0 / w, u / w)  # sigmoid(x)
        tl.store(grad_pixels_ptr + offsets, (sigma - t) * inv_count, mask=in_range)  # d L / d x


@triton.jit
def _sum_kernel(
    partial_ptr,  # [num_partials] float32 partial sums
    out_ptr,  # [] float32 out: scale * their sum
    num_partials,  # how many partial sums
    scale,  # 1 / (R M^2)
    NUM_STEPS: tl.constexpr,  # cdiv(num_partials, BLOCK): 1 up to 1024 partial sums (a million pixels)
    BLOCK: tl.constexpr,  # partial sums added per step
):
    # one program, a fixed order of additions: the same bits on every run. The trip count is a
    # compile-time constant (Triton 3.6's interpreter cannot loop to a run-time bound).
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for step in range(NUM_STEPS):
        offsets = step * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offsets, mask=offsets < num_partials, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0) * scale)


@triton.jit
def _mask_loss_backward_kernel(
    grad_logits_ptr,  # [R, K, M, M] contiguous out, the logits' dtype: d L / d mask_logits
    grad_pixels_ptr,  # [R, M, M] float32 from the forward pass
    labels_ptr,  # [R] int64
    grad_loss_ptr,  # [1] float32, the incoming gradient g of the scalar loss
    row_size,  # K * M * M, the gradient entries of one RoI
    mask_area,  # M * M
    BLOCK: tl.constexpr,  # entries of one RoI's row per program
):
    r = tl.program_id(0).to(tl.int64)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # index into the row: k * M^2 + pixel
    in_row = offsets < row_size
    channel = offsets // mask_area
    pixel = offsets % mask_area
    k = tl.load(labels_ptr + r)
    is_target = in_row & (channel == k)
    g = tl.load(grad_loss_ptr)
    d = tl.load(grad_pixels_ptr + r * mask_area + pixel, mask=is_target, other=0.0)
    grad = tl.where(is_target, d * g, 0.0)  # exactly 0 off channel k_r, even if g is inf or NaN
    tl.store(grad_logits_ptr + r * row_size + offsets, grad.to(grad_logits_ptr.dtype.element_ty), mask=in_row)


def _block_size(work: int, gpu_block: int) -> int:
    """Elements per program: a power of two, no larger than the work.

    On a GPU `gpu_block` (1024 or 2048) elements for 4 warps: each thread handles 8 or 16
    consecutive elements, enough for wide memory accesses in a memory-bound kernel, and the
    grid still has hundreds of programs at training sizes. Under the interpreter: up to 2^16.
    """
    limit = 1 << 16 if _INTERPRETED else gpu_block
    return max(16, min(triton.next_power_of_2(max(work, 1)), limit))


_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def _check_inputs(mask_logits: Tensor, labels: Tensor, mask_targets: Tensor, validate: bool) -> None:
    """ValueError naming the problem, before any launch (same rules as the reference).

    Shapes, dtypes and devices are checked from metadata alone. With `validate`, the values too
    (labels in `[0, K)`, targets in `[0, 1]`): one host synchronisation on CUDA when all is well.
    """
    if not isinstance(mask_logits, Tensor) or mask_logits.dim() != 4 or mask_logits.shape[2] != mask_logits.shape[3]:
        raise ValueError(f"mask_logits must be [R, K, M, M], got shape {tuple(getattr(mask_logits, 'shape', ()))}")
    if mask_logits.dtype not in _SUPPORTED:
        raise ValueError(f"mask_logits must be float32, float16 or bfloat16 for the kernel, got {mask_logits.dtype}")
    num_rois, num_classes, mask_size = mask_logits.shape[:3]
    if num_classes == 0:
        raise ValueError("mask_logits has K = 0 classes")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be a [R] integer tensor, got {getattr(labels, 'dtype', type(labels))}")
    if labels.shape[0] != num_rois:
        raise ValueError(f"labels has {labels.shape[0]} entries but mask_logits has R = {num_rois} RoIs")
    if not isinstance(mask_targets, Tensor) or tuple(mask_targets.shape) != (num_rois, mask_size, mask_size):
        raise ValueError(f"mask_targets must be [R, M, M] = {(num_rois, mask_size, mask_size)}, "
                         f"got shape {tuple(getattr(mask_targets, 'shape', ()))}")
    if not (mask_targets.is_floating_point() or mask_targets.dtype in (torch.uint8, torch.bool)):
        raise ValueError(f"mask_targets must be float, uint8 or bool, got {mask_targets.dtype}")
    if labels.device != mask_logits.device or mask_targets.device != mask_logits.device:
        raise ValueError("mask_logits, labels and mask_targets must be on one device")
    if not validate or num_rois == 0:
        return
    bad_labels = (labels < 0) | (labels >= num_classes)
    bad_targets = ~((mask_targets >= 0) & (mask_targets <= 1))
    if bool(bad_labels.any() | bad_targets.any()):  # one synchronisation when all is well
        if bool(bad_labels.any()):
            r = int(bad_labels.nonzero()[0, 0])
            raise ValueError(f"labels[{r}] = {int(labels[r])} is outside [0, K) = [0, {num_classes})")
        r, i, j = (int(v) for v in bad_targets.nonzero()[0])
        raise ValueError(f"mask_targets[{r}, {i}, {j}] = {float(mask_targets[r, i, j])} is outside [0, 1]")


def _forward(mask_logits: Tensor, labels: Tensor, mask_targets: Tensor, write_grad: bool) -> tuple[Tensor, Tensor]:
    """Launch the loss kernels: -> (loss [] float32, grad_pixels [R, M, M] float32)."""
    # check (done by the caller) -> allocate
    num_rois, _, mask_size, _ = mask_logits.shape
    num_pixels = num_rois * mask_size * mask_size
    targets = mask_targets.contiguous()
    if targets.dtype == torch.bool:
        targets = targets.view(torch.uint8)  # same bytes, a type Triton loads everywhere
    block = _block_size(num_pixels, 1024)
    num_programs = triton.cdiv(num_pixels, block)
    partial = torch.empty(num_programs, dtype=torch.float32, device=mask_logits.device)
    grad_pixels = torch.empty((num_rois, mask_size, mask_size) if write_grad else (1,), dtype=torch.float32,
                              device=mask_logits.device)
    loss = torch.empty((), dtype=torch.float32, device=mask_logits.device)
    # grid -> launch
    _mask_loss_forward_kernel[(num_programs,)](
        mask_logits, targets, labels, partial, grad_pixels,
        num_pixels, mask_size, *mask_logits.stride(), 1.0 / num_pixels,
        WRITE_GRAD=write_grad, BLOCK=block, num_warps=4,
    )
    sum_block = _block_size(num_programs, 1024)
    _sum_kernel[(1,)](partial, loss, num_programs, 1.0 / num_pixels,
                      NUM_STEPS=triton.cdiv(num_programs, sum_block), BLOCK=sum_block, num_warps=4)
    return loss, grad_pixels


def _backward(grad_pixels: Tensor, labels: Tensor, grad_loss: Tensor, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """Launch the backward kernel: -> d L / d mask_logits, `shape`, contiguous, `dtype`."""
    num_rois, num_classes, mask_size, _ = shape
    row_size = num_classes * mask_size * mask_size
    grad_logits = torch.empty(shape, dtype=dtype, device=grad_pixels.device)  # every entry written by the kernel
    g = grad_loss.reshape(1).to(torch.float32)
    block = _block_size(row_size, 2048)
    grid = (num_rois, triton.cdiv(row_size, block))
    _mask_loss_backward_kernel[grid](grad_logits, grad_pixels, labels, g, row_size, mask_size * mask_size,
                                     BLOCK=block, num_warps=4)
    return grad_logits


class _MaskLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mask_logits: Tensor, labels: Tensor, mask_targets: Tensor) -> Tensor:
        loss, grad_pixels = _forward(mask_logits, labels, mask_targets, write_grad=ctx.needs_input_grad[0])
        ctx.save_for_backward(grad_pixels, labels)
        ctx.shape, ctx.dtype = mask_logits.shape, mask_logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_pixels, labels = ctx.saved_tensors
        return _backward(grad_pixels, labels, grad_loss, ctx.shape, ctx.dtype), None, None


def mask_loss(mask_logits: Tensor, labels: Tensor, mask_targets: Tensor, validate: bool = True) -> Tensor:
    """L_mask with the fused kernels; the signature and result of `mrcnn.mask_loss.mask_loss_reference`.

    mask_logits `[R, K, M, M]` float32 / float16 / bfloat16 (any strides), labels `[R]` integer in
    `[0, K)`, mask_targets `[R, M, M]` float / uint8 / bool in `[0, 1]` -> scalar float32.
    R = 0 gives a zero that still backpropagates (a zero gradient), as torchvision does.

    `validate=True` (the default) checks the values of labels and targets before the launch,
    which reads a result back to the host: one synchronisation on CUDA. `validate=False` checks
    shapes, dtypes and devices only and never synchronises (the model's labels and targets are
    valid by construction). Then a target outside `[0, 1]` enters the formula as it is (the loss
    is no longer bounded below), and a label outside `[0, K)` reads outside the logits: the
    caller guarantees the labels.
    """
    _check_inputs(mask_logits, labels, mask_targets, validate)
    if mask_logits.shape[0] == 0:
        return mask_logits.sum().float() * 0
    return _MaskLoss.apply(mask_logits, labels.to(torch.int64).contiguous(), mask_targets)
