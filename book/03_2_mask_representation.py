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
# # Mask representation
#
# **Paper:** section 3, "Mask Representation", and the mask term $L_{mask}$ of the multi-task
# loss (section 3, and 3.1 "Training" for the mask targets).
# **Code:** `mrcnn/mask_loss.py` (readable), `kernels/mask_loss.py` (fused Triton kernel).
# **Proof:** `tests/test_mask_loss.py` (against a float64 loop written from the definition,
# hand-made targets and torchvision's `maskrcnn_loss`) and
# `tests/kernels/test_mask_loss_kernel.py` (kernel against the reference, loss and gradient).
#
# A mask encodes an object's spatial layout, so Mask R-CNN predicts it with a small fully
# convolutional network that keeps the $M \times M$ grid of the RoI ($M = 28$ with FPN) instead
# of collapsing it into a vector. For each RoI the mask branch outputs **$K$ masks**, one per
# class, each a grid of logits. Which of them is used is decided by the box branch's class:
# during training, the RoI's ground-truth class $k_r$; at test time, the predicted class.
#
# Legend: $R$ RoIs, $K$ classes (background included: 81 for COCO in the paper, 91 in
# torchvision's label space), $M$ mask size.

# %%
import math
import os
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # Triton's interpreter, before the kernel module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from book_helpers import show_source
from mrcnn.mask_head import MaskBranch
from mrcnn.mask_loss import (
    gathered_mask_logits,
    mask_loss,
    mask_loss_reference,
    mask_targets,
    multinomial_mask_loss,
)

torch.manual_seed(0)

# %% [markdown]
# ## The mask loss
#
# For a positive RoI $r$ with ground-truth class $k_r$, only the $k_r$-th mask is trained: "for
# an RoI associated with ground-truth class $k$, $L_{mask}$ is only defined on the $k$-th mask
# (other mask outputs do not contribute to the loss)". Each of its pixels is a binary
# classification, object or not, scored with the sigmoid and the binary cross-entropy, and
# $L_{mask}$ is the average over all $R M^2$ pixels. With $x = \text{mask\_logits}[r, k_r, i, j]$
# and its target $t \in [0, 1]$:
#
# $$L_{mask} = \frac{1}{R M^2} \sum_{r, i, j} -t \log \sigma(x) - (1 - t) \log(1 - \sigma(x))
#            = \frac{1}{R M^2} \sum_{r, i, j} \operatorname{softplus}(x) - t\,x ,$$
#
# with $\operatorname{softplus}(x) = \log(1 + e^x)$. The second form is the one to compute: it
# never takes the logarithm of a sigmoid that rounded to 0 or 1, so a logit of $\pm 10^4$ gives
# a large but finite loss. The gradient is as simple as it gets:
#
# $$\frac{\partial L_{mask}}{\partial x} = \frac{\sigma(x) - t}{R M^2}
#   \text{ on channel } k_r, \qquad 0 \text{ on the other } K - 1 \text{ channels.}$$
#
# A first look, with two RoIs, three classes and $2 \times 2$ masks: the loss reads channel 2 of
# the first RoI and channel 1 of the second, and only those receive a gradient.

# %%
mask_logits = torch.randn(2, 3, 2, 2, requires_grad=True)  # [R, K, M, M]
labels = torch.tensor([2, 1])  # [R]: the ground-truth class of each RoI
targets = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 1.0]]])  # [R, M, M]
loss = mask_loss(mask_logits, labels, targets)
loss.backward()
print(f"L_mask = {loss.item():.4f}")
print("channels with a nonzero gradient, per RoI:",
      [mask_logits.grad[r].flatten(1).any(1).nonzero().flatten().tolist() for r in range(2)])  # fmt: skip
x = mask_logits[0, 2].detach()
print("gradient of RoI 0, channel 2:", mask_logits.grad[0, 2].flatten().tolist())
print("(sigmoid(x) - t) / (R M^2):  ", ((torch.sigmoid(x) - targets[0]) / 8).flatten().tolist())

# %% [markdown]
# The readable reference: check the inputs, pick each RoI's own channel with one gather, apply
# the formula.

# %%
show_source(mask_loss_reference)

