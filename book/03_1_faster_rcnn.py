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
# # Faster R-CNN: backbone, FPN, anchors and the RPN
#
# **Paper:** section 3, the paragraph "Faster R-CNN" (and "Network Architecture" for the
# ResNet-FPN backbone), recapping Ren et al. 2015 and Lin et al. 2017 (FPN).
# **Code:** `mrcnn/transform.py` (resize, normalize, pad), `mrcnn/backbone.py` (ResNet),
# `mrcnn/fpn.py` (feature pyramid), `mrcnn/anchors.py` and `mrcnn/rpn.py` (region proposals).
# **Proof:** `tests/test_transform.py`, `tests/test_backbone.py`, `tests/test_fpn.py` (each
# against torchvision's own modules, to float rounding), `tests/test_anchors.py`,
# `tests/test_rpn.py`.
#
# Mask R-CNN is Faster R-CNN with a third branch. Faster R-CNN has two stages. The first, the
# **Region Proposal Network** (RPN), looks at every position of the feature maps and proposes
# boxes that may hold an object. The second (in essence Fast R-CNN) pools features from each
# proposal (RoIAlign in Mask R-CNN) and classifies and refines it; Mask R-CNN adds the mask in
# parallel. Both stages read the same features, computed once per image by the **backbone**:
# a ResNet, topped in the best models by a **Feature Pyramid Network**. This chapter follows
# an image through the first stage:
#
# $$\text{image} \xrightarrow{\text{transform}} [N, 3, H, W] \xrightarrow{\text{ResNet}} C_2..C_5
#   \xrightarrow{\text{FPN}} P_2..P_6 \xrightarrow{\text{RPN}} \text{proposals}.$$
#
# Legend: $N$ images, $C$ channels, $H \times W$ image or feature map, $A$ anchors per
# location, $G$ ground-truth objects.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Rectangle

from mrcnn.anchors import AnchorGenerator, cell_anchors
from mrcnn.backbone import Bottleneck, ResNet, resnet50, resnet_small
from book_helpers import show_source
from mrcnn.boxes import box_iou
from mrcnn.data.images import image_to_tensor
from mrcnn.data.shapes import CATEGORY_NAMES, masks_to_boxes, render_image
from mrcnn.fpn import FeaturePyramidNetwork
from mrcnn.poolers import fpn_level
from mrcnn.rpn import RegionProposalNetwork, RPNHead, flatten_predictions
from mrcnn.transform import ImageTransform, batch_images

torch.manual_seed(0)
chapter_start = time.perf_counter()


def show_image(ax, image, title=""):
    """Draw a [3, H, W] tensor in [0, 1] (or any range: it is rescaled)."""
    image = image.detach().permute(1, 2, 0).numpy()
    ax.imshow((image - image.min()) / (image.max() - image.min() + 1e-12))
    ax.set_title(title, fontsize=9)
    ax.axis("off")


# %% [markdown]
# ## The input: one batch of normalized, resized, padded images
#
# A synthetic image from `mrcnn.data.shapes`: coloured shapes on a textured background, with
# boxes and masks. The paper resizes every image so that its shorter side is 800 pixels (the
# longer at most 1333), one factor $s$ for both axes,
#
# $$s = \min\left(\frac{\text{min\_size}}{\min(h, w)}, \frac{\text{max\_size}}{\max(h, w)}\right),$$
#
# normalizes it with the ImageNet mean and standard deviation the backbone was trained with,
# and pads the batch with zeros, bottom and right, to a multiple of 32, the stride of $C_5$.
# Our images are small, so here `min_size` is 160.

# %%
image_np, masks_np, labels_np = render_image(4, seed=0, image_size=(140, 200), min_objects=3, max_objects=4,
                                             object_size=(24, 64))  # fmt: skip
image = image_to_tensor(image_np)  # [3, h, w] float32 in [0, 1]
target = {"boxes": masks_to_boxes(masks_np), "labels": torch.from_numpy(labels_np), "masks": torch.from_numpy(masks_np)}

