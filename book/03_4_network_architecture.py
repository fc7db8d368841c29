# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Network architecture: the C4 head and the FPN head
#
# **Paper:** section 3, "Mask R-CNN", paragraph "Network Architecture" (Figure 4), and the
# stride-32 model of Table 2d.
# **Code:** `mrcnn/model.py` (the model assembled from the config by explicit constructor calls),
# `mrcnn/architectures.py` (the heads of the C4, FPN and C5 models), `mrcnn/config.py` (the
# presets), `mrcnn/backbone.py` (`res5_head`).
# **Proof:** `tests/test_architectures.py` (shapes of every stage for each architecture, a training
# step and detections with every ablation switch, a C4 model that overfits one image) and
# `tests/test_config.py` (presets, validation, which switch builds what).
#
# "To demonstrate the generality of our approach, we instantiate Mask R-CNN with multiple
# architectures. For clarity, we differentiate between: (i) the convolutional **backbone**
# architecture used for feature extraction over an entire image, and (ii) the network **head**
# for bounding-box recognition (classification and regression) and mask prediction that is
# applied separately to each RoI." The paper names a backbone *network-depth-features*:
# ResNet-50-C4 takes its features from the last convolution of the fourth stage, C4, at stride
# 16; ResNet-50-FPN takes them from a feature pyramid built on C2..C5. Each backbone gets its own
# head (Figure 4), and either way the mask branch joins the box branch in the head.
#
# This chapter builds both, and the stride-32 C5 model that the paper's Table 2d uses, from one
# config each; measures their shapes, parameters and compute; draws their data flow; compares
# the presets; and trains a small model of each on one image.
#
# Legend: $N$ images, $C$ channels, $H \times W$ spatial size, $A$ anchors per position, $R$ RoIs,
# $K$ classes (background included), $P$ pooled size, $M$ mask size.

# %%
import dataclasses
import os
import time

import matplotlib.pyplot as plt
import torch
from torch.utils.flop_counter import FlopCounterMode

from mrcnn.architectures import Res5Head, c4_heads, fpn_heads
from mrcnn.backbone import res5_head
from book_helpers import show_source
from mrcnn.config import (
    PRESETS,
    MaskRCNNConfig,
    paper_r50_c4,
    shapes_small,
    shapes_small_c4,
    shapes_small_c5,
    torchvision_maskrcnn_resnet50_fpn,
)
from mrcnn.data.shapes import masks_to_boxes, render_image
from mrcnn.inference import paste_masks
from mrcnn.mask_loss import mask_targets
from mrcnn.model import MaskRCNN, build_backbone

torch.manual_seed(0)
torch.set_num_threads(1)  # small models: one thread is fastest, and the machine is shared

# %% [markdown]
# ## One field chooses the architecture
#
# `MaskRCNNConfig.architecture` is `"fpn"` (the default, torchvision's and Detectron2's model),
# `"c4"` or `"c5"`. The model reads it in three places: where the trunk stops, which feature maps
# the RPN and the RoI poolers read, and which heads follow the poolers. Everything else (the
# transform, the RPN's rules, the box and mask branches' sampling, losses and post-processing)
# is the same code for all three.
#
# | | trunk | RPN reads | RoIs pooled from | box head | mask head, $M$ |
# |---|---|---|---|---|---|
# | **C4** (Fig. 4 left) | stem..res4 | C4, all anchors | C4, $14 \times 14$ | res5, average pool | res5, deconv: $14$ |
# | **FPN** (Fig. 4 right) | stem..res5 + FPN | P2..P6, one size each | P2..P5 by size, $7$ / $14$ | fc 1024, fc 1024 | 4 conv, deconv: $28$ |
# | **C5** (Table 2d) | stem..res5 | C5, all anchors | C5, $7$ / $14$ | fc 1024, fc 1024 | 4 conv, deconv: $28$ |
#
# The trunk first: the C4 model's ResNet stops after res4, because its res5 becomes the head.

# %%
show_source(build_backbone)

