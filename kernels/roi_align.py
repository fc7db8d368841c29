r"""RoIAlign and FPN's multi-level RoIAlign as Triton kernels (Mask R-CNN, section 3).

Same numbers as `mrcnn.roi_align.roi_align_reference` (torchvision's definition), with one
launch per direction for one feature map or for all FPN levels at once.

Forward. RoI `r = (n_r, x1, y1, x2, y2)` is pooled from map `l_r` with spatial scale `s`
(offset `o = 1/2` when `aligned`, else 0; the legacy mode makes a RoI at least one pixel):

    y_start = y1 s - o     h = y2 s - o - y_start  (max(h, 1) unless aligned)     b_h = h / P_h
    g_h     = sampling_ratio if > 0 else ceil(h / P_h)        count = max(g_h g_w, 1)
    y(p, i) = y_start + p b_h + (i + 1/2) b_h / g_h           (x(q, j) likewise)

    out[r, c, p, q] = 1/count  sum_{i<g_h, j<g_w}  sum_{a in {lo, hi}, b in {lo, hi}}
                      w_a(y(p, i)) w_b(x(q, j)) F_l[n_r, c, y_a, x_b]

with the bilinear neighbours `y_lo = floor(y)`, `y_hi = y_lo + 1` and weights `w_hi = y - y_lo`,
`w_lo = 1 - w_hi`; a sample more than one pixel outside the map is dropped (it still counts
in `count`), one within a pixel of the border is clamped onto it. The coordinates are float32
whatever the dtype of the RoIs (float32, or that of 16-bit features) and of the features.

The level (FPN paper, eq. 1, as torchvision's LevelMapper), with `k_l` the level of map `l`
(`k_first ... k_last`, increasing; strides that skip a level, such as 8 and 32, leave a gap):

    k_r = floor(k0 + log2(sqrt((x2 - x1)(y2 - y1)) / s0) + eps)  clamped to [k_first, k_last]

and `l_r` is the map with `k_l = k_r`; where no map has level `k_r`, the RoI pools zeros and
sends back no gradient, as in torchvision.

Backward. The output is linear in F, so the gradient sends each output gradient back to the
four neighbours of each sample, with the same weights:

    dL/dF_l[n, c, y_a, x_b] += w_a(y(p, i)) w_b(x(q, j)) * G[r, c, p, q] / count

for every RoI `r` of image `n` on map `l` and every bin and sample. Many RoIs and samples
touch the same pixel, so the kernel adds with atomics into a float32 buffer, cast to the
feature dtype at the end. On a GPU the atomics land in the scheduler's order, so the last bits
vary from run to run; kernels/roi_align_deterministic.py sums in a fixed order instead.

What one program computes. Program `(r, t, u)` owns RoI `r`, bins `t*BLOCK_BINS ...` (bin
`(p, q)` flattened to `p P_w + q`) and channels `u*BLOCK_C ...`. It reads the RoI, picks its
level, and loops over the `g_h x g_w` samples of its bins; each sample is four loads (forward)
or four atomic adds (backward) of a `[BLOCK_BINS, BLOCK_C]` tile, accumulated in float32.
Forward and backward walk the same samples, so they are one kernel with a `BACKWARD` switch.

Why this layout. All levels are copied once into one channels-last buffer `[N, T, C]` (`T =
sum_l H_l W_l` positions per image, level `l` from position `T_l`): a tile row is then `C`
contiguous values, so loads and atomic adds coalesce across a warp, where `[N, C, H, W]` would
touch one memory sector per channel; and all bins of a program share one sample loop. The
per-level sizes, offsets, scales and levels are kernel arguments (tuples) and each program
computes its RoI's level itself: no sort, no gather of RoIs per level, no host synchronization.
Forward: a concatenation, an allocation, one launch. Backward: a zero fill, one launch, a cast
(16 bits).

The buffer, the level and the samples are shared with the fixed-order backward, so they live in
kernels/roi_align_geometry.py: `LaunchGeometry` (what a launch needs besides the tensors, built
once per call), `pack` / `unpack`, and the device functions `roi_geometry` and `bilinear_axis`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from kernels import roi_align_deterministic  # the fixed-order backward, looked up at each call (tests swap it)
from kernels.roi_align_geometry import LaunchGeometry, kernel_arguments, launch_geometry, map_levels, pack, unpack
from kernels.roi_align_geometry import bilinear_axis, roi_geometry  # @triton.jit, called by the kernel


@triton.jit
def _roi_align_kernel(
    features_ptr,  # [N, T, C] channels-last maps of all levels; backward: their float32 gradient, zeroed
    rois_ptr,  # [R, 5] contiguous (batch_index, x1, y1, x2, y2), float32 or the features' dtype
    pooled_ptr,  # [R, C, P_h, P_w] forward: the output, written; backward: its gradient G, read
    pooled_stride_r,  # strides of pooled_ptr, in elements
    pooled_stride_c,
    pooled_stride_h,
    pooled_stride_w,
    channels,  # C
    num_images,  # N
    positions_per_image,  # T
    level_heights,  # tuple of L ints: H_l
    level_widths,  # tuple of L ints: W_l
    level_offsets,  # tuple of L ints: T_l
    level_scales,  # tuple of L floats: spatial scales s_l
    level_numbers,  # tuple of L ints: FPN levels k_l of the maps
    canonical_level,  # k0
    canonical_size,  # s0
    level_eps,  # eps of the level assignment
    NUM_LEVELS: tl.constexpr,  # L
    POOLED_H: tl.constexpr,  # P_h
    POOLED_W: tl.constexpr,  # P_w
    SAMPLING_RATIO: tl.constexpr,  # fixed g, or <= 0 for adaptive
    ALIGNED: tl.constexpr,  # half-pixel offset
    BACKWARD: tl.constexpr,  # False: gather F into pooled; True: scatter G into features
    BLOCK_BINS: tl.constexpr,  # bins per program (rows of the tile)
    BLOCK_C: tl.constexpr,  # channels per program (columns of the tile)
):
    roi = tl.program_id(0)
    bins = tl.program_id(1) * BLOCK_BINS + tl.arange(0, BLOCK_BINS)  # [BLOCK_BINS], bin p P_w + q
    channel = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    bin_mask = bins < POOLED_H * POOLED_W
    channel_mask = channel < channels
    p_index, q_index = bins // POOLED_W, bins % POOLED_W  # [BLOCK_BINS] each
    p, q = p_index.to(tl.float32), q_index.to(tl.float32)
    height, width, image_base, y_start, x_start, bin_h, bin_w, grid_h, grid_w, count = roi_geometry(
        rois_ptr, roi, num_images, positions_per_image, level_heights, level_widths, level_offsets, level_scales,
        level_numbers, canonical_level, canonical_size, level_eps,
        NUM_LEVELS, POOLED_H, POOLED_W, SAMPLING_RATIO, ALIGNED,
    )
    pooled_offsets = (roi.to(tl.int64) * pooled_stride_r + channel[None, :].to(tl.int64) * pooled_stride_c
                      + (p_index * pooled_stride_h + q_index * pooled_stride_w)[:, None])  # [BLOCK_BINS, BLOCK_C]
    pooled_mask = bin_mask[:, None] & channel_mask[None, :]
    if BACKWARD:
        grad = tl.load(pooled_ptr + pooled_offsets, mask=pooled_mask, other=0.0).to(tl.float32) / count  # G / count
    acc = tl.zeros([BLOCK_BINS, BLOCK_C], dtype=tl.float32)

    i = 0
    while i < grid_h:  # for i in range(g_h); Triton 3.6's interpreter cannot range() over a tensor
        y = y_start + p * bin_h + tl.div_rn((i + 0.5) * bin_h, grid_h)  # y(p, i)
        y_low, y_high, hy, ly, y_inside = bilinear_axis(y, height)
        j = 0
        while j < grid_w:
            x = x_start + q * bin_w + tl.div_rn((j + 0.5) * bin_w, grid_w)  # x(q, j)
            x_low, x_high, hx, lx, x_inside = bilinear_axis(x, width)
            mask = (y_inside & x_inside & bin_mask)[:, None] & channel_mask[None, :]
            row_low = image_base + y_low * width  # [BLOCK_BINS] int64 positions in the buffer
            row_high = image_base + y_high * width
            f_ll_ptr = features_ptr + ((row_low + x_low) * channels)[:, None] + channel[None, :]
            f_lh_ptr = features_ptr + ((row_low + x_high) * channels)[:, None] + channel[None, :]
            f_hl_ptr = features_ptr + ((row_high + x_low) * channels)[:, None] + channel[None, :]
            f_hh_ptr = features_ptr + ((row_high + x_high) * channels)[:, None] + channel[None, :]
            if BACKWARD:  # dL/dF[n, c, y_a, x_b] += w_a(y) w_b(x) G[r, c, p, q] / count
                tl.atomic_add(f_ll_ptr, (hy * hx)[:, None] * grad, mask=mask, sem="relaxed")
                tl.atomic_add(f_lh_ptr, (hy * lx)[:, None] * grad, mask=mask, sem="relaxed")
                tl.atomic_add(f_hl_ptr, (ly * hx)[:, None] * grad, mask=mask, sem="relaxed")
                tl.atomic_add(f_hh_ptr, (ly * lx)[:, None] * grad, mask=mask, sem="relaxed")
            else:  # bilinear(F, y, x) = h_y h_x F[lo, lo] + h_y l_x F[lo, hi] + l_y h_x F[hi, lo] + l_y l_x F[hi, hi]
                acc += (hy * hx)[:, None] * tl.load(f_ll_ptr, mask=mask, other=0.0).to(tl.float32)
                acc += (hy * lx)[:, None] * tl.load(f_lh_ptr, mask=mask, other=0.0).to(tl.float32)
                acc += (ly * hx)[:, None] * tl.load(f_hl_ptr, mask=mask, other=0.0).to(tl.float32)
                acc += (ly * lx)[:, None] * tl.load(f_hh_ptr, mask=mask, other=0.0).to(tl.float32)
            j += 1
        i += 1

    if not BACKWARD:  # out[r, c, p, q], the average over the g_h x g_w samples
        tl.store(pooled_ptr + pooled_offsets, (acc / count).to(pooled_ptr.dtype.element_ty), mask=pooled_mask)


# ----------------------------------------------------------------------------------- launchers


def _block_sizes(channels: int, pooled_bins: int, element_size: int) -> tuple[int, int]:
    """The tile `[BLOCK_BINS, BLOCK_C]` of one program, from a fixed heuristic (no autotuning).

    A tile row is read by one warp, 16 bytes per thread: 32 x 16 bytes = 128 float32 or 256
    float16 channels. Rows are added until the tile holds about 1024 values, 8 per thread of the
    4 warps: enough independent loads per sample to hide memory latency, few enough registers
    for several programs per SM. Padding is bounded by the powers of two of C and P_h P_w.
    """
    block_c = min(triton.next_power_of_2(channels), 32 * 16 // element_size)
    block_bins = min(triton.next_power_of_2(pooled_bins), max(1024 // block_c, 1))
    return block_bins, block_c


def _launch(features: Tensor, rois: Tensor, pooled: Tensor, geometry: LaunchGeometry, backward: bool) -> None:
    """Run the kernel on the grid `(R, bin blocks, channel blocks)`, arguments as the kernel's."""
    if rois.shape[0] == 0:
        return
    bins = geometry.pooled_height * geometry.pooled_width
    block_bins, block_c = _block_sizes(geometry.channels, bins, pooled.element_size())
    grid = (rois.shape[0], triton.cdiv(bins, block_bins), triton.cdiv(geometry.channels, block_c))
    _roi_align_kernel[grid](
        features, rois, pooled, *pooled.stride(), geometry.channels, **kernel_arguments(geometry),
        BACKWARD=backward, BLOCK_BINS=block_bins, BLOCK_C=block_c, num_warps=4,
    )


