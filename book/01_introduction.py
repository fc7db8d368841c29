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
# # Introduction: instance segmentation, and the whole pipeline run once
#
# **Paper:** section 1, "Introduction" (and Figure 1, the framework in one picture).
# **Code:** `mrcnn/model.py` (the model, assembled stage by stage from one config),
# `mrcnn/visualize.py` (the detection figures), and one module per stage, named below.
# **Proof:** `tests/test_model.py` (the five training losses reach every parameter; detections
# per image at its original size; batches of mixed sizes and images without objects; the same
# seed gives the same losses to the bit; the small model overfits one image to a mask IoU of 0.9
# per object; bad input raises an error naming the image and the field).
#
# Mask R-CNN is "a conceptually simple, flexible, and general framework for object instance
# segmentation". This chapter says what instance segmentation is, against the two tasks it
# combines, states the paper's idea in three sentences, and then runs the whole model once on a
# picture, printing the shape of what every stage hands to the next. The later chapters take
# each stage apart; the map at the end says which.
#
# Legend: $N$ images, $C$ channels, $H \times W$ a height and width, $A$ anchors, $R$ RoIs,
# $K$ classes (background included), $P$ pooled size, $M$ mask size, $G$ ground-truth objects,
# $D$ detections.

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import to_rgb

from book_helpers import BOOK_TRAINING, book_training_settings, show_source, trained_shapes_model
from mrcnn.config import shapes_small
from mrcnn.data.shapes import ShapesDataset
from mrcnn.inference import paste_detection_masks
from mrcnn.model import MaskRCNN
from mrcnn.transform import resize_boxes
from mrcnn.visualize import INSTANCE_COLOURS, draw_boxes, draw_detections, image_to_array

torch.set_num_threads(1)  # a small model: a second thread barely helps, and on a shared machine it waits
_ = torch.manual_seed(0)

# %% [markdown]
# ## Three tasks on one picture
#
# The paper places instance segmentation between two classical tasks: it "combines elements
# from the classical computer vision tasks of object detection, where the goal is to classify
# individual objects and localize each using a bounding box, and semantic segmentation, where
# the goal is to classify each pixel into a fixed set of categories without differentiating
# object instances". For an image of $H \times W$ pixels and $K$ classes (class 0 the
# background), the three outputs are:
#
# - **object detection**: a set of $D$ triples $\{(b_i, c_i, s_i)\}$, a box
#   $b_i = (x_1, y_1, x_2, y_2)$, a class $c_i \in \{1, \dots, K-1\}$ and a score $s_i$;
# - **semantic segmentation**: one map $S \in \{0, \dots, K-1\}^{H \times W}$, a class per pixel;
# - **instance segmentation**: a set $\{(m_i, c_i, s_i)\}$ with a binary mask
#   $m_i \in \{0, 1\}^{H \times W}$ for each *object*.
#
# From instance masks the semantic map follows, $S(p) = c_i$ for the instance $i$ that covers
# pixel $p$ (0 where none does); the converse fails: where two objects of one class touch or
# overlap, $S$ has one region and no way to say where one ends. Mask R-CNN solves the instance
# task; semantic segmentation is the contrasting task, not one of its goals (it is easily
# mistaken for one).
#
# The book's data are synthetic: shapes of four classes (circle, square, triangle, star) on
# textured backgrounds, drawn by `mrcnn/data/shapes.py` in a few milliseconds, with the
# difficulties of real pictures in miniature (several instances, of varied size, that occlude
# each other). This picture, from the validation split, holds two stars, one partly hidden
# by the other, and a triangle:

# %%
data = ShapesDataset(12, seed=0, split="val")
class_names = data.category_names  # ("__background__", "circle", "square", "triangle", "star")
image, target = data[11]
print(f"image {tuple(image.shape)} {image.dtype} in [{image.min():.2f}, {image.max():.2f}]")
for key, value in target.items():
    described = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else repr(value)
    print(f"target[{key!r}]: {described}")
print("labels:", [class_names[label] for label in target["labels"].tolist()])


# %%
def semantic_map(target: dict, height: int, width: int) -> torch.Tensor:
    """S(p) = c_i for the instance covering p, 0 elsewhere: [H, W] int64 (masks here do not overlap)."""
    semantic = torch.zeros(height, width, dtype=torch.int64)
    for mask, label in zip(target["masks"].bool(), target["labels"]):
        semantic[mask] = label
    return semantic


