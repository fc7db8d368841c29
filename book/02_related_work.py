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
# # Related work: the R-CNN lineage
#
# **Paper:** section 2, "Related Work" ("R-CNN" and "Instance Segmentation").
# **Code:** `mrcnn/boxes.py` (IoU, box coding, NMS), `mrcnn/matcher.py` (labelling by IoU),
# `mrcnn/roi_align.py` (RoIPool, and the RoIAlign that replaces it).
# **Proof:** `tests/test_boxes.py` (IoU by hand, encode/decode round trip, NMS against a naive
# loop and against torchvision, bit for bit) and `tests/test_matcher.py`.
#
# Mask R-CNN is the fourth step of a line of detectors. Section 2 of the paper sums it up in
# three sentences: R-CNN "attend[s] to a manageable number of candidate object regions and
# evaluate[s] convolutional networks independently on each RoI"; it "was extended to allow
# attending to RoIs on feature maps using RoIPool, leading to fast speed and better accuracy";
# and "Faster R-CNN advanced this stream by learning the attention mechanism with a Region
# Proposal Network". Mask R-CNN adds a mask branch to Faster R-CNN and replaces RoIPool.
#
# The whole lineage shares a handful of small tools, which this chapter builds one by one:
# **boxes and IoU**, the **box coding** that turns "where is the object" into a regression
# target, **non-maximum suppression**, and **RoIPool**. They are in every later chapter.
#
# Legend: $R$ RoIs (regions of interest: candidate boxes), $G$ ground-truth objects, $D$
# detections; a box is $(x_1, y_1, x_2, y_2)$ in image pixels, its width is $x_2 - x_1$.

# %%
import math

import matplotlib.pyplot as plt
import torch

from book_helpers import show_source
from mrcnn.boxes import BoxCoder, batched_nms, box_iou, nms
from mrcnn.matcher import Matcher
from mrcnn.roi_align import roi_pool
from mrcnn.poolers import roi_align

torch.manual_seed(0)


def draw_box(ax, box, color, label=None, style="-", width=2.0):
    x1, y1, x2, y2 = [float(v) for v in box]
    ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linestyle=style,
                               linewidth=width, label=label))  # fmt: skip


# %% [markdown]
# ## Four detectors in one paragraph
#
# | | proposals | features per region | heads | test time per image, as reported (GPU) |
# |---|---|---|---|---|
# | **R-CNN** (2014) | ~2000 from Selective Search | the image region is warped to $227 \times 227$ and a whole CNN runs on it | SVM classifiers, box regression | ~47 s (VGG-16) |
# | **Fast R-CNN** (2015) | the same | one CNN pass on the whole image; **RoIPool** cuts each region's features out of the shared map | softmax classifier and box regression, trained together | 0.3 s + ~2 s of Selective Search |
# | **Faster R-CNN** (2015) | an **RPN** on the same features, sliding **anchors** | RoIPool | the same | ~0.2 s (VGG-16) |
# | **Mask R-CNN** (2017) | RPN (with FPN) | **RoIAlign** | + a mask branch, in parallel | ~0.2 s (ResNet-101-FPN) |
#
# Each step removed the most expensive part of the one before: R-CNN's thousands of CNN passes
# became one shared pass (Fast R-CNN), then the external proposal algorithm became a few
# convolutions on the shared features (Faster R-CNN). Mask R-CNN's changes are of another kind:
# a new output (a mask per object) and a fix to a rounding that boxes tolerated but masks do not.
#
# ## Boxes and IoU
#
# Everything in the lineage compares boxes by their **intersection over union**:
#
# $$\operatorname{IoU}(a, b) = \frac{|a \cap b|}{|a| + |b| - |a \cap b|} \in [0, 1].$$
#
# It decides which proposals count as an object during training (IoU $\ge 0.5$ with a
# ground-truth box, for the box head), which boxes NMS merges, and whether a detection is
# correct at evaluation (the "AP$_{50}$" and "AP$_{75}$" of the paper's tables).

# %%
box = torch.tensor([[20.0, 20.0, 80.0, 60.0]])  # 60 x 40
others = torch.tensor([[50.0, 30.0, 110.0, 70.0], [30.0, 25.0, 85.0, 65.0], [21.0, 21.0, 79.0, 61.0]])
ious = box_iou(box, others)[0]  # [3]

fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
for ax, other, iou in zip(axes, others, ious):
    x1, y1 = torch.max(box[0, :2], other[:2]).tolist()
    x2, y2 = torch.min(box[0, 2:], other[2:]).tolist()
    ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, color="tab:purple", alpha=0.3))
    draw_box(ax, box[0], "tab:blue")
    draw_box(ax, other, "tab:orange")
    ax.set_title(f"IoU = {iou.item():.2f}")
    ax.set_xlim(0, 120)
    ax.set_ylim(80, 0)
    ax.set_aspect("equal")
fig.suptitle("two boxes and their intersection (shaded)")
plt.show()

# %% [markdown]
# IoU is stricter than it looks. Slide a box of width $w$ sideways by $d$ against a copy of
# itself: the intersection is $w - d$ wide and the union $w + d$, so
# $\operatorname{IoU} = (w - d) / (w + d)$. An IoU of $0.5$ already means a shift of a third of
# the width, and the RPN's positive threshold $0.7$ allows less than a fifth:

# %%
width = 100.0
shifts = torch.linspace(0, 100, 201)
reference = torch.tensor([[0.0, 0.0, width, width]])
shifted = torch.stack([shifts, torch.zeros_like(shifts), shifts + width, torch.full_like(shifts, width)], dim=1)
iou_curve = box_iou(reference, shifted)[0]

fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(shifts, iou_curve, label="box_iou")
ax.plot(shifts, (width - shifts) / (width + shifts), "k:", label="(w - d) / (w + d)")
for threshold in (0.5, 0.7):
    d = width * (1 - threshold) / (1 + threshold)
    ax.axhline(threshold, color="gray", linewidth=0.5)
    ax.annotate(f"IoU {threshold}: d = {d:.1f}% of w", (d, threshold), (d + 10, threshold + 0.08),
                arrowprops=dict(arrowstyle="->"))  # fmt: skip
ax.set_xlabel("horizontal shift d (% of the width)")
ax.set_ylabel("IoU")
ax.legend()
plt.show()

# %% [markdown]
# The library computes all pairs at once, $[A, 4] \times [B, 4] \to [A, B]$, with the same
# operations in the same order as torchvision, so that the two agree to the last bit.

# %%
show_source(box_iou)

# %% [markdown]
# ### Which proposals are positives
#
# Training a detector starts by labelling each candidate box with the ground-truth box it
# overlaps most, if it overlaps it enough. The `Matcher` does it for the RPN (anchors: IoU
# $\ge 0.7$ positive, $< 0.3$ negative, in between ignored) and for the box head (proposals:
# $\ge 0.5$ positive). Below, two objects and six proposals; `-1` is background and `-2`
# ignored.

# %%
gt_boxes = torch.tensor([[10.0, 10.0, 50.0, 50.0], [60.0, 20.0, 100.0, 80.0]])  # [G, 4]
proposals = torch.tensor(
    [[12.0, 12.0, 50.0, 52.0], [20.0, 20.0, 60.0, 60.0], [0.0, 60.0, 30.0, 90.0],
     [62.0, 30.0, 98.0, 80.0], [40.0, 10.0, 80.0, 50.0], [55.0, 15.0, 95.0, 70.0]]
)  # [R, 4]
iou = box_iou(gt_boxes, proposals)  # [G, R]
print("IoU with each ground-truth box:\n", iou.round(decimals=2))
print("RPN rule (0.7 / 0.3):     ", Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou).tolist())
print("box head rule (0.5 / 0.5):", Matcher(0.5, 0.5)(iou).tolist())

# %% [markdown]
# ## Box coding: regressing a box
#
# A detector does not output box corners directly. It predicts how to *move* a reference box
# $P$ (an anchor, or a proposal) onto the object $G$, in units of $P$'s own size. With centres
# $(x, y)$ and sizes $(w, h)$ (R-CNN, appendix C):
#
# $$t_x = \frac{G_x - P_x}{P_w}, \quad t_y = \frac{G_y - P_y}{P_h}, \quad
#   t_w = \log\frac{G_w}{P_w}, \quad t_h = \log\frac{G_h}{P_h}.$$
#
# Dividing by $P$'s size makes the targets scale-invariant: the same $t$ means the same
# relative correction for a 30-pixel and a 300-pixel box; the logarithm makes "twice as wide" and
# "half as wide" symmetric ($\pm\log 2$). Decoding inverts it:
# $G_x = t_x P_w + P_x$, $G_w = e^{t_w} P_w$. (The box head also multiplies $t$ by fixed weights
# $(10, 10, 5, 5)$, only to give the four targets similar magnitudes.)

