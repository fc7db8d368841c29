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
# # RoIAlign
#
# **Paper:** section 3, "RoIAlign" (and Figure 3, Table 2c and 2d for the ablation).
# **Code:** `mrcnn/roi_align.py` (the readable reference, RoIPool, the FPN level of a RoI),
# `mrcnn/roi_align_cpu.py` (the fast CPU path: one sparse matrix product),
# `kernels/roi_align.py` (the Triton kernels used on a GPU).
# **Proof:** `tests/test_roi_align.py` (the reference against a float64 loop written from the
# definition, hand-computed cases, the fast path against the reference, torchvision) and
# `tests/kernels/test_roi_align_kernel.py` (the kernels against the reference).
# **Speed:** `benchmarks/roi_align.py`, results in `benchmarks/results/`.
#
# The box and mask heads need a fixed-size grid of features for every RoI, whatever its size: a
# $P \times P$ grid ($7 \times 7$ for the box head, $14 \times 14$ for the mask head). Fast R-CNN's
# **RoIPool** cuts it out of the feature map with two roundings. A box head hardly notices;
# a mask, which must follow the object's edges to the pixel, does. **RoIAlign** removes every
# rounding: "we avoid any quantization of the RoI boundaries or bins (i.e., we use $x/16$
# instead of $[x/16]$). We use bilinear interpolation to compute the exact values of the input
# features at four regularly sampled locations in each RoI bin, and aggregate the result".
#
# Legend: $N$ images, $C$ channels, $H \times W$ feature map, $R$ RoIs, $P$ pooled size; a RoI
# is a row $(n, x_1, y_1, x_2, y_2)$: image index and box in image pixels; the spatial scale $s$
# is 1/stride ($1/16$ for the paper's C4 backbone, $1/4 \dots 1/32$ for FPN's P2-P5).

# %%
# %matplotlib inline
import os
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from IPython.display import Markdown, display

if not torch.cuda.is_available():  # Triton's interpreter when there is no GPU, set before kernels/ is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mrcnn.roi_align_cpu as roi_align_cpu  # noqa: E402
from book_helpers import repository_root, show_source  # noqa: E402
from mrcnn.roi_align import (  # noqa: E402
    bilinear_neighbours,
    roi_align_reference,
    roi_pool,
    roi_pool_bins,
    sampling_grid,
)
from mrcnn.poolers import MultiLevelRoIAlign, fpn_level, roi_align  # noqa: E402
from mrcnn.visualize import roi_align_figure  # noqa: E402

_ = torch.manual_seed(0)

# %% [markdown]
# ## RoIPool's two roundings
#
# RoIPool maps the box to the feature map and rounds twice:
#
# 1. the corners to whole feature pixels, $[x_1 s]$, $[x_2 s]$ (and the RoI is at least one
#    pixel);
# 2. the $P \times P$ bins to whole pixels: bin $p$ covers rows
#    $\lfloor p\, b_h \rfloor \dots \lceil (p + 1)\, b_h \rceil - 1$ past the RoI's first row, with
#    $b_h$ the bin height in pixels.
#
# Each bin then takes the max over its pixels. Both roundings move the bins away from the box
# by up to a pixel of the feature map, 16 image pixels at stride 16. Below, one RoI over an
# $8 \times 8$ feature grid (pixel $(i, j)$ is the unit square $[j, j+1) \times [i, i+1)$): on
# the left the whole pixels RoIPool's bins cover, shaded (they even overlap, and reach a pixel
# past the box); on the right RoIAlign's exact bins and their sampling points. The numbers are
# each method's pooled value of the grey map underneath.

# %%
roi_align_figure()

# %% [markdown]
# The bins on the left come from the library's own quantization, the same function its
# `roi_pool` uses (and checked against torchvision's `roi_pool`, bit for bit, in the tests):

# %%
show_source(roi_pool_bins)