# %% [markdown]
# Then the heads. In the C4 model the whole res5 stage (three bottleneck blocks, the first with
# stride 2) runs on *every RoI*: a $14 \times 14 \times 1024$ RoI feature becomes
# $7 \times 7 \times 2048$, which both tasks share. The box head averages it to a 2048-vector;
# the mask head upsamples it by a $2 \times 2$ deconvolution of stride 2 back to
# $14 \times 14$ and predicts $K$ masks there, so $M = 14$. The FPN head is light: its
# pyramid already carries the semantics, so two 1024-d fully connected layers classify and four
# $3 \times 3$ convolutions plus a deconvolution predict $28 \times 28$ masks.

# %%
show_source(Res5Head, c4_heads, fpn_heads)

# %% [markdown]
# The res5 of the head is the stage a full ResNet would have had: three bottlenecks of width 512
# for ResNet-50/101 (with ImageNet weights it is initialised from them), one basic block of width
# 128 for the small trunk of the CPU presets. One module serves both heads: the mask branch calls
# it again on the positive RoIs (the module docstring of `mrcnn/architectures.py` says what that
# costs).

# %%
show_source(res5_head)

# %% [markdown]
# ## Every stage, measured: ResNet-50-C4 against ResNet-50-FPN
#
# On PyTorch's `meta` device a model has shapes but no numbers: building ResNet-50 costs no
# memory and running it costs no arithmetic, yet every tensor comes out with its true shape, and
# `FlopCounterMode` counts the multiply-adds each operation would do (2 FLOPs each). That is
# enough to measure both models of the paper at its test scale, an $800 \times 1216$ image.

# %%
with torch.device("meta"):
    models = {"C4": MaskRCNN(paper_r50_c4()).eval(), "FPN": MaskRCNN(torchvision_maskrcnn_resnet50_fpn(81)).eval()}
image = torch.empty(1, 3, 800, 1216, device="meta")  # [N, 3, H, W] after the transform (padded to /32)


def flops(function, *args):
    """The output of `function(*args)` and its FLOPs (2 per multiply-add)."""
    with FlopCounterMode(display=False) as counter:
        output = function(*args)
    return output, counter.get_total_flops()


def shape(t):
    return " x ".join(str(s) for s in t.shape[1:])


trunk_flops, fpn_flops = {}, {}
for name, model in models.items():
    trunk, trunk_flops[name] = flops(model.backbone, image)  # [C2, ..., C4] or [C2, ..., C5]
    print(f"ResNet-50-{name} trunk ({trunk_flops[name] / 1e9:.0f} GFLOPs):")
    for stage, feature in zip(model.backbone.stage_names, trunk):
        print(f"    {stage}: C{stage[-1]} = {shape(feature):>16}  stride {800 // feature.shape[-2]}")
    fpn_flops[name] = 0
    if model.fpn is not None:
        pyramid, fpn_flops[name] = flops(model.fpn, trunk)  # [P2, ..., P6]
        print(f"  FPN ({fpn_flops[name] / 1e9:.0f} GFLOPs): "
              + ", ".join(f"P{i + 2} {shape(p)}" for i, p in enumerate(pyramid)))  # fmt: skip

# %% [markdown]
# For this image C5 is $2048 \times 25 \times 38$. (A C5 of "32x32x2048", a size easily taken for the rule,
# describes a $1024 \times 1024$ input: the map is
# always the image divided by the stride, 32 for C5.) The C4 trunk stops at
# $1024 \times 50 \times 76$.
#
# Now the heads, for $R$ RoIs. At test time the box branch scores the RPN's proposals, "300 for
# the C4 backbone ... and 1000 for FPN" (section 3.1, "Inference"), and the mask branch runs on
# the 100 best detections of either.

# %%
K = 81
R_mask = 100  # detections given a mask (section 3.1)


def count(*modules):
    """Parameters of the modules, each shared tensor once (the C4 heads share res5)."""
    return sum({id(p): p.numel() for m in modules for p in m.parameters()}.values())


