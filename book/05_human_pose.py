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
# # Human pose estimation: keypoints as one-hot masks
#
# **Paper:** section 5, "Mask R-CNN for Human Pose Estimation" (Tables 4 and 5).
# **Code:** `mrcnn/keypoint_head.py` (targets, loss, head, decoding, the branch),
# `mrcnn/data/keypoints.py` (a synthetic keypoint data set, COCO keypoint files),
# `mrcnn/evaluate.py` (OKS evaluation), `experiments/keypoints.py` (Table 4 in miniature).
# **Proof:** `tests/test_keypoint_head.py` (targets by hand, an encode-decode round trip, the
# loss on hand-made heatmaps, torchvision's functions, layers and whole Keypoint R-CNN on the
# same weights, an overfit), `tests/test_keypoints_data.py` (the data set, its COCO files) and
# `tests/test_evaluate.py` (OKS AP of 1 for the ground truth, and counted by hand for one figure).
#
# Mask R-CNN's mask branch predicts, for every RoI, an $M \times M$ grid. Section 5 shows that
# the same machinery finds human keypoints with almost no change: "we model a keypoint's
# location as a one-hot mask, and adopt Mask R-CNN to predict $K$ masks, one for each of $K$
# keypoint types (e.g., left shoulder, right elbow)". (This book keeps $K$ for classes and calls
# the number of keypoint types $J$: 17 for COCO persons.) Three things change:
#
# 1. **the target**: for each keypoint, a $56 \times 56$ mask with a single foreground pixel;
# 2. **the loss**: not a sigmoid per pixel, but a softmax over the $56^2$ pixels of each
#    keypoint's map, "which encourages a single point to be detected";
# 3. **the head**: eight $3 \times 3$ convolutions of 512 channels, a deconvolution and a $2\times$
#    bilinear upsampling, for a finer $56 \times 56$ output ("needed for keypoint-level
#    localization accuracy").
#
# Legend: $R$ RoIs, $D$ detections, $C$ channels, $G$ objects, $J$ keypoints, $M$ map size (56).

# %%
import json
import math

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from IPython.display import Markdown, display

from book_helpers import repository_root, show_source, shown_path
from mrcnn.box_head import TrainingRoIs
from mrcnn.data.keypoints import SIGMAS, SKELETON, FiguresDataset, KEYPOINT_NAMES
from mrcnn.keypoint_head import (
    KeypointBranch,
    KeypointHead,
    KeypointPredictor,
    heatmaps_to_keypoints,
    keypoint_loss,
    keypoint_targets,
)
from mrcnn.poolers import MultiLevelRoIAlign

torch.manual_seed(0)
torch.set_num_threads(1)  # the convolutions below are tiny: one thread runs them fastest

# %% [markdown]
# ## The data: stick figures with eleven keypoints
#
# COCO's person keypoints take GPUs and days, so this chapter uses stick figures drawn on the
# fly by `mrcnn/data/keypoints.py`: a head, a neck, elbows, hands, a pelvis, knees and feet,
# $J = 11$, in random poses, tilts and sizes (40 to 90 pixels tall) on textured backgrounds.
# "Left" is the figure's own left, drawn on the left of the picture as for a person facing the
# camera. Each keypoint carries COCO's visibility flag: $v = 2$ visible, $v = 1$ labelled but
# hidden (behind a figure painted later), $v = 0$ not labelled (outside the image). Below, red
# dots are visible keypoints, yellow ones hidden; "L" marks the left hand.

# %%
dataset = FiguresDataset(8, seed=0)
fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
for ax, index in zip(axes, (1, 3, 4, 7)):
    image, target = dataset[index]
    ax.imshow(image.permute(1, 2, 0))
    for points in target["keypoints"]:
        for a, b in SKELETON:
            if points[a - 1, 2] > 0 and points[b - 1, 2] > 0:
                ax.plot(points[[a - 1, b - 1], 0], points[[a - 1, b - 1], 1], "w-", lw=0.8)
        for x, y, v in points:
            if v > 0:
                ax.plot(x, y, "o", ms=3, color="red" if v == 2 else "yellow")
        if points[4, 2] > 0:
            ax.text(points[4, 0] - 8, points[4, 1] - 3, "L", color="white", fontsize=9)
    ax.set_title(f"image {index}: {len(target['boxes'])} figures")
    ax.axis("off")