# %% [markdown]
# ### Why one sigmoid per class
#
# A semantic-segmentation FCN scores each pixel with a softmax over the classes: the classes
# *compete* for the pixel. Mask R-CNN lets the box branch choose the class and asks the mask
# branch only "which pixels belong to this object?", one independent sigmoid per class. The
# paper's Table 2b measures the difference: with a per-pixel softmax over classes
# (`multinomial_mask_loss`) mask AP drops from 30.3 to 24.8 (ResNet-50-C4).
#
# The coupling is visible in the gradient of a single pixel. Take logits $(0, 2, 1)$ for
# (background, class 1, class 2) at a pixel of a class-1 object:

# %%
pixel = torch.tensor([0.0, 2.0, 1.0]).reshape(1, 3, 1, 1)  # one RoI, K = 3, M = 1
for name, loss_fn in (("softmax over classes", multinomial_mask_loss), ("one sigmoid per class", mask_loss_reference)):
    z = pixel.clone().requires_grad_()
    loss_fn(z, torch.tensor([1]), torch.ones(1, 1, 1)).backward()
    print(f"{name:>22}: d loss / d logits = {[round(v, 3) for v in z.grad.flatten().tolist()]}")

# %% [markdown]
# The softmax pushes the background and class 2 *down* at this pixel; the sigmoid leaves them
# alone. That matters when two objects of different classes overlap: the same pixels, seen in
# two RoIs with nearly the same crop, must be "class 1" in one and "class 2" in the other.
#
# A small experiment makes the point. Two RoIs over the same crop: RoI 0 is an object of class
# 1 (a disk), RoI 1 an object of class 2 (another disk, overlapping the first). Because the
# crops are the same, the network sees the same input for both and outputs the same $K = 3$
# logit maps; we give it the most flexible model there is, a free logit for every class and
# pixel, and train it with each loss for 150 steps of Adam.

# %%
M = 28
rows, cols = torch.meshgrid(torch.arange(M), torch.arange(M), indexing="ij")
disk_1 = ((rows - 11) ** 2 + (cols - 11) ** 2 <= 64).float()
disk_2 = ((rows - 17) ** 2 + (cols - 17) ** 2 <= 64).float()
overlap_targets = torch.stack([disk_1, disk_2])  # [R = 2, M, M]
overlap_labels = torch.tensor([1, 2])


