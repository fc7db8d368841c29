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
# # Inspecting a trained model
#
# **Paper:** all of section 3 as one picture each: "Faster R-CNN" (backbone, FPN, anchors, the
# RPN), "RoIAlign", "Mask Representation", and section 3.1, "Implementation Details" (the
# training targets, and the paragraph "Inference").
# **Code:** `mrcnn/inspection.py` (`inspect_image`: every intermediate of one image, by name,
# read in one step per stage) and `mrcnn/inspection_figures.py` (one figure per stage).
# **Proof:** `tests/test_inspection.py` (each recorded intermediate is what the model used: the
# final detections equal a plain forward bit for bit, NMS of the recorded candidates gives the
# recorded proposals and detections, bilinear sampling at the recorded points gives the
# recorded RoI features, the mask targets give the model's mask loss).
#
# The other chapters take one stage apart at a time. This one follows a single image through a
# trained model from the pixels to the pasted masks and looks at what every stage produced. The
# intermediates are not recomputed by a copy of the model: `inspect_image` runs the model's
# own `forward` once with forward hooks on its modules and keeps what each received and
# returned; what happens *inside* a module (the proposals before NMS, the per-class boxes
# before per-class NMS, where RoIAlign samples) comes from that module's own public methods,
# applied to the inputs it recorded.
#
# Legend: $C$ channels, $H \times W$, $A$ anchors per location, $R$ RoIs, $K$ classes, $P$
# pooled size, $M$ mask size, $G$ objects, $D$ detections.

# %%
# %matplotlib inline
import math

import torch

from book_helpers import show_source, trained_shapes_model
from mrcnn.data.shapes import ShapesDataset
from mrcnn.inspection import (
    inspect_box_branch,
    inspect_features,
    inspect_image,
    inspect_input,
    inspect_mask_branch,
    inspect_rpn,
    record_forward,
    recording,
)
from mrcnn.inspection_figures import (
    activation_histograms_figure,
    anchors_figure,
    box_refinement_figure,
    detection_nms_figure,
    feature_maps_figure,
    input_figure,
    mask_logits_figure,
    mask_targets_figure,
    objectness_figure,
    pasted_masks_figure,
    proposals_figure,
    roi_levels_figure,
    rpn_targets_figure,
    sampling_figure,
    weight_histograms_figure,
)

torch.set_num_threads(1)  # small tensors: a second thread barely helps, and on a shared machine it waits
_ = torch.manual_seed(0)

# %% [markdown]
# ## The model, the image, the inspection
#
# The book's trained model (`trained_shapes_model`, trained once from a fixed seed and kept in
# `runs/book/`, shared with the introduction and "3.1 Inference"). The image is a held-out picture of
# the shapes data set with its ground truth, which `inspect_image` needs for the training
# targets (the RPN's anchor labels and the mask targets); the model runs in evaluation mode.

# %%
model = trained_shapes_model()
class_names = ShapesDataset.category_names
held_out = ShapesDataset(8, seed=0, split="val")
image, target = max((held_out[i] for i in range(len(held_out))), key=lambda sample: len(sample[1]["labels"]))
inspection = inspect_image(model, image, target, roi_index=0)
print(inspection.summary())

# %% [markdown]
# Every tensor above has a name, a shape and a dtype; `inspection.tensors()` returns them as a
# dict. First, the check that makes the rest worth looking at: the inspection's final
# detections are the model's own, bit for bit, from a plain call without hooks.

# %%
with torch.no_grad():
    (expected,) = model([image])
assert set(expected) == set(inspection.detections)
assert all(torch.equal(inspection.detections[key], expected[key]) for key in expected)
print(f"{len(expected['boxes'])} detections, equal to model([image]) in every field: {sorted(expected)}")
# the score above which the figures draw detections: 0.5, or lower for a briefly trained model
# whose scores stay low (then the best G, as many as there are objects)
cut = min(0.5, float(expected["scores"][: len(target["labels"])].min())) if len(expected["scores"]) else 0.5
cut = math.floor(100 * cut) / 100  # two decimals, rounded down

