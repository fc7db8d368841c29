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
- The feature rows are the channels-last layout of the map. Features in `torch.channels_last`
  memory format are read in place (and their gradient written in place, channels-last). For
  contiguous `[N, C, H, W]` features only the pixels that some RoI reads are gathered into
  rows (`touched_pixels`; a fifth to all of a level in a training batch) and the columns of `S`
  renumbered to them; the gradient of those pixels is written into a zero gradient. That
  measured faster than transposing the whole map, even when the RoIs read all of it.
- `S` is built a few RoIs at a time (`MAX_ENTRIES`), so that adaptive sampling of huge RoIs
  (mask targets pool whole-image masks, with no gradient) cannot build gigabytes of indices at
  once. When a gradient is needed the forward pass keeps `S` for the backward pass.
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
    adaptive sampling of large RoIs (mask targets pool whole-image masks, `G` ~ 20) would
    otherwise build gigabytes of indices at once.
    """
    pooled_h, pooled_w = output_size
    if sampling_ratio > 0:
        grid_h = grid_w = sampling_ratio
    else:  # adaptive: the largest grid of these RoIs
        y, x, *_ = sampling_grid(rois[chosen], output_size, spatial_scale, sampling_ratio, aligned)
        grid_h, grid_w = y.shape[2], x.shape[2]
    entries_per_roi = pooled_h * pooled_w * 4 * grid_h * grid_w  # the most K can be, times bins
    step = max(1, MAX_ENTRIES // entries_per_roi)
    for start in range(0, chosen.numel(), step):
        part = chosen[start : start + step]  # [R_c]
        yield (part, *interpolation_matrix(rois[part], output_size, spatial_scale, sampling_ratio, aligned, height, width))


def touched_pixels(column: Tensor, num_pixels: int) -> tuple[Tensor, Tensor]:
    """The pixels that the non-zeros of `S` read, and `S` renumbered to read only those.

    column `[M, K]` (pixels in `[0, num_pixels)`) -> `(pixels [U], column [M, K])`: the `U`
    distinct pixels in increasing order, and each entry's position among them.
    """
    read = torch.zeros(num_pixels, dtype=torch.bool, device=column.device)  # [N H W]
    read[column.flatten()] = True
    pixels = torch.nonzero(read).squeeze(1)  # [U], sorted
    position = torch.cumsum(read, dim=0) - 1  # [N H W]: where each read pixel sits among the U
    return pixels, position[column]  # [U], [M, K]


def pixel_coordinates(pixels: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pixel numbers `n H W + y W + x` `[U]` -> `(n, y, x)`, each `[U]` int64."""
    return pixels // (height * width), pixels % (height * width) // width, pixels % width


def transposed_bags(column: Tensor, weight: Tensor, num_columns: int) -> tuple[Tensor, Tensor, Tensor]:
    """The non-zeros of `S^T` in equation (2), grouped by column, as bags for `embedding_bag`.

    column, weight `[M, K]` (columns in `[0, num_columns)`) -> `(row [M K], weight [M K],
    offsets [num_columns])`: bag `j` (column `j`) lists the rows of `S` that read column `j`.
    """
    entries_per_row = column.shape[1]
    column = column.flatten()  # [M K]
    key = column.to(torch.int32) if num_columns < 2**31 else column  # int32 sorts twice as fast
    order = torch.sort(key, stable=True).indices  # the non-zeros sorted by pixel
    count = torch.bincount(column, minlength=num_columns)  # [num_columns], non-zeros per pixel
    offsets = count.cumsum(0) - count  # [num_columns], where each pixel's bag starts
    return order // entries_per_row, weight.flatten()[order], offsets


def is_channels_last(feature: Tensor) -> bool:
    """True when the rows `F` of `feature` `[N, C, H, W]` are a view: `torch.channels_last` layout."""
    return feature.is_contiguous(memory_format=torch.channels_last)


