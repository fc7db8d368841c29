r"""RoIAlign on a CPU as one sparse matrix product (paper section 3, "RoIAlign").

RoIAlign is linear in the features. Every output value is a weighted sum of a few feature
pixels: each of the `g_h x g_w` samples of a bin reads its four bilinear neighbours, with
weight `h_y h_x / (g_h g_w)` and so on (see `mrcnn.roi_align`). Put the features of one map in
rows, one row of `C` channels per pixel, and the whole call is a sparse matrix times a dense one:

    F    [N H W, C]        feature rows, row n H W + y W + x holds F[n, :, y, x]
    S    [R P_h P_w, N H W]  the interpolation matrix: row (r, p, q) has the 4 g_h g_w bilinear
                           weights of bin (p, q) of RoI r, in the columns of their pixels
    out  = S F             [R P_h P_w, C]                                           (1)
    dL/dF = S^T dL/dout    [N H W, C]                                               (2)

`S` does not depend on the features, so the backward pass (2) is the same non-zeros read by
column instead of by row; no gradient flows to the RoI coordinates (as in the reference
implementations).

How (1) and (2) are computed, chosen by measurement on a 2-core CPU (benchmarks/roi_align.py):

- `torch.nn.functional.embedding_bag` with `per_sample_weights` is exactly a row-sparse matrix
  times a dense one: bag `m` is row `m` of `S`, its indices the columns, its per-sample weights
  the values. It is vectorized over the channels and runs in parallel over the bags, which
  makes it several times faster than a loop over channels. A torch sparse CSR matrix product
  gives the same numbers and measured 1.5-3x slower; `index_add_` slower still.
- For (2) the non-zeros are sorted by column, so that each feature pixel becomes one bag of the
  output rows that read it, and the same `embedding_bag` computes `S^T dL/dout`.
- The weights factor into a y part and an x part, so `S` is built per axis and expanded by an
  outer product. Per axis, neighbours that two samples share (samples less than a pixel
  apart) are merged: with adaptive sampling that cuts the non-zeros about 3x.
- The feature rows are the channels-last layout of the map: features in
  `torch.channels_last` memory format are used without a copy; contiguous ones are transposed
  once per call, image by image, and the gradient (2) is transposed back to their layout.
- `S` is built a few RoIs at a time (`MAX_ENTRIES`), so that adaptive sampling of huge RoIs
  (mask targets pool whole-image masks) cannot build gigabytes of indices at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mrcnn.roi_align import bilinear_neighbours, sampling_grid

MAX_ENTRIES = 2**22  # non-zeros of S built at once: about 50 MB of indices and weights


def axis_neighbours(low: Tensor, high: Tensor, w_low: Tensor, w_high: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Along one axis: the distinct neighbour pixels of each bin's samples and their summed weights.

    low, high `[R, P, G]` int64 and w_low, w_high `[R, P, G]` from `bilinear_neighbours`; keep
    `[R, P, G]` the weight of each sample (0 for one that does not count). Returns `(index,
    weight)`, both `[R, P, L]` with `L <= 2 G`: the 2 G neighbours of a bin's samples name
    fewer pixels when the samples are less than a pixel apart, and a pixel named twice is kept
    once with the two weights added. Padding entries have weight 0 (and a valid index).
    """
    index = torch.stack([low, high], dim=-1).flatten(2)  # [R, P, 2 G]
    weight = (torch.stack([w_low, w_high], dim=-1) * keep[..., None]).flatten(2)  # [R, P, 2 G]
    index, order = index.sort(dim=-1, stable=True)  # equal pixels side by side
    weight = weight.gather(-1, order)  # [R, P, 2 G]
    first = torch.ones_like(index, dtype=torch.bool)  # [R, P, 2 G]: first entry of its pixel
    first[..., 1:] = index[..., 1:] != index[..., :-1]
    slot = first.cumsum(-1) - 1  # [R, P, 2 G], the merged entry each entry adds to
    distinct = int(slot.max()) + 1 if slot.numel() else 1  # L
    merged_weight = weight.new_zeros(*index.shape[:2], distinct).scatter_add_(-1, slot, weight)  # [R, P, L]
    merged_index = index[..., :1].repeat(1, 1, distinct).scatter_(-1, slot, index)  # [R, P, L]
    return merged_index, merged_weight