rows, measured, box_head_per_roi = {}, {}, {}
for name, model in models.items():
    R_box = model.config.rpn_post_nms_top_n_test  # proposals scored by the box branch: 300 (C4), 1000 (FPN)
    box, mask = model.box_branch, model.mask_branch
    rpn_maps, roi_maps = model.feature_maps(image)  # FPN: P2..P6 and P2..P5; C4: [C4] twice
    C, P_box, P_mask = roi_maps[0].shape[1], box.pooler.output_size, mask.pooler.output_size
    box_features = torch.empty(R_box, C, P_box, P_box, device="meta")  # RoIAlign's output [R, C, P, P]
    mask_features = torch.empty(R_mask, C, P_mask, P_mask, device="meta")
    box_hidden, box_head_flops = flops(box.head, box_features)
    (class_logits, box_deltas), box_predictor_flops = flops(box.predictor, box_hidden)
    mask_hidden, mask_head_flops = flops(mask.head, mask_features)
    mask_logits, mask_predictor_flops = flops(mask.predictor, mask_hidden)
    _, rpn_flops = flops(model.rpn.head, rpn_maps)
    A = model.rpn.anchor_generator.num_anchors_per_location()[0]
    print(f"{name}: box  {shape(box_features):>14} -> head {shape(box_hidden):>12} -> classes {shape(class_logits)}, "
          f"deltas {shape(box_deltas)}")
    print(f"{name}: mask {shape(mask_features):>14} -> head {shape(mask_hidden):>12} "
          f"-> mask logits {shape(mask_logits)}")
    print(f"{name}: RPN head on {len(rpn_maps)} map(s), A = {A} anchors per position, "
          f"{sum(f.shape[-2] * f.shape[-1] for f in rpn_maps) * A:,} anchors")
    parameters = {
        "trunk": count(model.backbone),
        "FPN": count(model.fpn) if model.fpn is not None else 0,
        "RPN head": count(model.rpn.head),
        "box head": count(box.head, box.predictor),  # with C4: res5, counted here once
        "mask head": count(box.head, box.predictor, mask.head, mask.predictor) - count(box.head, box.predictor),
    }
    compute = {
        "trunk": trunk_flops[name],
        "FPN": fpn_flops[name],
        "RPN head": rpn_flops,
        "box head": box_head_flops + box_predictor_flops,
        "mask head": mask_head_flops + mask_predictor_flops,
    }
    rows[name] = parameters, compute
    box_head_per_roi[name] = (box_head_flops + box_predictor_flops) / R_box
    measured[name] = {"trunk": rpn_maps, "box RoI": box_features, "box head": box_hidden, "classes": class_logits,
                      "deltas": box_deltas, "mask RoI": mask_features, "mask head": mask_hidden,
                      "deconv": mask.predictor.deconv(mask_hidden), "mask": mask_logits}  # fmt: skip

print(f"\n{'':10s}" + "".join(f"{name + ' params':>14s}{name + ' GFLOPs':>14s}" for name in rows))
for part in rows["C4"][0]:
    print(f"{part:10s}" + "".join(f"{rows[n][0][part] / 1e6:13.1f}M{rows[n][1][part] / 1e9:14.0f}" for n in rows))
print(f"{'total':10s}"
      + "".join(f"{sum(rows[n][0].values()) / 1e6:13.1f}M{sum(rows[n][1].values()) / 1e9:14.0f}" for n in rows))
print("\nbox head per RoI: " + ", ".join(f"{n} {box_head_per_roi[n] / 1e9:.3f} GFLOPs" for n in rows)
      + f"; C4's is {box_head_per_roi['C4'] / box_head_per_roi['FPN']:.0f} times FPN's")
print(f"C4: the box head on its {models['C4'].config.rpn_post_nms_top_n_test} proposals costs "
      f"{rows['C4'][1]['box head'] / rows['C4'][1]['trunk']:.1f} times its trunk")

