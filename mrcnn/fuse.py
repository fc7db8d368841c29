r"""Faster convolutions with the same numbers: frozen batch norm folded into the convolution.

A ResNet made for pretrained weights follows every convolution by a `FrozenBatchNorm2d`, a
fixed per-channel affine map (mrcnn/backbone.py). Two maps in a row are one map:

    norm(conv(x, w)) = conv(x, w) * scale + bias = conv(x, w * scale) + bias
    scale = gamma / sqrt(running_var + eps),   bias = beta - running_mean * scale

(`scale` multiplies output channel `o`, so it scales the weights `w[o, :, :, :]` of that channel.)
The right-hand side does one convolution with a bias and no extra pass over the activations;
the left-hand side reads and writes the whole activation map twice more (`* scale`, `+ bias`),
which for ResNet-50 at 800 x 1088 costs about a fifth of the backbone's time on a CPU.

`fold_frozen_batchnorm(module)` rewrites every `conv*`/`norm*` pair of sibling layers with a
`FrozenBatchNorm2d` into a `FrozenNormConv2d` (which computes the right-hand side, folding the
current weights at every call, so that training the convolution stays exact) followed by a
`FoldedFrozenBatchNorm2d` (which keeps the buffers, so the state dict and checkpoints are
unchanged, and passes its input through). Trainable norms (`nn.BatchNorm2d`) are left alone.

The folded weights change the order of the float operations, so the outputs equal the
unfolded ones to float rounding (relative differences of about 1e-6), not bit for bit.
`MaskRCNNConfig.fast_convolutions = False` keeps the plain layers, and torchvision's bits.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mrcnn.backbone import FrozenBatchNorm2d


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A `FrozenBatchNorm2d` whose affine map the preceding `FrozenNormConv2d` applies: the identity.

    It keeps the four buffers, so state dicts load and save as before.
    """

    def forward(self, x: Tensor) -> Tensor:
        return x

    def extra_repr(self) -> str:
        return super().extra_repr() + ", folded into the convolution before it"


class FrozenNormConv2d(nn.Conv2d):
    """`conv(x, w)` followed by a frozen batch norm, computed as `conv(x, w * scale) + bias`.

    Has the parameters of the convolution it replaces (the same `weight` tensor); `norm` is the
    `FoldedFrozenBatchNorm2d` that holds the statistics (kept out of this module's state dict).
    """

    def __init__(self, conv: nn.Conv2d, norm: FoldedFrozenBatchNorm2d):
        if conv.bias is not None or conv.padding_mode != "zeros":
            raise ValueError("only a convolution without bias and with zero padding folds a norm")
        super().__init__(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, bias=False, device=conv.weight.device, dtype=conv.weight.dtype,
        )  # fmt: skip
        self.weight = conv.weight  # the same parameter: its requires_grad and its optimizer state stay
        self.__dict__["norm"] = norm  # a plain reference: the norm is registered where it was

    def forward(self, x: Tensor) -> Tensor:
        norm = self.norm
        # scale = gamma / sqrt(var + eps), bias = beta - mean * scale, as FrozenBatchNorm2d computes them
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # [C_out]
        bias = norm.bias - norm.running_mean * scale  # [C_out]
        # norm(conv(x, w)) = conv(x, w * scale) + bias   (module docstring)
        return F.conv2d(x, self.weight * scale[:, None, None, None], bias, self.stride, self.padding, self.dilation, self.groups)


def fold_frozen_batchnorm(module: nn.Module) -> int:
    """Fold each `FrozenBatchNorm2d` named `norm<i>` into its sibling `nn.Conv2d` named `conv<i>`, in place.

    The pairs are found by name (`conv`/`norm`, `conv1`/`norm1`, ...), as in mrcnn/backbone.py,
    where each norm follows the convolution of the same suffix. Returns the number of pairs folded.
    """
    folded = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if not name.startswith("norm") or type(child) is not FrozenBatchNorm2d:
                continue
            conv = getattr(parent, "conv" + name[len("norm"):], None)
            if type(conv) is not nn.Conv2d or conv.out_channels != child.weight.shape[0]:
                continue
            norm = FoldedFrozenBatchNorm2d(child.weight.shape[0], child.eps).to(child.weight.device)
            norm.load_state_dict(child.state_dict())
            setattr(parent, name, norm)
            setattr(parent, "conv" + name[len("norm"):], FrozenNormConv2d(conv, norm))
            folded += 1
    return folded
