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

Under mixed precision the RoIs stay float32 while the features may be float16 or bfloat16: a
box coordinate of 1330 is 1328 in bfloat16, four pixels off. The sampling positions and the
bilinear weights are then computed in float32 and only the result takes the features' dtype.

Three implementations share this definition:

- `roi_align_reference`: the readable one below, which gathers the four neighbours of every
  sample. It is the definition the others are tested against.
- `kernels.roi_align`: the Triton kernels, used for CUDA tensors.
- `mrcnn.roi_align_cpu`: the same numbers as one sparse matrix product, the path taken on a CPU
  (several times faster than a per-channel loop).

`mrcnn.poolers` chooses between them (`roi_align`) and pools from the FPN level of each RoI's
size (`MultiLevelRoIAlign`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def pair(size: int | tuple[int, int]) -> tuple[int, int]:
    """An output size `P` or `(P_h, P_w)` as `(P_h, P_w)`."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def check_roi_inputs(features: Tensor, rois: Tensor) -> None:
    """Raise a `ValueError` naming the problem if `features` and `rois` cannot be pooled.

    features: `[N, C, H, W]` floating point; rois: `[R, 5]` on the same device, of the features'
    dtype or float32 (mixed precision keeps boxes in float32), finite, with batch indices in
    `[0, N)`. Checked before any work is done, by the public functions only: the values are read
    back to the host, which on a GPU is a synchronisation.
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
    if rois.dtype not in (features.dtype, torch.float32):
        raise ValueError(f"features are {features.dtype} but rois are {rois.dtype}; use float32 or the features' dtype")
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

    features `[N, C, H, W]`, rois `[R, 5]` -> `[R, C, P_h, P_w]`, same dtype as `features`; the
    samples and weights are computed in the dtype of `rois` (float32 under mixed precision).
    """
    check_roi_inputs(features, rois)
    pooled_h, pooled_w = pair(output_size)
    num_rois, channels, height, width = rois.shape[0], features.shape[1], features.shape[2], features.shape[3]
    if num_rois == 0:
        return features.new_zeros(0, channels, pooled_h, pooled_w) + 0 * features.sum()  # keeps the graph

    y, x, y_used, x_used, count = sampling_grid(rois, (pooled_h, pooled_w), spatial_scale, sampling_ratio, aligned)
    y_low, y_high, hy, ly, y_inside = bilinear_neighbours(y, height)  # each [R, P_h, G_h]
    x_low, x_high, hx, lx, x_inside = bilinear_neighbours(x, width)  # each [R, P_w, G_w]

    # A sample counts when it is inside (both axes) and part of its RoI's own grid.
    y_keep = (y_inside & y_used).to(rois.dtype)  # [R, P_h, G_h]
    x_keep = (x_inside & x_used).to(rois.dtype)  # [R, P_w, G_w]

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
    return pooled.permute(0, 3, 1, 2).contiguous().to(features.dtype)  # [R, C, P_h, P_w]


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
    pooled_h, pooled_w = pair(output_size)
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
    # [R, P_h, S_h, P_w, S_w, C]: the pixels of each bin's window (the indexed dimensions first, then C)
    values = features[batch, :, y_index[:, :, :, None, None], x_index[:, None, None, :, :]]
    used = y_used[:, :, :, None, None] & x_used[:, None, None, :, :]  # [R, P_h, S_h, P_w, S_w]
    values = values.masked_fill(~used[..., None], torch.finfo(features.dtype).min)
    pooled = values.amax(dim=(2, 4))  # [R, P_h, P_w, C]
    empty = ~used.any(dim=4).any(dim=2)  # [R, P_h, P_w]: a bin clipped away entirely gives 0
    pooled = pooled.masked_fill(empty[..., None], 0.0)
    return pooled.permute(0, 3, 1, 2).contiguous()  # [R, C, P_h, P_w]