# %% [markdown]
# The trade is plain. The C4 trunk is cheaper (it stops at res4) and it has no pyramid, but its
# head is a quarter of a ResNet run per RoI, so its proposals together cost several times the
# whole trunk (the last lines above). (Its RPN is not light either: a $3 \times 3$ convolution of
# 1024 channels.) The FPN model spends more on the trunk and the pyramid, but its box head costs
# a small fraction of res5 per RoI; its parameters are many, almost all in the
# first fc layer ($256 \cdot 7 \cdot 7 \times 1024$), yet a weight used once per RoI costs little
# arithmetic. Hence the paper's "using a ResNet-FPN backbone for feature extraction with Mask
# R-CNN gives excellent gains in both accuracy and speed", and why the C4 model samples only 64 RoIs per image in training against FPN's 512
# (section 3.1: "N is 64 for the C4 backbone ... and 512 for FPN").

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
parts = list(rows["C4"][0])
colours = plt.cm.tab10.colors
panels = [(0, "M", 1e6, "parameters (millions)"),
          (1, "G", 1e9, "GFLOPs, one 800 x 1216 image (300 / 1000 RoIs, 100 masks)")]  # fmt: skip
for ax, (index, unit, scale, title) in zip(axes, panels):
    left = {name: 0.0 for name in rows}
    for colour, part in zip(colours, parts):
        values = [rows[name][index][part] / scale for name in rows]
        ax.barh(list(rows), values, left=[left[n] for n in rows], color=colour, label=part)
        for y, (name, value) in enumerate(zip(rows, values)):
            if value > 0.06 * max(sum(v / scale for v in rows[n][index].values()) for n in rows):
                ax.text(left[name] + value / 2, y, f"{value:.0f}{unit}", ha="center", va="center", fontsize=8,
                        color="white")  # fmt: skip
            left[name] += value
    ax.set_title(title)
    ax.invert_yaxis()
axes[0].set_yticks([0, 1], ["ResNet-50-C4", "ResNet-50-FPN"])
axes[1].set_yticks([0, 1], ["", ""])
fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(parts), fontsize=9)
fig.suptitle("Where the parameters and the arithmetic sit (measured on the meta device)")
fig.tight_layout(rect=(0, 0.07, 1, 1))
plt.show()

# %% [markdown]
# ## The two heads, drawn from the measured shapes
#
# The paper's Figure 4 again, with the shapes the modules above actually produced (for $R$ RoIs,
# $K = 81$). Arrows are layers; "res5" is the whole fifth ResNet stage, nine convolutions, run
# per RoI. A reader's summary says that without FPN "two layers of convolutions" come before the
# split: in the paper's C4 head the shared part is res5, three bottleneck blocks.

# %%
def r(t):  # "R x C x H x W", the shape of one of the measured tensors
    return "R x " + shape(t)


c4, fpn_shapes = measured["C4"], measured["FPN"]
assert c4["mask"].shape[-1] == 14 and fpn_shapes["mask"].shape[-1] == 28  # M, as in Figure 4


def draw(ax, nodes, edges, title):
    """nodes: name -> (x, y, text); edges: (from, to, label)."""
    for x, y, text in nodes.values():
        ax.text(x, y, text, ha="center", va="center", fontsize=8.5,
                bbox=dict(boxstyle="round,pad=0.35", facecolor="#eef3fb", edgecolor="#3a6fb0"))  # fmt: skip
    for start, end, label in edges:
        (x0, y0, _), (x1, y1, _) = nodes[start], nodes[end]
        ax.annotate("", xy=(x1, y1 + 0.32), xytext=(x0, y0 - 0.32), arrowprops=dict(arrowstyle="->", color="#555"))
        ax.text((x0 + x1) / 2 + 0.06, (y0 + y1) / 2, label, fontsize=7.5, color="#a33", va="center")
    ax.set_xlim(-1.6, 1.6)
    ax.set_ylim(-0.6, 6.6)
    ax.axis("off")
    ax.set_title(title)


