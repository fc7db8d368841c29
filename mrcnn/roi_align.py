r"""RoIAlign, RoIPool and the multi-level RoIAlign of FPN (paper section 3, "RoIAlign").

Every RoI (a box in image coordinates) is turned into a fixed P x P grid of features. RoIPool
(Fast R-CNN) quantizes twice: the box to the feature grid, then the box into bins, and takes a
max. Those roundings misalign the pooled features with the box by up to a feature stride,
which hurts pixel-accurate masks. RoIAlign quantizes nothing: each bin is sampled at a regular
`g_h x g_w` grid of points by bilinear interpolation, and the samples are averaged.

For a RoI `(x1, y1, x2, y2)`, spatial scale `s` and offset `o` (0, or 1/2 when `aligned`):

    y_start = y1 * s - o            h = y2 * s - o - y_start   (h = max(h, 1) when not aligned)
    b_h     = h / P                 (bin height; likewise b_w)
    g_h     = sampling_ratio        if sampling_ratio > 0 else ceil(h / P)
    y(p, i) = y_start + p * b_h + (i + 1/2) * b_h / g_h      p in [0, P), i in [0, g_h)

    out[r, c, p, q] = 1 / max(g_h g_w, 1) * sum_{i, j} bilinear(F[n_r, c], y(p, i), x(q, j))

`bilinear` is the usual four-neighbour interpolation, with the conventions of the reference
implementations: a sample more than one pixel outside the map contributes zero (but still
counts in the average); a sample within that pixel is clamped onto the border.

Shapes (the book's legend): N images, C channels, H x W feature map, R RoIs, P pooled size.
`rois` is `[R, 5]`: `(batch_index, x1, y1, x2, y2)` in image coordinates.

Three implementations share this definition:

- `roi_align_reference`: the readable one below, which gathers the four neighbours of every
  sample. It is the definition the others are tested against.
- `kernels.roi_align`: the Triton kernels, used for CUDA tensors.
- `mrcnn.roi_align_cpu`: the same numbers as one sparse matrix product, the path `roi_align`
  and `MultiLevelRoIAlign` take on a CPU (several times faster than a per-channel loop).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what kernels.roi_align computes in


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def check_roi_inputs(features: Tensor, rois: Tensor) -> None:
    """Raise a `ValueError` naming the problem if `features` and `rois` cannot be pooled.

    features: `[N, C, H, W]` floating point; rois: `[R, 5]` of the same dtype and device, finite,
    with batch indices in `[0, N)`. Checked before any work is done.
    """
    if not isinstance(features, Tensor) or features.dim() != 4:
        raise ValueError(f"features must be a [N, C, H, W] tensor, got shape {tuple(getattr(features, 'shape', ()))}")
    if not features.is_floating_point():
        raise ValueError(f"features must be floating point, got {features.dtype}")
    if not isinstance(rois, Tensor) or rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(
            f"rois must be a [R, 5] tensor of (batch_index, x1, y1, x2, y2), got shape {tuple(getattr(rois, 'shape', ()))}"
        )
    if rois.device != features.device:
        raise ValueError(f"features are on {features.device} but rois are on {rois.device}")
    if rois.dtype != features.dtype:
        raise ValueError(f"features are {features.dtype} but rois are {rois.dtype}; use the same dtype")
    if rois.numel() == 0:
        return
    if features.shape[2] == 0 or features.shape[3] == 0:
        raise ValueError(f"features have an empty {features.shape[2]} x {features.shape[3]} map; nothing to pool from")
    if not bool(torch.isfinite(rois).all()):
        bad = int((~torch.isfinite(rois)).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"rois must be finite; row {bad} is {rois[bad].tolist()}")
    batch_index = rois[:, 0]
    n = features.shape[0]
    if bool(((batch_index < 0) | (batch_index >= n) | (batch_index != batch_index.floor())).any()):
        bad = int(((batch_index < 0) | (batch_index >= n) | (batch_index != batch_index.floor())).nonzero()[0, 0])
        raise ValueError(f"rois[{bad}] has batch index {batch_index[bad].item()}, outside [0, {n}) for {n} images")


def sampling_grid(
    rois: Tensor, output_size: tuple[int, int], spatial_scale: float, sampling_ratio: int, aligned: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The sample coordinates of every bin of every RoI, in feature-map pixels.

    Returns `y [R, P_h, G_h]`, `x [R, P_w, G_w]`, the masks `y_used [R, 1, G_h]` and `x_used
    [R, 1, G_w]` (adaptive sampling gives each RoI its own grid; `G` is the largest, and the
    samples past a RoI's own grid are unused), and `count [R]`, the number of samples per bin.
    Same order of operations as the reference kernels, so results agree to the last bit of
    the coordinates.
    """
    pooled_h, pooled_w = output_size
    offset = 0.5 if aligned else 0.0
    y_start = rois[:, 2] * spatial_scale - offset  # [R]
    x_start = rois[:, 1] * spatial_scale - offset  # [R]
    roi_h = rois[:, 4] * spatial_scale - offset - y_start  # [R]
    roi_w = rois[:, 3] * spatial_scale - offset - x_start  # [R]
    if not aligned:  # legacy: a RoI is at least one pixel
        roi_h = roi_h.clamp(min=1.0)
        roi_w = roi_w.clamp(min=1.0)
    bin_h = roi_h / pooled_h  # [R]
    bin_w = roi_w / pooled_w  # [R]

    if sampling_ratio > 0:
        grid_h = torch.full_like(roi_h, float(sampling_ratio))  # [R]
        grid_w = torch.full_like(roi_w, float(sampling_ratio))  # [R]
        max_h = max_w = sampling_ratio
    else:  # adaptive: ceil(roi_size / output_size) samples per bin side
        grid_h = torch.ceil(roi_h / pooled_h)  # [R]
        grid_w = torch.ceil(roi_w / pooled_w)  # [R]
        max_h = max(int(grid_h.max().item()) if rois.numel() else 1, 1)
        max_w = max(int(grid_w.max().item()) if rois.numel() else 1, 1)
    count = (grid_h * grid_w).clamp(min=1.0)  # [R]

    p_h = torch.arange(pooled_h, device=rois.device, dtype=rois.dtype)  # [P_h]
    p_w = torch.arange(pooled_w, device=rois.device, dtype=rois.dtype)  # [P_w]
    i_h = torch.arange(max_h, device=rois.device, dtype=rois.dtype)  # [G_h]
    i_w = torch.arange(max_w, device=rois.device, dtype=rois.dtype)  # [G_w]
    # y(p, i) = y_start + p * b_h + (i + 1/2) * b_h / g_h, evaluated left to right as the kernels do
    y = (
        y_start[:, None, None]
        + p_h[None, :, None] * bin_h[:, None, None]
        + (i_h[None, None, :] + 0.5) * bin_h[:, None, None] / grid_h[:, None, None]
    )  # [R, P_h, G_h]
    x = (
        x_start[:, None, None]
        + p_w[None, :, None] * bin_w[:, None, None]
        + (i_w[None, None, :] + 0.5) * bin_w[:, None, None] / grid_w[:, None, None]
    )  # [R, P_w, G_w]
    y_used = i_h[None, None, :] < grid_h[:, None, None]  # [R, 1, G_h]
    x_used = i_w[None, None, :] < grid_w[:, None, None]  # [R, 1, G_w]
    return y, x, y_used, x_used, count