def paint(picture: np.ndarray, regions: list[tuple[np.ndarray, str]]) -> np.ndarray:
    """The picture in dimmed grey, with each boolean region [H, W] filled with its colour: [H, W, 3]."""
    painted = np.repeat(picture.mean(axis=2, keepdims=True), 3, axis=2) * 0.5  # [H, W, 3]
    for region, colour in regions:
        painted[region] = to_rgb(colour)
    return painted


picture = image_to_array(image)  # [H, W, 3]
semantic = semantic_map(target, *image.shape[-2:])  # [H, W]
class_colours = {1: "tab:orange", 2: "tab:blue", 3: "tab:green", 4: "tab:purple"}
instances = [(mask.bool().numpy(), INSTANCE_COLOURS[i]) for i, mask in enumerate(target["masks"])]
fig, axes = plt.subplots(1, 4, figsize=(14, 3.9), layout="constrained")
axes[0].imshow(picture)
axes[0].set_title("the input", fontsize=10)
draw_detections(axes[1], image, target, class_names)
axes[1].set_title("its ground truth: a box, a class and a mask\nper object (drawn by mrcnn.visualize)", fontsize=10)
axes[2].imshow(paint(picture, [((semantic == c).numpy(), class_colours[c])
                               for c in semantic.unique().tolist() if c > 0]))  # fmt: skip
axes[2].set_title("semantic segmentation: a class per pixel\n(the two stars are one region)", fontsize=10)
for c, colour in class_colours.items():
    axes[2].plot([], [], "s", color=colour, label=class_names[c])
axes[2].legend(fontsize=7, loc="lower left")
axes[3].imshow(paint(picture, instances))
axes[3].set_title("instance segmentation: a mask per object\n(two stars, one triangle)", fontsize=10)
for ax in axes:
    ax.set_axis_off()
plt.show()

# %% [markdown]
# ## The idea
#
# "Our method, called Mask R-CNN, extends Faster R-CNN by adding a branch for predicting
# segmentation masks on each Region of Interest (RoI), in parallel with the existing branch for
# classification and bounding box regression." Three choices make it work:
#
# 1. **A parallel branch.** Faster R-CNN already finds objects: a region proposal network (RPN)
#    proposes boxes, and a second stage classifies each RoI and refines its box. Mask R-CNN
#    adds a small fully convolutional network (FCN) per RoI that predicts an $M \times M$ mask
#    ($M = 28$), trained with one multi-task loss on each sampled RoI,
#    $L = L_{cls} + L_{box} + L_{mask}$. The mask does not feed the box, nor the box the mask:
#    they share the RoI's features.
# 2. **RoIAlign.** Faster R-CNN's RoIPool rounds each RoI and each of its bins to the feature
#    grid, which shifts the pooled feature by up to a stride's worth of pixels: harmless for a
#    class, harmful for a mask that must line up with the pixels. RoIAlign samples the features
#    by bilinear interpolation at exact, unrounded positions; the paper reports that it
#    "improves mask accuracy by relative 10% to 50%".
# 3. **Decoupled masks.** "We predict a binary mask for each class independently, without
#    competition among classes, and rely on the network's RoI classification branch to predict
#    the category." The mask head outputs $K$ masks per RoI, each through a per-pixel sigmoid;
#    the loss reads only the mask of the RoI's ground-truth class $k$,
#    $L_{mask} = -\frac{1}{M^2}\sum_{i,j}\big[y_{ij}\log\sigma(m^k_{ij}) + (1 - y_{ij})\log(1 - \sigma(m^k_{ij}))\big]$,
#    instead of a softmax across classes at every pixel as in FCNs for semantic segmentation.
#
# ## A model to look at
#
# An untrained network detects nothing worth drawing, so the chapter takes a trained one from
# `trained_shapes_model` (book/book_helpers.py): the small preset (`shapes_small`: a narrow
# ResNet, a 64-channel FPN, images of 128 pixels) trained from a fixed seed on generated shapes
# pictures, with the settings printed below. The first chapter that needs it trains it, once,
# on one CPU thread, and keeps it in `runs/book/`; every later chapter, and every later build,
# loads it from there, so every page shows the same model. It has never seen this validation
# picture.