# %%
coder = BoxCoder()
proposal = torch.tensor([[30.0, 40.0, 110.0, 90.0]])  # [1, 4]: 80 x 50
ground_truth = torch.tensor([[45.0, 30.0, 135.0, 100.0]])  # [1, 4]: 90 x 70
deltas = coder.encode(ground_truth, proposal)  # [1, 4]
print("t = (t_x, t_y, t_w, t_h) =", [round(v, 4) for v in deltas[0].tolist()])
print("decode(t, P) =", coder.decode(deltas, proposal)[0, 0].tolist(), " G =", ground_truth[0].tolist())
larger = coder.encode(4 * ground_truth, 4 * proposal)  # [1, 4]
print("the same move, everything 4x larger: t =", [round(v, 4) for v in larger[0].tolist()])

# %% [markdown]
# `encode` is the four formulas, one line each. It first turns both sets of corners into
# centres and sizes ($P_x, P_y, P_w, P_h$ and $G_x, G_y, G_w, G_h$); each $t$ is then
# multiplied by its weight, $(w_x, w_y, w_w, w_h)$ = `BoxCoder(weights)`: all 1 by default and
# for the RPN, $(10, 10, 5, 5)$ for the box head. The reference boxes (here $G$) come first, the
# boxes they are measured from (here $P$) second, one of each per row.

# %%
show_source(BoxCoder.encode)

# %% [markdown]
# Scaling $t$ moves the decoded box part of the way: the figure decodes a quarter, a half and
# all of $t$. A trained head predicts the whole of it, or tries to.

# %%
fig, ax = plt.subplots(figsize=(5.5, 4))
draw_box(ax, proposal[0], "tab:blue", "proposal P", style="--")
for fraction, color in ((0.25, "#f3c58d"), (0.5, "#ed9e45"), (1.0, "tab:orange")):
    refined = coder.decode(fraction * deltas, proposal)[0, 0]
    draw_box(ax, refined, color, f"decode({fraction} t, P)", width=3.0 if fraction == 1.0 else 2.0)
draw_box(ax, ground_truth[0], "black", "ground truth G", style=":", width=1.5)
p_centre = ((proposal[0, 0] + proposal[0, 2]) / 2, (proposal[0, 1] + proposal[0, 3]) / 2)
g_centre = ((ground_truth[0, 0] + ground_truth[0, 2]) / 2, (ground_truth[0, 1] + ground_truth[0, 3]) / 2)
ax.annotate("", g_centre, p_centre, arrowprops=dict(arrowstyle="->", color="tab:red"))
ax.set_xlim(0, 160)
ax.set_ylim(120, 0)
ax.set_aspect("equal")
ax.legend(loc="lower right", fontsize=8)
ax.set_title("a proposal and its refinement by box coding")
plt.show()

# %% [markdown]
# One detail guards against early training: a wild $t_w$ would overflow $e^{t_w}$, so decoding
# clamps $t_w, t_h$ at $\log(1000 / 16)$ (a box at most 62.5 times its reference).

# %%
wild = coder.decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), proposal)[0, 0]  # t_w = t_h = 100
print(f"t_w = 100 decodes to a width of {(wild[2] - wild[0]).item():.0f} "
      f"= 62.5 x {(proposal[0, 2] - proposal[0, 0]).item():.0f}, not e^100 x 80")

# %% [markdown]
# `decode` runs the formulas backwards. It takes $k$ sets of deltas per reference box,
# `[B, 4k]`, and returns `[B, k, 4]`: the box head predicts one $t$ per class and decodes them
# all at once. It divides the weights back out, clamps $t_w$ and $t_h$ as just seen, computes
# the centre $G_x = t_x P_w + P_x$ and size $G_w = e^{t_w} P_w$, and returns to corners.

# %%
show_source(BoxCoder.decode)

# %% [markdown]
# ## Non-maximum suppression
#
# A detector fires many times around each object: neighbouring anchors and proposals all
# converge on it. **NMS** keeps the best of each cluster: visit the boxes by decreasing score,
# keep a box unless an already kept box overlaps it with IoU above a threshold. It runs twice in
# Mask R-CNN: on the RPN's proposals (IoU 0.7, within each FPN level) and on the final detections
# (IoU 0.5, within each class).