plt.tight_layout()
plt.show()
print("keypoints:", ", ".join(KEYPOINT_NAMES))

# %% [markdown]
# ## The target: one pixel out of 56 × 56
#
# A RoI $(x_1, y_1, x_2, y_2)$ of width $w$ and height $h$ is divided into $M \times M$ cells.
# The keypoint $(x, y)$ of the RoI's matched object falls in cell
#
# $$i = \left\lfloor (x - x_1) \frac{M}{w} \right\rfloor, \qquad
#   j = \left\lfloor (y - y_1) \frac{M}{h} \right\rfloor, \qquad t = j M + i ,$$
#
# and the target of that keypoint's map is one-hot at $t$. A keypoint outside the RoI, or not
# labelled ($v = 0$), has no target and no loss; hidden keypoints ($v = 1$) are trained like
# visible ones. A keypoint exactly on the right (bottom) edge goes to the last column (row), as
# in torchvision's `keypoints_to_heatmap`, which `tests/test_keypoint_head.py` matches exactly.

# %%
show_source(keypoint_targets)

# %% [markdown]
# The grid below is drawn over one figure's box: every eighth heatmap line is drawn, and the
# target cell of each of its keypoints is filled. On this 50-pixel-wide box a heatmap cell is
# under a pixel wide; the quantization error of the target is at most one cell.

# %%
image, target = dataset[1]
g = 0
box, points = target["boxes"][g], target["keypoints"][g]
M = 56
targets, valid = keypoint_targets(points[None], box[None], M)  # [1, J] each
x1, y1, x2, y2 = box.tolist()
cell_w, cell_h = (x2 - x1) / M, (y2 - y1) / M
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.6))
left.imshow(image.permute(1, 2, 0))
left.set_xlim(x1 - 4, x2 + 4)
left.set_ylim(y2 + 4, y1 - 4)
for k in range(0, M + 1, 8):
    left.axvline(x1 + k * cell_w, color="white", lw=0.4)
    left.axhline(y1 + k * cell_h, color="white", lw=0.4)
for t, ok, (x, y, v) in zip(targets[0].tolist(), valid[0].tolist(), points.tolist()):
    if ok:
        i, j = t % M, t // M
        left.add_patch(plt.Rectangle((x1 + i * cell_w, y1 + j * cell_h), cell_w, cell_h, color="red"))
        left.plot(x, y, "+", color="yellow", ms=6)
left.set_title("the box, the heatmap grid (every 8th line), target cells")
one_hot = torch.zeros(len(KEYPOINT_NAMES), M * M)
one_hot[valid[0], targets[0][valid[0]]] = 1
right.imshow(one_hot.reshape(-1, M, M).sum(0), cmap="gray_r", interpolation="nearest")
right.set_title(f"the {int(valid.sum())} one-hot targets, summed ({M} x {M})")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Why a softmax over pixels, and not a sigmoid per pixel
#
# The mask loss of section 3 is a sigmoid and a binary cross-entropy per pixel. For a keypoint
# the paper instead minimizes "the cross-entropy loss over an $m^2$-way softmax output". With
# $z$ the $M^2$ logits of one keypoint's map and $t$ its target pixel,
#
# $$L_{kp} = \frac{1}{|V|} \sum_{(r, j) \in V} -\log \frac{e^{z_t}}{\sum_{p=1}^{M^2} e^{z_p}} ,$$
#
# averaged over the set $V$ of (RoI, keypoint) pairs with a target. Each keypoint has its own
# softmax: "the $K$ keypoints are still treated independently".
#
# The difference is stark for a one-hot target. One pixel in 3136 is positive, so a per-pixel
# sigmoid is almost perfectly satisfied by a map that says "no keypoint anywhere": the one
# missed pixel weighs $1/3136$ of the loss. The softmax has no such escape: its probabilities sum
# to one, so the map must put its mass somewhere, and until it puts it on the right pixel the loss
# stays near $\log M^2 = 8.05$, the loss of a map that knows nothing.