# %% [markdown]
# ## RoIAlign: sample, never round
#
# For a RoI $(x_1, y_1, x_2, y_2)$, spatial scale $s$ and a half-pixel offset $o$ (next
# section), RoIAlign keeps real coordinates throughout:
#
# $$y_{start} = y_1 s - o, \qquad h = y_2 s - o - y_{start}, \qquad b_h = h / P$$
#
# and splits each bin into a regular $g_h \times g_w$ grid of sampling points, at the centres of
# the grid's cells ($g = 2$ in the paper's "four regularly sampled locations"; the reference
# implementations also have an *adaptive* mode, $g_h = \lceil h / P \rceil$):
#
# $$y(p, i) = y_{start} + p\, b_h + (i + \tfrac12)\, \frac{b_h}{g_h}, \qquad i = 0 \dots g_h - 1$$
#
# and likewise $x(q, j)$. Each sample reads the map by **bilinear interpolation** between its four
# neighbouring pixels: with $y_0 = \lfloor y \rfloor$, $y_1 = y_0 + 1$, $l_y = y - y_0$,
# $h_y = 1 - l_y$ (and the same for $x$),
#
# $$\operatorname{bilinear}(F, y, x) = h_y h_x F[y_0, x_0] + h_y l_x F[y_0, x_1]
#   + l_y h_x F[y_1, x_0] + l_y l_x F[y_1, x_1].$$
#
# The bin's output is the **average** of its samples:
#
# $$\text{out}[r, c, p, q] = \frac{1}{g_h g_w} \sum_{i, j}
#   \operatorname{bilinear}\big(F[n_r, c], y(p, i), x(q, j)\big).$$
#
# **Max or average?** It is tempting to read RoIAlign as taking the *max* of its four samples, as
# RoIPool takes the max of its bin. The paper leaves the choice open ("aggregate the result (using max or
# average)") and Table 2c reports RoIAlign with both: the two are nearly equal, and both far
# above RoIPool. The implementations that followed (Detectron, torchvision, and this library)
# average, which also makes RoIAlign linear in the features (used below for the fast path).
#
# At the border, the reference implementations' conventions: a sample more than one pixel
# outside the map reads 0 (and still counts in the average); one within a pixel of the border
# is moved onto it.
#
# ## The half-pixel shift, `aligned`
#
# A feature pixel $i$ of a stride-$S$ map summarizes the image around the centre of its cell,
# image coordinate $(i + \frac12) S$. So the continuous image coordinate $x$ is at feature
# coordinate $x / S - \frac12$ in the units where pixel $i$ sits at $i$, which is what bilinear
# interpolation uses. The first RoIAlign implementations (and torchvision's Mask R-CNN) forgot
# the $-\frac12$: `aligned=False`, every sample half a feature pixel down and to the right. Detectron2
# added `aligned=True`, $o = \frac12$; the legacy mode also stretches a RoI to at least one pixel.
#
# Worked example, on a $5 \times 5$ map with $F[y, x] = 5y + x$ (bilinear interpolation of a
# linear function is exact, so a bin's average is $5y + x$ at its centre). The box
# $(1, 1, 3, 3)$ at scale 1 covers the four pixels $(1..2) \times (1..2)$, whose values are 6, 7,
# 11, 12. With `aligned=True` it starts at $1 - \frac12 = 0.5$ and is 2 long: bins of 1, centres
# at 1.0 and 2.0, exactly the pixel centres, so the $2 \times 2$ output is those four pixels.
# With `aligned=False` the centres are at 1.5 and 2.5, each the average of a $2 \times 2$ block:
# $5 \cdot 1.5 + 1.5 = 9$, and 10, 14, 15.

# %%
five = torch.arange(25, dtype=torch.float64).view(1, 1, 5, 5)  # F[y, x] = 5 y + x
box = torch.tensor([[0.0, 1.0, 1.0, 3.0, 3.0]], dtype=torch.float64)  # (n, x1, y1, x2, y2)
print("the pixels the box covers:\n", five[0, 0, 1:3, 1:3])
print("aligned=True: \n", roi_align(five, box, 2, 1.0, sampling_ratio=2, aligned=True)[0, 0])
print("aligned=False:\n", roi_align(five, box, 2, 1.0, sampling_ratio=2, aligned=False)[0, 0])