# %%
model = trained_shapes_model()
settings = book_training_settings()
print(f"trained for {settings.iterations} steps of {settings.batch_size} images drawn from "
      f"{BOOK_TRAINING['num_images']:,} generated pictures, lr {settings.lr} after a warm-up of "
      f"{settings.warmup_iterations} steps, divided by 10 at step {settings.decay_steps[0]}")
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} million parameters, "
      f"K = {model.config.num_classes} classes")

# %% [markdown]
# ## The pipeline, stage by stage
#
# `MaskRCNN.forward` runs seven stages. Here they are called one at a time, in evaluation
# mode, on the picture above, with the shape of what each one returns.
#
# **1. Transform** (`mrcnn/transform.py`): normalize with the backbone's channel statistics,
# resize so that the shorter side is `min_size` (800 in the paper, 128 in the small preset, the
# longer at most `max_size`), and pad the batch to a multiple of 32, the stride of the coarsest
# backbone stage. The shapes are already drawn at 128 pixels; two photo-sized inputs show the
# resizing and the padding.

# %%
model.eval()
torch.set_grad_enabled(False)
batch, image_sizes, _ = model.transform([image])  # [N, 3, H_pad, W_pad]
print(f"image {tuple(image.shape)} -> batch {tuple(batch.shape)}, image size after resizing {image_sizes[0]}")
photo_batch, photo_sizes, _ = model.transform([torch.rand(3, 480, 640), torch.rand(3, 600, 400)])
print(f"two photos (3, 480, 640) and (3, 600, 400) -> batch {tuple(photo_batch.shape)}, sizes {photo_sizes}")

# %% [markdown]
# **2. Backbone** (`mrcnn/backbone.py`): a ResNet whose stages res2..res5 give the maps
# $C_2..C_5$ at strides 4, 8, 16, 32 (a basic-block ResNet of 8 layers here; ResNet-50 or
# -101 in the paper).
#
# **3. Feature pyramid** (`mrcnn/fpn.py`): a top-down path with lateral connections turns them
# into $P_2..P_5$, all of $C$ = `fpn_channels` channels, plus $P_6$ by max pooling for the
# largest anchors. Every level carries strong semantics at its own resolution.

# %%
backbone_features = model.backbone(batch)  # [C2, C3, C4, C5], each [N, C_l, H_l, W_l]
features = model.fpn(backbone_features)  # [P2, P3, P4, P5, P6], each [N, C, H_l, W_l]
for level, p in enumerate(features, start=2):
    c = f"C{level} {tuple(backbone_features[level - 2].shape)}" if level <= 5 else "(max pool of P5)"
    print(f"stride {2 ** level:2d}:  {c:22s} -> P{level} {tuple(p.shape)}")

fig, axes = plt.subplots(1, 5, figsize=(14, 3), layout="constrained")
for level, (ax, p) in enumerate(zip(axes, features), start=2):
    ax.imshow(p[0].abs().mean(0), cmap="magma")  # the mean activation magnitude over the C channels
    ax.set_title(f"P{level}: {p.shape[-2]} x {p.shape[-1]}", fontsize=10)
    ax.set_axis_off()
fig.suptitle("the pyramid: mean |activation| of each level", fontsize=10)
plt.show()

# %% [markdown]
# **4. Region proposal network** (`mrcnn/anchors.py`, `mrcnn/rpn.py`): at every position of
# every level, $A = 3$ anchors (three aspect ratios of the level's size) are scored as object
# or not and refined into boxes; the best, after non-maximum suppression, are the proposals,
# at most `rpn_post_nms_top_n_test` per image. The head runs on all five levels.

# %%
padded_size = tuple(batch.shape[-2:])
proposals, _ = model.rpn(features, image_sizes, padded_size)  # per image [R_i, 4], best first
anchors_per_level, objectness, _, _ = model.rpn.predict(features, padded_size)
print(f"anchors per level: {[a.shape[0] for a in anchors_per_level]} (H_l W_l A); objectness {tuple(objectness.shape)}")
print(f"proposals: {tuple(proposals[0].shape)}")

