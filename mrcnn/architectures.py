r"""The network heads of the three architectures (paper section 3, "Network Architecture", Figure 4).

The paper separates the *backbone*, the convolutional trunk that computes features over the
whole image, from the *head*, the part applied to each RoI for box recognition (classification
and regression) and mask prediction. It builds the head for two backbones (Figure 4):

**ResNet-C4** (`architecture="c4"`, Figure 4 left, "Faster R-CNN with ResNet"). The trunk stops
after res4: one feature map C4 of stride 16. The RPN runs on it (all anchor sizes and ratios at
that one level), RoIAlign pools each RoI to 14 x 14 from it, and the head is the res5 stage,
run per RoI (`mrcnn.backbone.res5_head`, stride 2 in its first block), shared by both tasks:

    RoI 14 x 14 x 1024 -> res5 -> 7 x 7 x 2048 -> average pool -> 2048 -> class scores [R, K], box deltas [R, 4K]
                                               -> deconv 2x2 /2, 256, ReLU -> 14 x 14 -> conv 1x1 -> mask logits [R, K, 14, 14]

so M = 14. The head is heavy: res5 costs 1.6 GFLOPs per RoI, and on the paper's 300 test
proposals about four times the whole trunk of an 800 x 1216 image (the chapter
book/03_4_network_architecture.py measures it on the meta device).

**ResNet-FPN** (`architecture="fpn"`, Figure 4 right, the default). The RoIs are pooled from the
pyramid level of their size (P2..P5, 256 channels), and the head is light:

    RoI 7 x 7 x 256   -> fc 1024 -> fc 1024 -> class scores, box deltas
    RoI 14 x 14 x 256 -> 4 x (conv 3x3, 256) -> deconv 2x2 /2 -> conv 1x1 -> mask logits [R, K, 28, 28]

**ResNet-C5** (`architecture="c5"`, Table 2d). The whole trunk, stride 32, gives one map C5 that
feeds the RPN and the RoI pooling. The paper gives the stride, and says that it uses the head of
Figure 4 (right) "as the res5 head is not applicable" (res5 is already in the trunk). So here the
C5 model takes the FPN heads unchanged: two fc layers on 7 x 7 RoI features for the boxes, the
four-convolution FCN on 14 x 14 for 28 x 28 masks. Its input is C5 itself (2048 channels for
ResNet-50, 128 for the small trunk), with no 1x1 reduction to 256 channels in between: the paper
names none, and a reduction would be a layer neither Figure 4 head has. The price is a large
first fc layer (2048 x 49 x 1024 weights for ResNet-50). What the model measures is then RoI
pooling on coarse features, which is the point of Table 2d.

The C4 mask branch runs res5 again on the positive RoIs (the box branch ran it on all sampled
RoIs): one module, called twice. Detectron reuses the box branch's res5 output instead; with
frozen norms the numbers are the same, the price is a quarter more res5 work in training (at
most 25% of the sampled RoIs are positive). Trained from scratch with batch norm (the small
trunk), res5 normalizes each call's RoIs by their own statistics.

The table ablations plug into all three: `roi_pooler` (Table 2c), `mask_loss` and
`class_agnostic_masks` (2b), `mask_head` (2e: on C4 the MLP reads res5's 7 x 7 output).
Shapes (the book's legend): R RoIs, C channels, P pooled size, K classes, M mask size.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

from torch import Tensor, nn

from mrcnn.backbone import BasicBlock, res5_head
from mrcnn.box_head import BoxHead, BoxPredictor
from mrcnn.config import MaskRCNNConfig
from mrcnn.mask_head import MaskHead, MaskPredictor, MLPMaskHead, MLPMaskPredictor
from mrcnn.norms import Norm, norm_layer
from mrcnn.poolers import MultiLevelRoIAlign, MultiLevelRoIPooler
from mrcnn.roi_align import roi_pool
from mrcnn.roi_warp import roi_warp


class Res5Head(nn.Module):
    """res5 run on every RoI (paper Figure 4, left): `[R, C4, 2P, 2P]` -> `[R, C5, P, P]`, or `[R, C5]`
    after a global average pool (the box head).

    Args:
        res5: the stage, from `build_res5`; the box and mask heads of one model share it.
        average_pool: average over the `P x P` positions (the box head), or keep the map (the mask head).
    """

    def __init__(self, res5: nn.Module, average_pool: bool = False):
        super().__init__()
        self.res5 = res5
        self.average_pool = average_pool

    def forward(self, roi_features: Tensor) -> Tensor:
        x = self.res5(roi_features)  # [R, C5, 7, 7]: stride 2 in the first block
        return x.mean(dim=(2, 3)) if self.average_pool else x  # [R, C5] or [R, C5, 7, 7]


def build_res5(config: MaskRCNNConfig, in_channels: int) -> nn.Sequential:
    """The res5 stage the config's trunk would have had: three bottlenecks of width 512 (2048 channels
    out) for ResNet-50/101; for the small trunk, one basic block of width 128. The norm is the
    trunk's (`config.norm`: frozen for ResNet-50/101, batch norm for the small trunk by default).
    in_channels: of C4."""
    norm = backbone_norm(config)
    if config.backbone == "small":
        return res5_head(in_channels, width=128, num_blocks=1, norm=norm, block=BasicBlock)
    return res5_head(in_channels, norm=norm)  # ResNet-50 and -101 share res5


class Heads(NamedTuple):
    """What the box and mask branches are built from: the pooled size each pools to, head and predictor."""

    box_pool_size: int  # P of the box branch's RoI pooling
    box_head: nn.Module  # [R, C, P, P] -> [R, F]
    box_predictor: nn.Module  # [R, F] -> class logits [R, K], box deltas [R, 4K]
    mask_pool_size: int  # P of the mask branch's RoI pooling
    mask_head: nn.Module  # [R, C, P, P] -> the predictor's input
    mask_predictor: nn.Module  # -> mask logits [R, K, M, M] ([R, 1, M, M] class-agnostic)


def backbone_norm(config: MaskRCNNConfig) -> Norm:
    """The trunk's normalization (`config.norm`); by default frozen for the pretrained ResNet-50/101,
    batch norm for the small trunk, which trains from scratch."""
    return norm_layer(config.norm or ("bn" if config.backbone == "small" else "frozen_bn"))


def head_norm(config: MaskRCNNConfig) -> Norm | None:
    """The normalization of the FPN and of the mask and keypoint heads' convolutions (`config.head_norm`)."""
    return norm_layer(config.head_norm) if config.head_norm is not None else None