class _RoIAlignFunction(torch.autograd.Function):
    """Pool `[R, 5]` rois from L feature maps; gradients for the maps (none for the rois)."""

    @staticmethod
    def forward(ctx, rois: Tensor, geometry: LaunchGeometry, deterministic: bool, *features: Tensor) -> Tensor:
        ctx.save_for_backward(rois)
        ctx.geometry, ctx.deterministic, ctx.dtype = geometry, deterministic, features[0].dtype
        pooled = features[0].new_empty(
            rois.shape[0], geometry.channels, geometry.pooled_height, geometry.pooled_width
        )  # [R, C, P_h, P_w]
        _launch(pack(features, geometry), rois, pooled, geometry, backward=False)
        return pooled

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_pooled: Tensor):
        (rois,) = ctx.saved_tensors
        geometry = ctx.geometry
        if ctx.deterministic:  # a sort and a fixed-order sum instead of atomics
            # [N, T, C] float32
            grad_packed = roi_align_deterministic.deterministic_backward(rois, grad_pooled, geometry)
        else:
            grad_packed = torch.zeros(
                geometry.num_images, geometry.positions, geometry.channels, device=grad_pooled.device
            )
            _launch(grad_packed, rois, grad_pooled, geometry, backward=True)  # [N, T, C] float32
        return (None, None, None, *unpack(grad_packed.to(ctx.dtype), geometry))


