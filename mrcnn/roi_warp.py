r"""RoIWarp, and the multi-level pooler for RoIWarp and RoIPool (paper section 4.2, Table 2c).

Table 2c compares three ways of turning a RoI into a fixed P x P feature:

- **RoIPool** (Fast R-CNN, `mrcnn.roi_align.roi_pool`): quantize the RoI to the feature grid,
  quantize its bins, take the max of each bin.
- **RoIWarp** (Dai et al., "Instance-aware semantic segmentation via multi-task network
  cascades", 2016): quantize the RoI to the feature grid, then resample it bilinearly to P x P.
  The bins are not quantized any more, but the box still is.
- **RoIAlign** (`mrcnn.poolers.roi_align`): quantize nothing.

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

`mrcnn.poolers.MultiLevelRoIPooler` gives RoIWarp and RoIPool the interface of
`MultiLevelRoIAlign` (one map per FPN level, each RoI pooled from the level of its size), so that
the model can swap the pooler of every branch (`MaskRCNNConfig.roi_pooler`,
`mrcnn.architectures.build_roi_pooler`). Shapes (the book's legend): N images,
C channels, H x W feature map, R RoIs, P pooled size; rois `[R, 5]` are `(batch_index, x1, y1,
x2, y2)` in image coordinates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mrcnn.poolers import roi_align
from mrcnn.roi_align import check_roi_inputs


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