def mask_head_and_predictor(config: MaskRCNNConfig, in_channels: int, pooled_size: int) -> tuple[nn.Module, nn.Module]:
    """The FCN mask head (`[R, C, P, P]` -> `[R, K, 2P, 2P]`) or Table 2e's MLP (fc, fc, fc to `K x 2P x 2P`);
    K = 1 with `class_agnostic_masks` (Table 2b)."""
    num_masks = 1 if config.class_agnostic_masks else config.num_classes
    if config.mask_head == "mlp":
        hidden = (config.representation_size,) * 2  # the paper's 1024, 1024
        return MLPMaskHead(in_channels, pooled_size, hidden), MLPMaskPredictor(hidden[-1], num_masks, 2 * pooled_size)
    head = MaskHead(in_channels, config.mask_head_channels, norm=head_norm(config))
    return head, MaskPredictor(config.mask_head_channels[-1], config.mask_predictor_channels, num_masks)


def fpn_heads(config: MaskRCNNConfig, in_channels: int) -> Heads:
    """Figure 4 (right), for the FPN and the C5 model: two fc layers on 7 x 7, the FCN on 14 x 14 -> 28 x 28."""
    return Heads(
        config.box_pool_size,
        BoxHead(in_channels, config.box_pool_size, config.representation_size),
        BoxPredictor(config.representation_size, config.num_classes),
        config.mask_pool_size,
        *mask_head_and_predictor(config, in_channels, config.mask_pool_size),
    )


def c4_heads(config: MaskRCNNConfig, in_channels: int) -> Heads:
    """Figure 4 (left): res5 on 14 x 14 RoIs (pooled at twice `box_pool_size`), shared by an average-pool
    box head and a deconvolution mask head, `M = mask_pool_size` (14). in_channels: of C4."""
    res5 = build_res5(config, in_channels)
    res5_channels = res5[-1].out_channels  # C5: 2048 (ResNet-50), 128 (small)
    num_masks = 1 if config.class_agnostic_masks else config.num_classes
    mask_features = Res5Head(res5)  # [R, C5, M/2, M/2]
    if config.mask_head == "mlp":  # Table 2e on C4: the MLP reads res5's output
        hidden = (config.representation_size,) * 2
        mask_head = nn.Sequential(
            mask_features, MLPMaskHead(res5_channels, config.mask_pool_size // 2, hidden)  # 7 x 7 in
        )
        mask_predictor = MLPMaskPredictor(hidden[-1], num_masks, config.mask_pool_size)
    else:
        mask_head = mask_features
        mask_predictor = MaskPredictor(res5_channels, config.mask_predictor_channels, num_masks)
    return Heads(
        2 * config.box_pool_size,  # 14: res5 halves it to 7
        Res5Head(res5, average_pool=True),
        BoxPredictor(res5_channels, config.num_classes),
        config.mask_pool_size,
        mask_head,
        mask_predictor,
    )


def build_roi_pooler(method: str, output_size: int, strides: tuple[int, ...], sampling_ratio: int, aligned: bool) -> nn.Module:
    """The pooler `MaskRCNNConfig.roi_pooler` names (Table 2c): "align" (`MultiLevelRoIAlign`), "warp" or "pool".

    sampling_ratio and aligned apply to the bilinear poolers (RoIAlign, RoIWarp); RoIPool has neither.
    """
    if method == "align":
        return MultiLevelRoIAlign(output_size, strides, sampling_ratio, aligned)
    if method == "warp":
        return MultiLevelRoIPooler(partial(roi_warp, sampling_ratio=sampling_ratio, aligned=aligned), output_size, strides)
    if method == "pool":
        return MultiLevelRoIPooler(roi_pool, output_size, strides)
    raise ValueError(f"unknown RoI pooler {method!r}; choose 'align', 'warp' or 'pool'")
