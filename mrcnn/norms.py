r"""The normalization layers a config can choose, and batch norm synchronised across processes.

Detection trains on few, large images per process, so a batch norm sees few samples. The
choices, each `norm(num_channels) -> nn.Module` (`MaskRCNNConfig.norm` for the backbone,
`MaskRCNNConfig.head_norm` for the FPN and the mask and keypoint heads):

- `"frozen_bn"`: the pretrained ImageNet statistics frozen into an affine map
  (`mrcnn.backbone.FrozenBatchNorm2d`): the paper's choice when fine-tuning from ImageNet.
- `"bn"`: batch norm that learns, with statistics over what one forward pass sees.
- `"sync_bn"`: the same, with the mean and variance over every process of a distributed run
  (`SyncBatchNorm2d` below): under DDP each process sees `batch / W` images, together the batch.
- `"gn"`: group norm (Wu and He, 2018), 32 groups of channels per sample: independent of the
  batch size, Detectron's recipe for training from scratch ("GN" configs).

`SyncBatchNorm2d` in one formula: with `S_1 = sum x`, `S_2 = sum x^2` and `n` the count of values
per channel, each summed over all processes (an all-reduce, differentiable),

    mean = S_1 / n,    var = S_2 / n - mean^2,    y = (x - mean) / sqrt(var + eps) * gamma + beta

and the running statistics are updated with the unbiased variance `var * n / (n - 1)`, as
`nn.BatchNorm2d` does. PyTorch's `nn.SyncBatchNorm` does the same on GPUs only; this one also runs
under the gloo backend on CPUs, which is how the tests run two processes.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.nn.functional import all_reduce

from mrcnn.backbone import FrozenBatchNorm2d

NormName = Literal["frozen_bn", "bn", "sync_bn", "gn"]
Norm = Callable[[int], nn.Module]


class SyncBatchNorm2d(nn.BatchNorm2d):
    """Batch norm whose training statistics cover every process of the default process group.

    Outside a distributed run, or in eval mode, it is `nn.BatchNorm2d`. State dicts are those of
    `nn.BatchNorm2d`. x: `[N, C, H, W]` -> same shape.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        dtype = torch.promote_types(x.dtype, torch.float32)  # statistics in float32 at least
        local = torch.cat([x.to(dtype).sum(dim=(0, 2, 3)), (x.to(dtype) ** 2).sum(dim=(0, 2, 3)),
                           x.new_full((1,), x.numel() // channels, dtype=dtype)])  # [2C + 1]  # fmt: skip
        total = all_reduce(local)  # [2C + 1], summed over the processes, with its gradient
        count = total[-1]
        mean = total[:channels] / count  # [C]: S_1 / n
        var = total[channels : 2 * channels] / count - mean**2  # [C]: S_2 / n - mean^2
        with torch.no_grad():  # the running statistics, as nn.BatchNorm2d keeps them
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
            self.num_batches_tracked += 1
            self.running_mean.mul_(1 - momentum).add_(mean.detach() * momentum)
            self.running_var.mul_(1 - momentum).add_(var.detach() * count / (count - 1).clamp(min=1) * momentum)
        y = (x.to(dtype) - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        return (y * self.weight[None, :, None, None] + self.bias[None, :, None, None]).to(x.dtype)


def group_norm(num_channels: int, groups: int = 32) -> nn.GroupNorm:
    """Group norm with 32 groups, or the largest divisor of `num_channels` below that (16 channels: 16 groups)."""
    return nn.GroupNorm(math.gcd(groups, num_channels), num_channels)


def norm_layer(name: NormName) -> Norm:
    """The normalization a config names (module docstring)."""
    layers = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d, "sync_bn": SyncBatchNorm2d, "gn": group_norm}
    return layers[name]
