r"""RoIAlign's backward pass with a fixed order of additions: the same bits on every run.

The backward kernel of `kernels.roi_align` scatters each output gradient onto the four
bilinear neighbours of each sample with atomic adds. On a GPU the order in which the adds to
one pixel land depends on the scheduler, and float addition is not associative, so the
gradient differs in its last bits from run to run. When `torch.use_deterministic_algorithms(True)`
is on (or `deterministic=True` is passed to `kernels.roi_align`), the backward pass runs here
instead: the same sum, as a sort and a segmented reduction.

With the notation of `kernels.roi_align` (G the output gradient, L levels packed in one
channels-last buffer of `T` positions per image):

    dL/dF[n, c, t] = sum over the terms e with destination t of  weight_e G[r_e, c, p_e, q_e]

1. **Terms.** One program per (RoI `r`, block of bins) writes, for every sample `(i, j)` of its
   bins and each of its four neighbours `a`, one term into slot
   `((r P_h P_w + p P_w + q) S + i G_w + j) 4 + a` of two flat buffers (`S = G_h G_w` slots
   per bin, `G` the largest sampling grid):

       destination = n T + T_l + y_a W_l + x_b          (a position of the [N, T, C] buffer)
       weight      = w_a(y(p, i)) w_b(x(q, j)) / count

   A term that does not count (a sample more than a pixel outside the map, past its RoI's own
   grid, or of a RoI whose image or FPN level is missing) keeps the destination `N T`, past
   every position, and weight 0. The samples and weights come from the same device functions as
   the forward pass's (`roi_geometry`, `bilinear_axis` of kernels/roi_align_geometry.py).
2. **Sort.** `torch.sort(destination, stable=True)` puts the terms of each position side by
   side, in the order of their slots: an order fixed by the RoIs alone. `searchsorted` gives
   position `t` its segment `[begin_t, end_t)` of the sorted slots.
3. **Sum.** One program per (block of positions, block of channels) walks the segments of its
   positions term by term, accumulating in float32, and writes every position (zero where no
   sample reads it), so no zero fill runs. Each sum is computed by one program, in one order.

Cost: 12 bytes per term (`R P_h P_w S 4` terms, 400k for 512 RoIs of 7 x 7 bins and 2 x 2
samples), one sort, and the sum's reads of `G` in the order of the sorted terms. Adaptive
sampling (`sampling_ratio <= 0`) needs `G` on the host: one synchronization, reading the
grids that a small kernel computes from the same geometry as the forward pass.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.roi_align_geometry import LaunchGeometry, bilinear_axis, kernel_arguments, roi_geometry

# Triton's interpreter (no GPU) runs programs one after another, about 10 ms each: larger tiles there.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _roi_grid_kernel(
    rois_ptr,  # [R, 5] contiguous (batch_index, x1, y1, x2, y2)
    grid_ptr,  # [R, 2] float32 out: (g_h, g_w) of each RoI, 0 for one that pools nothing
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
):
    roi = tl.program_id(0)
    height, width, image_base, y_start, x_start, bin_h, bin_w, grid_h, grid_w, count = roi_geometry(
        rois_ptr, roi, num_images, positions_per_image, level_heights, level_widths, level_offsets, level_scales,
        level_numbers, canonical_level, canonical_size, level_eps, NUM_LEVELS, POOLED_H, POOLED_W, SAMPLING_RATIO, ALIGNED,
    )
    tl.store(grid_ptr + roi * 2, grid_h)
    tl.store(grid_ptr + roi * 2 + 1, tl.where(grid_h > 0, grid_w, 0.0))


@triton.jit
def _roi_align_terms_kernel(
    rois_ptr,  # [R, 5] contiguous (batch_index, x1, y1, x2, y2)
    destination_ptr,  # [R P_h P_w S 4] int64, filled with N T: written where a term counts
    weight_ptr,  # [R P_h P_w S 4] float32, filled with 0
    max_grid_w,  # G_w: samples per row of a bin's slots
    samples_per_bin,  # S = G_h G_w
    nowhere,  # N T, the destination of a term that does not count: after every position
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
    BLOCK_BINS: tl.constexpr,  # bins per program
):
    roi = tl.program_id(0)
    bins = tl.program_id(1) * BLOCK_BINS + tl.arange(0, BLOCK_BINS)  # [BLOCK_BINS], bin p P_w + q
    bin_mask = bins < POOLED_H * POOLED_W
    p, q = (bins // POOLED_W).to(tl.float32), (bins % POOLED_W).to(tl.float32)
    height, width, image_base, y_start, x_start, bin_h, bin_w, grid_h, grid_w, count = roi_geometry(
        rois_ptr, roi, num_images, positions_per_image, level_heights, level_widths, level_offsets, level_scales,
        level_numbers, canonical_level, canonical_size, level_eps, NUM_LEVELS, POOLED_H, POOLED_W, SAMPLING_RATIO, ALIGNED,
    )
    first_slot = (roi.to(tl.int64) * (POOLED_H * POOLED_W) + bins) * samples_per_bin * 4  # [BLOCK_BINS]
    i = 0
    while i < grid_h:  # the samples of the forward pass, in its order
        y = y_start + p * bin_h + tl.div_rn((i + 0.5) * bin_h, grid_h)  # y(p, i)
        y_low, y_high, hy, ly, y_inside = bilinear_axis(y, height)
        j = 0
        while j < grid_w:
            x = x_start + q * bin_w + tl.div_rn((j + 0.5) * bin_w, grid_w)  # x(q, j)
            x_low, x_high, hx, lx, x_inside = bilinear_axis(x, width)
            counts = y_inside & x_inside
            slot = first_slot + (i * max_grid_w + j) * 4  # [BLOCK_BINS]
            row_low = image_base + y_low * width
            row_high = image_base + y_high * width
            # destination n T + T_l + y_a W_l + x_b, weight w_a w_b / count, for (a, b) = ll, lh, hl, hh
            tl.store(destination_ptr + slot, tl.where(counts, row_low + x_low, nowhere), mask=bin_mask)
            tl.store(destination_ptr + slot + 1, tl.where(counts, row_low + x_high, nowhere), mask=bin_mask)
            tl.store(destination_ptr + slot + 2, tl.where(counts, row_high + x_low, nowhere), mask=bin_mask)
            tl.store(destination_ptr + slot + 3, tl.where(counts, row_high + x_high, nowhere), mask=bin_mask)
            tl.store(weight_ptr + slot, tl.where(counts, hy * hx / count, 0.0), mask=bin_mask)
            tl.store(weight_ptr + slot + 1, tl.where(counts, hy * lx / count, 0.0), mask=bin_mask)
            tl.store(weight_ptr + slot + 2, tl.where(counts, ly * hx / count, 0.0), mask=bin_mask)
            tl.store(weight_ptr + slot + 3, tl.where(counts, ly * lx / count, 0.0), mask=bin_mask)
            j += 1
        i += 1


@triton.jit
def _segment_sum_kernel(
    grad_rows_ptr,  # [R P_h P_w, C] contiguous: G[r, c, p, q] in row r P_h P_w + p P_w + q
    order_ptr,  # [E] int64: the slots, sorted by destination (stable)
    weight_ptr,  # [E] float32: the weight of each slot
    bounds_ptr,  # [N T + 1] int64: position t's terms are order[bounds[t] : bounds[t + 1]]
    grad_ptr,  # [N T, C] float32 out: dL/dF in the channels-last buffer of kernels.roi_align
    num_positions,  # N T
    channels,  # C
    terms_per_bin,  # 4 S: slot // terms_per_bin is the bin's row in grad_rows
    BLOCK_POS: tl.constexpr,  # positions per program (rows of the tile)
    BLOCK_C: tl.constexpr,  # channels per program (columns of the tile)
):
    position = tl.program_id(0).to(tl.int64) * BLOCK_POS + tl.arange(0, BLOCK_POS)  # [BLOCK_POS]
    channel = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    position_mask = position < num_positions
    channel_mask = channel < channels
    begin = tl.load(bounds_ptr + position, mask=position_mask, other=0)  # [BLOCK_POS]
    end = tl.load(bounds_ptr + position + 1, mask=position_mask, other=0)
    longest = tl.max(end - begin, axis=0)
    acc = tl.zeros([BLOCK_POS, BLOCK_C], dtype=tl.float32)
    k = 0
    while k < longest:  # the k-th term of every position of the tile, in sorted order
        term = begin + k
        active = term < end
        slot = tl.load(order_ptr + term, mask=active, other=0)
        weight = tl.load(weight_ptr + slot, mask=active, other=0.0)
        row = slot // terms_per_bin  # r P_h P_w + p P_w + q
        g = tl.load(grad_rows_ptr + row[:, None] * channels + channel[None, :],
                    mask=active[:, None] & channel_mask[None, :], other=0.0).to(tl.float32)
        acc += weight[:, None] * g  # dL/dF[t, c] += weight_e G[r_e, c, p_e, q_e]
        k += 1
    tl.store(grad_ptr + position[:, None] * channels + channel[None, :], acc,
             mask=position_mask[:, None] & channel_mask[None, :])


def _sum_tile(num_positions: int, channels: int, element_size: int) -> tuple[int, int]:
    """`(BLOCK_POS, BLOCK_C)` of the sum: as `kernels.roi_align._block_sizes`, a row of 16 bytes per
    thread of a warp and about 1024 values per tile on a GPU; up to 2^16 values under the interpreter."""
    block_c = min(triton.next_power_of_2(channels), 1024 if _INTERPRETED else 32 * 16 // element_size)
    block_pos = min(triton.next_power_of_2(num_positions), max((1 << 16 if _INTERPRETED else 1024) // block_c, 1))
    return block_pos, block_c


def _largest_grid(rois: Tensor, geometry: LaunchGeometry) -> tuple[int, int]:
    """`(G_h, G_w)`: the sampling grid of every RoI fits in it. Adaptive sampling: one synchronization."""
    if geometry.sampling_ratio > 0:
        return geometry.sampling_ratio, geometry.sampling_ratio
    grids = torch.zeros(rois.shape[0], 2, dtype=torch.float32, device=rois.device)  # [R, 2]
    _roi_grid_kernel[(rois.shape[0],)](rois, grids, **kernel_arguments(geometry), num_warps=1)
    largest_h, largest_w = grids.amax(dim=0).tolist()  # the synchronization
    return max(int(largest_h), 1), max(int(largest_w), 1)


def deterministic_backward(rois: Tensor, grad_pooled: Tensor, geometry: LaunchGeometry) -> Tensor:
    """dL/dF of `kernels.roi_align` in a fixed order: `[N, T, C]` float32, bit-identical run to run.

    rois `[R, 5]` contiguous, float32 or the features' dtype; grad_pooled `[R, C, P_h, P_w]` (any
    strides), the gradient of the output; geometry: the forward pass's `LaunchGeometry`.
    """
    # check (done by the forward pass) -> allocate
    num_rois, channels = rois.shape[0], geometry.channels
    bins = geometry.pooled_height * geometry.pooled_width
    num_positions = geometry.num_images * geometry.positions  # N T
    device = grad_pooled.device
    if num_rois == 0 or num_positions == 0:
        return torch.zeros(geometry.num_images, geometry.positions, channels, device=device)
    largest_h, largest_w = _largest_grid(rois, geometry)
    samples = largest_h * largest_w  # S
    destination = torch.full((num_rois * bins * samples * 4,), num_positions, dtype=torch.int64, device=device)
    weight = torch.zeros(destination.shape, dtype=torch.float32, device=device)
    block_bins = min(triton.next_power_of_2(bins), 1024 if _INTERPRETED else 256)
    _roi_align_terms_kernel[(num_rois, triton.cdiv(bins, block_bins))](
        rois, destination, weight, largest_w, samples, num_positions, **kernel_arguments(geometry),
        BLOCK_BINS=block_bins, num_warps=4,
    )
    # sort: each position's terms side by side, in slot order; then each position's segment
    sorted_destination, order = torch.sort(destination, stable=True)  # [E] each
    targets = torch.arange(num_positions + 1, dtype=torch.int64, device=device)  # [N T + 1]
    bounds = torch.searchsorted(sorted_destination, targets)  # [N T + 1]
    grad_rows = grad_pooled.permute(0, 2, 3, 1).reshape(num_rois * bins, channels).contiguous()  # [R P_h P_w, C]
    grad = torch.empty(num_positions, channels, dtype=torch.float32, device=device)  # every entry written
    block_pos, block_c = _sum_tile(num_positions, channels, grad_rows.element_size())
    grid = (triton.cdiv(num_positions, block_pos), triton.cdiv(channels, block_c))
    _segment_sum_kernel[grid](grad_rows, order, weight, bounds, grad, num_positions, channels, samples * 4,
                              BLOCK_POS=block_pos, BLOCK_C=block_c, num_warps=4)  # fmt: skip
    return grad.view(geometry.num_images, geometry.positions, channels)  # [N, T, C]