# %% [markdown]
# ## An experiment: what a fraction of a stride does
#
# RoIPool's first rounding means that a box moved by a fraction of a feature pixel often gives
# the same output. Move one by a quarter of a stride, 4 image pixels at stride 16: its corners go
# from $x_1 s = 98 / 16 = 6.125$ to $6.375$ and so on, which all round to the same pixels.

# %%
features = torch.randn(1, 8, 32, 32)  # a stride-16 map of a 512 x 512 image
box = torch.tensor([[0.0, 98.0, 114.0, 258.0, 290.0]])
moved = box + torch.tensor([[0.0, 4.0, 4.0, 4.0, 4.0]])
for name, pool in (("RoIPool ", lambda b: roi_pool(features, b, 7, 1 / 16)),
                   ("RoIAlign", lambda b: roi_align(features, b, 7, 1 / 16, sampling_ratio=2, aligned=True))):
    print(f"{name}: output unchanged: {torch.equal(pool(box), pool(moved))}, "
          f"largest change {(pool(box) - pool(moved)).abs().max():.3f}")

# %% [markdown]
# For a box head that is harmless, even welcome. For a mask it is not. Take an object, a disc
# in a $256 \times 256$ image, and a stride-16 feature map that encodes it perfectly: the
# fraction of each $16 \times 16$ cell the disc covers. Pool the disc's box to $14 \times 14$
# from that map, with RoIPool and with RoIAlign, and compare with the mask target of the same
# box (the full-resolution mask pooled by RoIAlign, as the mask loss does). As the box and the
# object slide by a fraction of a stride together, RoIAlign's grid follows them; RoIPool's
# stays on the cells.

# %%
size, stride, radius = 256, 16, 50.0
coords = torch.arange(size, dtype=torch.float32) + 0.5
errors = {"RoIPool": [], "RoIAlign": []}
shifts = torch.arange(0, 33, 2.0)
for shift in shifts.tolist():
    centre = 100.0 + shift
    inside = (coords[:, None] - centre) ** 2 + (coords[None, :] - centre) ** 2 <= radius**2  # [H, W]
    mask = inside.float()[None, None]  # [1, 1, H, W]
    cell_fraction = F.avg_pool2d(mask, stride)  # [1, 1, 16, 16]: the stride-16 "feature"
    disc_box = torch.tensor([[0.0, centre - radius, centre - radius, centre + radius, centre + radius]])
    target = roi_align(mask, disc_box, 14, 1.0, sampling_ratio=-1, aligned=True)  # [1, 1, 14, 14]
    from_pool = roi_pool(cell_fraction, disc_box, 14, 1 / stride)
    from_align = roi_align(cell_fraction, disc_box, 14, 1 / stride, sampling_ratio=2, aligned=True)
    errors["RoIPool"].append((from_pool - target).abs().mean().item())
    errors["RoIAlign"].append((from_align - target).abs().mean().item())

fig, axes = plt.subplots(1, 4, figsize=(13, 3.2), gridspec_kw={"width_ratios": [1, 1, 1, 1.6]}, layout="constrained")
for axis, (title, grid) in zip(axes, (("mask target", target), ("RoIPool", from_pool), ("RoIAlign", from_align))):
    axis.imshow(grid[0, 0], cmap="viridis", vmin=0, vmax=1)
    axis.set_title(f"{title}, shift {shifts[-1]:.0f} px")
    axis.axis("off")
for name, values in errors.items():
    axes[3].plot(shifts, values, marker="o", label=name)
axes[3].set_xlabel("shift of object and box (image pixels; stride 16)")
axes[3].set_ylabel("mean |pooled - mask target|")
axes[3].legend()
plt.show()

