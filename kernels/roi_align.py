r"""RoIAlign and FPN's multi-level RoIAlign as Triton kernels (Mask R-CNN, section 3).

Same numbers as `mrcnn.roi_align.roi_align_reference` (torchvision's definition), with one
launch per direction for one feature map or for all FPN levels at once.

Forward. RoI `r = (n_r, x1, y1, x2, y2)` is pooled from level `l_r` with spatial scale `s`
(offset `o = 1/2` when `aligned`, else 0; the legacy mode makes a RoI at least one pixel):

    y_start = y1 s - o     h = y2 s - o - y_start  (max(h, 1) unless aligned)     b_h = h / P_h
    g_h     = sampling_ratio if > 0 else ceil(h / P_h)        count = max(g_h g_w, 1)
    y(p, i) = y_start + p b_h + (i + 1/2) b_h / g_h           (x(q, j) likewise)

    out[r, c, p, q] = 1/count  sum_{i<g_h, j<g_w}  sum_{a in {lo, hi}, b in {lo, hi}}
                      w_a(y(p, i)) w_b(x(q, j)) F_l[n_r, c, y_a, x_b]

with the bilinear neighbours `y_lo = floor(y)`, `y_hi = y_lo + 1` and weights `w_hi = y - y_lo`,
`w_lo = 1 - w_hi`; a sample more than one pixel outside the map is dropped (it still counts
in `count`), one within a pixel of the border is clamped onto it.

The level (FPN paper, eq. 1, as torchvision's LevelMapper):

    k_r = floor(k0 + log2(sqrt((x2 - x1)(y2 - y1)) / s0) + eps)  clamped to [k_min, k_min + L - 1]

Backward. The output is linear in F, so the gradient sends each output gradient back to the
four neighbours of each sample, with the same weights:

    dL/dF_l[n, c, y_a, x_b] += w_a(y(p, i)) w_b(x(q, j)) * G[r, c, p, q] / count

for every RoI `r` of image `n` on level `l` and every bin and sample. Many RoIs and samples
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
per-level sizes, offsets and scales are kernel arguments (tuples) and each program computes its
RoI's level itself: no sort, no gather of RoIs per level, no host synchronization. Forward: a
concatenation, an allocation, one launch. Backward: a zero fill, one launch, a cast (16 bits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable


@triton.jit
def _bilinear_axis(
    coord,  # [BLOCK_BINS] float32 sample coordinates along one axis, feature pixels
    size,  # H_l or W_l
):
    """The two neighbours of each sample, their weights, and whether the sample is used."""
    inside = (coord >= -1.0) & (coord <= size)  # farther out: the sample contributes zero
    coord = tl.maximum(tl.where(inside, coord, 0.0), 0.0)
    low = coord.to(tl.int32)  # floor, since coord >= 0
    at_border = low >= size - 1  # clamp onto the last pixel
    low = tl.where(at_border, size - 1, low)
    high = tl.where(at_border, low, low + 1)
    coord = tl.where(at_border, low.to(tl.float32), coord)
    w_high = coord - low  # l_y in the reference implementations
    w_low = 1.0 - w_high  # h_y
    return low, high, w_low, w_high, inside


@triton.jit
def _roi_geometry(
    rois_ptr,  # [R, 5] contiguous (batch_index, x1, y1, x2, y2), image pixels, any float dtype
    roi,  # r, the RoI of this program
    num_images,  # N, to drop RoIs whose batch index is outside [0, N) (possible with validate=False)
    positions_per_image,  # T = sum_l H_l W_l
    level_heights,  # tuple of L ints: H_l
    level_widths,  # tuple of L ints: W_l
    level_offsets,  # tuple of L ints: T_l, the first position of level l among an image's T
    level_scales,  # tuple of L floats: spatial scale s of level l (1 / stride)
    min_level,  # k_min, the FPN level of the first map
    canonical_level,  # k0 = 4
    canonical_size,  # s0 = 224
    level_eps,  # eps = 1e-6: a 112 x 112 RoI stays on P3 despite rounding in log2
    NUM_LEVELS: tl.constexpr,  # L
    POOLED_H: tl.constexpr,  # P_h
    POOLED_W: tl.constexpr,  # P_w
    SAMPLING_RATIO: tl.constexpr,  # g per bin side, or <= 0 for the adaptive ceil(h / P_h)
    ALIGNED: tl.constexpr,  # half-pixel offset o = 1/2, and no minimum RoI size
):
    """What a program needs to know about its RoI, in float32 (module docstring, forward)."""
    row = rois_ptr + roi * 5
    batch = tl.load(row).to(tl.float32)
    x1 = tl.load(row + 1).to(tl.float32)
    y1 = tl.load(row + 2).to(tl.float32)
    x2 = tl.load(row + 3).to(tl.float32)
    y2 = tl.load(row + 4).to(tl.float32)
    valid = (batch >= 0) & (batch < num_images)

    # k = floor(k0 + log2(sqrt(w h) / s0) + eps), clamped to [k_min, k_min + L - 1] by counting
    # the levels above k_min that k reaches. An empty or inverted box goes to the finest level.
    level = 0
    if NUM_LEVELS > 1:
        roi_size = tl.sqrt_rn(tl.maximum((x2 - x1) * (y2 - y1), 1e-30))
        k = tl.floor(canonical_level + tl.log2(roi_size / canonical_size) + level_eps)
        for j in tl.static_range(1, NUM_LEVELS):
            level += (k >= min_level + j).to(tl.int32)
    height, width, level_offset, spatial_scale = level_heights[0], level_widths[0], level_offsets[0], level_scales[0]
    for j in tl.static_range(1, NUM_LEVELS):
        height = tl.where(level == j, level_heights[j], height)
        width = tl.where(level == j, level_widths[j], width)
        level_offset = tl.where(level == j, level_offsets[j], level_offset)
        spatial_scale = tl.where(level == j, level_scales[j], spatial_scale)
    # the first position of this RoI's map in the [N, T, C] buffer, int64: N T C may pass 2^31
    image_base = tl.where(valid, batch, 0.0).to(tl.int64) * positions_per_image + level_offset

    offset: tl.constexpr = 0.5 if ALIGNED else 0.0
    y_start = y1 * spatial_scale - offset
    x_start = x1 * spatial_scale - offset
    roi_h = y2 * spatial_scale - offset - y_start
    roi_w = x2 * spatial_scale - offset - x_start
    if not ALIGNED:  # legacy: a RoI is at least one pixel
        roi_h = tl.maximum(roi_h, 1.0)
        roi_w = tl.maximum(roi_w, 1.0)
    bin_h = tl.div_rn(roi_h, POOLED_H * 1.0)  # b_h = h / P_h, correctly rounded: ceil() below is exact
    bin_w = tl.div_rn(roi_w, POOLED_W * 1.0)
    if SAMPLING_RATIO > 0:
        grid_h = tl.full((), SAMPLING_RATIO, tl.float32)
        grid_w = tl.full((), SAMPLING_RATIO, tl.float32)
    else:  # adaptive: g_h = ceil(h / P_h); a non-finite size (inf - inf is NaN) gets no samples
        grid_h = tl.ceil(bin_h)
        grid_w = tl.ceil(bin_w)
        grid_h = tl.where(grid_h - grid_h == 0.0, grid_h, 0.0)
        grid_w = tl.where(grid_w - grid_w == 0.0, grid_w, 0.0)
    count = tl.maximum(grid_h * grid_w, 1.0)  # count = max(g_h g_w, 1)
    grid_h = tl.where(valid, grid_h, 0.0)  # a RoI of a missing image pools nothing: zeros
    return height, width, image_base, y_start, x_start, bin_h, bin_w, grid_h, grid_w, count


@triton.jit
def _roi_align_kernel(
    features_ptr,  # [N, T, C] channels-last maps of all levels; backward: their float32 gradient, zeroed
    rois_ptr,  # [R, 5] contiguous (batch_index, x1, y1, x2, y2)
    pooled_ptr,  # [R, C, P_h, P_w] forward: the output, written; backward: its gradient G, read
    pooled_stride_r,  # strides of pooled_ptr, in elements
    pooled_stride_c,
    pooled_stride_h,
    pooled_stride_w,
    num_images,  # N
    channels,  # C
    positions_per_image,  # T
    level_heights,  # tuple of L ints: H_l
    level_widths,  # tuple of L ints: W_l
    level_offsets,  # tuple of L ints: T_l
    level_scales,  # tuple of L floats: spatial scales
    min_level,  # k_min
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
    height, width, image_base, y_start, x_start, bin_h, bin_w, grid_h, grid_w, count = _roi_geometry(
        rois_ptr, roi, num_images, positions_per_image, level_heights, level_widths, level_offsets,
        level_scales, min_level, canonical_level, canonical_size, level_eps,
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
        y_low, y_high, hy, ly, y_inside = _bilinear_axis(y, height)
        j = 0
        while j < grid_w:
            x = x_start + q * bin_w + tl.div_rn((j + 0.5) * bin_w, grid_w)  # x(q, j)
            x_low, x_high, hx, lx, x_inside = _bilinear_axis(x, width)
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


class _Layout:
    """Where each level lives in the channels-last buffer `[N, T, C]` (module docstring)."""

    def __init__(self, features: tuple[Tensor, ...]):
        self.num_images, self.channels = features[0].shape[:2]
        self.heights = tuple(int(f.shape[2]) for f in features)
        self.widths = tuple(int(f.shape[3]) for f in features)
        sizes = [h * w for h, w in zip(self.heights, self.widths)]
        self.offsets = tuple(sum(sizes[:level]) for level in range(len(sizes)))  # T_l
        self.positions = sum(sizes)  # T

    def pack(self, features: tuple[Tensor, ...]) -> Tensor:
        """`L x [N, C, H_l, W_l]` -> `[N, T, C]` contiguous: one copy (none for one channels-last map)."""
        views = [f.permute(0, 2, 3, 1).reshape(self.num_images, -1, self.channels) for f in features]  # [N, H_l W_l, C]
        return views[0].contiguous() if len(views) == 1 else torch.cat(views, dim=1)  # [N, T, C]

    def unpack(self, packed: Tensor) -> tuple[Tensor, ...]:
        """`[N, T, C]` -> `L x [N, C, H_l, W_l]` views (channels-last strides), no copy."""
        levels = zip(self.offsets, self.heights, self.widths)
        return tuple(packed[:, t : t + h * w].reshape(-1, h, w, self.channels).permute(0, 3, 1, 2) for t, h, w in levels)


def _launch(features: Tensor, rois: Tensor, pooled: Tensor, layout: _Layout, settings: dict, backward: bool) -> None:
    """Run the kernel on the grid `(R, bin blocks, channel blocks)`, arguments as the kernel's."""
    if rois.shape[0] == 0:
        return
    pooled_h, pooled_w = settings["output_size"]
    block_bins, block_c = _block_sizes(layout.channels, pooled_h * pooled_w, pooled.element_size())
    grid = (rois.shape[0], triton.cdiv(pooled_h * pooled_w, block_bins), triton.cdiv(layout.channels, block_c))
    _roi_align_kernel[grid](
        features, rois, pooled, *pooled.stride(),
        layout.num_images, layout.channels, layout.positions, layout.heights, layout.widths, layout.offsets,
        settings["spatial_scales"], *settings["level_mapping"],
        NUM_LEVELS=len(layout.heights), POOLED_H=pooled_h, POOLED_W=pooled_w,
        SAMPLING_RATIO=settings["sampling_ratio"], ALIGNED=settings["aligned"], BACKWARD=backward,
        BLOCK_BINS=block_bins, BLOCK_C=block_c, num_warps=4,
    )


