r"""RoIWarp, and the multi-level pooler for RoIWarp and RoIPool (paper section 4.2, Table 2c).

Table 2c compares three ways of turning a RoI into a fixed P x P feature:

- **RoIPool** (Fast R-CNN, `mrcnn.roi_align.roi_pool`): quantize the RoI to the feature grid,
  quantize its bins, take the max of each bin.
- **RoIWarp** (Dai et al., "Instance-aware semantic segmentation via multi-task network
  cascades", 2016): quantize the RoI to the feature grid, then resample it bilinearly to P x P.
  The bins are not quantized any more, but the box still is.
- **RoIAlign** (`mrcnn.roi_align.roi_align`): quantize nothing.

The paper's point is that RoIWarp, although it interpolates bilinearly like RoIAlign, lands
with RoIPool ("RoIWarp ... performs on par with RoIPool and much worse than RoIAlign"): the
misalignment comes from the first quantization, which both keep. Here RoIWarp is exactly that
difference: with spatial scale `s` and the rounding `[v] = floor(v + 1/2)` of RoIPool,

    (x1, y1, x2, y2)  ->  ([x1 s] / s, [y1 s] / s, [x2 s] / s, [y2 s] / s)      quantize the RoI
    out = roi_align(F, quantized RoI, P, s, sampling_ratio, aligned)               then RoIAlign

so a RoI whose corners already sit on the feature grid (`x1 s` an integer, and so on) gives
RoIAlign's numbers exactly, and any other RoI is shifted by up to half a feature stride per
corner. Averaging the bilinear samples (rather than a max over them, the paper's other RoIWarp
row) keeps the comparison with RoIAlign to the one quantization; the paper reports the two
within 0.1 AP.

`MultiLevelRoIPooler` gives RoIWarp and RoIPool the interface of `MultiLevelRoIAlign` (one map
per FPN level, each RoI pooled from the level of its size), so that the model can swap the
pooler of every branch (`MaskRCNNConfig.roi_pooler`). Shapes (the book's legend): N images,
C channels, H x W feature map, R RoIs, P pooled size; rois `[R, 5]` are `(batch_index, x1, y1,
x2, y2)` in image coordinates.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

from mrcnn.roi_align import MultiLevelRoIAlign, check_roi_inputs, fpn_level, roi_align, roi_pool


def quantize_rois(rois: Tensor, spatial_scale: float) -> Tensor:
    """RoIPool's first quantization: each corner moved to the nearest feature-grid line.

    rois `[R, 5]` -> `[R, 5]`, same dtype, in image coordinates again (the corners become
    multiples of the stride `1 / spatial_scale`); halves round away from zero, as in `roi_pool`.
    """
    corners = rois[:, 1:] * spatial_scale  # [R, 4] in feature pixels
    rounded = torch.sign(corners) * torch.floor(corners.abs() + 0.5)  # [R, 4]
    return torch.cat([rois[:, :1], rounded / spatial_scale], dim=1)  # [R, 5]


def roi_warp(
    features: Tensor,
    rois: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 2,
    aligned: bool = False,
) -> Tensor:
    """RoIWarp: RoIAlign on the RoI quantized to the feature grid (module docstring).

    features `[N, C, H, W]`, rois `[R, 5]` -> `[R, C, P_h, P_w]`, differentiable with respect to
    `features` (the quantized corners carry no gradient, as in RoIPool).
    """
    check_roi_inputs(features, rois)
    return roi_align(features, quantize_rois(rois, spatial_scale), output_size, spatial_scale, sampling_ratio, aligned)


class MultiLevelRoIPooler(nn.Module):
    """Pool each RoI from the FPN level of its size with a single-map pooler (RoIWarp or RoIPool).

    Args:
        pool: `pool(features [N, C, H, W], rois [R, 5], output_size, spatial_scale) -> [R, C, P, P]`,
            for example `roi_pool` or `functools.partial(roi_warp, sampling_ratio=2)`.
        output_size: P.
        strides: of the maps passed to `forward`, finest first, powers of two (`(16,)` for one C4 map).

    Levels are assigned as in `MultiLevelRoIAlign` (FPN paper, eq. 1), so only the pooling differs.
    """

    def __init__(self, pool: Callable[..., Tensor], output_size: int, strides: tuple[int, ...] = (4, 8, 16, 32)):
        super().__init__()
        self.pool = pool
        self.output_size = output_size
        self.strides = tuple(strides)
        self.levels = tuple(int(round(math.log2(s))) for s in self.strides)  # stride 4 -> level 2

    def forward(self, features: list[Tensor], rois: Tensor) -> Tensor:
        """features: one `[N, C, H_l, W_l]` map per level; rois `[R, 5]` -> `[R, C, P, P]`."""
        if len(features) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature maps (strides {self.strides}), got {len(features)}")
        for feature in features:
            check_roi_inputs(feature, rois)
        level = fpn_level(rois[:, 1:], self.levels[0], self.levels[-1]) - self.levels[0]  # [R], index into features
        channels = features[0].shape[1]
        pooled = features[0].new_zeros(rois.shape[0], channels, self.output_size, self.output_size)  # [R, C, P, P]
        pooled = pooled + 0 * sum(f.sum() for f in features)  # every level stays in the graph, even without RoIs
        for index, (feature, stride) in enumerate(zip(features, self.strides)):
            on_level = torch.where(level == index)[0]  # [R_l]
            if on_level.numel():
                values = self.pool(feature, rois[on_level], self.output_size, 1.0 / stride)  # [R_l, C, P, P]
                pooled = pooled.index_copy(0, on_level, values)
        return pooled

    def extra_repr(self) -> str:
        name = getattr(self.pool, "__name__", None) or getattr(getattr(self.pool, "func", None), "__name__", "pool")
        return f"{name}, output_size={self.output_size}, strides={self.strides}"


def build_roi_pooler(method: str, output_size: int, strides: tuple[int, ...], sampling_ratio: int, aligned: bool) -> nn.Module:
    """The pooler `MaskRCNNConfig.roi_pooler` names: "align" (`MultiLevelRoIAlign`), "warp" or "pool".

    sampling_ratio and aligned apply to the bilinear poolers (RoIAlign, RoIWarp); RoIPool has neither.
    """
    if method == "align":
        return MultiLevelRoIAlign(output_size, strides, sampling_ratio, aligned)
    if method == "warp":
        return MultiLevelRoIPooler(partial(roi_warp, sampling_ratio=sampling_ratio, aligned=aligned), output_size, strides)
    if method == "pool":
        return MultiLevelRoIPooler(roi_pool, output_size, strides)
    raise ValueError(f"unknown RoI pooler {method!r}; choose 'align', 'warp' or 'pool'")