# %%
# the first two overlap (IoU 0.2)
objects = torch.tensor([[40.0, 30.0, 120.0, 110.0], [80.0, 50.0, 180.0, 130.0], [210.0, 20.0, 260.0, 70.0]])
jitter = torch.randn(3, 8, 4) * torch.tensor([6.0, 6.0, 6.0, 6.0])  # 8 noisy detections per object
candidates = (objects[:, None, :] + jitter).reshape(-1, 4)  # [24, 4]
quality = box_iou(candidates, objects).max(dim=1).values  # [24]: how good each candidate is
scores = (quality + 0.1 * torch.rand(24)).clamp(max=1.0)  # a score that mostly follows the quality
keep = nms(candidates, scores, iou_threshold=0.5)

fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
panels = ((axes[0], range(len(candidates)), f"before NMS: {len(candidates)} boxes (colour: score)"),
          (axes[1], keep.tolist(), f"after NMS (IoU > 0.5): {len(keep)} boxes"))  # fmt: skip
for ax, chosen, title in panels:
    for i in chosen:
        draw_box(ax, candidates[i], plt.cm.viridis(scores[i].item()), width=1.5)
    for obj in objects:
        draw_box(ax, obj, "black", style=":", width=1.0)
    ax.set_xlim(0, 280)
    ax.set_ylim(160, 0)
    ax.set_aspect("equal")
    ax.set_title(title)
plt.show()
print("kept (best first):", keep.tolist(), " scores:", [round(s, 2) for s in scores[keep].tolist()])

# %% [markdown]
# The threshold trades duplicates against missed neighbours: too low and the middle object,
# which overlaps its neighbour, is suppressed by it; too high and duplicates survive.

# %%
for threshold in (0.1, 0.3, 0.5, 0.7, 0.9):
    print(f"IoU threshold {threshold}: {len(nms(candidates, scores, threshold)):2d} boxes kept")

# %% [markdown]
# The library's `nms` keeps exactly the boxes torchvision keeps: a box is suppressed only when
# IoU is *strictly* above the threshold, equal scores keep the lower index first, and the
# comparison is made as torchvision's C++ kernel makes it, in double precision. Its docstring
# states the greedy rule as a triangular system and the plan for solving it; the code comes in
# two pieces. The first ranks the boxes by score and prepares the threshold:

# %%
show_source(nms, stop="threshold_low = float(")

# %% [markdown]
# The sort is stable, which is what keeps the lower index first among equal scores. The
# threshold lines spare a conversion: torchvision computes the IoU in the boxes' dtype and
# compares it with the threshold $t$ as a double; such an IoU is above $t$ exactly when it is
# above $t'$, the largest value of its dtype not above $t$, so the IoUs are compared with $t'$
# as they are.
#
# The second piece is the greedy pass itself, a block of `block_size` boxes (256) at a time.
# Inside a block, step 1 repeats $\text{keep}_j \leftarrow \neg \exists i < j:
# \text{keep}_i \wedge S_{ij}$ until nothing changes, which is the greedy answer; step 2 lets
# the block's kept boxes drop the later boxes they overlap. IoUs are computed only for boxes
# still alive, so a crowd of overlapping proposals, mostly dropped by the first blocks, costs
# little:

# %%
show_source(nms, start="alive = torch.ones")

# %% [markdown]
# `batched_nms` runs NMS within each category (class or FPN level) and never across. For few
# boxes it shifts each category into its own stretch of the plane, where no box of another
# category can overlap it, and runs one NMS; for many it runs one NMS per category, as
# torchvision chooses, so that the two agree bit for bit.

# %%
show_source(batched_nms)

# %% [markdown]
# ## RoIPool, and why its rounding matters
#
# Fast R-CNN's key step: from one shared feature map (stride 16 in the paper's C4 backbone),
# cut out each RoI's features and pool them to a fixed $P \times P$ grid ($7 \times 7$), so that
# a fully connected head can follow. RoIPool does it with two roundings: the RoI's corners are
# rounded to whole feature cells ($[x / 16]$), and the RoI is divided into $P \times P$ bins whose
# borders are rounded too; each bin takes the max of its cells.
#
# Below, a feature map of stride 16 whose value is simply the column index ($F[y, x] = x$), and a
# RoI 64 pixels wide slid to the right one pixel at a time. A good pooling should follow the
# RoI smoothly; RoIPool moves in jumps of a whole cell, 16 pixels, and ignores everything in
# between. RoIAlign (section 3 of the paper, and its own chapter) samples the map by bilinear
# interpolation at exact positions, so its output follows the RoI.

