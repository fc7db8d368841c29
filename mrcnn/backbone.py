r"""The ResNet backbone: an image in, the feature maps C2..C5 out (paper section 3, "Network Architecture").

Mask R-CNN's backbone is a ResNet (He et al. 2016) of depth 50 or 101. A ResNet is a stem (a 7x7
convolution of stride 2 and a 3x3 max-pool of stride 2) followed by four stages of residual
blocks, res2..res5. The first block of res3, res4 and res5 halves the resolution, so the output
of stage `i`, written `C_i`, has stride `2^i`:

    C2: stride 4     C3: stride 8     C4: stride 16     C5: stride 32

For an `H x W` image, `C_i` is `[N, C_i, ceil(H / 2^i), ceil(W / 2^i)]`; ResNet-50 has
`C_i = 256, 512, 1024, 2048` channels. (So "a 32 x 32 x 2048 feature map" is C5 of a
1024 x 1024 image only.) A residual block computes

    y = relu(F(x) + shortcut(x))

where `F` is two 3x3 convolutions (`BasicBlock`, ResNet-18/34) or a 1x1 -> 3x3 -> 1x1
"bottleneck" of width `w` and output `4 w` (`Bottleneck`, ResNet-50/101), each convolution
followed by a normalization, and `shortcut` is the identity, or a 1x1 convolution + norm (the
"projection shortcut") where the shape changes. Like torchvision ("ResNet v1.5") the stride of a
bottleneck sits on its 3x3 convolution; the original MSRA/Caffe2 models put it on the first 1x1.

Detection fine-tunes with batches of one or two large images, too few to estimate batch
statistics, so the ImageNet normalization is frozen into a per-channel affine map
(`FrozenBatchNorm2d`):

    y = x * scale + bias,   scale = gamma / sqrt(running_var + eps),   bias = beta - running_mean * scale

and the earliest layers, which compute generic edges and colours, are frozen too
(`frozen_stages`).

Two ways to use the backbone (paper Figure 4):

- FPN (the default): all of C2..C5 feed the feature pyramid (mrcnn/fpn.py).
- C4: the backbone stops after res4 (`last_stage=4`); RoIAlign pools 14 x 14 features from C4
  and `res5_head` (the res5 stage, stride 2 at its first block, as Detectron's Res5ROIHeads)
  turns them into 7 x 7 x 2048 per RoI.

Parameter names follow the paper (`stem`, `res2`..`res5`); `from_torchvision_resnet` renames
a torchvision ResNet state dict (an ImageNet checkpoint, or `backbone.body.*` of
`maskrcnn_resnet50_fpn`) to these names.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Norm = Callable[[int], nn.Module]  # num_channels -> a normalization module


class FrozenBatchNorm2d(nn.Module):
    """Batch normalization with fixed statistics and affine parameters (all buffers, no parameters).

    Computes `x * scale + bias` with `scale = weight * (running_var + eps)^(-1/2)` and
    `bias = bias - running_mean * scale`, in that order, as torchvision does, so outputs agree
    bit for bit. x: `[N, C, H, W]` -> same shape and dtype.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))  # gamma
        self.register_buffer("bias", torch.zeros(num_features))  # beta
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # a BatchNorm2d state dict loads as well
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        gamma = self.weight.reshape(1, -1, 1, 1)  # [1, C, 1, 1]
        beta = self.bias.reshape(1, -1, 1, 1)  # [1, C, 1, 1]
        running_var = self.running_var.reshape(1, -1, 1, 1)  # [1, C, 1, 1]
        running_mean = self.running_mean.reshape(1, -1, 1, 1)  # [1, C, 1, 1]
        # scale = gamma / sqrt(var + eps), bias = beta - mean * scale  (module docstring)
        scale = gamma * (running_var + self.eps).rsqrt()
        bias = beta - running_mean * scale
        return x * scale + bias

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def projection_shortcut(in_channels: int, out_channels: int, stride: int, norm: Norm) -> nn.Module:
    """The shortcut of a residual block: identity when shapes match, else 1x1 conv (stride) + norm."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    shortcut = nn.Sequential()
    shortcut.add_module("conv", nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False))
    shortcut.add_module("norm", norm(out_channels))
    return shortcut


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (ResNet-18/34): `[N, C_in, H, W]` -> `[N, w, H/s, W/s]`."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1, norm: Norm = FrozenBatchNorm2d):
        super().__init__()
        self.out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm2 = norm(width)
        self.shortcut = projection_shortcut(in_channels, self.out_channels, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)), inplace=True)
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)  # y = relu(F(x) + shortcut(x))


class Bottleneck(nn.Module):
    """1x1 (reduce to w) -> 3x3 (stride s) -> 1x1 (expand to 4w), and a shortcut (ResNet-50/101).

    `[N, C_in, H, W]` -> `[N, 4 w, H/s, W/s]`.
    """

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, norm: Norm = FrozenBatchNorm2d):
        super().__init__()
        self.out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.norm1 = norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)  # stride on the 3x3
        self.norm2 = norm(width)
        self.conv3 = nn.Conv2d(width, self.out_channels, 1, bias=False)
        self.norm3 = norm(self.out_channels)
        self.shortcut = projection_shortcut(in_channels, self.out_channels, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)), inplace=True)
        out = F.relu(self.norm2(self.conv2(out)), inplace=True)
        out = self.norm3(self.conv3(out))
        return F.relu(out + self.shortcut(x), inplace=True)  # y = relu(F(x) + shortcut(x))


def make_stage(block: type[nn.Module], in_channels: int, width: int, num_blocks: int, stride: int, norm: Norm) -> nn.Sequential:
    """`num_blocks` residual blocks; the first one has the stride and the projection shortcut."""
    blocks = []
    for index in range(num_blocks):
        blocks.append(block(in_channels, width, stride if index == 0 else 1, norm))
        in_channels = blocks[-1].out_channels
    return nn.Sequential(*blocks)


class Stem(nn.Module):
    """conv1 of the ResNet paper: 7x7 conv (stride 2) + norm + relu + 3x3 max-pool (stride 2).

    `[N, 3, H, W]` -> `[N, stem_width, ceil(H/4), ceil(W/4)]` (for H, W multiples of 4).
    """

    def __init__(self, width: int = 64, norm: Norm = FrozenBatchNorm2d):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.norm = norm(width)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.norm(self.conv(x)), inplace=True)
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class ResNet(nn.Module):
    """A ResNet trunk returning the list `[C2, ..., C_last]` (no classifier).

    Args:
        block: `BasicBlock` or `Bottleneck`.
        layers: blocks per stage res2..res5, for example `(3, 4, 6, 3)` for ResNet-50.
        widths: the block width `w` per stage; a stage outputs `w * block.expansion` channels.
        stem_width: channels of the stem convolution.
        frozen_stages: how many stages get `requires_grad=False`, counting as mmdetection does:
            -1 nothing, 0 the stem, 1 the stem and res2 (default), ..., 4 everything. It equals
            torchvision's `trainable_layers = 4 - frozen_stages` (5 for -1); the default matches
            `maskrcnn_resnet50_fpn`'s `trainable_backbone_layers=3`. As in torchvision, a
            trainable norm inside a frozen stage still updates its running statistics in train mode.
        norm: the normalization after every convolution, called with the channel count.
            `FrozenBatchNorm2d` for pretrained weights; `nn.BatchNorm2d` or a GroupNorm to
            train from scratch.
        last_stage: 5 returns C2..C5 (FPN); 4 stops after res4 and returns C2..C4 (the C4 model,
            whose res5 runs per RoI in `res5_head`).

    Attributes: `out_channels` (per returned map) and `strides` (4, 8, 16, 32, up to `last_stage`).
    Convolutions are initialized as torchvision's ResNet (Kaiming normal, fan-out).
    """

    def __init__(
        self,
        block: type[nn.Module],
        layers: tuple[int, ...],
        widths: tuple[int, ...] = (64, 128, 256, 512),
        stem_width: int = 64,
        frozen_stages: int = 1,
        norm: Norm = FrozenBatchNorm2d,
        last_stage: int = 5,
    ):
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"layers and widths need one entry per stage res2..res5, got {layers} and {widths}")
        if last_stage not in (4, 5):
            raise ValueError(f"last_stage must be 4 (C4 model) or 5 (FPN), got {last_stage}")
        if not -1 <= frozen_stages <= last_stage - 1:
            raise ValueError(f"frozen_stages must be in [-1, {last_stage - 1}], got {frozen_stages}")
        self.stem = Stem(stem_width, norm)
        in_channels = stem_width
        self.out_channels: list[int] = []
        self.strides: list[int] = []
        for stage in range(2, last_stage + 1):  # res2 keeps the stem's stride 4; res3..res5 halve it
            index = stage - 2
            res = make_stage(block, in_channels, widths[index], layers[index], 1 if stage == 2 else 2, norm)
            self.add_module(f"res{stage}", res)
            in_channels = res[-1].out_channels
            self.out_channels.append(in_channels)
            self.strides.append(2**stage)
        self.stage_names = [f"res{stage}" for stage in range(2, last_stage + 1)]
        self.frozen_stages = frozen_stages

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        frozen = [self.stem] + [getattr(self, name) for name in self.stage_names]
        for module in frozen[: frozen_stages + 1]:
            module.requires_grad_(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        """images `[N, 3, H, W]` -> `[C2, ..., C_last]`, `C_i` of shape `[N, out_channels, H/2^i, W/2^i]`."""
        x = self.stem(images)
        features = []
        for name in self.stage_names:
            x = getattr(self, name)(x)
            features.append(x)
        return features


def resnet50(**kwargs) -> ResNet:
    """ResNet-50: bottleneck blocks (3, 4, 6, 3); C2..C5 have 256, 512, 1024, 2048 channels."""
    return ResNet(Bottleneck, (3, 4, 6, 3), **kwargs)


def resnet101(**kwargs) -> ResNet:
    """ResNet-101: bottleneck blocks (3, 4, 23, 3); same channels as ResNet-50."""
    return ResNet(Bottleneck, (3, 4, 23, 3), **kwargs)


def resnet_small(norm: Norm = nn.BatchNorm2d, frozen_stages: int = -1, **kwargs) -> ResNet:
    """A small ResNet for training from scratch on a CPU: one basic block per stage.

    Widths (16, 32, 64, 128), stem 16: C2..C5 have 16, 32, 64, 128 channels at the usual
    strides 4..32. About 0.3 M parameters and 0.2 GFLOP (2 per multiply-add) forward for a
    256 x 256 image, against 23.5 M and 10.7 GFLOP for ResNet-50. A 256-channel FPN on it would
    cost 6.5 GFLOP, so pair it with `out_channels=64` (0.4 GFLOP); forward and backward of
    both then take about 0.055 s of one CPU core (torch 2.13, one thread; tests/test_backbone.py
    counts the FLOPs).
    With no pretrained weights there is nothing to freeze and the norms must learn, so the
    defaults are `nn.BatchNorm2d` and `frozen_stages=-1`.
    """
    return ResNet(BasicBlock, (1, 1, 1, 1), widths=(16, 32, 64, 128), stem_width=16, norm=norm, frozen_stages=frozen_stages, **kwargs)


def res5_head(
    in_channels: int = 1024, width: int = 512, num_blocks: int = 3, norm: Norm = FrozenBatchNorm2d,
    block: type[nn.Module] = Bottleneck,
) -> nn.Sequential:  # fmt: skip
    """The res5 stage run on each RoI: the head of the C4 model (paper Figure 4, left).

    RoI features `[R, 1024, 14, 14]` pooled from C4 -> `[R, 2048, 7, 7]`: bottleneck blocks, the
    first with stride 2 (Detectron's Res5ROIHeads: `first_stride=2` on 14 x 14 RoIAlign output;
    here the stride sits on the 3x3, as in torchvision's res5, where Detectron's MSRA weights
    put it on the first 1x1).
    A box head then average-pools to `[R, 2048]`. Its weights are res5 of an ImageNet ResNet:
    load `{key[len("res5."):]: value}` for the `res5.*` keys from `from_torchvision_resnet`.
    For the small trunk: `res5_head(64, 128, 1, nn.BatchNorm2d, BasicBlock)`, `[R, 64, 14, 14]` ->
    `[R, 128, 7, 7]` (mrcnn/architectures.py builds both).
    """
    return make_stage(block, in_channels, width, num_blocks, 2, norm)


# torchvision name -> ours, applied in order to the part of a key after the block index
_TORCHVISION_RENAMES = (
    (r"^conv1\.", "stem.conv."),
    (r"^bn1\.", "stem.norm."),
    (r"^layer(\d)\.", lambda m: f"res{int(m.group(1)) + 1}."),  # layer1 is res2
    (r"\.bn(\d)\.", r".norm\1."),
    (r"\.downsample\.0\.", ".shortcut.conv."),
    (r"\.downsample\.1\.", ".shortcut.norm."),
)


def torchvision_resnet_key(key: str) -> str | None:
    """Our name for one key of a torchvision ResNet state dict, or None for keys we do not have.

    `conv1` -> `stem.conv`, `bn1` -> `stem.norm`, `layer{i}` -> `res{i+1}`, `bn{k}` -> `norm{k}`,
    `downsample.0/1` -> `shortcut.conv/norm`; `fc.*` (the classifier) and `num_batches_tracked`
    give None. Example: `layer3.0.downsample.1.running_var` -> `res4.0.shortcut.norm.running_var`.
    """
    if key.startswith("fc.") or key.endswith("num_batches_tracked"):
        return None
    for pattern, replacement in _TORCHVISION_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def from_torchvision_resnet(state_dict: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Rename a torchvision ResNet state dict to ours (load with `ResNet.load_state_dict`).

    prefix: the part to strip from each key, for example `"backbone.body."` for the backbone of a
    torchvision `maskrcnn_resnet50_fpn` checkpoint; keys without it are skipped. For a C4 model
    (`last_stage=4`) drop the `res5.*` keys (or give them to `res5_head`, see there).
    """
    renamed = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        ours = torchvision_resnet_key(key[len(prefix):])
        if ours is not None:
            renamed[ours] = value
    return renamed
