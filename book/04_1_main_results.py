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
# # Main results
#
# **Paper:** section 4.1, "Main Results" (Table 1), and the metric of all of section 4.
# **Code:** `mrcnn/evaluate.py` (detections to COCO results, COCOeval), `mrcnn/data/shapes.py`
# (the synthetic data set), `mrcnn/data/coco.py` (the COCO reader), `mrcnn/demo.py`.
# **Proof:** `tests/test_evaluate.py` (AP values reasoned out by hand: a perfect detector,
# a shifted box, a missed object, crowds), `tests/test_coco.py`, `tests/test_shapes.py`,
# `tests/test_cli.py` (the demo end to end).
#
# Table 1 of the paper compares Mask R-CNN with the best instance-segmentation systems of
# 2016 on COCO `test-dev`, by **mask AP**. Its rows, in %:
#
# | method | backbone | AP | AP$_{50}$ | AP$_{75}$ | AP$_S$ | AP$_M$ | AP$_L$ |
# |---|---|---|---|---|---|---|---|
# | FCIS (COCO 2016 winner) | ResNet-101-C5-dilated | 29.2 | 49.5 | - | 7.1 | 31.3 | 50.0 |
# | Mask R-CNN | ResNet-101-C4 | 33.1 | 54.9 | 34.8 | 12.1 | 35.6 | 51.1 |
# | Mask R-CNN | ResNet-101-FPN | 35.7 | 58.0 | 37.8 | 15.5 | 38.1 | 52.4 |
# | Mask R-CNN | ResNeXt-101-FPN | 37.1 | 60.0 | 39.4 | 16.9 | 39.9 | 53.5 |
#
# Those models trained for a day or two on 8 GPUs. This chapter explains what the six numbers
# measure, computes one of them by hand and checks it against pycocotools, and then measures
# a model trained here, on the synthetic shapes, with the same code the paper's numbers come
# from.

# %%
# %matplotlib inline
import contextlib
import io
import json
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from book_helpers import demo_results, show_source, trained_shapes_model
from mrcnn.boxes import box_iou
from mrcnn.data.coco import CocoDataset
from mrcnn.data.shapes import generate_shapes
from mrcnn.evaluate import coco_evaluate, detections_to_coco_results, evaluate
from mrcnn.visualize import detections_figure
from IPython.display import display

torch.set_num_threads(1)  # small tensors: a second thread barely helps, and on a shared machine it waits
_ = torch.manual_seed(0)

# %% [markdown]
# ## IoU, for boxes and for masks
#
# A detection counts as correct when it overlaps a ground-truth object of its class enough:
# its intersection over union $\mathrm{IoU}(a, b) = |a \cap b| / |a \cup b|$ reaches a threshold
# $t$. For box AP the sets are boxes, for mask AP they are pixels. A mask is judged more
# strictly: a disc predicted 4 pixels off keeps a higher box IoU than mask IoU, and a box
# cannot tell a disc from its square.

# %%
yy, xx = np.mgrid[0:64, 0:64]
disc = lambda cx, cy, r: ((xx - cx) ** 2 + (yy - cy) ** 2 <= r**2).astype(np.uint8)  # noqa: E731
truth, shifted = disc(30, 32, 14), disc(34, 32, 14)
square = np.zeros((64, 64), np.uint8)
square[18:47, 16:45] = 1  # the disc's own bounding box, filled
rle = lambda m: mask_utils.encode(np.asfortranarray(m))  # noqa: E731
box = lambda m: torch.tensor(  # noqa: E731
    [[xx[m > 0].min(), yy[m > 0].min(), xx[m > 0].max() + 1, yy[m > 0].max() + 1]], dtype=torch.float32
)