transform = ImageTransform(min_size=160, max_size=256).eval()
batch, image_sizes, (resized_target,) = transform([image], [target])
print(f"original image {tuple(image.shape[1:])} -> resized {image_sizes[0]} -> padded batch {tuple(batch.shape)}")
print("objects:", [CATEGORY_NAMES[int(label) - 1] for label in labels_np])

fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
show_image(axes[0], image, f"the image, {image.shape[1]} x {image.shape[2]}")
for box in target["boxes"]:
    x1, y1, x2, y2 = box.tolist()
    axes[0].add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="white", lw=1.5))
show_image(axes[1], batch[0], f"normalized, resized to {image_sizes[0][0]} x {image_sizes[0][1]}, "
                              f"padded to {batch.shape[2]} x {batch.shape[3]}")  # fmt: skip
axes[1].add_patch(Rectangle((-0.5, -0.5), image_sizes[0][1], image_sizes[0][0], fill=False, color="yellow", lw=1.5,
                            ls="--"))  # fmt: skip
plt.tight_layout()
plt.show()

# %% [markdown]
# The resize and the batching are exactly torchvision's `GeneralizedRCNNTransform` (the tests
# compare batches, sizes and targets with `torch.equal`). Boxes follow the image by the actual
# ratios $h'/h$, $w'/w$; masks are resized with nearest neighbour by the same factor.

# %%
show_source(ImageTransform.resize, batch_images)

# %% [markdown]
# ## The backbone: a ResNet, read at four depths
#
# A ResNet is a stem (a 7x7 convolution of stride 2 and a max-pool of stride 2) and four stages
# of residual blocks, res2..res5. The first block of res3, res4 and res5 halves the resolution,
# so the output $C_i$ of stage $i$ has stride $2^i$: 4, 8, 16, 32. ResNet-50's bottleneck block
# squeezes the channels with a 1x1 convolution, works at low width with a 3x3, and expands
# again, around an identity shortcut: $y = \mathrm{relu}(F(x) + x)$.

# %%
show_source(Bottleneck)

# %% [markdown]
# The shapes follow from the strides alone. On the `meta` device PyTorch computes shapes
# without any arithmetic, so we can ask ResNet-50 for the shapes of a 1024 x 1024 and an
# 800 x 1216 batch at no cost. A "32 x 32 x 2048 feature map" is $C_5$ of a 1024 x 1024 image;
# at the paper's usual 800-pixel scale, $C_5$ is 25 x 38 (after padding to 800 x 1216).

# %%
paper_backbone = resnet50()  # random weights: this chapter downloads nothing
with torch.device("meta"):
    meta_backbone = resnet50()
for height, width in [(1024, 1024), (800, 1216)]:
    shapes = [tuple(c.shape[1:]) for c in meta_backbone(torch.empty(1, 3, height, width, device="meta"))]
    print(f"{height} x {width}:", ", ".join(f"C{i + 2} {c} x {h} x {w}" for i, (c, h, w) in enumerate(shapes)))
print("strides:", paper_backbone.strides, " channels:", paper_backbone.out_channels)

# %% [markdown]
# For detection the backbone starts from ImageNet weights and is fine-tuned with one or two
# images per GPU, too few to estimate batch statistics. So batch normalization is *frozen*
# into a fixed affine map, $y = x \cdot \gamma / \sqrt{\sigma^2 + \epsilon} + (\beta - \mu \gamma / \sqrt{\sigma^2 + \epsilon})$
# (`FrozenBatchNorm2d`), and the stem and res2, which compute generic edges and colours, are not
# trained at all:

# %%
for name in ["stem", "res2", "res3", "res4", "res5"]:
    parameters = list(getattr(paper_backbone, name).parameters())
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    print(f"{name}: {sum(p.numel() for p in parameters) / 1e6:5.2f} M parameters, {trainable / 1e6:5.2f} M trained")

