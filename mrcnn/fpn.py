r"""The Feature Pyramid Network: C2..C5 in, P2..P6 out (paper section 3, "Network Architecture").

A ResNet's maps get coarser and semantically stronger with depth. FPN (Lin et al. 2017) gives
every level both: a top-down pathway upsamples the coarse, strong map and adds it to a
"lateral" 1x1 projection of the finer backbone map, and a 3x3 convolution smooths each sum:

    M5 = L5(C5)
    M_i = L_i(C_i) + Upsample(M_{i+1})        i = 4, 3, 2   (nearest neighbour, to C_i's size)
    P_i = O_i(M_i)                            i = 2, ..., 5
    P6 = P5[:, :, ::2, ::2]                   (max-pool with kernel 1, stride 2: a subsampling)

`L_i` is a 1x1 convolution to `d` channels (256 in the paper), `O_i` a 3x3 convolution with
`d` outputs; there is no activation. `P_i` has stride `2^i`: 4, 8, 16, 32 and 64 for P6. The RPN
runs on all five levels (each with its own anchor size); RoIAlign pools each RoI from one
of P2..P5 chosen by its size (mrcnn/roi_align.py). The upsampling targets the lateral map's own
size, so odd sizes work (a 25-wide C3 under a 13-wide C4).

Same semantics, initialization (Kaiming uniform with a = 1, zero bias) and order of
operations as torchvision's `FeaturePyramidNetwork` with `LastLevelMaxPool`;
`from_torchvision_fpn` renames its state dict.
"""

from __future__ import annotations

import re
from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn


class FeaturePyramidNetwork(nn.Module):
    """Top-down pathway with lateral connections, plus P6 by subsampling P5.

    Args:
        in_channels_list: channels of C2..C5 (finest first), e.g. `[256, 512, 1024, 2048]`.
        out_channels: `d`, the channels of every P_i.
        extra_max_pool: add P6 = max_pool2d(P5, kernel 1, stride 2), used by the RPN only.
        in_strides: strides of the input maps, finest first (for the `strides` attribute).
        norm: a normalization after every convolution (`mrcnn.norms`; Detectron's GN recipe), or
            None (the paper's FPN, as torchvision's).

    Attributes: `strides`, the stride of each output map, e.g. `(4, 8, 16, 32, 64)`;
    `out_channels`.
    """

    def __init__(
        self,
        in_channels_list: list[int],
        out_channels: int = 256,
        extra_max_pool: bool = True,
        in_strides: tuple[int, ...] = (4, 8, 16, 32),
        norm: Callable[[int], nn.Module] | None = None,
    ):
        super().__init__()
        if len(in_channels_list) != len(in_strides):
            raise ValueError(f"{len(in_channels_list)} input channel counts but {len(in_strides)} strides {tuple(in_strides)}")
        if any(channels <= 0 for channels in in_channels_list):
            raise ValueError(f"in_channels_list must be positive, got {list(in_channels_list)}")
        self.out_channels = out_channels
        self.extra_max_pool = extra_max_pool
        self.strides = tuple(in_strides) + ((2 * in_strides[-1],) if extra_max_pool else ())
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels_list)  # L_i
        self.output_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels_list)  # O_i
        for conv in [*self.lateral_convs, *self.output_convs]:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)
        norms = lambda: nn.ModuleList(norm(out_channels) if norm else nn.Identity() for _ in in_channels_list)  # noqa: E731
        self.lateral_norms, self.output_norms = norms(), norms()  # identities without a norm

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """features `[C2, ..., C5]`, `C_i` of `[N, in_channels_list[i], H_i, W_i]` ->
        `[P2, ..., P5, P6]`, `P_i` of `[N, out_channels, H_i, W_i]` (P6: `ceil(H_5 / 2)`)."""
        if len(features) != len(self.lateral_convs):
            raise ValueError(f"expected {len(self.lateral_convs)} feature maps, got {len(features)}")
        merged = self.lateral(-1, features[-1])  # M5 = L5(C5)
        pyramid = [self.output(-1, merged)]  # P5
        for level in range(len(features) - 2, -1, -1):  # from C4 down to C2
            lateral = self.lateral(level, features[level])  # [N, d, H_i, W_i]
            top_down = F.interpolate(merged, size=lateral.shape[-2:], mode="nearest")  # [N, d, H_i, W_i]
            merged = lateral + top_down  # M_i = L_i(C_i) + Upsample(M_{i+1})
            pyramid.insert(0, self.output(level, merged))  # P_i = O_i(M_i)
        if self.extra_max_pool:
            pyramid.append(F.max_pool2d(pyramid[-1], kernel_size=1, stride=2, padding=0))  # P6
        return pyramid

    def lateral(self, level: int, x: Tensor) -> Tensor:
        """L_i: the 1x1 convolution to d channels (and the norm, if any)."""
        return self.lateral_norms[level](self.lateral_convs[level](x))

    def output(self, level: int, x: Tensor) -> Tensor:
        """O_i: the 3x3 convolution that smooths M_i into P_i (and the norm, if any)."""
        return self.output_norms[level](self.output_convs[level](x))


def torchvision_fpn_key(key: str) -> str:
    """Our name for a key of torchvision's FeaturePyramidNetwork state dict.

    `inner_blocks.{i}.0.*` -> `lateral_convs.{i}.*`, `layer_blocks.{i}.0.*` -> `output_convs.{i}.*`
    (checkpoints older than torchvision 0.13 lack the `.0`; both forms are accepted).
    """
    key = re.sub(r"^inner_blocks\.(\d+)\.(?:0\.)?", r"lateral_convs.\1.", key)
    return re.sub(r"^layer_blocks\.(\d+)\.(?:0\.)?", r"output_convs.\1.", key)


def from_torchvision_fpn(state_dict: dict[str, Tensor], prefix: str = "backbone.fpn.") -> dict[str, Tensor]:
    """Rename the FPN part of a torchvision state dict (keys under `prefix`) to ours."""
    return {torchvision_fpn_key(key[len(prefix):]): value for key, value in state_dict.items() if key.startswith(prefix)}