fig, axes = plt.subplots(1, 2, figsize=(13, 6.4))
draw(axes[0], {
    "image": (0, 6, f"image {shape(image)}"),
    "trunk": (0, 5, f"ResNet-50 stem..res4: C4 {shape(c4['trunk'][0])}\n(RPN: 15 anchors per position)"),
    "roi": (0, 4, f"RoIAlign from C4: {r(c4['box RoI'])}"),
    "res5": (0, 3, f"res5 (per RoI): {r(c4['mask head'])}"),
    "pool": (-0.8, 2, f"average pool: {r(c4['box head'])}"),
    "cls": (-0.8, 1, f"class, box: {r(c4['classes'])}, {r(c4['deltas'])}"),
    "deconv": (0.8, 2, f"deconv 2x2 /2: {r(c4['deconv'])}"),
    "mask": (0.8, 1, f"conv 1x1: {r(c4['mask'])}"),
}, [("image", "trunk", "stride 16"), ("trunk", "roi", "14 x 14"), ("roi", "res5", "3 blocks, /2"),
    ("res5", "pool", ""), ("pool", "cls", "fc"), ("res5", "deconv", ""), ("deconv", "mask", "")],
    "ResNet-C4 head (Figure 4, left): M = 14")  # fmt: skip
draw(axes[1], {
    "image": (0, 6, f"image {shape(image)}"),
    "trunk": (0, 5, "ResNet-50 + FPN: P2..P6, 256 channels\n"
              + ", ".join(f"{p.shape[-2]}x{p.shape[-1]}" for p in fpn_shapes["trunk"])
              + "\n(RPN on every level, 3 anchors per position)"),
    "box_roi": (-0.8, 3.8, f"RoIAlign from P2..P5\nby RoI size: {r(fpn_shapes['box RoI'])}"),
    "fc": (-0.8, 2.6, f"fc 1024, fc 1024: {r(fpn_shapes['box head'])}"),
    "cls": (-0.8, 1.4, f"class, box: {r(fpn_shapes['classes'])}, {r(fpn_shapes['deltas'])}"),
    "mask_roi": (0.8, 3.8, f"RoIAlign from P2..P5\nby RoI size: {r(fpn_shapes['mask RoI'])}"),
    "convs": (0.8, 2.6, f"4 x conv 3x3: {r(fpn_shapes['mask head'])}"),
    "deconv": (0.8, 1.4, f"deconv 2x2 /2: {r(fpn_shapes['deconv'])}"),
    "mask": (0.8, 0.3, f"conv 1x1: {r(fpn_shapes['mask'])}"),
}, [("image", "trunk", "strides 4..64"), ("trunk", "box_roi", ""), ("trunk", "mask_roi", ""), ("box_roi", "fc", ""),
    ("fc", "cls", ""), ("mask_roi", "convs", ""), ("convs", "deconv", ""), ("deconv", "mask", "")],
    "FPN head (Figure 4, right): M = 28")  # fmt: skip
fig.tight_layout()
plt.show()

# %% [markdown]
# A second reader's slip belongs here too: "we feed only the lowest-level feature map from the
# FPN to the RPN". With FPN, the RPN's one small head slides over *every* level, P2 to P6, each
# with one anchor size (32 on P2 up to 512 on P6); only the RoI features come from one level per
# RoI. The model that feeds a single map to the RPN is the C4 one, which puts all 15 anchors
# (5 sizes x 3 ratios) at each position of C4.
#
# ## The stride-32 model of Table 2d
#
# Table 2d asks how RoIAlign fares on coarse features: "ResNet-50-C5, stride 32". Res5 is then
# part of the trunk, so the res5 head cannot be used; the paper uses "the same head as in
# Figure 4 (right)". Here, `architecture="c5"` does exactly that: the RPN and the poolers read C5
# (2048 channels, stride 32), and the FPN's heads follow. The paper does not say whether C5 is first
# reduced to 256 channels; this library feeds C5 as it is (the docstring of `mrcnn/architectures.py`
# gives the reason), which makes the first fc layer large ($2048 \cdot 49 \times 1024$ weights).

# %%
with torch.device("meta"):
    c5 = MaskRCNN(torchvision_maskrcnn_resnet50_fpn(81).replace(architecture="c5")).eval()
    c5_features, c5_roi_features = c5.feature_maps(image)
print(f"C5 model: RPN and RoIs read {len(c5_features)} map {shape(c5_features[0])} "
      f"(stride {800 // c5_features[0].shape[-2]}); "
      f"box head fc6 {tuple(c5.box_branch.head.fc6.weight.shape)}; "
      f"{sum(p.numel() for p in c5.parameters()) / 1e6:.1f} M parameters")