def interpolation_matrix(
    rois: Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    height: int,
    width: int,
) -> tuple[Tensor, Tensor]:
    """The non-zeros of `S` in equation (1) for RoIs pooled from one `[N, C, H, W]` map.

    rois `[R, 5]` -> `(column, weight)`, both `[R P_h P_w, K]`: row `(r, p, q)` of `S` has weight
    `weight[m, k]` in column `column[m, k]` (int64, the pixel `n H W + y W + x`). `K = L_h L_w
    <= 4 G_h G_w` (`G` the largest sampling grid, see `sampling_grid`); entries of samples
    outside the map or past their RoI's own grid, and padding, have weight 0.
    """
    pooled_h, pooled_w = output_size
    y, x, y_used, x_used, count = sampling_grid(rois, output_size, spatial_scale, sampling_ratio, aligned)
    y_low, y_high, hy, ly, y_inside = bilinear_neighbours(y, height)  # each [R, P_h, G_h]
    x_low, x_high, hx, lx, x_inside = bilinear_neighbours(x, width)  # each [R, P_w, G_w]

    # A sample that does not count gets weight 0; the 1 / (g_h g_w) of the average goes with y.
    y_keep = (y_inside & y_used).to(rois.dtype) / count[:, None, None]  # [R, P_h, G_h]
    x_keep = (x_inside & x_used).to(rois.dtype)  # [R, P_w, G_w]
    row, row_weight = axis_neighbours(y_low, y_high, hy, ly, y_keep)  # each [R, P_h, L_h]
    col, col_weight = axis_neighbours(x_low, x_high, hx, lx, x_keep)  # each [R, P_w, L_w]

    # The bilinear weights factor, h_y h_x and so on, so a bin's entries are the outer product of
    # its row entries and its column entries: sum over samples of (y weight)(x weight) F[y, x].
    image = rois[:, 0].to(torch.int64) * (height * width)  # [R], first pixel of the RoI's image
    column = (
        image[:, None, None, None, None]
        + row[:, :, None, :, None] * width
        + col[:, None, :, None, :]
    )  # [R, P_h, P_w, L_h, L_w]
    weight = row_weight[:, :, None, :, None] * col_weight[:, None, :, None, :]  # [R, P_h, P_w, L_h, L_w]
    bins = rois.shape[0] * pooled_h * pooled_w
    return column.reshape(bins, -1), weight.reshape(bins, -1)  # each [R P_h P_w, K]