# %%
t = torch.tensor([[28 * M + 30]])  # the target pixel of one keypoint of one RoI
maps = {
    "uniform": torch.zeros(1, 1, M, M),
    "empty (-8 everywhere)": torch.full((1, 1, M, M), -8.0),
    "peak at the target": torch.full((1, 1, M, M), -8.0).index_put_(
        (torch.tensor([0]), torch.tensor([0]), torch.tensor([28]), torch.tensor([30])), torch.tensor(8.0)
    ),
    "peak 5 pixels away": torch.full((1, 1, M, M), -8.0).index_put_(
        (torch.tensor([0]), torch.tensor([0]), torch.tensor([28]), torch.tensor([35])), torch.tensor(8.0)
    ),
}
one_hot_target = torch.zeros(1, 1, M, M)
one_hot_target.view(-1)[t.item()] = 1
rows = []
for name, logits in maps.items():
    softmax = keypoint_loss(logits, t, torch.ones_like(t, dtype=torch.bool)).item()
    sigmoid = F.binary_cross_entropy_with_logits(logits, one_hot_target).item()
    rows.append((name, softmax, sigmoid))
    print(f"{name:22s}  softmax cross-entropy {softmax:7.3f}   per-pixel sigmoid BCE {sigmoid:7.4f}")
fig, ax = plt.subplots(figsize=(8, 3))
positions = np.arange(len(rows))
ax.bar(positions - 0.2, [r[1] / math.log(M * M) for r in rows], 0.4, label="softmax CE / log(M^2)")
ax.bar(positions + 0.2, [r[2] / rows[0][2] for r in rows], 0.4, label="sigmoid BCE / BCE(uniform)")
ax.set_xticks(positions, [r[0] for r in rows])
ax.set_ylabel("loss, relative to a uniform map")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# The per-pixel sigmoid scores the empty map (the keypoint is nowhere) almost as well as the
# right answer, and the right answer barely better than a peak five pixels away. The softmax
# ranks them as one should: the peak on the target near zero, everything else far above. The
# loss is torchvision's `keypointrcnn_loss`, a cross-entropy over the flattened map:

# %%
show_source(keypoint_loss)

# %% [markdown]
# ## The head: eight convolutions and a 56 x 56 output
#
# RoIAlign pools each RoI to $14 \times 14$ from the FPN level of its size, as for masks. Then:
#
# $$[R, C, 14, 14] \xrightarrow{8 \times (\text{conv } 3\times 3,\ 512,\ \text{ReLU})} [R, 512, 14, 14]
#   \xrightarrow{\text{deconv } 4\times 4,\ \text{stride } 2} [R, J, 28, 28]
#   \xrightarrow{\text{bilinear } \times 2} [R, J, 56, 56]$$
#
# Eight convolutions instead of the mask head's four, 512 channels instead of 256, and twice
# the output resolution: a keypoint is a point, and a $28 \times 28$ grid over a 200-pixel person
# would quantize it to 7 pixels.

# %%
show_source(KeypointHead, KeypointPredictor)

# %%
with torch.device("meta"):  # shapes and sizes only: no memory, no arithmetic
    paper_head, paper_predictor = KeypointHead(256, (512,) * 8), KeypointPredictor(512, 17)
    logits = paper_predictor(paper_head(torch.empty(100, 256, 14, 14)))
parameters = sum(p.numel() for p in [*paper_head.parameters(), *paper_predictor.parameters()])
print(f"100 RoIs of [256, 14, 14] -> keypoint logits {list(logits.shape)}; {parameters / 1e6:.1f} M parameters")
flops = sum(2 * 14 * 14 * 9 * conv.in_channels * conv.out_channels for conv in paper_head.layers)  # multiply-adds x 2
mask_flops = 4 * 2 * 14 * 14 * 9 * 256 * 256
print(f"one RoI costs {flops / 1e9:.1f} GFLOP in the eight convolutions (the mask head's four: {mask_flops / 1e9:.1f})")

# %% [markdown]
# The weights carry torchvision's names through `torchvision_key_map`
# (`head.layers.i.weight` is `roi_heads.keypoint_head.{2i}.weight`, since torchvision interleaves
# the ReLUs), so `mrcnn.keypoint_head.from_torchvision_keypoint_rcnn` loads a
# `keypointrcnn_resnet50_fpn` checkpoint; the test gives both models the same weights and image
# and gets the same boxes and keypoints. In the whole model, `MaskRCNN` builds the branch when
# `config.num_keypoints > 0` (`mrcnn/config.py`: the `torchvision_keypointrcnn_resnet50_fpn`
# and `figures_small` presets).
#
# ## Decoding: from a heatmap to a point in the image
#
# At test time the branch runs on the detected boxes. Each box's $J$ maps are resized with
# bicubic interpolation to the box's size in pixels, $\lceil w \rceil \times \lceil h \rceil$,
# and the argmax pixel $(i, j)$ of each becomes the keypoint, at the pixel's centre:
#
# $$x = x_1 + (i + \tfrac{1}{2}) \frac{w}{\lceil w \rceil}, \qquad y = y_1 + (j + \tfrac{1}{2}) \frac{h}{\lceil h \rceil} .$$
#
# The score of the keypoint is the interpolated logit there.

