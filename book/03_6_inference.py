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
# # Inference
#
# **Paper:** section 3.1, "Implementation Details", paragraph "Inference".
# **Code:** the box branch's post-processing in `mrcnn/box_head.py` (`refine_boxes`,
# `detection_candidates`, `postprocess_detections`), non-maximum suppression in
# `mrcnn/boxes.py`, the mask of the predicted class in `mrcnn/mask_head.py`
# (`MaskBranch.predict`), and pasting the masks into the image in `mrcnn/inference.py`.
# **Proof:** `tests/test_box_head.py` (a strict score threshold, NMS per class, the best
# detections first, and torchvision's post-processing on the same inputs), `tests/test_boxes.py`
# (NMS against the greedy loop and torchvision), `tests/test_inference.py` (pasting by hand,
# against torchvision's `paste_masks_in_image`, and its speed).
#
# Training runs the three branches in parallel on the same sampled RoIs. Inference does not:
#
# > "At test time, the proposal number is 300 for the C4 backbone (as in [36]) and 1000 for FPN
# > (as in [27]). We run the box prediction branch on these proposals, followed by non-maximum
# > suppression. The mask branch is then applied to the highest scoring 100 detection boxes.
# > Although this differs from the parallel computation used in training, it speeds up
# > inference and improves accuracy (due to the use of fewer, more accurate RoIs). The mask
# > branch can predict $K$ masks per RoI, but we only use the $k$-th mask, where $k$ is the
# > predicted class by the classification branch. The $m \times m$ floating-number mask output
# > is then resized to the RoI size, and binarized at a threshold of 0.5."
#
# This chapter takes a trained model and one image through those steps one at a time, with the
# library's own functions, and checks at the end that the result is the model's own output.
#
# Legend: $R$ RoIs (here the proposals), $K$ classes (background included), $D$ detections,
# $M$ mask size (28), $H \times W$ the image.

# %%
# %matplotlib inline
import math
import os
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.patches import Rectangle

from book_helpers import show_source, trained_shapes_model
from mrcnn.box_head import detection_candidates, postprocess_detections, refine_boxes
from mrcnn.boxes import batched_nms, box_iou
from mrcnn.data.shapes import ShapesDataset
from mrcnn.inference import expand_boxes, paste_matrix, paste_masks
from mrcnn.mask_head import MaskBranch
from mrcnn.model import MaskRCNN
from mrcnn.transform import resize_boxes
from mrcnn.visualize import INSTANCE_COLOURS, draw_detections, image_to_array

torch.set_num_threads(1)  # small tensors: a second thread barely helps, and on a shared machine it waits
_ = torch.manual_seed(0)

# %% [markdown]
# ## A trained model and a held-out image
#
# The chapter needs a model that detects something: the book's own (`trained_shapes_model`, the
# `shapes_small` preset trained once from a fixed seed and kept in `runs/book/`, shared with the
# introduction; its settings are printed there). The image is one of the held-out pictures of
# the shapes data set, which the model never trained on: the one with the most
# objects among the first eight.

# %%
model = trained_shapes_model()
class_names = ShapesDataset.category_names  # ("__background__", "circle", "square", "triangle", "star")
held_out = ShapesDataset(8, seed=0, split="val")
image, target = max((held_out[i] for i in range(len(held_out))), key=lambda sample: len(sample[1]["labels"]))
print(f"image {list(image.shape)}, {len(target['labels'])} objects: {[class_names[k] for k in target['labels']]}")
config = model.config
print(f"K = {config.num_classes} classes; proposals at test time: {config.rpn_post_nms_top_n_test} "
      f"(the paper's FPN: 1000); score threshold {config.box_score_thresh}, per-class NMS at IoU "
      f"{config.box_nms_thresh}, at most {config.detections_per_image} detections (the paper: 100)")

# %% [markdown]
# ## Step 1: the proposals
#
# Everything before the box branch is the same as in training: the image is resized and
# normalized, the backbone and the FPN compute $P_2 \ldots P_6$, and the RPN proposes $R$ boxes
# (after its own NMS at IoU 0.7). These are exactly the calls `MaskRCNN.forward` makes, in the
# same order.

# %%
with torch.no_grad():
    batch, image_sizes, _ = model.transform([image])  # [1, 3, H_pad, W_pad]
    if config.fast_convolutions:  # as forward does: the layout CPU convolutions run fastest in
        batch = batch.contiguous(memory_format=torch.channels_last)
    features, roi_features = model.feature_maps(batch)  # P2..P6 for the RPN, P2..P5 for the RoIs, each [1, C, H_l, W_l]
    (proposals,), _ = model.rpn(features, image_sizes, tuple(batch.shape[-2:]))  # [R, 4], best first