# %% [markdown]
# How it records: one forward hook per module, removed when the block ends, around one call of
# the model's own forward. Every step below reads this recording, one stage at a time, and
# returns its fields of the `Inspection`.

# %%
show_source(record_forward, recording)

# %% [markdown]
# ## The input
#
# The transform resizes the image so that its shorter side is `min_size` (128 for the small
# preset; 800 in the paper) and pads it with zeros to a multiple of 32, so that every FPN level
# divides it exactly. The shapes are drawn at 128 pixels, so here nothing is resized or padded.
# The step reads the transform's output and undoes the normalization for the picture:

# %%
show_source(inspect_input)

# %%
input_figure(inspection)

# %% [markdown]
# ## Feature maps: the backbone's C2 to C5 and the FPN's P2 to P6
#
# The norm over channels at each position. The backbone's maps halve in size at every stage
# (strides 4 to 32); the FPN adds the top-down pathway, so that every $P_k$ has $C$ channels and
# carries the coarse levels' context at its own resolution. $P_6$ is a max-pool of $P_5$, for the
# RPN's largest anchors only.

# %%
show_source(inspect_features)

# %%
feature_maps_figure(inspection)

# %% [markdown]
# ## Anchors, level by level
#
# At each position of each level the RPN places $A = 3$ anchors (aspect ratios 1:2, 1:1, 2:1)
# of one size per level, from $P_2$ (the smallest, 8 pixels in the small preset; 32 in the
# paper) to $P_6$ (the largest). The picture shows the anchors of every level at the image's
# centre, and the legend counts the anchors of each level. It is tempting to think that the RPN reads
# only the lowest (finest) level of the FPN: as the figure shows, every level
# $P_2 \ldots P_6$ has anchors and objectness scores. The RPN's head runs on all of them with
# shared weights; it is each *RoI* that later takes its features from one level only.
#
# The RPN's step records what its head returned and asks the RPN's own methods for the rest: the
# anchors and decoded boxes (`predict`), the candidates before NMS, and, given the ground
# truth, the label of every anchor (`assign_targets`):

# %%
show_source(inspect_rpn)

# %%
anchors_figure(inspection)

# %% [markdown]
# ## The RPN's targets for the ground truth
#
# In training, an anchor is positive (green) when its IoU with a ground-truth box (white) is at
# least 0.7, or when it is the best anchor of an object; negative when its best IoU is under
# 0.3 (a random few drawn, in red); neutral (gold) in between, which the loss ignores. Most
# anchors are negatives.

# %%
rpn_targets_figure(inspection)

# %% [markdown]
# ## Objectness
#
# The RPN's probability that an object is there, for the best of the $A$ anchors at each
# position of each level. Each shape lights up at the level whose anchor size fits it.

# %%
objectness_figure(inspection)

# %% [markdown]
# ## Proposals, before and after NMS
#
# The best `rpn_pre_nms_top_n_test` anchors of each level, decoded by their deltas and clipped,
# are the candidates; NMS at IoU 0.7 within each level removes the near-duplicates, and the
# best `rpn_post_nms_top_n_test` remain (the paper's FPN keeps 1000; the small preset 100).

# %%
proposals_figure(inspection)

# %% [markdown]
# ## The FPN level of each RoI
#
# A RoI is pooled from one level, chosen by its size (FPN paper, eq. 1):
# $k = \lfloor 4 + \log_2(\sqrt{wh}/224) \rfloor$, clamped to $[2, 5]$. The shapes are small next
# to the 224 pixels of an ImageNet picture: a RoI needs $\sqrt{wh} \ge 112$ pixels to reach
# $P_3$, so in a 128-pixel image nearly every proposal reads $P_2$.
#
# The box branch's step: the level of each RoI, the pooled features and the head's outputs as
# recorded, every proposal refined for every class, and the candidates of per-class NMS:

# %%
show_source(inspect_box_branch)

# %%
roi_levels_figure(inspection)

# %% [markdown]
# ## Where RoIAlign samples
#
# The best proposal on its level's feature map: its $7 \times 7$ bins, and in each bin the
# $2 \times 2$ regularly spaced points (`roi_sampling_ratio = 2`) where the feature is read by
# bilinear interpolation and then averaged. No coordinate is rounded: the points sit between
# the feature map's cells (section 3, "RoIAlign").

# %%
sampling_figure(inspection)

# %% [markdown]
# ## Box refinement
#
# For the best detections, the proposal they came from (dashed) and the box the box branch's
# deltas for the detected class move it to: each proposal gets one refinement per class, and
# the detected class's is kept.

# %%
box_refinement_figure(inspection, class_names=class_names)

# %% [markdown]
# ## Per-class NMS
#
# The (RoI, class) candidates above the score threshold, and what per-class NMS at IoU 0.5
# keeps (drawn here above a score of 0.3, or lower for a model whose scores stay low, to keep
# the picture readable). Many proposals refine onto the same object, hence the stacks on the left.

# %%
detection_nms_figure(inspection, score_threshold=min(0.3, cut))

# %% [markdown]
# ## Mask targets
#
# What the mask branch is trained to predict: for each positive training RoI (IoU at least 0.5
# with an object; sampled here from this image's proposals and ground truth as a training step
# would), the object's mask cropped by the RoI and resampled to $M \times M = 28 \times 28$. A
# RoI that is off-centre on its object gets an off-centre target. The step samples the RoIs as a
# training step would, with a fixed seed, and asks the mask branch for their targets:

# %%
show_source(inspect_mask_branch)

# %%
mask_targets_figure(inspection, class_names=class_names)

# %% [markdown]
# ## The 28 × 28 mask logits
#
# The best detection's $K$ mask logits, one map per class (red positive, blue negative), and
# the sigmoid of the detected class's map (starred): only that one is used. The background's
# map is never trained (the mask loss reads only the object's class), the other classes' maps
# were never trained on this object; for shapes they often look like the starred one anyway,
# since where the object ends hardly depends on its class.

# %%
mask_logits_figure(inspection, detection=0, class_names=class_names)

# %% [markdown]
# ## The result: masks pasted into the image
#
# Each detection's probabilities resized to its box, pasted into the image and binarized at 0.5
# (chapter "3.1 Inference" derives the pasting), drawn for the detections scoring at least 0.5
# (or the best $G$).

# %%
pasted_masks_figure(inspection, class_names, score_threshold=cut)

# %% [markdown]
# ## Weights and activations
#
# Histograms of the weights of each part of the model (the convolutions and linear layers), and
# of the values each stage produced for this image, on a logarithmic count axis. They are the
# first place to look when training goes wrong: a layer whose activations are all zero (dead
# ReLUs), or that grow from stage to stage, shows up here at a glance.

# %%
weight_histograms_figure(model)

# %%
activation_histograms_figure(inspection)

# %% [markdown]
# The library's entry point, for reference: it checks its inputs, puts the model in evaluation
# mode and back, records one forward and reads it with the five steps above.

# %%
show_source(inspect_image)

# %% [markdown]
# ## What to try next
#
# - Inspect the untrained model (`MaskRCNN(shapes_small())`) on the same image and compare
#   every figure: which stages already look sensible with random weights?
# - Pick another `roi_index` (a large proposal, or one on a different level) and compare its
#   sampling points with the first.
# - Draw the anchors at an object's centre (`anchors_figure(inspection, location=(x, y))`) and
#   find the positive anchors of the RPN targets figure among them.
# - Inspect a picture with two overlapping shapes and look at the mask targets of the occluded
#   one: the target is the *visible* part only.
# - Load torchvision's COCO weights into `torchvision_maskrcnn_resnet50_fpn()` (mrcnn/weights.py)
#   and inspect a photograph: the same figures, on the paper's model.