# %%
show_source(heatmaps_to_keypoints)

# %% [markdown]
# Encoding and decoding round-trip within the quantization: within half a heatmap cell plus
# half an image pixel (`tests/test_keypoint_head.py`). One caveat comes with the bicubic resize,
# which torchvision and Detectron2 share: in a box narrower than 56 pixels the resize *samples*
# the heatmap every $56 / \lceil w \rceil$ cells without smoothing first. A one-hot peak can fall
# between the samples and vanish; a peak a couple of cells wide, as a trained head predicts,
# survives. Here in a 20-pixel-wide box:

# %%
box = torch.tensor([[10.0, 10.0, 30.0, 70.0]])  # 20 x 60 pixels
keypoint = torch.tensor([[[16.9, 40.0, 2.0]]])  # in heatmap column 19, between the samples at 17.7 and 20.5
cell, _ = keypoint_targets(keypoint, box, M)
i, j = cell.item() % M, cell.item() // M
noise = 0.3 * torch.randn(1, 1, M, M, generator=torch.Generator().manual_seed(0))  # a little background clutter
sharp = noise.clone()
sharp.view(-1)[cell.item()] = 10.0
grid = torch.arange(M, dtype=torch.float32)
smooth = noise + 10 * torch.exp(-((grid - i) ** 2 + (grid[:, None] - j) ** 2) / (2 * 1.5**2))  # sigma 1.5 cells
fig, axes = plt.subplots(1, 4, figsize=(12, 3.2))
for (name, heatmap), (ax_map, ax_resized) in zip((("one-hot", sharp), ("smooth", smooth)), (axes[:2], axes[2:])):
    decoded, _ = heatmaps_to_keypoints(heatmap, box)
    resized = F.interpolate(heatmap, size=(60, 20), mode="bicubic", align_corners=False)[0, 0]
    ax_map.imshow(heatmap[0, 0], cmap="magma")
    ax_map.set_title(f"{name} 56 x 56 map")
    ax_resized.imshow(resized, cmap="magma", extent=(10, 30, 70, 10))
    ax_resized.plot(*keypoint[0, 0, :2], "c+", ms=10, label="true")
    ax_resized.plot(*decoded[0, 0, :2], "wx", ms=8, label="decoded")
    error = (decoded[0, 0, :2] - keypoint[0, 0, :2]).norm().item()
    ax_resized.set_title(f"resized to 20 x 60: error {error:.1f} px")