# %% [markdown]
# Our real backbone on our image: the four maps over the same picture, each drawn with the grid
# of its stride, and below it the length of the feature vector at each location. The weights
# are random, so the maps show the *geometry*: how coarse each level is (at stride 32 a whole
# shape falls in one or two cells) and how far each location sees. Random convolutions do react
# to strong colour contrast, hence the shapes in $C_2$; that is not recognition.

# %%
with torch.no_grad():
    features = paper_backbone(batch)  # [C2, C3, C4, C5]

fig, axes = plt.subplots(2, 4, figsize=(12, 5.2))
for column, (feature, stride) in enumerate(zip(features, paper_backbone.strides)):
    show_image(axes[0, column], batch[0], f"grid of stride {stride}")
    for x in range(0, batch.shape[3] + 1, stride):
        axes[0, column].axvline(x - 0.5, color="white", lw=0.4, alpha=0.7)
    for y in range(0, batch.shape[2] + 1, stride):
        axes[0, column].axhline(y - 0.5, color="white", lw=0.4, alpha=0.7)
    energy = feature[0].norm(dim=0)  # [H_i, W_i]: the length of each location's feature vector
    axes[1, column].imshow(energy, cmap="magma")
    axes[1, column].set_title(f"C{column + 2}: {feature.shape[1]} x {feature.shape[2]} x {feature.shape[3]}",
                              fontsize=9)  # fmt: skip
    axes[1, column].axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The feature pyramid: strong features at every scale
#
# $C_2$ is fine but shallow; $C_5$ is deep but coarse. FPN builds maps that are both: a
# top-down pathway upsamples the coarser merged map (nearest neighbour) and adds a 1x1
# "lateral" projection of the backbone map; a 3x3 convolution then smooths each sum. $P_6$ is
# $P_5$ subsampled by 2, for the largest anchors only.
#
# $$M_5 = L_5(C_5), \qquad M_i = L_i(C_i) + \mathrm{Up}(M_{i+1}), \qquad P_i = O_i(M_i), \qquad P_6 = P_5[::2, ::2].$$

# %%
show_source(FeaturePyramidNetwork.forward)

# %% [markdown]
# What the top-down pathway buys is *context*. Take the feature vector at one location of
# $C_2$ and of $P_2$ and ask which image pixels it depends on: the gradient of its length
# with respect to the image. $C_2$ has only gone through the stem and res2: it sees a small
# window. $P_2$ also holds $\mathrm{Up}(M_3)$, which holds $C_5$: it sees the whole image.
# (The extent of this dependence is a property of the architecture, so random weights show it
# as well as trained ones.)

# %%
paper_fpn = FeaturePyramidNetwork(paper_backbone.out_channels, out_channels=256)
probe = batch.clone().requires_grad_()
c_maps = paper_backbone(probe)
p_maps = paper_fpn(c_maps)
row, column = 20, 28  # a location of the stride-4 maps: pixel (80, 112) of the image
c2_gradient = torch.autograd.grad(c_maps[0][0, :, row, column].norm(), probe, retain_graph=True)[0]
p2_gradient = torch.autograd.grad(p_maps[0][0, :, row, column].norm(), probe)[0]

fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
show_image(axes[0], batch[0], "the probed location")
axes[0].plot(column * 4, row * 4, "w+", ms=12, mew=2)
for ax, gradient, name in [(axes[1], c2_gradient, "C2"), (axes[2], p2_gradient, "P2")]:
    influence = gradient[0].abs().sum(0)  # [H, W]
    ax.imshow(influence > 1e-6 * influence.max(), cmap="gray")
    ax.plot(column * 4, row * 4, "r+", ms=12, mew=2)
    reached = (influence > 1e-6 * influence.max()).float().mean()
    ax.set_title(f"pixels that move {name}[{row}, {column}]: {reached:.0%}", fontsize=9)
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# The five pyramid levels of our image: one 256-channel map per stride, 4 to 64.