# ------------------------------------------------------------------------------ public functions


def _deterministic(deterministic: bool | None) -> bool:
    """The backward to run: the fixed-order one when asked, or when None and PyTorch's global switch is on."""
    return torch.are_deterministic_algorithms_enabled() if deterministic is None else bool(deterministic)


def _check_inputs(features, rois, output_size, spatial_scales, sampling_ratio, validate: bool) -> tuple[int, int]:
    """Raise a `ValueError` naming the problem before any launch; return `(P_h, P_w)`.

    Shapes, dtypes, devices and settings are checked from metadata alone. With `validate`, the
    values of `rois` are checked too (finite, integer batch index in `[0, N)`): one host
    synchronization on CUDA. Without it, a RoI with a bad batch index pools zeros and a
    non-finite one pools zeros or garbage, but nothing is read or written out of bounds.
    """
    shape = lambda t: tuple(getattr(t, "shape", ()))  # noqa: E731
    if isinstance(features, Tensor) or len(features) == 0:
        raise ValueError("features must be a non-empty list of [N, C, H, W] tensors, one per level")
    for level, f in enumerate(features):
        if not isinstance(f, Tensor) or f.dim() != 4:
            raise ValueError(f"features[{level}] must be a [N, C, H, W] tensor, got shape {shape(f)}")
        if f.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"features[{level}] must be float32, float16 or bfloat16, got {f.dtype}")
        if (f.shape[:2], f.dtype, f.device) != (features[0].shape[:2], features[0].dtype, features[0].device):
            raise ValueError(f"features[{level}] must have the N, C, dtype and device of features[0]")
    if not isinstance(rois, Tensor) or rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must be a [R, 5] tensor of (batch_index, x1, y1, x2, y2), got shape {shape(rois)}")
    if rois.device != features[0].device:
        raise ValueError(f"features are on {features[0].device} but rois are on {rois.device}")
    if rois.dtype not in (torch.float32, features[0].dtype):  # 32-bit boxes with 16-bit features: mixed precision
        raise ValueError(f"rois must be float32 or the features' dtype ({features[0].dtype}), got {rois.dtype}")
    pooled = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if len(pooled) != 2 or not all(isinstance(s, int) and s > 0 for s in pooled):
        raise ValueError(f"output_size must be a positive int or (height, width), got {output_size}")
    if len(spatial_scales) != len(features) or not all(float(s) > 0 for s in spatial_scales):
        raise ValueError(f"need one positive spatial scale per feature map ({len(features)}), got {list(spatial_scales)}")
    levels = map_levels(tuple(float(s) for s in spatial_scales), 0)
    if any(finer >= coarser for finer, coarser in zip(levels, levels[1:])):
        raise ValueError(f"spatial_scales must be finest first, each map at least one level (a factor 2) coarser "
                         f"than the one before, got {list(spatial_scales)}")  # fmt: skip
    if not isinstance(sampling_ratio, int):
        raise ValueError(f"sampling_ratio must be an int (<= 0 for adaptive), got {sampling_ratio!r}")
    if validate and rois.shape[0] > 0:
        num_images, batch_index = features[0].shape[0], rois[:, 0]
        finite = torch.isfinite(rois).all(dim=1)  # [R]
        in_range = (batch_index >= 0) & (batch_index < num_images) & (batch_index == batch_index.floor())  # [R]
        if not bool((finite & in_range).all()):  # the one host synchronization
            if not bool(finite.all()):
                bad = int((~finite).nonzero()[0, 0])
                raise ValueError(f"rois must be finite; row {bad} is {rois[bad].tolist()}")
            bad = int((~in_range).nonzero()[0, 0])
            raise ValueError(f"rois[{bad}] has batch index {batch_index[bad].item()}, outside [0, {num_images})")
    return pooled


