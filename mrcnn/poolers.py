r"""The RoI poolers of the model: one RoIAlign for every device, and FPN's choice of level (paper section 3).

`mrcnn.roi_align` defines RoIAlign and RoIPool on one feature map. The model needs two things
more, and they live here:

- **One function for every device.** `roi_align` runs the Triton kernel (`kernels.roi_align`)
  on CUDA tensors and the sparse-matrix path (`mrcnn.roi_align_cpu`) elsewhere; both compute
  the definition of `mrcnn.roi_align.roi_align_reference`.
- **The level of each RoI.** With FPN, a RoI is pooled from the pyramid level that suits its
  size (FPN paper, eq. 1; `fpn_level`):

      k = floor(k0 + log2(sqrt(w h) / 224)),   clamped to the levels of the maps given     (1)

  `MultiLevelRoIAlign` pools every RoI from its own level; `MultiLevelRoIPooler` does the same
  with a single-map pooler (RoIWarp or RoIPool, the ablation of Table 2c). A RoI whose level has
  no map (strides that skip a level, e.g. `(8, 32)`) pools zeros, as in torchvision.

Where the checks are. The public function `roi_align` checks its arguments, values included
(`mrcnn.roi_align.check_roi_inputs`). The poolers are the model's inner layers: they check
shapes, dtypes and devices only and never read a tensor's value back to the host, so on a GPU a
pooler call is launches only, with no synchronisation (the Triton kernel is called with
`validate=False`; the model's RoIs are valid by construction).

Shapes (the book's legend): N images, C channels, H x W feature map, R RoIs, P pooled size; rois
`[R, 5]` are `(batch_index, x1, y1, x2, y2)` in image coordinates.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from mrcnn.roi_align import check_roi_inputs, pair
from mrcnn.roi_align_cpu import sparse_roi_align

try:  # optional: Triton is there on Linux with a GPU build, the CPU path needs none of it
    from kernels.roi_align import multi_level_roi_align as multi_level_roi_align_kernel
    from kernels.roi_align import roi_align as roi_align_kernel
except ImportError:
    multi_level_roi_align_kernel = roi_align_kernel = None

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what kernels.roi_align computes in


def kernels_available() -> bool:
    """True when the Triton kernels imported (Triton installed)."""
    return roi_align_kernel is not None


def use_kernel_for(features: Tensor) -> bool:
    """The default choice of path: the Triton kernel for CUDA features of a dtype it supports."""
    return features.is_cuda and features.dtype in KERNEL_DTYPES and kernels_available()


def roi_align(
    features: Tensor,
    rois: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    use_kernel: bool | None = None,
) -> Tensor:
    """RoIAlign of one map, dispatched to the fastest implementation for the device.

    Same arguments and result as `roi_align_reference` (up to float rounding), differentiable
    with respect to `features`; rois may be float32 with float16/bfloat16 features. Checks its
    inputs, values included. `use_kernel=None` (the default) runs the Triton kernel when
    `features` are on CUDA in a dtype it supports and Triton imports, the sparse-matrix path of
    `mrcnn.roi_align_cpu` otherwise; `True` or `False` forces the choice.
    """
    check_roi_inputs(features, rois)
    if use_kernel if use_kernel is not None else use_kernel_for(features):
        return roi_align_kernel(features, rois, output_size, spatial_scale, sampling_ratio, aligned, validate=False)
    level = torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)  # [R], one map
    return sparse_roi_align([features], rois, level, pair(output_size), [spatial_scale], sampling_ratio, aligned)


def fpn_level(
    boxes: Tensor,
    min_level: int,
    max_level: int,
    canonical_level: int = 4,
    canonical_size: float = 224.0,
    eps: float = 1e-6,
) -> Tensor:
    """The FPN level of each RoI: `k = floor(k0 + log2(sqrt(w h) / 224))`, clamped (equation 1).

    boxes `[R, 4]` (x1, y1, x2, y2) -> `[R]` int64 levels in `[min_level, max_level]`. A 224 x 224
    RoI goes to P4; halve its side and it moves one level down. The small `eps` keeps a RoI of
    exactly 112 x 112 on P3 despite rounding in log2, as the reference implementations do. A
    box inverted on one axis (negative area) goes to the finest level, as an empty one does.
    """
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0)  # [R]
    size = torch.sqrt(area)  # [R]
    level = torch.floor(canonical_level + torch.log2(size / canonical_size) + torch.tensor(eps, dtype=size.dtype))
    return level.clamp(min=min_level, max=max_level).to(torch.int64)


def check_pyramid(features: list[Tensor], rois: Tensor, num_maps: int) -> None:
    """Raise a `ValueError` unless `features` are `num_maps` maps `[N, C, H_l, W_l]` of one N, C,
    dtype and device, and rois a `[R, 5]` float tensor beside them. Metadata only: no value is read."""
    if len(features) != num_maps:
        raise ValueError(f"expected {num_maps} feature maps, got {len(features)}")
    first = features[0]
    for feature in features:
        if feature.dim() != 4 or (feature.shape[:2], feature.dtype, feature.device) != (first.shape[:2], first.dtype, first.device):
            raise ValueError(f"every level must be [N, C, H, W] with the N, C, dtype and device of the first, "
                             f"got {tuple(feature.shape)} {feature.dtype} and {tuple(first.shape)} {first.dtype}")  # fmt: skip
    if rois.dim() != 2 or rois.shape[1] != 5 or rois.dtype not in (first.dtype, torch.float32) or rois.device != first.device:
        raise ValueError(f"rois must be [R, 5] float32 (or the features' dtype) on {first.device}, "
                         f"got {tuple(rois.shape)} {rois.dtype} on {rois.device}")  # fmt: skip


class LevelPooler(nn.Module):
    """What the multi-level poolers share: equation (1) for maps of the given strides.

    Args:
        strides: of the maps, finest first, powers of two; they may skip a level, e.g. `(8, 32)`.
    """

    def __init__(self, strides: tuple[int, ...]):
        super().__init__()
        self.strides = tuple(strides)
        self.levels = tuple(int(round(math.log2(s))) for s in self.strides)  # stride 4 -> level 2
        # map_of_level[k - levels[0]]: the index of level k's map, -1 where no map has level k
        self.map_of_level = tuple(self.levels.index(k) if k in self.levels else -1
                                  for k in range(self.levels[0], self.levels[-1] + 1))  # fmt: skip

    def map_index(self, rois: Tensor) -> Tensor:
        """rois `[R, 5]` -> `[R]` int64: the index into the maps of each RoI's level, -1 if it has none."""
        level = fpn_level(rois[:, 1:], self.levels[0], self.levels[-1]) - self.levels[0]  # [R]
        if len(self.map_of_level) == len(self.levels):  # no level skipped: the level is the index
            return level
        return torch.tensor(self.map_of_level, device=rois.device)[level]  # [R]