def train_shared_logits(loss_fn, steps=150):
    shared = torch.zeros(1, 3, M, M, requires_grad=True)  # the same logits for both RoIs
    optimizer = torch.optim.Adam([shared], lr=0.2)
    for _ in range(steps):
        loss = loss_fn(shared.expand(2, 3, M, M), overlap_labels, overlap_targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return shared.detach()[0]  # [K, M, M]


start = time.perf_counter()
sigmoid_logits = train_shared_logits(mask_loss_reference)
softmax_logits = train_shared_logits(multinomial_mask_loss)
probabilities = {
    "sigmoid per class": torch.sigmoid(sigmoid_logits),  # [K, M, M]: each class on its own
    "softmax over classes": torch.softmax(softmax_logits, dim=0),  # [K, M, M]: classes share each pixel
}
print(f"trained both in {time.perf_counter() - start:.1f} s")

regions = {"only disk 1": (disk_1 == 1) & (disk_2 == 0), "both disks": (disk_1 == 1) & (disk_2 == 1)}
for name, p in probabilities.items():
    cells = ", ".join(f"{region}: {p[1][where].mean():.2f}" for region, where in regions.items())
    print(f"{name:>22}: mean probability of class 1 on {cells}")

# %%
fig, axes = plt.subplots(2, 3, figsize=(8.5, 5.4))
axes[0, 0].imshow(torch.stack([disk_1, torch.zeros(M, M), disk_2], dim=-1))  # red: disk 1, blue: disk 2
axes[0, 0].set_title("targets: RoI 0, class 1 (red)\nRoI 1, class 2 (blue)", fontsize=9)
for row, (name, p) in enumerate(probabilities.items()):
    for col, k in ((1, 1), (2, 2)):
        shown = axes[row, col].imshow(p[k], cmap="viridis", vmin=0, vmax=1)
        axes[row, col].set_title(f"{name}:\nprobability of class {k}", fontsize=9)
for ax in axes.flat:
    ax.axis("off")
fig.colorbar(shown, ax=axes[:, 1:], shrink=0.8)
plt.show()

# %% [markdown]
# With one sigmoid per class both masks are learned exactly, overlap included. With the
# softmax the two RoIs pull against each other: where the disks overlap, class 1 and class 2
# share the pixel (about 0.5 each, on the decision threshold), and where only disk 1 lies, RoI 1
# wants background while RoI 0 wants class 1, so that pixel too ends near 0.5. Real crops are
# never exactly identical, but overlapping objects of different classes (a person on a horse,
# a cup on a table) are common, and every such overlap is a small tug of war for a softmax.
#
# The paper's other comparison (section 4.2, in the text) keeps the sigmoid but predicts one mask per
# RoI whatever its class ($K = 1$): 29.7 AP against 30.3 for class-specific masks. What matters
# is the decoupling, not the $K$ masks. In the code class-agnostic is only a shape: a predictor
# with one output channel, and every RoI reads channel 0 (`MaskBranch.mask_channel`) with the
# same `mask_loss`.

# %%
show_source(multinomial_mask_loss, MaskBranch.mask_channel)

# %% [markdown]
# ### The mask targets
#
# "The mask target is the intersection between an RoI and its associated ground-truth mask"
# (section 3.1): the RoI's matched ground-truth mask is cropped by the proposal box and
# resampled to $M \times M$. Resampling with RoIAlign (as torchvision does, with `aligned=False`)
# gives each target cell the fraction of it covered by the object, a soft value along the
# edges. The paper describes binary targets, and Detectron2 thresholds at $0.5$; torchvision's
# `maskrcnn_loss` trains on the soft values, so the default here keeps them (`threshold=None`) and
# the torchvision-compatible model matches it exactly. The binary cross-entropy is defined for
# any target in $[0, 1]$; only values outside it are refused.

# %%
height, width = 96, 128
ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
gt_masks = ((((ys - 48) / 30.0) ** 2 + ((xs - 60) / 45.0) ** 2) <= 1).to(torch.uint8)[None]  # [G = 1, H, W]
proposals = torch.tensor([[5.0, 30.0, 85.0, 90.0]])  # [R = 1, 4]: overhangs left and below, cuts the right
soft = mask_targets(gt_masks, proposals, torch.tensor([0]), 28)
binary = mask_targets(gt_masks, proposals, torch.tensor([0]), 28, threshold=0.5)

fig, axes = plt.subplots(1, 3, figsize=(10, 3))
axes[0].imshow(gt_masks[0], cmap="gray")
x1, y1, x2, y2 = proposals[0].tolist()
axes[0].add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="tab:orange", linewidth=2))
axes[0].set_title("ground-truth mask and proposal")
axes[1].imshow(soft[0], cmap="gray", vmin=0, vmax=1)
axes[1].set_title("28 x 28 target (soft)")
axes[2].imshow(binary[0], cmap="gray", vmin=0, vmax=1)
axes[2].set_title("thresholded at 0.5")
for ax in axes:
    ax.axis("off")
plt.show()
print("soft values strictly between 0 and 1:", int(((soft > 0) & (soft < 1)).sum()), "of", soft.numel())

# %%
show_source(mask_targets)

# %% [markdown]
# ### The fused kernel
#
# In PyTorch the loss is several passes: gather the $R$ target channels out of the
# $[R, K, M, M]$ logits, compute the loss, then in the backward pass compute the gradient of the
# gathered pixels, fill a zero tensor the size of the logits and scatter the gradient into it.
# `kernels/mask_loss.py` does the same work in two kernels.
#
# **Forward.** Each program takes a block of the $R M^2$ gathered pixels, reads each pixel's
# label, its logit on that channel (through the strides: no gather copy) and its target, and
# computes, with $u = e^{-|x|}$ (which never overflows),
#
# $$\operatorname{softplus}(x) = \max(x, 0) + \log(1 + u), \qquad
#   \sigma(x) = \begin{cases} 1 / (1 + u) & x \ge 0 \\ u / (1 + u) & x < 0 \end{cases}$$
#
# It writes the sum of its losses to a partial-sum buffer and, **in the same pass**, the gradient
# $(\sigma(x) - t) / (R M^2)$ to a compact $[R, M, M]$ buffer: the loss is a scalar, so its
# gradient is known before the backward pass asks for it. A second kernel, one program, adds the
# partial sums in a fixed order: no atomics, so the loss is the same to the bit on every run.

# %%
import kernels.mask_loss as fused  # noqa: E402

show_source(fused._mask_loss_forward_kernel.fn, fused._sum_kernel.fn)