# %% [markdown]
# ## The model, assembled
#
# `MaskRCNN.__init__` reads the config top to bottom and calls constructors: no registry, no
# string-to-class table. The architecture decides the maps, the anchors per level and the heads;
# the pooler of every branch comes from `roi_pooler` (Table 2c); the rest is shared. In the order
# of the code below, it builds:
#
# 1. `transform`, the `ImageTransform` that resizes the images (`min_size`, `max_size`),
#    normalizes them and pads the batch to a multiple of `size_divisible`;
# 2. `backbone`, the trunk of `build_backbone` above (with `fast_convolutions`, its frozen batch
#    norms are folded into the convolutions before them);
# 3. the maps and the anchors: for FPN, the `FeaturePyramidNetwork`, RoIs pooled from P2..P5 and
#    one anchor size per level P2..P6; for C4 and C5, the trunk's last map for both, with every
#    anchor size on it;
# 4. `rpn`, the `RegionProposalNetwork`: an `AnchorGenerator`, an `RPNHead` on those channels and
#    the RPN's rules from the config (IoU thresholds, sampling, proposals kept before and after
#    NMS);
# 5. the heads, from `c4_heads` for C4 and `fpn_heads` otherwise (both above), and `pooler`, the
#    one kind of RoI pooler every branch uses;
# 6. `box_branch`, the `BoxBranch`: pooler, box head and predictor, with its sampling, box coding
#    and detection rules;
# 7. `mask_branch` when `config.mask` is set, and `keypoint_branch` when the config has keypoints
#    (section 5); otherwise they stay `None`.

# %%
show_source(MaskRCNN.__init__)

# %% [markdown]
# At run time the architecture shows in one method, `feature_maps`: the maps the RPN reads and
# the maps the RoIs are pooled from. C4 and C5 give the trunk's last map to both; FPN gives the
# RPN all of P2..P6 and the poolers P2..P5.

# %%
show_source(MaskRCNN.feature_maps)

# %% [markdown]
# ## The presets, and what differs between them
#
# A preset is a function that returns a `MaskRCNNConfig`; a variant of a preset is
# `preset().replace(field=value)`. Below, for every registered preset (the command line's
# `--config` accepts these names), the fields that differ from the paper's defaults, which are
# torchvision's `maskrcnn_resnet50_fpn`.

# %%
defaults = MaskRCNNConfig()
for name, preset in PRESETS.items():
    config = preset()
    changed = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
               if getattr(config, f.name) != getattr(defaults, f.name)}  # fmt: skip
    print(f"{name}:")
    print("    " + (", ".join(f"{k}={v}" for k, v in changed.items()) or "(the defaults)"))
for name in ("shapes_small_c4", "shapes_small_c5"):
    config, base = PRESETS[name](), shapes_small()
    changed = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
               if getattr(config, f.name) != getattr(base, f.name)}  # fmt: skip
    print(f"{name} against shapes_small: " + ", ".join(f"{k}={v}" for k, v in changed.items()))

# %% [markdown]
# Three families. **torchvision's** Mask R-CNN preset is the defaults (its checkpoints load into
# it, and `tests/test_weights.py` checks the detections are torchvision's); its Keypoint R-CNN
# preset adds the keypoint branch of section 5. **Detectron2's** FPN
# preset differs in two details that change numbers but not the architecture: RoIAlign with the
# half-pixel shift (`roi_aligned=True`) and adaptive sampling, and 1000 proposals per image in
# training. **`paper_r50_c4`** is Figure 4's left model with the paper's 64 RoIs per image and
# Detectron's C4 proposal counts. The **small** presets keep the design and shrink everything
# else for a CPU: $128 \times 128$ images, a narrow ResNet with one basic block per stage, 64 FPN
# channels, anchors of 8 to 128 pixels; `shapes_small_c4` and `shapes_small_c5` are that model
# as C4 and C5.
#
# The source of the architecture presets:

# %%
show_source(paper_r50_c4, shapes_small_c4, shapes_small_c5)