figure, axes = plt.subplots(1, 2, figsize=(7, 3.4), layout="constrained")
for panel, (name, prediction) in zip(axes, (("disc shifted by 4 px", shifted), ("the disc's box, filled", square))):
    panel.imshow(truth + 2 * prediction, cmap="viridis")
    box_value = box_iou(box(truth), box(prediction)).item()
    mask_value = mask_utils.iou([rle(prediction)], [rle(truth)], [0])[0, 0]
    panel.set_title(f"{name}\nbox IoU {box_value:.2f}   mask IoU {mask_value:.2f}", fontsize=10)
    panel.set_axis_off()
plt.show()

# %% [markdown]
# ## From matches to AP
#
# COCO's evaluation goes through the detections of one class in order of decreasing score.
# Each is matched to the unmatched ground-truth object it overlaps most, if that IoU is at
# least $t$: a true positive; otherwise it is a false positive. After the $n$-th detection,
#
# $$\text{precision}_n = \frac{TP_n}{n}, \qquad \text{recall}_n = \frac{TP_n}{G}.$$
#
# The precision is made monotone, $p_{interp}(r) = \max_{r' \ge r} p(r')$, and read at the 101
# recalls $r \in \{0, 0.01, \dots, 1\}$ (0 where the recall is never reached); their mean is
# $\mathrm{AP}_t$. COCO's **AP** (the paper's AP) averages over the classes and over ten
# thresholds, $t \in \{0.50, 0.55, \dots, 0.95\}$: a model scores well only with detections
# that are precise as well as present. AP$_{50}$ and AP$_{75}$ are single thresholds; AP$_S$,
# AP$_M$, AP$_L$ count only objects smaller than $32^2$ pixels, between $32^2$ and $96^2$,
# and larger.
#
# A small case written out: three discs in one image, five detections with their scores. The
# function below follows the definition; pycocotools must agree.