def interpolation_chunks(
    rois: Tensor,
    chosen: Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    height: int,
    width: int,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """`interpolation_matrix` for the RoIs `rois[chosen]`, a few at a time.

    Yields `(chosen_part [R_c], column, weight)` with at most about `MAX_ENTRIES` entries each:
    adaptive sampling of a large RoI (mask targets pool a whole image mask, `G` ~ 20) would
    otherwise build gigabytes of indices at once.
    """
    pooled_h, pooled_w = output_size
    y, x, *_ = sampling_grid(rois[chosen], output_size, spatial_scale, sampling_ratio, aligned)
    entries_per_roi = pooled_h * pooled_w * 4 * y.shape[2] * x.shape[2]  # the most K can be, times bins
    step = max(1, MAX_ENTRIES // entries_per_roi)
    for start in range(0, chosen.numel(), step):
        part = chosen[start : start + step]  # [R_c]
        yield (part, *interpolation_matrix(rois[part], output_size, spatial_scale, sampling_ratio, aligned, height, width))


def feature_rows(feature: Tensor) -> Tensor:
    """`[N, C, H, W]` -> `[N H W, C]`, the channels-last rows `F` of equation (1).

    No copy if `feature` is already in `torch.channels_last` memory format. Otherwise each image
    is one 2-D transpose `[C, H W] -> [H W, C]`, which torch copies in cache-sized blocks (a
    4-D permute copy measured slower).
    """
    num_images, channels, height, width = feature.shape
    if feature.is_contiguous(memory_format=torch.channels_last):
        return feature.permute(0, 2, 3, 1).reshape(-1, channels)  # [N H W, C], a view
    rows = feature.new_empty(num_images, height * width, channels)  # [N, H W, C]
    for image in range(num_images):
        rows[image].copy_(feature[image].reshape(channels, height * width).t())
    return rows.view(-1, channels)  # [N H W, C]


def rows_to_feature(rows: Tensor, like: Tensor) -> Tensor:
    """The inverse of `feature_rows`: `[N H W, C]` -> `[N, C, H, W]` in the memory format of `like`."""
    num_images, channels, height, width = like.shape
    if like.is_contiguous(memory_format=torch.channels_last):
        return rows.view(num_images, height, width, channels).permute(0, 3, 1, 2)  # a view
    feature = rows.new_empty(num_images, channels, height, width)
    for image, image_rows in enumerate(rows.view(num_images, height * width, channels)):
        feature[image].view(channels, height * width).copy_(image_rows.t())
    return feature


def transposed_bags(column: Tensor, weight: Tensor, num_columns: int) -> tuple[Tensor, Tensor, Tensor]:
    """The non-zeros of `S^T` in equation (2), grouped by column, as bags for `embedding_bag`.

    column, weight `[M, K]` (from `interpolation_matrix`) -> `(row [M K], weight [M K],
    offsets [num_columns])`: bag `j` (pixel `j`) lists the rows of `S` that read pixel `j`.
    """
    entries_per_row = column.shape[1]
    column = column.flatten()  # [M K]
    key = column.to(torch.int32) if num_columns < 2**31 else column  # int32 sorts twice as fast
    order = torch.sort(key, stable=True).indices  # the non-zeros sorted by pixel
    count = torch.bincount(column, minlength=num_columns)  # [num_columns], non-zeros per pixel
    offsets = count.cumsum(0) - count  # [num_columns], where each pixel's bag starts
    return order // entries_per_row, weight.flatten()[order], offsets


class SparseRoIAlignFunction(torch.autograd.Function):
    """Equations (1) and (2) over several feature maps: RoI `r` is pooled from map `level[r]`.

    `S` is cheap to build next to the products, so the backward pass builds it again instead of
    keeping it from the forward pass.
    """

    @staticmethod
    def forward(ctx, rois: Tensor, level: Tensor, geometry: tuple, *features: Tensor) -> Tensor:
        """rois `[R, 5]`, level `[R]` int64, geometry `(output_size, spatial_scales, sampling_ratio,
        aligned)`, features one `[N, C, H_l, W_l]` per map -> pooled rows `[R, P_h P_w, C]`."""
        (pooled_h, pooled_w), spatial_scales, sampling_ratio, aligned = geometry
        channels = features[0].shape[1]
        out = features[0].new_zeros(rois.shape[0], pooled_h * pooled_w, channels)  # [R, P_h P_w, C]
        for index, (feature, scale) in enumerate(zip(features, spatial_scales)):
            chosen = torch.nonzero(level == index).squeeze(1)  # [R_l]
            if chosen.numel() == 0:
                continue
            rows = feature_rows(feature)  # [N H_l W_l, C]
            args = ((pooled_h, pooled_w), scale, sampling_ratio, aligned, *feature.shape[2:])
            for part, column, weight in interpolation_chunks(rois, chosen, *args):
                pooled = F.embedding_bag(column, rows, mode="sum", per_sample_weights=weight)  # (1): [R_c P_h P_w, C]
                out.index_copy_(0, part, pooled.view(part.numel(), pooled_h * pooled_w, channels))
        ctx.save_for_backward(rois, level)
        ctx.geometry = geometry
        ctx.features_like = [torch.empty_like(feature, device="meta") for feature in features]  # shape and layout
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        rois, level = ctx.saved_tensors
        (pooled_h, pooled_w), spatial_scales, sampling_ratio, aligned = ctx.geometry
        grads = []
        for index, (like, scale) in enumerate(zip(ctx.features_like, spatial_scales)):
            num_images, channels, height, width = like.shape
            chosen = torch.nonzero(level == index).squeeze(1)  # [R_l]
            grad_rows = grad_out.new_zeros(num_images * height * width, channels) if chosen.numel() == 0 else None
            for part, column, weight in interpolation_chunks(rois, chosen, (pooled_h, pooled_w), scale, sampling_ratio, aligned, height, width):
                grad_pooled = grad_out.index_select(0, part).reshape(-1, channels)  # [R_c P_h P_w, C]
                row, row_weight, offsets = transposed_bags(column, weight, num_images * height * width)
                grad_part = F.embedding_bag(row, grad_pooled, offsets, mode="sum", per_sample_weights=row_weight)  # (2)
                grad_rows = grad_part if grad_rows is None else grad_rows.add_(grad_part)  # [N H_l W_l, C]
            grads.append(rows_to_feature(grad_rows, like))  # [N, C, H_l, W_l], laid out like the features
        return (None, None, None, *grads)


def sparse_roi_align(
    features: Sequence[Tensor],
    rois: Tensor,
    level: Tensor,
    output_size: tuple[int, int],
    spatial_scales: Sequence[float],
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """RoIAlign of every RoI from the map `level[r]` chooses, by equations (1) and (2).

    features: `[N, C, H_l, W_l]` per map; rois `[R, 5]`; level `[R]` int64 indices into
    `features`; spatial_scales: one per map. Returns `[R, C, P_h, P_w]`, contiguous, with the
    same numbers as `roi_align_reference` up to float rounding; differentiable with respect to
    the features. Inputs are assumed checked (`check_roi_inputs`).
    """
    pooled_h, pooled_w = output_size
    geometry = ((pooled_h, pooled_w), tuple(spatial_scales), sampling_ratio, aligned)
    rows = SparseRoIAlignFunction.apply(rois, level, geometry, *features)  # [R, P_h P_w, C]
    channels = features[0].shape[1]
    return rows.view(rois.shape[0], pooled_h, pooled_w, channels).permute(0, 3, 1, 2).contiguous()  # [R, C, P_h, P_w]