# %% [markdown]
# ## All three on a CPU: thirty steps on one image
#
# The small presets train on a laptop. Each model below takes thirty SGD steps on the same
# synthetic image, as `tests/test_architectures.py` checks that the C4 model learns.
# First, what each one builds for this $128 \times 128$ image:

# %%
picture, object_masks, object_labels = render_image(1)  # [H, W, 3] uint8, [G, H, W], [G]
image_small = torch.from_numpy(picture).permute(2, 0, 1).float() / 255  # [3, 128, 128]
target = {"boxes": masks_to_boxes(object_masks), "labels": torch.from_numpy(object_labels),
          "masks": torch.from_numpy(object_masks)}  # fmt: skip
presets = {"C4": shapes_small_c4, "FPN": shapes_small, "C5": shapes_small_c5}
small = {}
for name, preset in presets.items():
    torch.manual_seed(0)
    small[name] = MaskRCNN(preset())
    model = small[name]
    with torch.no_grad():
        features, roi_features = model.feature_maps(image_small[None])
        rois = torch.cat([torch.zeros(1, 1), target["boxes"][:1]], dim=1)  # [1, 5]
        mask_logits = model.mask_branch.mask_logits(roi_features, [target["boxes"][:1]])
    print(f"{name:3s}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; RPN reads "
          f"{[shape(f) for f in features]}; box RoI {shape(model.box_branch.pooler(roi_features, rois))}, "
          f"mask RoI {shape(model.mask_branch.pooler(roi_features, rois))}, mask logits {shape(mask_logits)}")

# %%
history = {}
start_load = os.getloadavg()[0]
for name, model in small.items():
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)  # no warm-up: a modest rate
    history[name] = []
    start = time.perf_counter()
    for step in range(30):
        losses = model([image_small], [target])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        history[name].append({k: v.item() for k, v in losses.items()})
    seconds = time.perf_counter() - start
    total = [sum(h.values()) for h in history[name]]
    print(f"{name:3s}: total loss {total[0]:.2f} -> {total[-1]:.2f} in 30 steps, {seconds:.1f} s on one thread")
print(f"(load average {start_load:.1f} when the runs started, {os.getloadavg()[0]:.1f} at the end: a shared machine)")

fig, axes = plt.subplots(1, 3, figsize=(13, 3.3))
panels = zip(axes, ["total", "loss_classifier", "loss_mask"], ["all five losses", "$L_{cls}$", "$L_{mask}$"])
for ax, key, title in panels:
    for name, steps in history.items():
        ax.plot([sum(h.values()) if key == "total" else h[key] for h in steps], label=name)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_yscale("log")
axes[0].legend()
fig.suptitle("Thirty SGD steps on one image, three architectures")
fig.tight_layout()
plt.show()

# %% [markdown]
# Thirty steps on one image prove only that each architecture trains end to end, gradients
# reaching the trunk through both heads; which one is better is a question for the paper's
# Table 2a (FPN's 33.6 mask AP against C4's 30.3 at ResNet-50) and for `experiments/ablations.py`
# on the shapes.
#
# ## What a mask of 14 × 14 costs against 28 × 28
#
# The C4 head predicts $14 \times 14$ masks, the FPN head $28 \times 28$. Before any learning,
# the mask size bounds what a model can draw: the training target of a RoI is the object's mask
# resampled to $M \times M$ in its box (`mask_targets`), and inference pastes an $M \times M$ map
# back into the box (`paste_masks`, any $M$). Pasting the targets themselves back gives the best
# mask each $M$ allows; its IoU with the true mask is an upper bound for that head.

# %%
sizes = (7, 14, 28, 56)
for image_size, object_size in [(128, (16, 56)), (512, (64, 224))]:  # the shapes data set, and four times larger
    ious = {m: [] for m in sizes}
    for index in range(24):
        _, gt_masks, _ = render_image(index, image_size=image_size, object_size=object_size)  # [G, H, W] uint8
        gt_masks = torch.from_numpy(gt_masks)
        gt_boxes = masks_to_boxes(gt_masks.numpy())  # [G, 4]
        for m in sizes:
            targets = mask_targets(gt_masks, gt_boxes, torch.arange(len(gt_boxes)), m)  # [G, M, M]
            pasted = paste_masks(targets[:, None], gt_boxes, (image_size, image_size))[:, 0] >= 0.5  # [G, H, W]
            truth = gt_masks.bool()
            ious[m] += ((pasted & truth).sum((1, 2)) / (pasted | truth).sum((1, 2))).tolist()
    print(f"{image_size} x {image_size} images, objects {object_size[0]} to {object_size[1]} px, "
          f"{len(ious[7])} objects: mean IoU of the pasted target with the true mask")
    print("    " + ", ".join(f"M = {m}: {sum(v) / len(v):.3f}" for m, v in ious.items()))