print(f"{len(proposals)} proposals for the {image_sizes[0]} image")

# %% [markdown]
# ## Step 2: every proposal refined once per class
#
# The box branch pools a $7 \times 7$ feature for each of the $R$ proposals and predicts $K$
# class scores and $K$ box refinements per RoI: `class_logits` $[R, K]$ and `box_deltas`
# $[R, 4K]$. Each refinement $t^k = (t_x, t_y, t_w, t_h)$ moves the proposal
# $(x_a, y_a, w_a, h_a)$ (centre, width, height) to the box of class $k$,
#
# $$x = x_a + w_a \frac{t_x}{10}, \quad y = y_a + h_a \frac{t_y}{10}, \quad
#   w = w_a \exp\!\Big(\frac{t_w}{5}\Big), \quad h = h_a \exp\!\Big(\frac{t_h}{5}\Big),$$
#
# (the weights 10, 10, 5, 5 of the box coder; chapter "Related work"), clipped to the image. The
# score of the pair (RoI $r$, class $k$) is the softmax probability $p_{r,k}$. So $R$ proposals
# give $R(K-1)$ candidate detections, one per foreground class: a class-specific box and score each.

# %%
with torch.no_grad():
    class_logits, box_deltas = model.box_branch.logits_and_deltas(roi_features, [proposals])  # [R, K], [R, 4K]
(refined,), (scores,) = refine_boxes(class_logits, box_deltas, [proposals], image_sizes, model.box_branch.box_coder)
print(f"class_logits {list(class_logits.shape)}, box_deltas {list(box_deltas.shape)} -> "
      f"refined boxes {list(refined.shape)}, scores {list(scores.shape)}")
show_source(refine_boxes)

# %% [markdown]
# ## Step 3: the score threshold
#
# Most of the $R(K-1)$ pairs are background or the wrong class, with a tiny probability. Pairs
# scoring $p_{r,k} \le 0.05$ are dropped (and boxes clipped to under 0.01 pixel, which can
# happen at the image border).

# %%
candidate_boxes, candidate_scores, candidate_labels = detection_candidates(refined, scores, config.box_score_thresh)
print(f"{refined.shape[0] * (refined.shape[1] - 1)} (RoI, class) pairs -> {len(candidate_scores)} above "
      f"{config.box_score_thresh}")
show_source(detection_candidates)

# %% [markdown]
# ## Step 4: non-maximum suppression per class, and the best 100
#
# Many proposals cover the same object, so many candidates of the same class overlap. NMS keeps
# the best-scoring one and drops every candidate of *the same class* that overlaps it with IoU
# above 0.5, then repeats with the next best survivor. Candidates of different classes never
# suppress each other: a square and a star at the same place are two hypotheses, and both may
# survive (the class scores sort them out). `batched_nms` does this for all classes in one NMS
# by shifting each class's boxes into its own stretch of the plane. Of the survivors, the best
# `detections_per_image` remain (100 in the paper, 50 in the small preset).

# %%
keep = batched_nms(candidate_boxes, candidate_scores, candidate_labels, config.box_nms_thresh)
keep = keep[: config.detections_per_image]
boxes, box_scores, labels = candidate_boxes[keep], candidate_scores[keep], candidate_labels[keep]
print(f"{len(candidate_scores)} candidates -> {len(keep)} detections after per-class NMS")
for box, score, label in list(zip(boxes, box_scores, labels))[:8]:
    print(f"  {class_names[label]:9s} {score:.3f}  box {[round(v, 1) for v in box.tolist()]}")

# the same as the box branch's own post-processing
expected = postprocess_detections(class_logits, box_deltas, [proposals], image_sizes, model.box_branch.box_coder,
                                  config.box_score_thresh, config.box_nms_thresh, config.detections_per_image)
assert all(torch.equal(mine, theirs[0]) for mine, theirs in zip((boxes, box_scores, labels), expected))
show_source(postprocess_detections, batched_nms)

# %% [markdown]
# The four steps on the picture. Second panel: every class-specific box, drawn with an opacity
# equal to its score, so the background and wrong-class refinements fade out; the last two are
# coloured by class.