# %% [markdown]
# **5. Box branch** (`mrcnn/box_head.py`, `mrcnn/roi_align.py`): RoIAlign pools each proposal
# from the pyramid level that suits its size into a $C \times 7 \times 7$ feature; two fully
# connected layers and two sibling outputs give $K$ class scores and $K$ box refinements per
# RoI; boxes are refined by their best class, and per-class NMS keeps the detections.

# %%
roi_features = features[:4]  # the RoIs are pooled from P2..P5
class_logits, box_deltas = model.box_branch.logits_and_deltas(roi_features, proposals)
print(f"class logits {tuple(class_logits.shape)} = [R, K], box deltas {tuple(box_deltas.shape)} = [R, 4K]")
detections, _ = model.box_branch(roi_features, proposals, image_sizes)
print({key: tuple(value.shape) for key, value in detections[0].items()})

# The figures draw the detections scoring at least 0.5 (scores come best first).
threshold = 0.5
scores = detections[0]["scores"]
shown = int((scores >= threshold).sum())

to_original = lambda boxes: resize_boxes(boxes, image_sizes[0], tuple(image.shape[-2:]))  # noqa: E731
fig, axes = plt.subplots(1, 2, figsize=(8, 4.2), layout="constrained")
axes[0].imshow(picture)
draw_boxes(axes[0], to_original(proposals[0][:20]), "yellow", 0.8)
axes[0].set_title(f"stage 4: the 20 best of {len(proposals[0])} proposals", fontsize=10)
axes[1].imshow(picture)
draw_boxes(axes[1], to_original(detections[0]["boxes"][:shown]), "lime", 1.2,
           labels=[f"{class_names[c]} {s:.2f}"
                   for c, s in zip(detections[0]["labels"][:shown].tolist(), scores[:shown].tolist())])
axes[1].set_title(f"stage 5: the {shown} best of {len(scores)} detections (score >= {threshold:.2f})", fontsize=10)
for ax in axes:
    ax.set_axis_off()
plt.show()

# %% [markdown]
# **6. Mask branch** (`mrcnn/mask_head.py`): at test time it runs on the *detections* (not the
# proposals): RoIAlign to $C \times 14 \times 14$, four $3 \times 3$ convolutions, a $2\times$
# deconvolution and a $1 \times 1$ convolution give $K$ masks of $28 \times 28$ logits per
# detection. Only the mask of the detection's own class is kept, through a sigmoid: the class
# branch alone decides which one, and the masks never compete for a pixel. (On shapes this
# simple the masks of the other classes often look much the same: each learned to outline
# whatever object fills the box.)

# %%
mask_logits = model.mask_branch.mask_logits(roi_features, [d["boxes"] for d in detections])
print(f"mask logits {tuple(mask_logits.shape)} = [D, K, M, M]")
detections = model.mask_branch.predict(roi_features, detections)
print(f"masks of the predicted classes {tuple(detections[0]['masks'].shape)} = [D, 1, M, M]")

best = 0  # the best-scoring detection: its K - 1 foreground masks, of which the class branch picks one
label = int(detections[0]["labels"][best])
fig, axes = plt.subplots(1, len(class_names) - 1, figsize=(10, 2.8), layout="constrained")
for k, ax in enumerate(axes, start=1):
    ax.imshow(mask_logits[best, k].sigmoid(), cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"{class_names[k]}" + ("  <- its class" if k == label else ""), fontsize=10,
                 color="tab:red" if k == label else "black")
    ax.set_axis_off()
fig.suptitle(f"the K - 1 = {len(class_names) - 1} masks of one detection, sigmoid of 28 x 28 logits", fontsize=10)
plt.show()

# %% [markdown]
# **7. Paste** (`mrcnn/transform.py`, `mrcnn/inference.py`): the boxes are scaled back to the
# original image, and each $28 \times 28$ mask is resized to its box and placed in a canvas of
# the image's size. Binarized at 0.5, these are the paper's masks.

# %%
original_size = tuple(image.shape[-2:])
for detection in detections:
    detection["boxes"] = resize_boxes(detection["boxes"], image_sizes[0], original_size)
detections = paste_detection_masks(detections, [original_size])
print({key: tuple(value.shape) for key, value in detections[0].items()})