fig, axes = plt.subplots(1, 5, figsize=(13, 3.1))
_, gt_masks, _ = render_image(2, image_size=512, object_size=(64, 224))  # the larger drawing
gt_masks = torch.from_numpy(gt_masks)
gt_boxes = masks_to_boxes(gt_masks.numpy())
box_areas = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])  # [G]
g = int((gt_masks.sum((1, 2)) / box_areas).argmin())  # the object that fills its box least: the most edge
x1, y1, x2, y2 = (int(v) for v in gt_boxes[g])
truth = gt_masks[g, y1:y2, x1:x2].bool()
axes[0].imshow(truth, cmap="gray")
axes[0].set_title(f"true mask, {x2 - x1} x {y2 - y1} px")
for index, m in enumerate((14, 28)):
    target_m = mask_targets(gt_masks, gt_boxes[g : g + 1], torch.tensor([g]), m)  # [1, M, M]
    axes[1 + index].imshow(target_m[0], cmap="gray", vmin=0, vmax=1)
    axes[1 + index].set_title(f"target, M = {m}")
    pasted = paste_masks(target_m[:, None], gt_boxes[g : g + 1], (512, 512))[0, 0, y1:y2, x1:x2] >= 0.5
    picture_rgb = torch.ones(*truth.shape, 3)  # white
    picture_rgb[truth] = 0.85  # the object, light grey
    picture_rgb[pasted & ~truth] = torch.tensor([0.85, 0.1, 0.1])  # extra: red
    picture_rgb[truth & ~pasted] = torch.tensor([0.1, 0.2, 0.9])  # missing: blue
    axes[3 + index].imshow(picture_rgb)
    axes[3 + index].set_title(f"pasted, M = {m}:\n{int((pasted ^ truth).sum())} pixels wrong")
for ax in axes:
    ax.axis("off")
fig.suptitle("The target resampled to M x M and pasted back (red: extra pixels, blue: missing)")
fig.tight_layout(rect=(0, 0, 1, 0.95))
plt.show()

# %% [markdown]
# For a straight-edged square like the one drawn, the bilinear paste restores the edges from
# either grid (the pixel counts in the titles); the means printed above count every shape, stars
# and circles included. On the shapes data set (objects of 16 to 56 pixels) every $M$ from 14 up
# gives about the same ceiling: the objects are hardly finer than the grid, and the pasting's
# whole-pixel box and the 0.5 threshold dominate what is lost. On the same shapes drawn four
# times larger the grid shows: compare the second line of means. Larger objects, as in COCO, are
# where the FPN head's finer output pays, before any
# learning is counted.

# %% [markdown]
# ## What to try next
#
# - Swap RoIAlign for RoIWarp or RoIPool in any of the three (`replace(roi_pooler="warp")`) and
#   see on the meta device that nothing changes shape; then train the C5 model both ways and
#   compare mask AP75, as Table 2d does.
# - Count the head's FLOPs of the C4 model with 64 RoIs (its training batch) and with 1000
#   proposals, and compare with the trunk: where would you cut first?
# - Give the C5 model a $1 \times 1$ convolution from 2048 to 256 channels before its heads, and
#   measure what it saves in parameters and what it costs in the mask loss after thirty steps.
# - Build `paper_r50_c4().replace(backbone="resnet101")` on the meta device and find which stage
#   grows.
# - Put the MLP mask head (`mask_head="mlp"`) on the C4 model: it reads res5's $7 \times 7$
#   output; how many parameters does its last layer have for $K = 81$?