def bilinear_neighbours(coord: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Along one axis: the two neighbouring pixel indices of each sample and their weights.

    coord: any shape, feature-map pixels. Returns `(low, high, w_low, w_high, inside)`, where
    `inside` is False for samples more than one pixel outside `[0, size)` (they contribute
    zero), and samples in `[-1, 0)` or past the last pixel are clamped onto the border.
    """
    inside = (coord >= -1.0) & (coord <= size)  # False for NaN too (a RoI with an empty grid)
    coord = torch.where(inside, coord, torch.zeros_like(coord)).clamp(min=0)
    low = coord.to(torch.int64)  # floor, since coord >= 0
    at_border = low >= size - 1
    low = torch.where(at_border, torch.full_like(low, size - 1), low)
    high = torch.where(at_border, low, low + 1)
    coord = torch.where(at_border, low.to(coord.dtype), coord)
    w_high = coord - low  # l_y in the kernels
    w_low = 1.0 - w_high  # h_y
    return low, high, w_low, w_high, inside


def roi_align_reference(
    features: Tensor,
    rois: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign as defined in the module docstring: readable, vectorized, differentiable.

    features `[N, C, H, W]`, rois `[R, 5]` -> `[R, C, P_h, P_w]`, same dtype as `features`.
    """
    check_roi_inputs(features, rois)
    pooled_h, pooled_w = _pair(output_size)
    num_rois, channels, height, width = rois.shape[0], features.shape[1], features.shape[2], features.shape[3]
    if num_rois == 0:
        return features.new_zeros(0, channels, pooled_h, pooled_w) + 0 * features.sum()  # keeps the graph

    y, x, y_used, x_used, count = sampling_grid(rois, (pooled_h, pooled_w), spatial_scale, sampling_ratio, aligned)
    y_low, y_high, hy, ly, y_inside = bilinear_neighbours(y, height)  # each [R, P_h, G_h]
    x_low, x_high, hx, lx, x_inside = bilinear_neighbours(x, width)  # each [R, P_w, G_w]

    # A sample counts when it is inside (both axes) and part of its RoI's own grid.
    y_keep = (y_inside & y_used).to(features.dtype)  # [R, P_h, G_h]
    x_keep = (x_inside & x_used).to(features.dtype)  # [R, P_w, G_w]

    batch = rois[:, 0].to(torch.int64)[:, None, None, None, None]  # [R, 1, 1, 1, 1]

    def gather(y_index: Tensor, x_index: Tensor) -> Tensor:
        # F[n_r, :, y, x] for every (p, i, q, j): [R, P_h, G_h, P_w, G_w, C]
        return features[batch, :, y_index[:, :, :, None, None], x_index[:, None, None, :, :]]

    def outer(a: Tensor, b: Tensor) -> Tensor:  # [R, P_h, G_h] x [R, P_w, G_w] -> [R, P_h, G_h, P_w, G_w, 1]
        return (a[:, :, :, None, None] * b[:, None, None, :, :])[..., None]

    # bilinear(F, y, x) = h_y h_x F[y_lo, x_lo] + h_y l_x F[y_lo, x_hi] + l_y h_x F[y_hi, x_lo] + l_y l_x F[y_hi, x_hi]
    value = (
        outer(hy, hx) * gather(y_low, x_low)
        + outer(hy, lx) * gather(y_low, x_high)
        + outer(ly, hx) * gather(y_high, x_low)
        + outer(ly, lx) * gather(y_high, x_high)
    )  # [R, P_h, G_h, P_w, G_w, C]
    value = value * outer(y_keep, x_keep)
    # the average over the g_h x g_w samples of each bin
    pooled = value.sum(dim=(2, 4)) / count[:, None, None, None]  # [R, P_h, P_w, C]
    return pooled.permute(0, 3, 1, 2).contiguous()  # [R, C, P_h, P_w]


def roi_pool_bins(
    rois: Tensor, output_size: tuple[int, int], spatial_scale: float, height: int, width: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """RoIPool's two quantizations: the whole feature pixels each bin covers.

    Same conventions as the reference implementations: the RoI corners are rounded to the
    nearest feature pixel, the RoI is at least 1 x 1 (its end pixel included), and bin `p`
    covers rows `[floor(p * b_h), ceil((p + 1) * b_h))` past the RoI's first row, clipped to the
    map. rois `[R, 5]` -> `(y_low, y_high, x_low, x_high)`, int64, `[R, P_h]` and `[R, P_w]`:
    bin `(p, q)` of RoI `r` covers rows `[y_low[r, p], y_high[r, p])` and columns
    `[x_low[r, q], x_high[r, q])` (empty when clipped away).
    """
    pooled_h, pooled_w = output_size

    # quantization 1: the RoI corners to whole feature pixels (rounding half away from zero)
    def round_half_away(v: Tensor) -> Tensor:
        return (torch.sign(v) * torch.floor(v.abs() + 0.5)).to(torch.int64)

    x_start = round_half_away(rois[:, 1] * spatial_scale)  # [R]
    y_start = round_half_away(rois[:, 2] * spatial_scale)  # [R]
    x_end = round_half_away(rois[:, 3] * spatial_scale)  # [R]
    y_end = round_half_away(rois[:, 4] * spatial_scale)  # [R]
    bin_h = (y_end - y_start + 1).clamp(min=1).to(rois.dtype) / pooled_h  # [R]
    bin_w = (x_end - x_start + 1).clamp(min=1).to(rois.dtype) / pooled_w  # [R]

    # quantization 2: bin p covers pixels [floor(p * b), ceil((p + 1) * b)) past the RoI start
    def bin_edges(start: Tensor, size: Tensor, pooled: int, limit: int) -> tuple[Tensor, Tensor]:
        p = torch.arange(pooled, device=rois.device, dtype=rois.dtype)  # [P]
        low = (torch.floor(p[None] * size[:, None]).to(torch.int64) + start[:, None]).clamp(0, limit)  # [R, P]
        high = (torch.ceil((p[None] + 1) * size[:, None]).to(torch.int64) + start[:, None]).clamp(0, limit)  # [R, P]
        return low, high

    y_low, y_high = bin_edges(y_start, bin_h, pooled_h, height)
    x_low, x_high = bin_edges(x_start, bin_w, pooled_w, width)
    return y_low, y_high, x_low, x_high


def roi_pool(features: Tensor, rois: Tensor, output_size: int | tuple[int, int], spatial_scale: float = 1.0) -> Tensor:
    """RoIPool of Fast R-CNN: quantize the RoI, quantize the bins, max-pool each bin.

    The baseline RoIAlign replaces (paper section 3, Table 2c). The bins are those of
    `roi_pool_bins`; an empty bin (clipped away by the map's border) gives 0.

    features `[N, C, H, W]`, rois `[R, 5]` -> `[R, C, P_h, P_w]`.
    """
    check_roi_inputs(features, rois)
    pooled_h, pooled_w = _pair(output_size)
    num_rois, channels, height, width = rois.shape[0], *features.shape[1:]
    if num_rois == 0:
        return features.new_zeros(0, channels, pooled_h, pooled_w) + 0 * features.sum()
    y_low, y_high, x_low, x_high = roi_pool_bins(rois, (pooled_h, pooled_w), spatial_scale, height, width)

    def window(low: Tensor, high: Tensor, limit: int) -> tuple[Tensor, Tensor]:
        span = max(int((high - low).max().item()), 1)  # the widest bin
        index = low[:, :, None] + torch.arange(span, device=rois.device)  # [R, P, S]
        used = index < high[:, :, None]  # [R, P, S]
        return index.clamp(max=limit - 1), used

    y_index, y_used = window(y_low, y_high, height)  # [R, P_h, S_h]
    x_index, x_used = window(x_low, x_high, width)  # [R, P_w, S_w]
    batch = rois[:, 0].to(torch.int64)[:, None, None, None, None]  # [R, 1, 1, 1, 1]
    values = features[batch, :, y_index[:, :, :, None, None], x_index[:, None, None, :, :]]  # [R, P_h, S_h, P_w, S_w, C]
    used = y_used[:, :, :, None, None] & x_used[:, None, None, :, :]  # [R, P_h, S_h, P_w, S_w]
    values = values.masked_fill(~used[..., None], torch.finfo(features.dtype).min)
    pooled = values.amax(dim=(2, 4))  # [R, P_h, P_w, C]
    empty = ~used.any(dim=4).any(dim=2)  # [R, P_h, P_w]: a bin clipped away entirely gives 0
    pooled = pooled.masked_fill(empty[..., None], 0.0)
    return pooled.permute(0, 3, 1, 2).contiguous()  # [R, C, P_h, P_w]


def fpn_level(boxes: Tensor, min_level: int, max_level: int, canonical_level: int = 4, canonical_size: float = 224.0, eps: float = 1e-6) -> Tensor:
    """The FPN level of each RoI: `k = floor(k0 + log2(sqrt(w h) / 224))`, clamped (FPN paper, eq. 1).

    boxes `[R, 4]` (x1, y1, x2, y2) -> `[R]` int64 levels in `[min_level, max_level]`. A 224 x 224
    RoI goes to P4; halve its side and it moves one level down. The small `eps` keeps a RoI of
    exactly 112 x 112 on P3 despite rounding in log2, as the reference implementations do. A
    box inverted on one axis (negative area) goes to the finest level, as an empty one does.
    """
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0)  # [R]
    size = torch.sqrt(area)  # [R]
    level = torch.floor(canonical_level + torch.log2(size / canonical_size) + torch.tensor(eps, dtype=size.dtype))
    return level.clamp(min=min_level, max=max_level).to(torch.int64)


def roi_align(
    features: Tensor,
    rois: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    use_kernel: bool | None = None,
) -> Tensor:
    """RoIAlign, dispatched to the fastest implementation for the device.

    Same arguments and result as `roi_align_reference` (up to float rounding), differentiable
    with respect to `features`. `use_kernel=None` (the default) runs the Triton kernel when
    `features` are on CUDA in a dtype it supports (float32, float16, bfloat16) and Triton
    imports, and the sparse-matrix path of `mrcnn.roi_align_cpu` otherwise; `True` or `False`
    forces the choice.
    """
    check_roi_inputs(features, rois)
    if use_kernel is None:
        use_kernel = features.is_cuda and features.dtype in KERNEL_DTYPES and kernels_available()
    if use_kernel:
        from kernels.roi_align import roi_align as roi_align_kernel

        return roi_align_kernel(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    from mrcnn.roi_align_cpu import sparse_roi_align  # imported here: it builds on this module

    level = torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)  # [R], one map
    return sparse_roi_align([features], rois, level, _pair(output_size), [spatial_scale], sampling_ratio, aligned)


def kernels_available() -> bool:
    """True when the Triton kernels can be imported (Triton installed)."""
    try:
        import kernels.roi_align  # noqa: F401
    except ImportError:
        return False
    return True


class MultiLevelRoIAlign(nn.Module):
    """Pool each RoI from the one FPN level that suits its size (paper section 3, "Network Architecture").

    Args:
        output_size: P (7 for the box head, 14 for the mask head).
        strides: the strides of the feature maps passed to `forward`, finest first, powers of
            two, for example `(4, 8, 16, 32)` for P2-P5.
        sampling_ratio, aligned: as in `roi_align`.
    """

    def __init__(self, output_size: int, strides: tuple[int, ...] = (4, 8, 16, 32), sampling_ratio: int = 2, aligned: bool = False):
        super().__init__()
        self.output_size = output_size
        self.strides = tuple(strides)
        self.levels = tuple(int(round(math.log2(s))) for s in self.strides)  # stride 4 -> level 2
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, features: list[Tensor], rois: Tensor, use_kernel: bool | None = None) -> Tensor:
        """features: one `[N, C, H_l, W_l]` map per level; rois `[R, 5]` -> `[R, C, P, P]`.

        `use_kernel` as in `roi_align`; without the kernel, all levels are pooled by one call of
        the sparse-matrix path (`mrcnn.roi_align_cpu`).
        """
        if len(features) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature maps (strides {self.strides}), got {len(features)}")
        for feature in features:
            check_roi_inputs(feature, rois)
            if feature.shape[:2] != features[0].shape[:2]:
                raise ValueError(
                    f"all levels must have the same images and channels, got {tuple(feature.shape[:2])} and {tuple(features[0].shape[:2])}"
                )
        if use_kernel is None:
            use_kernel = features[0].is_cuda and features[0].dtype in KERNEL_DTYPES and kernels_available()
        if use_kernel:
            from kernels.roi_align import multi_level_roi_align

            return multi_level_roi_align(
                features, rois, self.output_size, [1.0 / s for s in self.strides], self.sampling_ratio, self.aligned,
                min_level=self.levels[0],
            )
        from mrcnn.roi_align_cpu import sparse_roi_align  # imported here: it builds on this module

        level = fpn_level(rois[:, 1:], self.levels[0], self.levels[-1]) - self.levels[0]  # [R], index into features
        output_size = (self.output_size, self.output_size)
        scales = [1.0 / stride for stride in self.strides]
        return sparse_roi_align(features, rois, level, output_size, scales, self.sampling_ratio, self.aligned)