# %% [markdown]
# RoIAlign's error is what a 16-pixel-cell encoding of a disc loses, and it hardly depends on
# where the object is. RoIPool's is larger and swings with a period of one stride as the object
# moves: its bins snap to the cells, so the pooled mask is off by up to a feature pixel (and its
# max makes it blocky). That is the effect the
# paper measures in Table 2c: at stride 16 RoIAlign improves mask AP by about 3 points over
# RoIPool, and by more at the stricter AP$_{75}$; at stride 32 (Table 2d) by more still.
#
# ## The reference code
#
# The readable implementation is three functions, in the order of the definition above.
#
# **The sample positions.** `sampling_grid` computes the coordinates $y(p, i)$ and $x(q, j)$ of
# every RoI at once, in feature pixels: the RoI's start, $p$ bins of height $b_h$, and the
# sample's place $(i + \frac12)/g_h$ within its bin. With adaptive sampling
# (`sampling_ratio=-1`) each RoI has its own $g_h \times g_w$, so the grids are padded to the
# largest and the padding masked (`y_used`, `x_used`).

# %%
show_source(sampling_grid)
# one RoI, x from 0 to 4 and y from 0 to 8, at scale 1: 2 x 2 bins of 2 x 2 samples each
y, x, y_used, x_used, count = sampling_grid(torch.tensor([[0.0, 0.0, 0.0, 4.0, 8.0]]), (2, 2), 1.0, 2, aligned=False)
print("y(p, i):", y[0].tolist(), " x(q, j):", x[0].tolist(), " samples per bin:", count.tolist())

# %% [markdown]
# **The two neighbours of a sample, along one axis.** `bilinear_neighbours` returns, for each
# coordinate, the pixel below and the pixel above it and their weights $h = 1 - l$ and $l$ (the
# distance to the lower one), with the border rules above: a coordinate more than a pixel
# outside reads nothing (`inside` is false), one within a pixel of the border is moved onto it.

# %%
show_source(bilinear_neighbours)
low, high, weight_low, weight_high, inside = bilinear_neighbours(torch.tensor([-1.5, -0.5, 0.25, 2.75, 3.5]), 4)
print("y:        ", [-1.5, -0.5, 0.25, 2.75, 3.5])
print("low, high:", low.tolist(), high.tolist())
print("h, l:     ", [round(v, 2) for v in weight_low.tolist()], [round(v, 2) for v in weight_high.tolist()])
print("inside:   ", inside.tolist())

# %% [markdown]
# **Gather and average.** `roi_align_reference` combines the two axes: the four neighbours of
# every sample are gathered from the RoI's own image, weighted by the products of the axis
# weights (the bilinear formula in the comment), the samples outside the map or past the RoI's
# own grid are zeroed, and each bin's $g_h g_w$ samples are summed and divided by their count.

# %%
show_source(roi_align_reference)

# %% [markdown]
# ## The fast CPU path: one sparse matrix
#
# `roi_align_reference` materializes $C$ values for each of the $4 g_h g_w$ neighbours of each
# bin: clear, but slow and memory-hungry at training sizes. Look at the definition again: every
# output is a weighted sum of feature pixels, with weights that depend on the RoIs only. So
# RoIAlign is **linear in the features**. Write the map as rows, one row of $C$ channels per
# pixel, $\mathbf{F} \in \mathbb{R}^{NHW \times C}$; then the whole call is a sparse matrix
# product, and its backward pass the transposed product:
#
# $$\mathbf{out} = S\,\mathbf{F}, \qquad
#   \frac{\partial L}{\partial \mathbf{F}} = S^{\top} \frac{\partial L}{\partial \mathbf{out}},
#   \qquad S \in \mathbb{R}^{R P^2 \times N H W}.$$
#
# Row $(r, p, q)$ of $S$ holds the bilinear weights $h_y h_x / (g_h g_w)$ etc. of bin $(p, q)$'s
# samples, in the columns of the pixels they read: at most $4 g_h g_w$ non-zeros in a row of
# $NHW$. Here is $S$ for one RoI with $2 \times 2$ bins on a $6 \times 6$ map, as a picture:

# %%
small_box = torch.tensor([[0.0, 1.3, 0.6, 4.9, 4.2]])
column, weight = roi_align_cpu.interpolation_matrix(small_box, (2, 2), 1.0, 2, True, 6, 6)  # [R P P, K] each
dense = torch.zeros(4, 36).index_put_((torch.arange(4)[:, None].expand_as(column), column), weight, accumulate=True)
fig, axes = plt.subplots(1, 4, figsize=(12, 2.8))
for row, axis in enumerate(axes):
    axis.imshow(dense[row].view(6, 6), cmap="Blues")
    axis.set_title(f"row of bin {divmod(row, 2)}: {int((dense[row] > 0).sum())} pixels")
    axis.set_xticks(range(6))
    axis.set_yticks(range(6))
plt.show()
print("each row sums to 1 (all samples inside the map):", dense.sum(dim=1))

# %% [markdown]
# The weights factor into a $y$ part and an $x$ part, so $S$ is built per axis and expanded by an
# outer product; per axis, the neighbours that two samples share are merged. The product itself
# is `torch.nn.functional.embedding_bag` with per-sample weights: "bag" $m$ is row $m$ of $S$,
# its indices the columns, its weights the values, and the kernel is vectorized over the $C$
# channels and parallel over the bags. For the backward pass the non-zeros are sorted by
# column, so that each pixel becomes one bag of the output rows that read it. And the feature
# rows are only those of the pixels that some RoI reads, gathered once (`touched_pixels`).

# %%
show_source(roi_align_cpu.axis_neighbours, roi_align_cpu.interpolation_matrix, roi_align_cpu.touched_pixels,
            roi_align_cpu.SparseRoIAlignFunction)

# %% [markdown]
# Same numbers, to float rounding, and much less time than the reference (the tests check
# outputs and gradients in float32 and float64, every mode):

# %%
features = torch.randn(2, 128, 100, 168, requires_grad=True)  # P3 of two 800 x 1344 images, 128 channels
sides = torch.empty(128).uniform_(2.0, 6.0).exp()  # RoI sides of 7 to 400 pixels
corners = torch.rand(128, 2) * torch.tensor([1344.0, 800.0])
rois = torch.cat([torch.randint(0, 2, (128, 1)).float(), corners, corners + sides[:, None]], dim=1)
grad_out = torch.randn(128, 128, 7, 7)
timings = {}
for name, pool in (("reference", roi_align_reference), ("sparse path", lambda *a: roi_align(*a, use_kernel=False))):
    start = time.perf_counter()
    out = pool(features, rois, 7, 1 / 8, 2, False)
    (grad,) = torch.autograd.grad(out, features, grad_out)
    timings[name] = (time.perf_counter() - start, out.detach(), grad)
print("largest difference: output", (timings["reference"][1] - timings["sparse path"][1]).abs().max().item(),
      " gradient", (timings["reference"][2] - timings["sparse path"][2]).abs().max().item())
for name, (seconds, _, _) in timings.items():
    print(f"{name:12s} forward + backward: {seconds * 1e3:6.0f} ms")

# %% [markdown]
# At full training sizes, 2 images of $800 \times 1344$, FPN levels P2-P5 with 256 channels,
# 1024 RoIs to $7 \times 7$ and 256 RoIs to $14 \times 14$, `benchmarks/roi_align.py` compares it
# with torchvision's C++ kernel on the same two CPU cores. The recorded results:

# %%
results = repository_root() / "benchmarks" / "results" / "roi_align_cpu.md"
display(Markdown(results.read_text() if results.is_file() else "(run `python benchmarks/roi_align.py` to record them)"))

# %% [markdown]
# ## Which FPN level pools a RoI
#
# With FPN there is one feature map per level, P2 to P5 (strides 4 to 32). A RoI is pooled from
# the level that suits its size (FPN paper, equation 1):
#
# $$k = \left\lfloor k_0 + \log_2\!\left(\sqrt{w h} / 224\right) \right\rfloor, \qquad k_0 = 4,$$
#
# clamped to $[2, 5]$: a $224 \times 224$ RoI (an ImageNet-sized object) goes to P4, and halving
# its side moves it one level finer, so every RoI covers a similar number of feature pixels. A
# tiny $\epsilon = 10^{-6}$ inside the floor keeps a RoI of side exactly 112 on P3 when rounding
# in the coordinates would make its $\log_2$ a hair under $-1$.