# %%
stride = 16
features = torch.arange(12, dtype=torch.float32).repeat(12, 1)[None, None]  # [N=1, C=1, 12, 12]: F[y, x] = x
offsets = torch.arange(0, 49, dtype=torch.float32)  # slide the RoI by 0..48 image pixels
rois = torch.stack([torch.zeros_like(offsets), 8 + offsets, torch.full_like(offsets, 8.0), 72 + offsets,
                    torch.full_like(offsets, 72.0)], dim=1)  # [R, 5]
pooled_max = roi_pool(features, rois, output_size=2, spatial_scale=1 / stride)  # [R, 1, 2, 2]
pooled_align = roi_align(features, rois, output_size=2, spatial_scale=1 / stride, sampling_ratio=2, aligned=True)

fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
axes[0].imshow(features[0, 0], cmap="Greys", extent=(0, 12 * stride, 12 * stride, 0), alpha=0.5)
for index, color in ((0, "tab:blue"), (20, "tab:orange")):
    x1, y1, x2, y2 = rois[index, 1:].tolist()
    draw_box(axes[0], (x1, y1, x2, y2), color, f"RoI shifted by {index} px")
    qx1, qy1, qx2, qy2 = [math.floor(v / stride + 0.5) * stride for v in (x1, y1, x2, y2)]  # rounded to cells
    draw_box(axes[0], (qx1, qy1, qx2 + stride, qy2 + stride), color, "cells RoIPool reads", style=":")
axes[0].set_xticks(range(0, 12 * stride + 1, stride), minor=True)
axes[0].set_yticks(range(0, 12 * stride + 1, stride), minor=True)
axes[0].grid(which="minor", linewidth=0.3)
axes[0].set_xlim(0, 12 * stride)
axes[0].set_ylim(8 * stride, 0)
axes[0].legend(fontsize=7, loc="lower right")
axes[0].set_title("RoIs on a stride-16 feature grid")
axes[1].plot(offsets, pooled_max[:, 0, 0, 0], drawstyle="steps-post", label="RoIPool, left bin (max)")
axes[1].plot(offsets, pooled_align[:, 0, 0, 0], label="RoIAlign, left bin (average)")
axes[1].set_xlabel("RoI shift (image pixels)")
axes[1].set_ylabel("pooled feature")
axes[1].legend()
axes[1].set_title("pooled output as the RoI slides")
plt.show()

# %% [markdown]
# A misalignment of up to half a cell, 8 image pixels here, barely changes a classification:
# the object is still the object. It is ruinous for a mask, which must line up with the object's
# edges to the pixel; the paper measures the difference in Tables 2c and 2d (RoIAlign gains about
# 3 mask AP over RoIPool at stride 16, 7.3 at stride 32, and more at AP$_{75}$) and the RoIAlign
# chapter builds the fix. This is the
# library's RoIPool, kept as the baseline for that ablation:

# %%
show_source(roi_pool)

# %% [markdown]
# ## What to try next
#
# - Plot IoU against a *scale* change instead of a shift: a box against a copy $s$ times larger
#   and concentric has IoU $1/s^2$. Which scale error does the 0.7 threshold allow?
# - Replace the log in $t_w$ by a plain ratio $G_w / P_w - 1$ and look at the targets of boxes
#   half and twice as wide as their reference: why does the log suit a symmetric loss better?
# - Make NMS "soft" (Bodla et al., 2017): instead of removing an overlapping box, multiply its
#   score by $1 - \text{IoU}$. Write it with `box_iou` in a loop of a few lines, and compare the
#   boxes kept on the cluster above.
# - Time `nms` on 500, 2000 and 8000 random boxes. The IoU matrix grows with the square of the
#   number of boxes: where does the time go, and why does the RPN run NMS per FPN level?
# - Slide the RoI of the last figure vertically as well, or with a finer stride (8 or 4, as the
#   FPN levels do): how does RoIPool's jump shrink?