# %%
def show_boxes(panel, boxes, colours, alphas=None, title=""):
    panel.imshow(image_to_array(image))
    for index, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        colour = colours[index] if isinstance(colours, list) else colours
        alpha = 1.0 if alphas is None else float(alphas[index])
        panel.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=0.8, alpha=alpha))
    panel.set_title(title, fontsize=9)
    panel.set_axis_off()


class_colours = {k: INSTANCE_COLOURS[k] for k in range(1, config.num_classes)}
figure, axes = plt.subplots(1, 4, figsize=(14, 3.8), layout="constrained")
show_boxes(axes[0], proposals, "cyan", title=f"1. {len(proposals)} proposals")
foreground = refined[:, 1:].reshape(-1, 4)  # [R (K-1), 4]
foreground_labels = torch.arange(1, config.num_classes).repeat(len(proposals))  # [R (K-1)]
show_boxes(axes[1], foreground, [class_colours[int(k)] for k in foreground_labels], scores[:, 1:].reshape(-1),
           title=f"2. {len(foreground)} class-specific boxes")
show_boxes(axes[2], candidate_boxes, [class_colours[int(k)] for k in candidate_labels],
           title=f"3. {len(candidate_boxes)} with score > {config.box_score_thresh}")
show_boxes(axes[3], boxes, [class_colours[int(k)] for k in labels], box_scores.clamp(0.2, 1),
           title=f"4. {len(boxes)} after per-class NMS")
axes[3].legend(handles=[Rectangle((0, 0), 1, 1, color=c, label=class_names[k]) for k, c in class_colours.items()],
               fontsize=7, loc="lower right")
plt.show()

# %% [markdown]
# A low threshold (0.05) keeps weak detections: they cost nothing in AP, which rewards a good
# ranking rather than a good cut (chapter 4.1), and an application chooses its own cut later.
#
# ## Step 5: the mask branch, on the detections only
#
# Now, and only now, the mask branch runs: on the $D$ detected boxes, not on the $R$
# proposals. Two reasons, in the paper's words: it "speeds up inference" (here $D$ RoIs
# instead of $R$; with the paper's model, at most 100 instead of 1000) "and improves accuracy
# (due to the use of fewer, more accurate RoIs)": a detection's box has been refined by the box
# branch and is better aligned with its object than the proposal it came from. Measured on this
# image, the IoU with the best-matching ground-truth box, for each detection and for its
# proposal:

# %%
def source_proposal(box, label):
    """The proposal whose refinement for class `label` is `box`."""
    return int((refined[:, label] - box).abs().sum(dim=1).argmin())


best = slice(0, min(5, len(boxes)))  # the five best detections
sources = torch.tensor([source_proposal(b, k) for b, k in zip(boxes[best], labels[best])], dtype=torch.int64)
truth = resize_boxes(target["boxes"], tuple(image.shape[-2:]), image_sizes[0])  # [G, 4] in the resized image
proposal_iou = box_iou(proposals[sources], truth).amax(dim=1)
detection_iou = box_iou(boxes[best], truth).amax(dim=1)
print(f"IoU with the ground truth, the {len(detection_iou)} best detections:")
print("  their proposals:", [round(v, 3) for v in proposal_iou.tolist()])
print("  refined boxes:  ", [round(v, 3) for v in detection_iou.tolist()])
seconds = {"proposals": [], "detections": []}
with torch.no_grad():
    for _ in range(3):  # the best of three: the first call also allocates
        for name, rois in (("proposals", proposals), ("detections", boxes)):
            started = time.perf_counter()
            mask_logits = model.mask_branch.mask_logits(roi_features, [rois])  # [R or D, K, M, M]
            seconds[name].append(time.perf_counter() - started)
print(f"mask branch on the {len(proposals)} proposals: {1000 * min(seconds['proposals']):.0f} ms; "
      f"on the {len(boxes)} detections: {1000 * min(seconds['detections']):.0f} ms")

# %% [markdown]
# The mask branch predicts $K$ masks of $M \times M = 28 \times 28$ logits per box, one per
# class. Only the mask of the predicted class $k$ is used (the box branch decides the class, the
# mask branch only the shape), through its sigmoid: a probability per cell.

# %%
detection_index = torch.arange(len(labels))
probabilities = mask_logits[detection_index, labels].sigmoid()[:, None]  # [D, 1, M, M]
print(f"mask_logits {list(mask_logits.shape)} -> probabilities of the predicted class {list(probabilities.shape)}")
show_source(MaskBranch.predict)