# %%
show_source(fpn_level)
sides = torch.linspace(8, 1200, 600)
levels = fpn_level(torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], dim=1), 2, 5)
plt.figure(figsize=(6, 2.6))
plt.step(sides, levels, where="post")
plt.xscale("log")
plt.xticks([28, 56, 112, 224, 448, 896], ["28", "56", "112", "224", "448", "896"])
plt.yticks([2, 3, 4, 5], ["P2", "P3", "P4", "P5"])
plt.xlabel("RoI side $\\sqrt{wh}$ (image pixels)")
plt.title("FPN level of a RoI")
plt.show()

# %% [markdown]
# `MultiLevelRoIAlign` assigns the levels and pools every RoI from its own map; without the
# kernel, all levels go through one call of the sparse path (one $S$ per level):

# %%
show_source(MultiLevelRoIAlign.forward)

# %% [markdown]
# ## The Triton kernel
#
# On a GPU, `roi_align` and `MultiLevelRoIAlign` call `kernels/roi_align.py`. It computes the same
# definition with a different layout in mind: all FPN levels are copied into one channels-last
# buffer, so that the $C$ channels of a pixel are contiguous and a GPU's loads coalesce, and each
# program handles one RoI, a block of its bins and a block of channels, computing the RoI's FPN
# level itself (equation 1 again, so no sorting of RoIs by level and no host synchronization).
# Its backward pass scatters each output gradient back along the same bilinear weights. The
# kernel file describes itself in its module docstring:

# %%
import kernels.roi_align as roi_align_kernels  # noqa: E402  (after TRITON_INTERPRET is set)

print(roi_align_kernels.__doc__)

# %% [markdown]
# and these are its `@triton.jit` functions, as they are in the files: the kernel, and the geometry
# it shares with the deterministic backward (`kernels/roi_align_geometry.py`):

# %%
import kernels.roi_align_geometry as roi_align_geometry  # noqa: E402

jitted = [value.fn for module in (roi_align_kernels, roi_align_geometry) for value in vars(module).values()
          if getattr(getattr(value, "fn", None), "__module__", None) == module.__name__]  # fmt: skip
show_source(*jitted)

# %% [markdown]
# Run it (under Triton's interpreter when there is no GPU, so on a small case) against the
# library's CPU path:

# %%
device = "cuda" if torch.cuda.is_available() else "cpu"
levels = [torch.randn(1, 4, 32 // s, 48 // s) for s in (4, 8, 16, 32)]
small_rois = torch.tensor([[0, 2.0, 3.0, 20.0, 25.0], [0, 5.0, 1.0, 160.0, 120.0], [0, 0.0, 0.0, 30.0, 10.0]])
expected = MultiLevelRoIAlign(3, (4, 8, 16, 32), sampling_ratio=2)(levels, small_rois, use_kernel=False)
from_kernel = roi_align_kernels.multi_level_roi_align([f.to(device) for f in levels], small_rois.to(device), 3,
                                                     [1 / 4, 1 / 8, 1 / 16, 1 / 32], 2, False)
print("levels:", (fpn_level(small_rois[:, 1:], 2, 5)).tolist(),
      " largest difference to the CPU path:", (from_kernel.cpu() - expected).abs().max().item())

# %% [markdown]
# ## What to try next
#
# - Set `sampling_ratio=1` (one sample at each bin's centre) and repeat the disc experiment:
#   the paper notes that the exact sampling locations and their number matter little "as long
#   as no quantization is performed".
# - Replace the average by a max over the four samples (RoIAlign-max of Table 2c): change one
#   line of a copy of `roi_align_reference` and compare on the disc.
# - Repeat the disc experiment at stride 32: how do the two errors grow (Table 2d)?
# - Pass features in `torch.channels_last` memory format to `roi_align`: the sparse path then
#   reads them without a copy. How much of its time was the transposition?
# - Compare the sparse path with a torch sparse CSR product (`torch.sparse_csr_tensor` built from
#   `interpolation_matrix`): same numbers; which is faster on your machine, forward and backward?
