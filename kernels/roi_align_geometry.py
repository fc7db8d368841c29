r"""The geometry the RoIAlign kernels share: where each map lies in the packed buffer, which map a
RoI is pooled from, and where its samples fall (Mask R-CNN section 3; FPN paper, eq. 1).

`kernels/roi_align.py` (forward, and the backward with atomics) and
`kernels/roi_align_deterministic.py` (the backward in a fixed order) walk the same samples of the
same RoIs. What they share lives here, and both import it:

- on the host, `LaunchGeometry`: everything a launch needs besides the tensors (the output size,
  the sampling, the maps' sizes and places in the packed buffer, the level assignment), built
  once per call by the public functions (`launch_geometry`); `pack` and `unpack` move between
  the maps and the buffer; `kernel_arguments` spells the geometry as the kernels' arguments;
- on the device, `roi_geometry` (a RoI's map, start, bin size, sampling grid and count) and
  `bilinear_axis` (the neighbours and weights of a vector of samples along one axis).

The buffer. All L maps `[N, C, H_l, W_l]` are copied into one channels-last buffer `[N, T, C]`,
`T = sum_l H_l W_l` positions per image, map l from position `T_l = sum_{m<l} H_m W_m`:

    F_l[n, c, y, x] = buffer[n, T_l + y W_l + x, c]

The map of a RoI. Map l is FPN level `k_l`: the first is `k_min` (`min_level`), the others follow
from the scales, `k_l = k_min + round(log2(s_0 / s_l))` (1/4, 1/8, 1/32 -> levels 2, 3, 5). RoI
`r = (n_r, x1, y1, x2, y2)` gets

    k_r = floor(k0 + log2(sqrt((x2 - x1)(y2 - y1)) / s0) + eps)   clamped to [k_first, k_last]

and is pooled from the map with `k_l = k_r`. When no map has that level (strides that skip one,
e.g. 8 and 32), the RoI pools zeros and sends back no gradient, as torchvision's
`MultiScaleRoIAlign`. A box of zero or negative area goes to the first map.

The samples of a RoI on its map, of spatial scale `s` (offset `o = 1/2` when `aligned`, else 0):

    y_start = y1 s - o     h = y2 s - o - y_start  (max(h, 1) unless aligned)     b_h = h / P_h
    g_h     = sampling_ratio if > 0 else ceil(h / P_h)        count = max(g_h g_w, 1)
    y(p, i) = y_start + p b_h + (i + 1/2) b_h / g_h           (x(q, j) likewise)

all in float32, whatever the dtype of the RoIs (float32, or that of 16-bit features) and of the
features. A RoI of a missing image (batch index outside `[0, N)`, possible with `validate=False`)
or of a missing level gets `g_h = 0`: no samples, so zeros forward and no gradient backward.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor


class LaunchGeometry(NamedTuple):
    """What the RoIAlign kernels need to know besides the tensors; one per call of a public function."""

    pooled_height: int  # P_h
    pooled_width: int  # P_w
    sampling_ratio: int  # g per bin side, or 0 for the adaptive ceil(h / P_h)
    aligned: bool  # half-pixel offset o = 1/2, and no minimum RoI size
    num_images: int  # N
    channels: int  # C
    heights: tuple[int, ...]  # H_l of each map
    widths: tuple[int, ...]  # W_l of each map
    offsets: tuple[int, ...]  # T_l: the first position of map l among an image's T
    positions: int  # T = sum_l H_l W_l, positions per image in the [N, T, C] buffer
    spatial_scales: tuple[float, ...]  # s_l = 1 / stride of map l
    levels: tuple[int, ...]  # k_l, the FPN level of map l (strictly increasing; gaps allowed)
    canonical_level: int  # k0 = 4: a RoI of canonical_size goes to this level
    canonical_size: float  # s0 = 224, the ImageNet pre-training size
    eps: float  # 1e-6: a 112 x 112 RoI stays on P3 despite rounding in log2


def map_levels(spatial_scales: tuple[float, ...], min_level: int) -> tuple[int, ...]:
    """`k_l = k_min + round(log2(s_0 / s_l))`: the FPN level of each map (module docstring)."""
    return tuple(min_level + round(math.log2(spatial_scales[0] / s)) for s in spatial_scales)


def launch_geometry(
    features: tuple[Tensor, ...],
    output_size: tuple[int, int],
    spatial_scales: tuple[float, ...],
    sampling_ratio: int,
    aligned: bool,
    min_level: int = 0,
    canonical_level: int = 4,
    canonical_size: float = 224.0,
    eps: float = 1e-6,
) -> LaunchGeometry:
    """The geometry of one call, from the maps' shapes and the settings (metadata only, checked before)."""
    heights = tuple(int(f.shape[2]) for f in features)
    widths = tuple(int(f.shape[3]) for f in features)
    sizes = [h * w for h, w in zip(heights, widths)]
    scales = tuple(float(s) for s in spatial_scales)
    return LaunchGeometry(
        pooled_height=output_size[0],
        pooled_width=output_size[1],
        sampling_ratio=max(sampling_ratio, 0),
        aligned=bool(aligned),
        num_images=int(features[0].shape[0]),
        channels=int(features[0].shape[1]),
        heights=heights,
        widths=widths,
        offsets=tuple(sum(sizes[:level]) for level in range(len(sizes))),  # T_l
        positions=sum(sizes),  # T
        spatial_scales=scales,
        levels=map_levels(scales, int(min_level)),
        canonical_level=int(canonical_level),
        canonical_size=float(canonical_size),
        eps=float(eps),
    )