# %% [markdown]
# The best four detections: the image inside the box, the $28 \times 28$ probabilities of the
# predicted class, and, for contrast, the mask of another class, which the model was never asked
# to get right for this object. The two often look alike: on shapes, what is object and what is
# background hardly depends on the class, and the paper found a single class-agnostic mask
# "nearly as effective" (29.7 against 30.3 mask AP, ResNet-50-C4).

# %%
shown = min(4, len(boxes))
figure, axes = plt.subplots(3, max(shown, 1), figsize=(2.4 * max(shown, 1), 7), layout="constrained", squeeze=False)
for d in range(shown):
    x1, y1, x2, y2 = boxes[d].round().int().tolist()
    axes[0, d].imshow(image_to_array(image)[max(y1, 0) : y2 + 1, max(x1, 0) : x2 + 1])
    axes[0, d].set_title(f"{class_names[labels[d]]} {box_scores[d]:.2f}", fontsize=9)
    axes[1, d].imshow(probabilities[d, 0], cmap="gray", vmin=0, vmax=1)
    axes[1, d].set_title(f"mask of '{class_names[labels[d]]}'", fontsize=9)
    other = 1 + int(labels[d]) % (config.num_classes - 1)  # the next foreground class
    axes[2, d].imshow(mask_logits[d, other].sigmoid(), cmap="gray", vmin=0, vmax=1)
    axes[2, d].set_title(f"mask of '{class_names[other]}' (unused)", fontsize=9)
for panel in axes.flat:
    panel.set_axis_off()
plt.show()

# %% [markdown]
# ## Step 6: back to the original image, and pasting
#
# The boxes were found in the resized image; `resize_boxes` scales them back to the original
# (an identity here: the shapes are drawn at 128 pixels, the size the model works at). Then
# each $28 \times 28$ probability map is "resized to the RoI size": the mask covers the box, so
# a box of $w \times h$ pixels needs the map resampled to $h \times w$ and placed at the box's
# position in an $H \times W$ canvas. `mrcnn/inference.py` does it with the arithmetic of
# torchvision's `paste_masks_in_image`:
#
# 1. pad the mask with one pixel of zeros, $M \to S = M + 2 = 30$, and enlarge the box by
#    $S/M$ about its centre, so the mask fades out across the box's edge;
# 2. cut the enlarged box to whole pixels: columns $x_0 \ldots x_1$, $w = x_1 - x_0 + 1$;
# 3. resize bilinearly (`align_corners=False`): box pixel $i$ reads the padded mask at
#    $s(i) = \max\!\big(\tfrac{S}{w}(i + \tfrac12) - \tfrac12,\ 0\big)$, between cells
#    $\lfloor s \rfloor$ and $\lfloor s \rfloor + 1$ with weights $1 - (s - \lfloor s \rfloor)$
#    and $s - \lfloor s \rfloor$.
#
# Bilinear resizing is separable: first along the columns, then along the rows. Both steps are
# matrix products, and the placement in the canvas folds into the same matrices: row $y$ of
# $A_y$ holds the two weights of image row $y$ when it lies in the box, zeros elsewhere. So for
# detection $d$
#
# $$\text{pasted}_d = A_y(d)\; \text{mask}_d\; A_x(d)^\top \qquad [H, S]\,[S, S]\,[S, W] = [H, W],$$
#
# and all $D$ detections are two batched matrix products, with no Python loop over them. Here
# are the two matrices of the best detection, built by the library's `paste_matrix`:

# %%
original_size = tuple(image.shape[-2:])
boxes_in_image = resize_boxes(boxes, image_sizes[0], original_size)  # [D, 4] in the original image
d = 0
padding, mask_size = 1, probabilities.shape[-1]
padded = F.pad(probabilities[d : d + 1, 0], (padding,) * 4)  # [1, S, S]
S = mask_size + 2 * padding
x0, y0, x1, y1 = expand_boxes(boxes_in_image[d : d + 1], S / mask_size).to(torch.int64)[0].tolist()
A_y = paste_matrix(torch.tensor([y0]), torch.tensor([y1 - y0 + 1]), original_size[0], S, padded.dtype)[0]  # [H, S]
A_x = paste_matrix(torch.tensor([x0]), torch.tensor([x1 - x0 + 1]), original_size[1], S, padded.dtype)[0]  # [W, S]
by_hand = A_y @ padded[0] @ A_x.T  # [H, W]
pasted = paste_masks(probabilities, boxes_in_image, original_size)  # [D, 1, H, W]
print(f"box {[round(v, 1) for v in boxes_in_image[d].tolist()]} -> enlarged, whole pixels: "
      f"columns {x0}..{x1}, rows {y0}..{y1}")