class SparseRoIAlignFunction(torch.autograd.Function):
    """Equations (1) and (2) over several feature maps: RoI `r` is pooled from map `level[r]`.

    The forward pass keeps the non-zeros of `S` for the backward pass (12 bytes per non-zero, a
    few MB at training sizes) when a feature map needs a gradient.
    """

    @staticmethod
    def forward(ctx, rois: Tensor, level: Tensor, geometry: tuple, *features: Tensor) -> Tensor:
        """rois `[R, 5]`, level `[R]` int64 in `[0, L)`, geometry `(output_size, spatial_scales,
        sampling_ratio, aligned)`, features: L maps `[N, C, H_l, W_l]` -> pooled rows `[R, P_h P_w, C]`."""
        (pooled_h, pooled_w), spatial_scales, sampling_ratio, aligned = geometry
        num_rois, bins, channels = rois.shape[0], pooled_h * pooled_w, features[0].shape[1]
        out = features[0].new_zeros(num_rois, bins, channels)  # [R, P_h P_w, C]; a RoI of level -1 stays zero
        pieces = []  # per map, its chunks of S: (rois of the chunk, columns, weights, pixels read or None)
        for index, (feature, scale) in enumerate(zip(features, spatial_scales)):
            num_images, _, height, width = feature.shape
            chosen = torch.nonzero(level == index).squeeze(1)  # [R_l]
            pieces.append([])
            chunks = interpolation_chunks(
                rois, chosen, (pooled_h, pooled_w), scale, sampling_ratio, aligned, height, width
            )
            for part, column, weight in chunks:
                weight = weight.to(feature.dtype)  # computed in the RoIs' dtype (float32 under mixed precision)
                if is_channels_last(feature):
                    pixels, rows = None, feature.permute(0, 2, 3, 1).reshape(-1, channels)  # [N H W, C], a view
                else:  # gather the rows S reads, and renumber S's columns to them
                    pixels, column = touched_pixels(column, num_images * height * width)
                    n, y, x = pixel_coordinates(pixels, height, width)
                    rows = feature[n, :, y, x]  # [U, C]
                pooled = F.embedding_bag(column, rows, mode="sum", per_sample_weights=weight)  # (1): [R_c P_h P_w, C]
                if part.numel() == num_rois:  # all RoIs at once (one map, one chunk): no reordering
                    out = pooled.view(num_rois, bins, channels)
                else:
                    out.index_copy_(0, part, pooled.view(part.numel(), bins, channels))
                if ctx.needs_input_grad[3 + index]:
                    pieces[-1].append((part, column, weight, pixels))
        ctx.pieces = pieces
        ctx.features_like = [torch.empty_like(feature, device="meta") for feature in features]  # shape and layout
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        bins, channels = grad_out.shape[1:]
        grad_out = grad_out.contiguous().view(-1, channels)  # [R P_h P_w, C], the rows of dL/dout
        grads = []
        for index, (like, pieces) in enumerate(zip(ctx.features_like, ctx.pieces)):
            if not ctx.needs_input_grad[3 + index]:
                grads.append(None)
                continue
            num_images, _, height, width = like.shape
            grad = None  # [N, C, H, W], laid out like the features
            for part, column, weight, pixels in pieces:
                num_rows = num_images * height * width if pixels is None else pixels.numel()
                row, row_weight, offsets = transposed_bags(column, weight, num_rows)
                # row (r, p, q) of the chunk's S is row (part[r], p, q) of dL/dout
                row = part[row // bins] * bins + row % bins
                grad_rows = F.embedding_bag(row, grad_out, offsets, mode="sum", per_sample_weights=row_weight)  # (2)
                if pixels is None:  # channels-last: the gradient rows of all pixels are the gradient
                    update = grad_rows.view(num_images, height, width, channels).permute(0, 3, 1, 2)  # [N, C, H, W]
                    grad = update if grad is None else grad.add_(update)
                else:  # the gradient rows of the pixels read, into a zero gradient
                    first = grad is None
                    grad = torch.empty_like(like, device=grad_out.device).zero_() if first else grad
                    grad.permute(0, 2, 3, 1).index_put_(
                        pixel_coordinates(pixels, height, width), grad_rows, accumulate=not first
                    )
            grads.append(torch.empty_like(like, device=grad_out.device).zero_() if grad is None else grad)
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

    features: `[N, C, H_l, W_l]` per map; rois `[R, 5]` (float32 or the features' dtype); level
    `[R]` int64 indices into `features`, -1 for a RoI that no map serves (it pools zeros);
    spatial_scales: one per map. Returns `[R, C, P_h, P_w]`, contiguous, with the
    same numbers as `roi_align_reference` up to float rounding; differentiable with respect to
    the features. Inputs are assumed checked (`check_roi_inputs`).
    """
    pooled_h, pooled_w = output_size
    geometry = ((pooled_h, pooled_w), tuple(spatial_scales), sampling_ratio, aligned)
    rows = SparseRoIAlignFunction.apply(rois, level, geometry, *features)  # [R, P_h P_w, C]
    channels = features[0].shape[1]
    return rows.view(rois.shape[0], pooled_h, pooled_w, channels).permute(0, 3, 1, 2).contiguous()  # [R, C, P_h, P_w]