axes[-1].legend(loc="lower right", fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Training: a small keypoint branch overfits four images
#
# The test `test_a_small_keypoint_model_overfits_a_few_figures` trains the branch alone on four
# images, with the ground-truth boxes as RoIs and features from three fixed random convolutions
# (stride 4). It starts at the uniform loss $\log 56^2$ and within 150 Adam steps puts most
# keypoints within a pixel or two. The same, here, on other images:

# %%
images, targets = zip(*[dataset[i] for i in range(4)])
images = torch.stack(images)  # [4, 3, 128, 128]
boxes = [t["boxes"] for t in targets]
rois = TrainingRoIs(boxes, [torch.ones(len(b), dtype=torch.int64) for b in boxes],
                    [torch.zeros(len(b), 4) for b in boxes], [torch.arange(len(b)) for b in boxes])
features_net = torch.nn.Sequential(
    torch.nn.Conv2d(3, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
    torch.nn.Conv2d(32, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
    torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
)
with torch.no_grad():
    features = [features_net(images)]  # one level, stride 4: [4, 32, 32, 32]
branch = KeypointBranch(
    MultiLevelRoIAlign(14, (4,)), KeypointHead(32, (32,) * 4), KeypointPredictor(32, len(KEYPOINT_NAMES))
)
optimizer = torch.optim.Adam(branch.parameters(), lr=3e-3)
losses = []
for step in range(150):
    loss = branch.loss(features, rois, list(targets))["loss_keypoint"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
branch.eval()
with torch.no_grad():
    predicted = branch.predict(features, [{"boxes": b} for b in boxes])
errors = torch.cat([(p["keypoints"][..., :2] - t["keypoints"][..., :2]).norm(dim=-1)[t["keypoints"][..., 2] > 0]
                    for p, t in zip(predicted, targets)])
print(f"loss {losses[0]:.2f} -> {losses[-1]:.2f}; keypoint error: median {errors.median():.2f} px, "
      f"{(errors < 3).float().mean():.0%} within 3 px, worst {errors.max():.1f} px")

fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), gridspec_kw={"width_ratios": [1.4, 1, 1]})
axes[0].plot(losses)
axes[0].axhline(math.log(M * M), color="gray", ls="--", label="log 56^2 (uniform)")
axes[0].set_xlabel("step")
axes[0].set_ylabel("L_kp")
axes[0].legend()
for ax, index in zip(axes[1:], (1, 3)):
    ax.imshow(images[index].permute(1, 2, 0))
    for truth, guess in zip(targets[index]["keypoints"], predicted[index]["keypoints"]):
        labelled = truth[:, 2] > 0
        ax.plot(truth[labelled, 0], truth[labelled, 1], "o", mfc="none", mec="white", ms=6)
        ax.plot(guess[labelled, 0], guess[labelled, 1], "r.", ms=5)
    ax.set_title(f"image {index}: truth (circles), prediction (dots)")
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# Trained much longer, this overfit gets worse, not better, at decoding: the logits far from the
# keypoints sink to the hundreds below zero in the deconvolution's checkerboard, and the bicubic
# resize rings around such cliffs, so some decoded keypoints jump away although every heatmap's
# argmax is on its target. A model that generalizes keeps smoother maps; the test stops at 150 steps.
#
# ## Scoring keypoints: OKS and keypoint AP
#
# COCO scores a detected pose $d$ against a ground-truth person $g$ of segment area $s^2$ by the
# object keypoint similarity, a Gaussian of each labelled keypoint's distance, scaled by the
# object's size and by a per-keypoint constant $k_j = 2\sigma_j$ (how precisely people annotate
# that joint: eyes tightly, hips loosely):
#
# $$\text{OKS}(d, g) = \frac{\sum_j \exp\left(-\frac{\lVert p^d_j - p^g_j \rVert^2}{2 s^2 k_j^2}\right) [v_j > 0]}{\sum_j [v_j > 0]}$$
#
# Keypoint AP is then AP with OKS in place of IoU, averaged over the thresholds 0.50 to 0.95.
# `mrcnn.evaluate.keypoint_metrics` runs pycocotools' `COCOeval` with
# `iouType="keypoints"` and the figures' sigmas (COCO's for the matching joint). For a figure of
# 600 pixels of area (a 60-pixel figure, limbs 4 pixels thick), one keypoint's similarity falls
# quickly with the error:

# %%
distance = np.linspace(0, 8, 100)
area = 600.0
fig, ax = plt.subplots(figsize=(7, 3))
for name in ("neck", "left_hand", "pelvis"):
    k = 2 * SIGMAS[KEYPOINT_NAMES.index(name)]
    ax.plot(distance, np.exp(-(distance**2) / (2 * area * k**2)),
            label=f"{name} (sigma {SIGMAS[KEYPOINT_NAMES.index(name)]})")  # fmt: skip
for threshold in (0.5, 0.75, 0.95):
    ax.axhline(threshold, color="gray", lw=0.5, ls="--")
ax.set_xlabel("keypoint error (pixels)")
ax.set_ylabel("similarity")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# At the strictest threshold, 0.95, a hand must be within about half a pixel; a one-pixel error
# costs AP75 and above. Small objects make keypoint AP hard.
#
# ## The whole Keypoint R-CNN, with and without masks (Table 4 in miniature)
#
# The paper's Table 4 trains ResNet-50-FPN on COCO persons with keypoints only and with
# keypoints and masks: 64.2 and 64.7 keypoint AP on minival (box AP 50.7 and 52.0). Multi-task
# training helps a little. Table 5 shows RoIAlign matters even more for keypoints than for masks:
# 64.2 keypoint AP against 59.8 with RoIPool.
#
# `experiments/keypoints.py` runs the same two arms on the stick figures: the `figures_small`
# preset trained from scratch, both arms with one budget, scored on the same held-out images.
# Each arm trains on one thread, the two side by side, for longer than a chapter can wait, so
# this chapter reads the recorded results (`experiments/results/keypoints.json`, with the
# settings and the training time of each arm) rather than training:

# %%
results_path = repository_root() / "experiments" / "results" / "keypoints.json"
if results_path.exists():
    record = json.loads(results_path.read_text())
    print(f"{'arm':22s} {'box AP':>7s} {'kp AP':>7s} {'kp AP50':>8s} {'kp AP75':>8s} {'mask AP':>8s} {'train':>8s}")
    for name, arm in record["arms"].items():
        metrics = arm["metrics"]
        mask_ap = f"{metrics['segm']['AP']:.3f}" if "segm" in metrics else "-"
        print(f"{name:22s} {metrics['bbox']['AP']:7.3f} {metrics['keypoints']['AP']:7.3f} "
              f"{metrics['keypoints']['AP50']:8.3f} {metrics['keypoints']['AP75']:8.3f} {mask_ap:>8s} "
              f"{arm['train_seconds'] / 60:6.0f} min")
    settings = record["settings"]
    print(f"\ncommand: {record['command']}\n"
          f"machine: {record['machine']['processor']}, {record['machine']['cpu_count']} cores, "
          f"torch {record['machine']['torch']}, {record['machine']['threads_per_arm']} thread(s) per arm")
    print(f"settings: {settings['iterations']} steps of {settings['batch_size']} images, SGD at {settings['lr']}, "
          f"{settings['num_train']} training and {settings['num_val']} held-out pictures, seed {settings['seed']}")
else:
    record = None
    print(f"{shown_path(results_path)} is not there yet: run `python experiments/keypoints.py` to make it")

# %% [markdown]
# Read these numbers with their error bars in mind: one seed, a few hundred validation
# images, a small model trained for minutes, not days.

# %% tags=["remove-input"]
if record is not None:
    alone, with_masks = (record["arms"][name]["metrics"]["keypoints"] for name in ("keypoints", "keypoints_and_masks"))
    gain = 100 * (with_masks["AP"] - alone["AP"])
    direction = ("higher, the direction of the paper's Table 4 (64.2 to 64.7)" if gain > 0 else
                 "not higher, against the direction of the paper's Table 4 (64.2 to 64.7)")
    display(Markdown(
        f"The branch learns keypoints end to end from the detector's own proposals: keypoint AP "
        f"{alone['AP']:.2f} (AP$_{{50}}$ {alone['AP50']:.2f}) without the mask branch in the recorded run. "
        f"With the mask branch the keypoint AP was {direction}, by {abs(gain):.1f} points "
        f"({alone['AP']:.3f} to {with_masks['AP']:.3f}); "
        f"with a single seed, a gap of this size may be within what another seed would change: one run does not "
        f"settle whether the masks help at this scale."))

# %% [markdown]
# One practical detail: flipping images for augmentation must also swap left and right keypoints
# (`mrcnn.data.flip.flip_keypoints` with `FLIP_INDEX`), which the trainer's flip does with the
# data set's `flip_index`. The recorded experiment trained without flipping (it was made before
# the trainer swapped keypoints), so its numbers above carry no flip.
#
# ## What to try next
#
# - Replace the softmax by the per-pixel sigmoid (`F.binary_cross_entropy_with_logits` on the
#   one-hot maps) in the overfit above, and watch the maps go empty.
# - Decode with an anti-aliased resize (`F.interpolate(..., antialias=True)`) or by taking the
#   argmax on the $56 \times 56$ map before scaling, and compare the round-trip error in small boxes.
# - Train with Gaussian targets (a few cells wide) instead of one-hot ones, as later pose
#   estimators do, and compare keypoint AP75.
# - Shrink the head to four convolutions or a $28 \times 28$ output and measure what the paper's
#   "needed for keypoint-level localization accuracy" costs.
# - Rerun the experiment with flipping (`flip=True` in `experiments/keypoints.py`) and see how much
#   keypoint AP it adds.