class _RoIAlignFunction(torch.autograd.Function):
    """Pool `[R, 5]` rois from L feature maps; gradients for the maps (none for the rois)."""

    @staticmethod
    def forward(ctx, rois: Tensor, settings: dict, *features: Tensor) -> Tensor:
        layout = _Layout(features)
        ctx.save_for_backward(rois)
        ctx.layout, ctx.settings, ctx.dtype = layout, settings, features[0].dtype
        ctx.deterministic = torch.are_deterministic_algorithms_enabled() if settings["deterministic"] is None else settings["deterministic"]
        pooled = features[0].new_empty(rois.shape[0], layout.channels, *settings["output_size"])  # [R, C, P_h, P_w]
        _launch(layout.pack(features), rois, pooled, layout, settings, backward=False)
        return pooled

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_pooled: Tensor):
        (rois,) = ctx.saved_tensors
        layout = ctx.layout
        if ctx.deterministic:  # a sort and a fixed-order sum instead of atomics
            from kernels.roi_align_deterministic import deterministic_backward  # it builds on this module
            grad_packed = deterministic_backward(rois, grad_pooled, layout, ctx.settings)  # [N, T, C] float32
        else:
            grad_packed = torch.zeros(layout.num_images, layout.positions, layout.channels, device=grad_pooled.device)
            _launch(grad_packed, rois, grad_pooled, layout, ctx.settings, backward=True)  # [N, T, C] float32
        return (None, None, *layout.unpack(grad_packed.to(ctx.dtype)))