def roi_align(
    features: Tensor,
    rois: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    validate: bool = True,
    deterministic: bool | None = None,
) -> Tensor:
    """RoIAlign of one feature map (paper section 3), as `mrcnn.roi_align.roi_align_reference`.

    features `[N, C, H, W]` (float32, float16 or bfloat16, any strides; N may be 0), rois `[R, 5]`
    `(batch_index, x1, y1, x2, y2)` on the same device, float32 or the dtype of `features` ->
    `[R, C, P_h, P_w]`, dtype of `features`. The sampling coordinates are float32 in every case,
    so float32 rois keep their precision with 16-bit features. Differentiable in `features`.
    `validate=False` skips the value checks of `rois` and their host synchronization (see
    `_check_inputs`). `deterministic=True` gives a backward pass with the same bits on every run;
    None follows `torch.are_deterministic_algorithms_enabled()`.
    """
    pooled = _check_inputs([features], rois, output_size, [spatial_scale], sampling_ratio, validate)
    geometry = launch_geometry((features,), pooled, (spatial_scale,), sampling_ratio, aligned)
    return _RoIAlignFunction.apply(rois.contiguous(), geometry, _deterministic(deterministic), features)


def multi_level_roi_align(
    features: list[Tensor],
    rois: Tensor,
    output_size: int | tuple[int, int],
    spatial_scales: list[float],
    sampling_ratio: int = -1,
    aligned: bool = False,
    min_level: int = 2,
    canonical_level: int = 4,
    canonical_size: float = 224.0,
    eps: float = 1e-6,
    validate: bool = True,
    deterministic: bool | None = None,
) -> Tensor:
    """Pool each RoI from the FPN level that suits its size, all levels in one launch.

    features: L maps `[N, C, H_l, W_l]`, finest first, with `spatial_scales[l]` (1/4, 1/8, ... for
    P2, P3, ...); the first map is level `min_level` and map l is level
    `min_level + round(log2(spatial_scales[0] / spatial_scales[l]))`, so the strides may skip a
    level (1/8, 1/32: levels 3 and 5). rois `[R, 5]` as in `roi_align` -> `[R, C, P_h, P_w]`.
    RoI r goes to level `floor(canonical_level + log2(sqrt(area_r) / canonical_size) + eps)`,
    clamped to the first and last maps' levels, as torchvision's `MultiScaleRoIAlign`; a box of
    zero or negative area goes to the first map, and a RoI whose level has no map pools zeros
    (and gets no gradient). No host synchronization with `validate=False`; the default
    `validate=True` checks the values of `rois` first, which synchronizes once on CUDA (the
    model, whose rois are valid by construction, should pass `validate=False`). `deterministic`
    as in `roi_align`.
    """
    pooled = _check_inputs(features, rois, output_size, spatial_scales, sampling_ratio, validate)
    geometry = launch_geometry(tuple(features), pooled, tuple(spatial_scales), sampling_ratio, aligned,
                               min_level, canonical_level, canonical_size, eps)  # fmt: skip
    return _RoIAlignFunction.apply(rois.contiguous(), geometry, _deterministic(deterministic), *features)