# %%
with torch.no_grad():
    pyramid = paper_fpn(features)  # [P2, P3, P4, P5, P6]
fig, axes = plt.subplots(1, 5, figsize=(13, 2.6))
for index, (level, stride) in enumerate(zip(pyramid, paper_fpn.strides)):
    axes[index].imshow(level[0].norm(dim=0), cmap="magma")
    axes[index].set_title(f"P{index + 2}: stride {stride}, {level.shape[2]} x {level.shape[3]}", fontsize=9)
    axes[index].axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Anchors: reference boxes at every location of every level
#
# The RPN does not regress boxes from nothing. At every location of a level of stride $s$ it
# considers $A = 3$ reference boxes, the **anchors**, with aspect ratios $h/w \in \{1/2, 1, 2\}$
# and one size per level: 32, 64, 128, 256, 512 pixels on $P_2..P_6$ for 800-pixel images. An
# anchor of size $S$ and ratio $r$ keeps the area $S^2$: $h = S\sqrt{r}$, $w = S/\sqrt{r}$.
# Our images are five times smaller, so we use sizes 8 to 128, as the `shapes_small` preset
# does. (As in torchvision, the anchors of cell $(i, j)$ are centred on the pixel $(j s, i s)$,
# the cell's corner, not its centre.)

# %%
show_source(cell_anchors)

# %%
anchor_sizes = ((8,), (16,), (32,), (64,), (128,))
anchor_generator = AnchorGenerator(anchor_sizes, ((0.5, 1.0, 2.0),) * 5)
anchors = anchor_generator(tuple(batch.shape[-2:]), [level.shape[-2:] for level in pyramid])
for index, level_anchors in enumerate(anchors):
    grid = pyramid[index].shape[-2:]
    print(f"P{index + 2}: {grid[0]} x {grid[1]} locations x A = 3 -> {level_anchors.shape[0]:5d} anchors "
          f"of size {anchor_sizes[index][0]}")
print("all levels:", sum(a.shape[0] for a in anchors), "anchors for one", batch.shape[2], "x", batch.shape[3], "image")

colours = ["tab:cyan", "tab:green", "tab:orange", "tab:red", "tab:purple"]
fig, axes = plt.subplots(2, 3, figsize=(12, 5.4))
margin = 70  # the largest anchors reach past the image
for index, (ax, level_anchors) in enumerate(zip(axes.flat, anchors)):
    stride = paper_fpn.strides[index]
    grid_h, grid_w = pyramid[index].shape[-2:]
    show_image(ax, batch[0], f"P{index + 2}: anchor centres every {stride} px, size {anchor_sizes[index][0]}")
    centres_x, centres_y = np.meshgrid(np.arange(grid_w) * stride, np.arange(grid_h) * stride)
    ax.plot(centres_x.ravel(), centres_y.ravel(), ".", color="white", ms=1 if stride == 4 else 2)
    for i, j in [(grid_h // 4, grid_w // 4), (grid_h // 2, (3 * grid_w) // 4)]:  # the 3 anchors at two locations
        for box in level_anchors.view(grid_h, grid_w, 3, 4)[i, j]:
            x1, y1, x2, y2 = box.tolist()
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=colours[index], lw=1.5))
    ax.set_xlim(-margin, batch.shape[3] + margin)
    ax.set_ylim(batch.shape[2] + margin, -margin)