# %%
def average_precision(scores, ious, threshold):
    """AP_t of one class in one image, from the definition: scores [D], ious [D, G]."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    matched, true_positive = set(), []
    for d in order:
        candidates = [(ious[d, g], g) for g in range(ious.shape[1]) if g not in matched and ious[d, g] >= threshold]
        if candidates:
            matched.add(max(candidates)[1])
        true_positive.append(bool(candidates))
    tp = np.cumsum(true_positive)
    precision, recall = tp / np.arange(1, len(tp) + 1), tp / ious.shape[1]
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # p_interp: the best precision at any higher recall
    at = np.searchsorted(recall, np.linspace(0, 1, 101), side="left")  # the first n reaching each recall
    return float(np.mean([precision[i] if i < len(precision) else 0.0 for i in at])), precision, recall


objects = [disc(14, 16, 9), disc(44, 18, 11), disc(30, 46, 12)]
predictions = [disc(15, 16, 9), disc(44, 20, 11), disc(36, 46, 12), disc(50, 50, 6), disc(14, 17, 8)]
scores = [0.95, 0.9, 0.8, 0.7, 0.6]  # the last one repeats object 0: a duplicate, a false positive
ious = mask_utils.iou([rle(p) for p in predictions], [rle(o) for o in objects], [0, 0, 0])  # [D, G]
print("mask IoU of each detection with each object:\n", np.round(ious, 2))

with contextlib.redirect_stdout(io.StringIO()):  # pycocotools reports its progress
    ground_truth = COCO()
ground_truth.dataset = {
    "images": [{"id": 1, "height": 64, "width": 64}],
    "categories": [{"id": 1, "name": "disc"}],
    "annotations": [{"id": g + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": float(o.sum()),
                     "bbox": mask_utils.toBbox(rle(o)).tolist(), "segmentation": rle(o)}
                    for g, o in enumerate(objects)],
}
with contextlib.redirect_stdout(io.StringIO()):
    ground_truth.createIndex()
detections = {"boxes": torch.cat([box(p) for p in predictions]), "labels": torch.ones(5, dtype=torch.int64),
              "scores": torch.tensor(scores),
              "masks": torch.stack([torch.from_numpy(p).float()[None] for p in predictions])}
results = detections_to_coco_results([detections], [1], {1: 1})
metrics = coco_evaluate(ground_truth, results, iou_types=("segm",), verbose=False)["segm"]
for t, name in ((0.5, "AP50"), (0.75, "AP75")):
    by_hand, precision, recall = average_precision(scores, ious, t)
    print(f"t = {t}: by hand {by_hand:.4f}   pycocotools {metrics[name]:.4f}   "
          f"(precision {np.round(precision, 2).tolist()}, recall {np.round(recall, 2).tolist()})")
all_thresholds = np.mean([average_precision(scores, ious, t)[0] for t in np.linspace(0.5, 0.95, 10)])
print(f"AP over t = 0.50..0.95: by hand {all_thresholds:.4f}   pycocotools {metrics['AP']:.4f}")

# %% [markdown]
# The library's side of it, in two steps. First, each detection becomes one entry of COCO's
# result format: the box as $[x, y, w, h]$, the class label mapped back to the data set's
# category id, the score, and the mask binarized at 0.5 (as the paper binarizes it) and
# run-length encoded.

# %%
show_source(detections_to_coco_results)

# %% [markdown]
# Then `evaluate` runs the model over a data set in evaluation mode and scores what it
# returns. Most of its length is bookkeeping around three lines: `model(...)` on each batch,
# `detections_to_coco_results` on its detections, and `coco_evaluate` (COCOeval, as above) on
# all of them. Around those: the ground truth comes from the data set's own COCO file, or is
# built from its targets; mask AP is added when there are masks, keypoint AP when there are
# keypoints; the model's train/eval mode is put back.

# %%
show_source(evaluate)

# %% [markdown]
# ## Measured here: the shapes data set
#
# COCO and a day on 8 GPUs are out of reach of a notebook, so the measurement below is on the
# synthetic shapes (chapter "Training"): four classes, one to four objects a picture, touching
# and occluding each other, on textured backgrounds, in COCO's file format. The model is the
# book's (`trained_shapes_model`: the `shapes_small` preset trained once from a fixed seed and
# kept in `runs/book/`; the introduction prints its settings), scored on held-out pictures it
# never trained on. The numbers are measured here, not copied; `evaluate` prints COCO's own
# 12-line summary for each IoU type first, then the table in the paper's layout.

# %%
work = Path(tempfile.mkdtemp(prefix="main_results_"))
model = trained_shapes_model()
shapes = generate_shapes(work / "shapes", num_train=0, num_val=60)  # the first 60 held-out pictures (split "val")
origin = "the book's model"
held_out = CocoDataset(shapes.val_images, shapes.val_annotations)
metrics = evaluate(model, held_out, output_dir=work / "evaluation", progress=False)
print(f"\n{origin}, on {len(held_out)} held-out images (%):")
print(f"{'':6s}" + "".join(f"{name:>7s}" for name in ("AP", "AP50", "AP75", "APs", "APm", "APl")))
for iou_type, row in (("segm", "mask"), ("bbox", "box")):
    print(f"{row:6s}" + "".join(f"{100 * metrics[iou_type][k]:7.1f}" if metrics[iou_type][k] >= 0 else f"{'-':>7s}"
                                for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")))
demo = demo_results()  # experiments/results/demo.json: one measured `make demo` run
report = demo["report"]
print(f"\nfor comparison, the demo's model ({report['steps']:,} steps of {report['arguments']['batch_size']} images, "
      f"measured {demo['date']}) on its {report['arguments']['num_val']} held-out images: "
      f"mask AP {100 * report['mask_AP']:.1f}, box AP {100 * report['box_AP']:.1f}")

# %% [markdown]
# AP at each IoU threshold shows where the points are lost: a model that finds the objects but
# outlines them loosely keeps its AP$_{50}$ and loses the high thresholds. COCOeval's precision
# table (`eval["precision"]`, of shape [thresholds, recalls, classes, areas, max detections])
# gives the curve:

# %%
detected = json.loads((work / "evaluation" / "detections.json").read_text())
figure, axes = plt.subplots(1, 2, figsize=(11, 3.6), layout="constrained")
for iou_type, colour in (("segm", "tab:red"), ("bbox", "tab:blue")):
    if not detected:
        break
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools reports its progress
        evaluator = COCOeval(held_out.coco, held_out.coco.loadRes(detected), iou_type)
        evaluator.params.imgIds = held_out.image_ids
        evaluator.evaluate(), evaluator.accumulate()
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # [T, 101, K]: all areas, 100 detections
    per_threshold = [p[p > -1].mean() if (p > -1).any() else 0.0 for p in precision]
    axes[0].plot(evaluator.params.iouThrs, per_threshold, "o-", color=colour,
                 label="mask" if iou_type == "segm" else "box")  # fmt: skip
    for t, style in ((0, "-"), (5, "--")):
        curve = precision[t].copy()  # [101, K]
        curve[curve < 0] = np.nan
        axes[1].plot(evaluator.params.recThrs, np.nanmean(curve, axis=1), style, color=colour,
                     label=f"{'mask' if iou_type == 'segm' else 'box'}, t = {evaluator.params.iouThrs[t]:.2f}")
axes[0].set(xlabel="IoU threshold t", ylabel="AP_t", title="AP at each threshold (AP is their mean)", ylim=(0, 1))
axes[1].set(xlabel="recall", ylabel="interpolated precision", title="precision-recall, mean over the classes",
            ylim=(0, 1.02))  # fmt: skip
for panel in axes:
    panel.legend(fontsize=8)
    panel.grid(alpha=0.3)
plt.show()

# %% [markdown]
# ## Good and bad predictions
#
# Each held-out picture gets a quality score: the mean, over its objects, of the best mask IoU
# among the detections of the right class scoring at least 0.5 (0 for a missed object). The
# best three and the worst three, each above its ground truth:

# %%
model.eval()
quality = []
with torch.inference_mode():
    for index in range(len(held_out)):
        image, target = held_out[index]
        found = model([image])[0]
        keep = found["scores"] >= 0.5
        best = []
        for mask, label in zip(target["masks"], target["labels"]):
            same_class = keep & (found["labels"] == label)
            if not same_class.any():
                best.append(0.0)
                continue
            predicted = (found["masks"][same_class, 0] >= 0.5).numpy().astype(np.uint8)  # [D, H, W]
            overlaps = mask_utils.iou([rle(p) for p in predicted], [rle(mask.numpy())], [0])
            best.append(float(np.max(overlaps)))
        quality.append((float(np.mean(best)), index, {k: v for k, v in found.items()}))
quality.sort(key=lambda item: -item[0])
for title, chosen in (("best", quality[:3]), ("worst", quality[-3:])):
    images = [held_out[i][0] for _, i, _ in chosen] * 2
    shown = [found for _, _, found in chosen] + [held_out[i][1] for _, i, _ in chosen]
    titles = [f"{title}: quality {q:.2f}" for q, _, _ in chosen] + ["ground truth"] * 3
    display_figure = detections_figure(images, shown, held_out.category_names, 0.5, titles=titles, columns=3, size=2.8)
    display(display_figure)

# %% [markdown]
# The kinds of mistakes to look for: a shape classified as another (a triangle as a star), two
# touching shapes merged into one detection, a small shape missed, a mask that leaks into the
# shape that occludes it, or (early in training) boxes that land on the background texture.
#
# ## What to try next
#
# - Run `make demo` and evaluate its model the same way (`mrcnn evaluate --data runs/demo/shapes
#   --weights runs/demo/train/checkpoint.pt`): how far does a full schedule take it?
# - Draw a harder data set (`mrcnn shapes --max-objects 8`) and evaluate the same model on it:
#   which of AP$_S$, AP$_M$, AP$_L$ falls most?
# - Evaluate with the masks binarized at 0.4 or 0.6 instead of 0.5
#   (`detections_to_coco_results(..., mask_threshold=...)`): how sensitive is mask AP to it?
# - Compare box AP and mask AP of the same detections (the paper's Table 3 does it for COCO):
#   is one always higher on the shapes?