def pack(features: tuple[Tensor, ...], geometry: LaunchGeometry) -> Tensor:
    """`L x [N, C, H_l, W_l]` -> `[N, T, C]` contiguous: one copy (none for one channels-last map)."""
    n, c = geometry.num_images, geometry.channels
    views = [f.permute(0, 2, 3, 1).reshape(n, h * w, c)  # [N, H_l W_l, C]
             for f, h, w in zip(features, geometry.heights, geometry.widths)]  # fmt: skip
    return views[0].contiguous() if len(views) == 1 else torch.cat(views, dim=1)  # [N, T, C]


def unpack(packed: Tensor, geometry: LaunchGeometry) -> tuple[Tensor, ...]:
    """`[N, T, C]` -> `L x [N, C, H_l, W_l]` views (channels-last strides), no copy."""
    n, c = geometry.num_images, geometry.channels
    maps = zip(geometry.offsets, geometry.heights, geometry.widths)
    # each [N, C, H_l, W_l]
    return tuple(packed[:, t : t + h * w].reshape(n, h, w, c).permute(0, 3, 1, 2) for t, h, w in maps)


def kernel_arguments(geometry: LaunchGeometry) -> dict:
    """The geometry as the keyword arguments of `roi_geometry`, which every kernel passes on under these names."""
    return dict(
        num_images=geometry.num_images,
        positions_per_image=geometry.positions,
        level_heights=geometry.heights,
        level_widths=geometry.widths,
        level_offsets=geometry.offsets,
        level_scales=geometry.spatial_scales,
        level_numbers=geometry.levels,
        canonical_level=geometry.canonical_level,
        canonical_size=geometry.canonical_size,
        level_eps=geometry.eps,
        NUM_LEVELS=len(geometry.heights),
        POOLED_H=geometry.pooled_height,
        POOLED_W=geometry.pooled_width,
        SAMPLING_RATIO=geometry.sampling_ratio,
        ALIGNED=geometry.aligned,
    )


# ------------------------------------------------------------------------------ device side


@triton.jit
def bilinear_axis(
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
def roi_geometry(
    rois_ptr,  # [R, 5] contiguous (batch_index, x1, y1, x2, y2), image pixels, float32 or the features' dtype
    roi,  # r, the RoI of this program
    num_images,  # N, to drop RoIs whose batch index is outside [0, N) (possible with validate=False)
    positions_per_image,  # T = sum_l H_l W_l
    level_heights,  # tuple of L ints: H_l
    level_widths,  # tuple of L ints: W_l
    level_offsets,  # tuple of L ints: T_l, the first position of map l among an image's T
    level_scales,  # tuple of L floats: spatial scale s of map l (1 / stride)
    level_numbers,  # tuple of L ints: k_l, the FPN level of map l, increasing (gaps allowed)
    canonical_level,  # k0 = 4
    canonical_size,  # s0 = 224
    level_eps,  # eps = 1e-6: a 112 x 112 RoI stays on P3 despite rounding in log2
    NUM_LEVELS: tl.constexpr,  # L
    POOLED_H: tl.constexpr,  # P_h
    POOLED_W: tl.constexpr,  # P_w
    SAMPLING_RATIO: tl.constexpr,  # g per bin side, or <= 0 for the adaptive ceil(h / P_h)
    ALIGNED: tl.constexpr,  # half-pixel offset o = 1/2, and no minimum RoI size
):
    """What a program needs to know about its RoI, in float32 (module docstring)."""
    row = rois_ptr + roi * 5
    batch = tl.load(row).to(tl.float32)
    x1 = tl.load(row + 1).to(tl.float32)
    y1 = tl.load(row + 2).to(tl.float32)
    x2 = tl.load(row + 3).to(tl.float32)
    y2 = tl.load(row + 4).to(tl.float32)
    valid = (batch >= 0) & (batch < num_images)

    # k = floor(k0 + log2(sqrt(w h) / s0) + eps), clamped to [k_first, k_last]; the RoI's map is
    # the l with k_l = k, and a RoI whose level has no map pools nothing. An empty or inverted box
    # goes to the first map.
    level = 0  # l, the index of the RoI's map
    if NUM_LEVELS > 1:
        roi_size = tl.sqrt_rn(tl.maximum((x2 - x1) * (y2 - y1), 1e-30))
        k = tl.floor(canonical_level + tl.log2(roi_size / canonical_size) + level_eps)
        k = tl.minimum(tl.maximum(k, level_numbers[0] + 0.0), level_numbers[NUM_LEVELS - 1] + 0.0)
        has_map = k == level_numbers[0]
        for j in tl.static_range(1, NUM_LEVELS):
            level = tl.where(k == level_numbers[j], j, level)
            has_map = has_map | (k == level_numbers[j])
        valid = valid & has_map
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
    grid_h = tl.where(valid, grid_h, 0.0)  # a RoI of a missing image or level pools nothing: zeros
    return height, width, image_base, y_start, x_start, bin_h, bin_w, grid_h, grid_w, count