ax = axes.flat[5]
show_image(ax, batch[0], "all 15 anchors centred on pixel (80, 112)")
for index, level_anchors in enumerate(anchors):
    grid_h, grid_w = pyramid[index].shape[-2:]
    stride = paper_fpn.strides[index]
    for box in level_anchors.view(grid_h, grid_w, 3, 4)[80 // stride, 112 // stride]:
        x1, y1, x2, y2 = box.tolist()
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=colours[index], lw=1.5))
ax.set_xlim(-margin, batch.shape[3] + margin)
ax.set_ylim(batch.shape[2] + margin, -margin)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The Region Proposal Network
#
# One small head slides over **every** level $P_2..P_6$ with the **same** weights: a 3x3
# convolution and ReLU, then two sibling 1x1 convolutions giving, for each of the $A$ anchors
# of each location, an objectness logit and four deltas $(t_x, t_y, t_w, t_h)$ that move and
# stretch the anchor. What differs from level to level is the anchor size, so the head learns
# one job, "is there an object of about the anchor's size here?", and the pyramid supplies the
# scale.
#
# A note against a tempting misreading: it is *not* only the lowest (finest) level that feeds
# the RPN. The RPN runs on all five levels; it is in the *second* stage that each RoI takes its
# features from one level only, chosen by its size, $k = \lfloor 4 + \log_2(\sqrt{wh}/224) \rfloor$
# clamped to $[2, 5]$ (FPN paper, eq. 1):

# %%
for side in [32, 112, 224, 448, 900]:
    level = fpn_level(torch.tensor([[0.0, 0.0, side, side]]), 2, 5).item()
    print(f"a {side} x {side} RoI is pooled from P{level}")

# %%
show_source(RPNHead)

# %% [markdown]
# During training each anchor gets a label: positive when its IoU with a ground-truth box is at
# least 0.7 (or it is the best anchor of some box), negative below 0.3, ignored in between. 256
# anchors per image (here 128), at most half positive, enter a binary cross-entropy for the
# objectness and a smooth-L1 loss on the deltas of the positives. For proposals, the network
# keeps the top-scoring anchors of each level, decodes them, clips them to the image and
# removes duplicates with non-maximum suppression (IoU 0.7), level by level:

# %%
show_source(RegionProposalNetwork.select_proposals)

# %% [markdown]
# ### Watching it learn
#
# With random weights the objectness is $\sigma(0) = 0.5$ everywhere and the proposals are
# arbitrary. To see what the RPN is for, we overfit a small model (the CPU backbone
# `resnet_small` with a 64-channel FPN, the `shapes_small` preset) to this one image: a few
# dozen Adam steps, each about a tenth of a second on a laptop CPU. This shows the mechanism, not
# how well an RPN generalizes; that is what the training chapter is about.

# %%
torch.manual_seed(0)
backbone = resnet_small()
fpn = FeaturePyramidNetwork(backbone.out_channels, out_channels=64)
rpn = RegionProposalNetwork(
    anchor_generator,
    RPNHead(64, num_anchors=3),
    batch_size_per_image=128,
    pre_nms_top_n=dict(training=100, testing=300),  # training needs no proposals here: keep NMS cheap
    post_nms_top_n=dict(training=100, testing=100),
)
padded_size = tuple(batch.shape[-2:])


def objectness_maps():
    """Per level, the highest objectness probability of the A anchors at each location: [H_l, W_l]."""
    with torch.no_grad():
        logits, _ = rpn.head(fpn(backbone(batch)))
    return [torch.sigmoid(level[0]).amax(dim=0) for level in logits]


backbone.eval(), fpn.eval(), rpn.eval()
maps_before = objectness_maps()
parameters = [*backbone.parameters(), *fpn.parameters(), *rpn.parameters()]
optimizer = torch.optim.Adam(parameters, lr=3e-3)  # Adam: quicker than SGD for a 40-step demo
backbone.train(), fpn.train(), rpn.train()
history = []
start = time.perf_counter()
for step in range(40):
    _, losses = rpn(fpn(backbone(batch)), image_sizes, padded_size, [resized_target])
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    history.append({name: value.item() for name, value in losses.items()})
print(f"40 steps in {time.perf_counter() - start:.1f} s; last losses:",
      {k: round(v, 4) for k, v in history[-1].items()})  # fmt: skip