# %% [markdown]
# **Backward.** The incoming gradient $g$ (a scalar, read from device memory) scales the saved
# gradient. The output is the full $[R, K, M, M]$ gradient, allocated with `torch.empty` and
# written entirely by the kernel: $g$ times the saved value on channel $k_r$, zero on the other
# $K - 1$ channels, with no separate zero fill. Between forward and backward only the compact
# buffer is kept, $1/K$ of the logits' size.

# %%
show_source(fused._mask_loss_backward_kernel.fn)

# %% [markdown]
# Here it runs under Triton's interpreter when there is no GPU, on a small case, against the
# reference:

# %%
logits = torch.randn(6, 5, 14, 14) * 4
labels = torch.randint(0, 5, (6,))
targets = torch.rand(6, 14, 14)
results = {}
for name, use_kernel in (("reference", False), ("kernel", True)):
    x = logits.clone().requires_grad_()
    loss = mask_loss(x, labels, targets, use_kernel=use_kernel)
    loss.backward()
    results[name] = (loss.detach(), x.grad)
print("loss: reference", results["reference"][0].item(), " kernel", results["kernel"][0].item())
print("largest gradient difference:", (results["reference"][1] - results["kernel"][1]).abs().max().item())

# %% [markdown]
# ### The bigger saving is upstream
#
# The kernel still has to write a $K$-channel gradient, $K - 1$ channels of zeros, because the
# mask predictor's last $1 \times 1$ convolution produced all $K$ channels and its backward pass
# reads them all. But during training the loss uses one channel per RoI, and channel $k$ of a
# $1 \times 1$ convolution is a dot product with row $k$ of its weight:
#
# $$x[r, i, j] = w_{k_r} \cdot f[r, :, i, j] + b_{k_r} .$$
#
# So the predictor can compute only the channels the loss reads, a batched matrix product,
# `gathered_mask_logits`: $K$ times less work and memory, forward and backward, and the loss then
# runs on that one channel (label 0 of the gathered logits). The mask branch trains this way
# (`MaskPredictor.class_mask_logits`, called by `MaskBranch.loss`; `tests/test_mask_head.py`
# checks that the loss and every gradient equal those of the $K$ channels). At test time the mask
# of the predicted class is read from all $K$, as before.

# %%
show_source(gathered_mask_logits, MaskBranch.loss)

# %%
num_rois, channels, num_classes = 32, 256, 81
features = torch.randn(num_rois, channels, M, M, requires_grad=True)
weight = (torch.randn(num_classes, channels, 1, 1) * 0.01).requires_grad_()
bias = torch.zeros(num_classes, requires_grad=True)
labels = torch.randint(1, num_classes, (num_rois,))
targets = (torch.rand(num_rois, M, M) > 0.5).float()


def full_predictor():
    return mask_loss(F.conv2d(features, weight, bias), labels, targets)  # all K channels


def gathered_predictor():
    own_channel = torch.zeros_like(labels)  # channel 0 of the gathered logits is each RoI's class
    return mask_loss(gathered_mask_logits(features, weight, bias, labels), own_channel, targets)


for name, step in (("full conv + loss", full_predictor), ("gathered conv + loss", gathered_predictor)):
    times = []
    for _ in range(3):
        features.grad = weight.grad = bias.grad = None
        start = time.perf_counter()
        step().backward()
        times.append(time.perf_counter() - start)
    print(f"{name:>22}: loss {step().item():.6f}, forward + backward {1e3 * min(times):6.1f} ms "
          f"(R={num_rois}, K={num_classes})")

# %% [markdown]
# Same loss, a fraction of the time. `benchmarks/mask_loss.py` measures both this and the loss
# kernel at the training sizes (R = 512, K = 81 or 91, M = 28); its CPU results are in
# `benchmarks/results/mask_loss_cpu.md`.
#
# ## What to try next
#
# - Train the overlap experiment with three overlapping disks of three classes: how low does the
#   softmax push the shared pixels?
# - Replace the soft targets by `threshold=0.5` in the experiment of the mask targets and compare
#   the loss of a perfect predictor (`logit = +-inf` where the target is 1 / 0): with soft targets
#   even a perfect predictor has a nonzero loss along the edges.
# - Run `tests/kernels/test_mask_loss_kernel.py` on a GPU, then `benchmarks/mask_loss.py`, and
#   compare the kernel's peak extra memory with the plain PyTorch loss.