# ------------------------------------------------------------------------------ public functions

def _check_inputs(features, rois, output_size, spatial_scales, sampling_ratio, validate: bool) -> tuple[int, int]:
    """Raise a `ValueError` naming the problem before any launch; return `(P_h, P_w)`.

    Shapes, dtypes and devices are checked from metadata alone. With `validate`, the values of
    `rois` are checked too (finite, integer batch index in `[0, N)`): one host synchronization on
    CUDA. Without it, a RoI with a bad batch index pools zeros and a non-finite one pools zeros
    or garbage, but nothing is read or written out of bounds.
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
    if rois.dtype != features[0].dtype:
        raise ValueError(f"features are {features[0].dtype} but rois are {rois.dtype}; use the same dtype")
    pooled = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if len(pooled) != 2 or not all(isinstance(s, int) and s > 0 for s in pooled):
        raise ValueError(f"output_size must be a positive int or (height, width), got {output_size}")
    if len(spatial_scales) != len(features) or not all(float(s) > 0 for s in spatial_scales):
        raise ValueError(f"need one positive spatial scale per feature map ({len(features)}), got {list(spatial_scales)}")
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

    features `[N, C, H, W]` (float32, float16 or bfloat16, any strides), rois `[R, 5]`
    `(batch_index, x1, y1, x2, y2)` of the same dtype and device -> `[R, C, P_h, P_w]`, dtype of
    `features`. Differentiable in `features`. `validate=False` skips the value checks of `rois`
    and their host synchronization (see `_check_inputs`). `deterministic=True` gives a backward
    pass with the same bits on every run; None follows `torch.are_deterministic_algorithms_enabled()`.
    """
    pooled = _check_inputs([features], rois, output_size, [spatial_scale], sampling_ratio, validate)
    settings = dict(output_size=pooled, spatial_scales=(float(spatial_scale),), sampling_ratio=max(sampling_ratio, 0),
                    aligned=bool(aligned), level_mapping=(0, 0, 1.0, 0.0), deterministic=deterministic)  # fmt: skip
    return _RoIAlignFunction.apply(rois.contiguous(), settings, features)


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

    features: L maps `[N, C, H_l, W_l]`, finest first, levels `min_level ... min_level + L - 1`
    with `spatial_scales[l]` (1/4, 1/8, ... for P2, P3, ...); rois `[R, 5]` -> `[R, C, P_h, P_w]`.
    RoI r goes to level `floor(canonical_level + log2(sqrt(area_r) / canonical_size) + eps)`,
    clamped, as torchvision's `MultiScaleRoIAlign`; a box of zero or negative area goes to the
    finest level. No host synchronization with `validate=False`; the default `validate=True`
    checks the values of `rois` first, which synchronizes once on CUDA (the model, whose rois
    are valid by construction, should pass `validate=False`). `deterministic` as in `roi_align`.
    """
    pooled = _check_inputs(features, rois, output_size, spatial_scales, sampling_ratio, validate)
    settings = dict(output_size=pooled, spatial_scales=tuple(float(s) for s in spatial_scales),
                    sampling_ratio=max(sampling_ratio, 0), aligned=bool(aligned), deterministic=deterministic,
                    level_mapping=(int(min_level), int(canonical_level), float(canonical_size), float(eps)))  # fmt: skip
    return _RoIAlignFunction.apply(rois.contiguous(), settings, *features)