print(f"A_y {list(A_y.shape)}, A_x {list(A_x.shape)}; A_y mask A_x^T against paste_masks: "
      f"max difference {(by_hand - pasted[d, 0]).abs().max():.1e}")
inside = A_x[max(x0, 0) : min(x1, original_size[1] - 1) + 1]  # the rows of the image columns inside the box
print("each row of A_x inside the box sums to 1:", bool(torch.allclose(inside.sum(1), torch.ones(len(inside)))))

figure, axes = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained")
axes[0].imshow(A_y, cmap="viridis", aspect="auto")
axes[0].set(title=f"$A_y$ [{original_size[0]}, {S}]: rows {y0}..{y1} of the image", xlabel="cell of the padded mask",
            ylabel="image row")
axes[1].imshow(A_x, cmap="viridis", aspect="auto")
axes[1].set(title=f"$A_x$ [{original_size[1]}, {S}]: columns {x0}..{x1}", xlabel="cell of the padded mask",
            ylabel="image column")
plt.show()
show_source(paste_masks, paste_matrix)

# %% [markdown]
# The same mask before and after pasting, and binarized at 0.5 ("binarized at a threshold of
# 0.5"). The dashed rectangle is the detected box: the pasted probabilities reach a little past
# it (the padding), and fall through 0.5 where the object's edge is.

# %%
figure, axes = plt.subplots(1, 3, figsize=(11, 3.8), layout="constrained")
axes[0].imshow(probabilities[d, 0], cmap="gray", vmin=0, vmax=1)
axes[0].set_title(f"{mask_size} x {mask_size} probabilities ({class_names[labels[d]]})", fontsize=9)
margin = 6
bx1, by1, bx2, by2 = boxes_in_image[d].tolist()
view = (max(int(bx1) - margin, 0), min(int(bx2) + margin, original_size[1] - 1),
        max(int(by1) - margin, 0), min(int(by2) + margin, original_size[0] - 1))
for panel, values, title in ((axes[1], pasted[d, 0], f"pasted into the {original_size[0]} x {original_size[1]} image"),
                             (axes[2], (pasted[d, 0] >= 0.5).float(), "binarized at 0.5")):
    panel.imshow(values, cmap="gray", vmin=0, vmax=1)
    panel.add_patch(Rectangle((bx1 - 0.5, by1 - 0.5), bx2 - bx1, by2 - by1, fill=False, edgecolor="tab:orange",
                              linestyle="--", linewidth=1.2))
    panel.set_xlim(view[0] - 0.5, view[1] + 0.5)
    panel.set_ylim(view[3] + 0.5, view[2] - 0.5)
    panel.set_title(title + " (zoomed to the box)", fontsize=9)
for panel in axes:
    panel.set_axis_off()
plt.show()

# %% [markdown]
# The rectangle is drawn at $x_1 - \tfrac12$ because `imshow` centres pixel $j$ on $j$, while a
# box coordinate $x$ is the left edge of pixel $x$.
#
# ## One paste for all detections, against a loop
#
# torchvision pastes the masks one detection at a time: resize the padded mask to the box with
# `F.interpolate`, then copy it into its place in the canvas. Written out here, it gives the
# same probabilities to float rounding:


# %%
def paste_one_by_one(masks, boxes, image_size, padding=1):
    """torchvision's loop: for each detection, resize its padded mask to the whole-pixel box, then place it."""
    height, width = image_size
    size = masks.shape[-1] + 2 * padding
    padded = F.pad(masks[:, 0], (padding,) * 4)  # [D, S, S]
    boxes = expand_boxes(boxes, size / masks.shape[-1]).to(torch.int64)  # [D, 4]
    canvas = masks.new_zeros(len(masks), 1, height, width)
    for d, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        resized = F.interpolate(padded[d][None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        top, left, bottom, right = max(y0, 0), max(x0, 0), min(y0 + h, height), min(x0 + w, width)
        canvas[d, 0, top:bottom, left:right] = resized[top - y0 : bottom - y0, left - x0 : right - x0]
    return canvas


looped = paste_one_by_one(probabilities, boxes_in_image, original_size)
print(f"{len(boxes)} masks: largest difference between the two {(looped - pasted).abs().max():.1e}")


# %% [markdown]
# Which is faster? The two do different work. The batched products compute every pixel of the
# canvas for every detection, about $2 D H W S$ multiply-adds, in two large operations; the loop
# touches only each box's own pixels, but pays Python and a few small operations per detection.
# Both write the $D \times H \times W$ result. Timed on 50 masks in this small image, and on 100
# masks of random boxes in an image of COCO's size ($800 \times 1066$):

# %%
def best_of(function, repeats):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


generator = torch.Generator().manual_seed(0)
for count, size, repeats in ((50, original_size, 20), (100, (800, 1066), 3)):
    corners = torch.rand(count, 2, generator=generator) * torch.tensor([size[1], size[0]]) * 0.8  # [D, 2] (x, y)
    extent = 8 + torch.rand(count, 2, generator=generator) * min(size) * 0.3  # [D, 2]
    test_boxes = torch.cat([corners, corners + extent], dim=1)  # [D, 4]
    test_masks = torch.rand(count, 1, 28, 28, generator=generator)
    batched = best_of(lambda: paste_masks(test_masks, test_boxes, size), repeats)
    loop = best_of(lambda: paste_one_by_one(test_masks, test_boxes, size), repeats)
    print(f"{count} masks into {size[0]} x {size[1]}: batched {1000 * batched:6.1f} ms, "
          f"one by one {1000 * loop:6.1f} ms (batched / one by one: {batched / loop:.2f})")
print(f"(best of several runs, 1 thread, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")

# %% [markdown]
# Compare the two on each image size above. Where the loop wins, on a CPU and on the large
# image, the reason is arithmetic: the batched products spend $2 \times 100 \times 800 \times
# 1066 \times 30 \approx 5$ GFLOP mostly on zeros, since a box covers a small part of the image,
# while the loop touches each box's own pixels only. The
# batched form buys something else: a fixed sequence of a few large operations whatever $D$, with
# no Python per detection, which is what a GPU (one launch instead of $D$) and a traced or
# compiled graph want.

# %% [markdown]
# ## The whole of it, and the model's own answer
#
# Put together, the steps above are `MaskRCNN.forward` in evaluation mode: the box branch with
# `postprocess_detections`, then `MaskBranch.predict` on the detections, `resize_boxes`, and
# `paste_detection_masks`:

# %%
show_source(MaskRCNN.forward)

# %% [markdown]
# The model's own call gives the same detections (to float rounding: the convolutions ran
# twice, and oneDNN may sum in another order from one call to the next):

# %%
with torch.no_grad():
    (result,) = model([image])
assert torch.equal(result["labels"], labels)
torch.testing.assert_close(result["boxes"], boxes_in_image)
torch.testing.assert_close(result["scores"], box_scores)
torch.testing.assert_close(result["masks"], pasted)
print({key: list(value.shape) for key, value in result.items()})

# a cut at 0.5, or lower for a briefly trained model whose scores stay low: the best G detections
cut = min(0.5, float(result["scores"][: len(target["labels"])].min())) if len(result["scores"]) else 0.5
cut = math.floor(100 * cut) / 100  # two decimals, rounded down
figure, axes = plt.subplots(1, 2, figsize=(8, 4.2), layout="constrained")
count = draw_detections(axes[0], image, result, class_names, score_threshold=cut)
axes[0].set_title(f"the model: {count} detections with score >= {cut:.2f}", fontsize=9)
draw_detections(axes[1], image, target, class_names)
axes[1].set_title("the ground truth", fontsize=9)
plt.show()

# %% [markdown]
# The picture keeps the detections scoring at least 0.5 (or, for a model whose scores are
# still low, as many as there are objects); the model returns up to `detections_per_image`, down
# to a score of 0.05, with their masks as probabilities (binarize at 0.5). How good they are is
# chapter 4.1's question: COCO AP over the held-out images.
#
# ## What to try next
#
# - Raise `box_nms_thresh` to 0.7 or lower it to 0.3 (`model.box_branch.nms_thresh`) and watch
#   duplicates appear or neighbouring objects of the same class vanish.
# - Run the mask branch on the proposals instead of the detections, take each proposal's best
#   class, and compare the pasted masks with the ground truth: the paper's "fewer, more accurate
#   RoIs" in numbers.
# - Paste with `padding=0` and look at the border of a large mask: without the zero border, the
#   mask stops sharply at the box's edge.
# - Class-agnostic NMS: call `batched_nms` with all labels equal, and find the image where a
#   square and a star overlapping at the same place lose one of the two.
# - Time `paste_masks` against the loop on images of other sizes, and find the crossover.