backbone.eval(), fpn.eval(), rpn.eval()
maps_after = objectness_maps()

fig, ax = plt.subplots(figsize=(5, 2.8))
for name in history[0]:
    ax.plot([h[name] for h in history], label=name)
ax.set_yscale("log")
ax.set_xlabel("step")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# The objectness per level (the most confident of the $A$ anchors at each location), before and
# after: each level lights up where an object of *its* anchor size sits. Our shapes, 30 to 55
# pixels across, fire on $P_4$ and $P_5$, whose anchors are 32 and 64 pixels; $P_2$, $P_3$
# (8 and 16) and $P_6$ (128) learn to say "nothing of my size here".

# %%
fig, axes = plt.subplots(2, 6, figsize=(15, 4.6))
for row, (maps, when) in enumerate([(maps_before, "before"), (maps_after, "after")]):
    show_image(axes[row, 0], batch[0], f"{when} training")
    for index, level_map in enumerate(maps):
        axes[row, index + 1].imshow(level_map, cmap="viridis", vmin=0, vmax=1)
        axes[row, index + 1].set_title(f"P{index + 2} (anchors {anchor_sizes[index][0]}): max {level_map.max():.2f}",
                                       fontsize=9)  # fmt: skip
        axes[row, index + 1].axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# Proposals before and after non-maximum suppression. Before NMS, the top-scoring decoded
# anchors pile up on each object, many nearly identical boxes; NMS keeps the best of each
# cluster, so the first few proposals after it are the objects.

# %%
with torch.no_grad():
    features_small = fpn(backbone(batch))
    logits, deltas = rpn.head(features_small)
    objectness, deltas = flatten_predictions(logits, deltas)  # [1, T], [1, T, 4]
    all_anchors = torch.cat(anchor_generator(padded_size, [f.shape[-2:] for f in features_small]))  # [T, 4]
    decoded = rpn.box_coder.decode(deltas[0], all_anchors)[:, 0]  # [T, 4]
    top = objectness[0].topk(40).indices
    before_nms = decoded[top]
    proposals, _ = rpn(features_small, image_sizes, padded_size)
after_nms = proposals[0][:8]
print("IoU of each ground-truth box with its best of the first 8 proposals:",
      [round(v, 2) for v in box_iou(resized_target["boxes"], after_nms).max(dim=1).values.tolist()])

fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
for ax, boxes, title in [(axes[0], before_nms, "top 40 anchors, decoded, before NMS"),
                         (axes[1], after_nms, "first 8 proposals after NMS")]:  # fmt: skip
    show_image(ax, batch[0], title)
    for box in boxes:
        x1, y1, x2, y2 = box.tolist()
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="yellow", lw=1, alpha=0.8))
plt.tight_layout()
plt.show()
print(f"chapter ran in {time.perf_counter() - chapter_start:.0f} s")

# %% [markdown]
# These proposals go on to the second stage: RoIAlign pools a fixed-size feature grid for each
# (chapter "RoIAlign"), and the box, class and mask heads take it from there (chapters "Mask
# representation" and "Network architecture").
#
# ## What to try next
#
# - Build the C4 variant: `resnet50(last_stage=4)` stops at $C_4$ (stride 16), and
#   `mrcnn.backbone.res5_head()` runs res5 on each 14 x 14 RoI, as in the paper's Figure 4
#   (left). Which is cheaper per RoI, and why does the FPN head win on small objects?
# - Give every level the same anchor size (say 32) and retrain the RPN above: which levels
#   still fire, and what happens to the large shapes?
# - Load torchvision's ImageNet ResNet-50 weights (`mrcnn.backbone.from_torchvision_resnet` on
#   a checkpoint you have on disk) and redraw the $C_2..C_5$ maps: trained features light up on
#   the shapes, random ones on the texture.
# - Change `min_size` of the transform to a tuple, `(128, 160, 192)`, and call it in training
#   mode a few times: multi-scale training, one scale drawn per image.