fig, ax = plt.subplots(figsize=(4.5, 4.5), layout="constrained")
count = draw_detections(ax, image, detections[0], class_names, score_threshold=threshold)
ax.set_title(f"the {count} best detections (score >= {threshold:.2f}), masks at 0.5", fontsize=10)
plt.show()

# %% [markdown]
# ## The forward pass
#
# The model's own `forward` runs the same seven stages in one call; its detections are those
# of the stage-by-stage run, up to float rounding:

# %%
own = model([image])[0]
print(f"{len(own['boxes'])} detections; the stage-by-stage run gave {len(detections[0]['boxes'])}")
print("largest difference of boxes, scores, masks:",
      *(f"{(own[key] - detections[0][key]).abs().max().item():.1e}" for key in ("boxes", "scores", "masks")))
_ = torch.set_grad_enabled(True)  # back to the default

# %% [markdown]
# Here it is, from `mrcnn/model.py`. In training (`model.train()`, with targets) the same
# stages run, except that the RPN and the box branch sample anchors and RoIs against the ground
# truth and return their losses, the mask branch trains on the positive RoIs (not on the
# detections), and nothing is pasted: the model returns the five losses of the multi-task
# objective.

# %%
show_source(MaskRCNN.forward)

# %% [markdown]
# ## A map of the book
#
# Each later chapter reads one part of this pipeline, in the paper's order. Those without a
# link are still being written.
#
# | stage | code | chapter |
# |---|---|---|
# | 1 transform | `mrcnn/transform.py` | [3 Faster R-CNN recap](03_1_faster_rcnn.py) |
# | 2 backbone, 3 FPN | `mrcnn/backbone.py`, `mrcnn/fpn.py` | [3 Faster R-CNN recap](03_1_faster_rcnn.py), [3 Network architecture](03_4_network_architecture.py) (C4 against FPN) |
# | 4 anchors and RPN | `mrcnn/anchors.py`, `mrcnn/rpn.py`, `mrcnn/matcher.py` | [3 Faster R-CNN recap](03_1_faster_rcnn.py) |
# | 5 IoU, box coding, NMS | `mrcnn/boxes.py` | [2 Related work](02_related_work.py) |
# | 5, 6 RoIAlign (and RoIPool before it) | `mrcnn/roi_align.py`, `kernels/roi_align.py` | [3 RoIAlign](03_3_roi_align.py), [2 Related work](02_related_work.py) |
# | 5, 6 box and mask heads, the per-class sigmoid | `mrcnn/box_head.py`, `mrcnn/mask_head.py`, `mrcnn/mask_loss.py` | [3 Mask representation](03_2_mask_representation.py) |
# | 5, 7 per-class NMS, the masks of the detections, pasting | `mrcnn/box_head.py`, `mrcnn/inference.py` | [3.1 Inference](03_6_inference.py) |
# | all seven, one image, every intermediate by name | `mrcnn/inspection.py` | [Inspecting a trained model](06_inspecting.py) |
# | the five losses and their samples | `mrcnn/train.py` | [3.1 Training](03_5_training.py) |
# | measuring: COCO AP | `mrcnn/evaluate.py` | [4.1 Main results](04_1_main_results.py); 4.2 Ablations; 4.3 Box detection and 4.4 Timing |
# | a keypoint branch beside the mask branch | `mrcnn/keypoint_head.py` | [5 Human pose](05_human_pose.py) |
# | the Triton kernels of RoIAlign and the mask loss | `kernels/` | [Appendix](appendix_kernels.py) |

# %% [markdown]
# ## What to try next
#
# - Draw another picture (`data[4]` holds two stars and two triangles that touch) and follow it
#   through the stages: how many proposals overlap each object?
# - Compare the semantic and instance pictures for `ShapesDataset(8, seed=0, max_objects=8)`:
#   how often do two objects of one class touch?
# - Print `model` to see every layer, and `sum(p.numel() for p in model.parameters())` for the
#   size of the small preset; `mrcnn.config.torchvision_maskrcnn_resnet50_fpn()` builds the
#   paper's ResNet-50-FPN model (about 44 million parameters).
# - Set `model.box_branch.score_thresh = 0.5` before stage 5: fewer detections reach the mask
#   branch, and the masks of the others are never computed.