class MultiLevelRoIAlign(LevelPooler):
    """Pool each RoI from the one FPN level that suits its size (paper section 3, "Network Architecture").

    Args:
        output_size: P (7 for the box head, 14 for the mask head).
        strides: the strides of the feature maps passed to `forward`, finest first, powers of
            two, for example `(4, 8, 16, 32)` for P2-P5.
        sampling_ratio, aligned: as in `roi_align`.
    """

    def __init__(self, output_size: int, strides: tuple[int, ...] = (4, 8, 16, 32), sampling_ratio: int = 2, aligned: bool = False):
        super().__init__(strides)
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, features: list[Tensor], rois: Tensor, use_kernel: bool | None = None) -> Tensor:
        """features: one `[N, C, H_l, W_l]` map per level; rois `[R, 5]` -> `[R, C, P, P]`.

        `use_kernel` as in `roi_align`; without the kernel, all levels are pooled by one call of
        the sparse-matrix path (`mrcnn.roi_align_cpu`).
        """
        check_pyramid(features, rois, len(self.strides))
        scales = [1.0 / stride for stride in self.strides]
        if use_kernel if use_kernel is not None else use_kernel_for(features[0]):
            return multi_level_roi_align_kernel(features, rois, self.output_size, scales, self.sampling_ratio,
                                                self.aligned, min_level=self.levels[0], validate=False)  # fmt: skip
        level = self.map_index(rois)  # [R], index into features
        return sparse_roi_align(features, rois, level, pair(self.output_size), scales, self.sampling_ratio, self.aligned)


class MultiLevelRoIPooler(LevelPooler):
    """Pool each RoI from the FPN level of its size with a single-map pooler (RoIWarp or RoIPool).

    Args:
        pool: `pool(features [N, C, H, W], rois [R, 5], output_size, spatial_scale) -> [R, C, P, P]`,
            for example `roi_pool` or `functools.partial(roi_warp, sampling_ratio=2)`.
        output_size: P.
        strides: of the maps passed to `forward`, finest first, powers of two (`(16,)` for one C4 map).

    Levels are assigned as in `MultiLevelRoIAlign` (equation 1), so only the pooling differs.
    """

    def __init__(self, pool: Callable[..., Tensor], output_size: int, strides: tuple[int, ...] = (4, 8, 16, 32)):
        super().__init__(strides)
        self.pool = pool
        self.output_size = output_size

    def forward(self, features: list[Tensor], rois: Tensor) -> Tensor:
        """features: one `[N, C, H_l, W_l]` map per level; rois `[R, 5]` -> `[R, C, P, P]`."""
        check_pyramid(features, rois, len(self.strides))
        level = self.map_index(rois)  # [R], index into features
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
