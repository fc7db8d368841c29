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
# # Appendix: the kernels
#
# **Paper:** appendix to section 3 ("RoIAlign", and "Network Architecture" for the FPN levels);
# the paper's own implementation was Caffe2 on GPUs, this book's is OpenAI Triton.
# **Code:** `kernels/roi_align.py` (RoIAlign and multi-level RoIAlign, forward and backward),
# `kernels/roi_align_geometry.py` (the geometry it shares with the fixed-order backward of
# `kernels/roi_align_deterministic.py`).
# **Proof:** `tests/kernels/test_roi_align_kernel.py` (the kernels against
# `mrcnn/roi_align.py`'s readable reference, outputs and gradients, on odd shapes, degenerate
# boxes, an empty batch, strides that skip a level, both `aligned` modes, fixed and adaptive
# sampling, float32 and float16, and bad input) and `tests/kernels/test_roi_align_mixed_precision.py`
# (float32 boxes with 16-bit features).
# **Speed:** `benchmarks/roi_align.py`, results in `benchmarks/results/`.
#
# The chapters explain *what* the network computes with readable PyTorch. This appendix is about
# *how* to compute the same numbers fast on a GPU: which program does which part of the work,
# where the data lies in memory, and how the kernel is checked against the readable code. On a
# machine without a GPU everything below runs under Triton's interpreter, which executes the
# kernels' programs one after the other on the CPU: slow, so the examples are tiny, but the same
# code as on the GPU.
#
# Legend: $N$ images, $C$ channels, $H \times W$ feature map, $R$ RoIs, $P$ pooled size, $L$ FPN
# levels.

# %%
# %matplotlib inline
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # Triton's interpreter; must be set before kernels/ is imported

import matplotlib.pyplot as plt
from matplotlib import patches
from torch.utils._python_dispatch import TorchDispatchMode

import kernels.roi_align as roi_align_kernels
import kernels.roi_align_geometry as geometry_helpers
from kernels.roi_align import multi_level_roi_align, roi_align
from book_helpers import repository_root, show_source
from mrcnn.roi_align import roi_align_reference

device = "cuda" if torch.cuda.is_available() else "cpu"
_ = torch.manual_seed(0)

# %% [markdown]
# ## RoIAlign
#
# ### The computation
#
# Chapter 3.3 defines RoIAlign. For RoI $r = (n_r, x_1, y_1, x_2, y_2)$ on a map of spatial scale
# $s$, with offset $o = \frac12$ when `aligned` (else 0):
#
# $$y_{start} = y_1 s - o,\quad h = y_2 s - o - y_{start}\ (\max(h, 1) \text{ unless aligned}),\quad
#   b_h = h / P_h,\quad g_h = \text{sampling ratio, or } \lceil h / P_h \rceil$$
#
# $$y(p, i) = y_{start} + p\, b_h + (i + \tfrac12)\, b_h / g_h, \qquad
#   \text{out}[r, c, p, q] = \frac{1}{\max(g_h g_w, 1)} \sum_{i < g_h,\ j < g_w}\ \sum_{a, b \in \{0, 1\}}
#   w_a(y)\, w_b(x)\, F[n_r, c, y_a, x_b]$$
#
# where $y_0 = \lfloor y \rfloor$, $y_1 = y_0 + 1$, $w_1(y) = y - y_0$, $w_0(y) = 1 - w_1(y)$ are the
# bilinear neighbours and weights of sample $y = y(p, i)$, $x = x(q, j)$ (with the border rules of
# the reference). With FPN the map is the one of level
#
# $$k_r = \Big\lfloor k_0 + \log_2 \frac{\sqrt{(x_2 - x_1)(y_2 - y_1)}}{224} + \epsilon \Big\rfloor,
#   \text{ clamped to the first and last levels there are};$$
#
# a RoI whose level has no map (strides 8 and 32 skip level 4) pools zeros, as in torchvision.
#
# **Backward.** The output is *linear* in $F$: each output is a weighted sum of feature values,
# with weights that depend on the RoI only. The gradient of the loss with respect to $F$ is the
# transpose of that sum: every output gradient $G[r, c, p, q]$ goes back to the four neighbours
# of each of its samples, with the same weights,
#
# $$\frac{\partial \mathcal{L}}{\partial F[n, c, y_a, x_b]} \mathrel{+}=
#   w_a(y)\, w_b(x)\, \frac{G[r, c, p, q]}{\max(g_h g_w, 1)}.$$
#
# Many RoIs (and neighbouring samples of one RoI) touch the same pixel, so the sums collide: the
# kernel adds with atomic operations into a float32 buffer.
#
# ### Where the work is
#
# At the benchmark's training shapes (2 images of $800 \times 1344$, P2-P5, 256 channels, 1024
# RoIs pooled to $7 \times 7$ for the box head and 256 to $14 \times 14$ for the mask head, 2 x 2
# samples per bin), each output reads $4 \times 4 = 16$ feature values, and the backward makes 16
# atomic additions per output gradient:

# %%
channels, samples = 256, 2 * 2
pyramid = [(800 // stride, 1344 // stride) for stride in (4, 8, 16, 32)]
feature_values = 2 * channels * sum(h * w for h, w in pyramid)
print(f"feature values (2 images, 4 levels): {feature_values / 1e6:.0f} M, "
      f"{feature_values * 4 / 2**20:.0f} MiB in float32")
for head, rois, pooled in (("box head", 1024, 7), ("mask head", 256, 14)):
    outputs = rois * channels * pooled * pooled
    print(f"{head}: {outputs / 1e6:.1f} M outputs, {outputs * samples * 4 / 1e6:.0f} M reads forward, "
          "as many atomic adds backward")

# %% [markdown]
# So the work is memory traffic: gathers forward, scattered additions backward, about 200 M of
# each per head. Two choices follow.
#
# 1. **Channels last.** In the usual $[N, C, H, W]$ layout the $C$ values of one pixel are $H W$
#    apart: a warp of 32 threads reading 32 channels of one pixel touches 32 memory sectors. In
#    $[N, H, W, C]$ they are contiguous, and one warp instruction moves 512 bytes at once, as
#    loads forward and as vector atomic adds backward. So the kernel first copies the features
#    into a channels-last buffer (one pass over the features above, a small fraction of a
#    millisecond at a current GPU's memory bandwidth) and vectorizes over channels.
# 2. **All levels in one launch.** FPN pools every RoI from one of four maps. Sorting RoIs by
#    level, gathering them, pooling each level and scattering the results back costs dozens of
#    small operations and host synchronizations (how many RoIs on this level?). Instead all
#    levels go into the *same* buffer, one after the other, and every program computes the level
#    of its own RoI from the box.
#
# ### One buffer for all levels
#
# Level $l$ of image $n$ occupies positions $T_l \dots T_l + H_l W_l - 1$ of the image's $T =
# \sum_l H_l W_l$ positions, each position holding $C$ contiguous channels: $F_l[n, c, y, x]$ is
# at `buffer[n, T_l + y W_l + x, c]`.
#
# Where each map lies in the buffer is part of the call's `LaunchGeometry`: one named tuple that
# the public functions build once from the maps' shapes and the settings, and that the launchers
# spell out as the kernels' arguments. It lives in `kernels/roi_align_geometry.py`, beside `pack`
# and `unpack`, because the fixed-order backward (`kernels/roi_align_deterministic.py`) walks the
# same buffer.

# %%
show_source(geometry_helpers.LaunchGeometry, geometry_helpers.launch_geometry, geometry_helpers.pack,
            geometry_helpers.unpack)  # fmt: skip

# %%
tiny_pyramid = [torch.randn(2, 3, 16 // 2**level, 24 // 2**level) for level in range(3)]  # P2-P4 of a 64 x 96 image
geometry = geometry_helpers.launch_geometry(tiny_pyramid, (2, 2), [1 / 4, 1 / 8, 1 / 16], 2, False, min_level=2)
packed = geometry_helpers.pack(tiny_pyramid, geometry)  # [N, T, C]
print("heights", geometry.heights, "widths", geometry.widths, "offsets T_l", geometry.offsets, "T", geometry.positions,
      "levels", geometry.levels)
print("packed", tuple(packed.shape), "contiguous:", packed.is_contiguous())
level, n, c, y, x = 1, 1, 2, 3, 5
assert packed[n, geometry.offsets[level] + y * geometry.widths[level] + x, c] == tiny_pyramid[level][n, c, y, x]
# views back, no copy
assert all(torch.equal(a, b) for a, b in zip(geometry_helpers.unpack(packed, geometry), tiny_pyramid))

# %% [markdown]
# ### What one program computes
#
# The grid has three axes: program $(r, t, u)$ owns RoI $r$, the $t$-th block of `BLOCK_BINS` of
# its bins (bin $(p, q)$ is number $p P_w + q$) and the $u$-th block of `BLOCK_C` channels. It reads
# its RoI, computes the level and the sampling grid, then loops over the $g_h \times g_w$ samples of
# its bins. Each sample is four loads (forward) or four atomic adds (backward) of a
# `[BLOCK_BINS, BLOCK_C]` tile: one row per bin, each row `BLOCK_C` contiguous channels of one
# neighbour pixel. All bins of a program share the RoI's sample count, so the loop is the same
# for every row. The tile size comes from a fixed rule, not from autotuning:

# %%
show_source(roi_align_kernels._block_sizes)
for dtype in (torch.float32, torch.float16):
    for rois, pooled in ((1024, 7), (256, 14)):
        block_bins, block_c = roi_align_kernels._block_sizes(256, pooled * pooled, torch.finfo(dtype).bits // 8)
        grid = (rois, -(-pooled * pooled // block_bins), -(-256 // block_c))  # ceil divisions
        print(f"{str(dtype):14} P = {pooled:2}: tile [{block_bins}, {block_c}], grid {grid}, "
              f"{grid[0] * grid[1] * grid[2]} programs")

# %% [markdown]
# The picture, for one RoI pooled to $7 \times 7$ with `BLOCK_BINS = 8` (float32, $C = 256$):
# on the left the bins of each program along the grid's second axis, in one colour, and the
# $2 \times 2$ samples of each bin; on the right the buffer those programs read, with the four rows
# (neighbour pixels) that one sample needs, cut into the two channel blocks of the grid's third
# axis.

# %%
def program_grid_figure():
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.2), gridspec_kw={"width_ratios": [1.5, 1]})
    height, width, pooled, block_bins = 12, 16, 7, 8
    x1, y1, x2, y2 = 2.3, 1.6, 13.1, 10.4  # the RoI in feature pixels
    for row in range(height + 1):
        left.plot([0, width], [row, row], color="0.85", lw=0.6)
    for col in range(width + 1):
        left.plot([col, col], [0, height], color="0.85", lw=0.6)
    bin_h, bin_w = (y2 - y1) / pooled, (x2 - x1) / pooled
    colours = plt.get_cmap("tab10")
    for p in range(pooled):
        for q in range(pooled):
            block = (p * pooled + q) // block_bins
            left.add_patch(patches.Rectangle((x1 + q * bin_w, y1 + p * bin_h), bin_w, bin_h, color=colours(block),
                                             alpha=0.35, lw=0))  # fmt: skip
            for i in range(2):
                for j in range(2):
                    left.plot(x1 + (q + (j + 0.5) / 2) * bin_w, y1 + (p + (i + 0.5) / 2) * bin_h, ".", color="k",
                              ms=2.5)  # fmt: skip
    left.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=2, color="k"))
    for block in range(-(-pooled * pooled // block_bins)):
        left.plot([], [], "s", color=colours(block), alpha=0.6, label=f"t = {block}")
    left.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, title="program axis 1")
    left.set(xlim=(0, width), ylim=(height, 0), aspect="equal", title="one RoI, 7 x 7 bins, 2 x 2 samples per bin")

    sizes = [("P2", 6), ("P3", 3), ("P4", 1.5), ("P5", 0.75)]  # band heights, not to scale
    top = 0.0
    for name, size in sizes:
        right.add_patch(patches.Rectangle((0, top), 256, size, color="0.9", ec="0.5"))
        right.text(-8, top + size / 2, name, ha="right", va="center")
        top += size
    # the four neighbours of one sample on P3: (y0, x0) and (y0, x0 + 1) are neighbouring positions,
    # (y0 + 1, x0) and (y0 + 1, x0 + 1) come W_l positions later
    for row in (7.0, 7.25, 8.2, 8.45):
        for channel_block, colour in ((0, "tab:red"), (1, "tab:blue")):
            right.plot([128 * channel_block + 2, 128 * channel_block + 126], [row, row], color=colour, lw=2)
    right.text(262, 7.1, "y0: x0, x0 + 1", va="center", fontsize=8)
    right.text(262, 8.3, "y0 + 1: x0, x0 + 1", va="center", fontsize=8)
    right.axvline(128, color="0.3", ls="--", lw=1)
    right.text(64, -0.35, "u = 0", ha="center")
    right.text(192, -0.35, "u = 1", ha="center")
    right.text(128, top + 0.55, "one sample of one bin: 4 rows of BLOCK_C contiguous channels", ha="center", fontsize=9)
    right.set(xlim=(-40, 330), ylim=(top + 0.9, -0.8), xlabel="channel c", ylabel="position in the image's T positions",
              title="buffer [N, T, C], one image", yticks=[])
    fig.tight_layout()
    plt.show()


program_grid_figure()

# %% [markdown]
# ### The kernel
#
# Two helpers and one kernel. `bilinear_axis` is the reference's `bilinear_neighbours` for a
# vector of samples; `roi_geometry` reads the RoI, picks its level and computes $y_{start}$,
# $b_h$, $g_h$ and the count (both helpers are in `kernels/roi_align_geometry.py`, shared with
# the fixed-order backward); the kernel loops over the samples. Forward and backward walk the
# same samples, so they are one kernel with a `BACKWARD` switch: it loads (forward) or
# atomically adds into (backward) the same four addresses.

# %%
show_source(geometry_helpers.bilinear_axis.fn, geometry_helpers.roi_geometry.fn, roi_align_kernels._roi_align_kernel.fn)

# %% [markdown]
# Details that make it match the reference to float rounding, and stay safe:
#
# - **Coordinates in float32**, whatever the feature dtype, computed in the reference's order
#   of operations, from float32 boxes when the features are 16-bit (mixed precision keeps box
#   geometry in float32: a box at $x = 1330.3$ would be $1328$ in bfloat16). The divisions use
#   `tl.div_rn` (correctly rounded): the adaptive $g_h = \lceil h / P_h \rceil$ jumps at
#   integers, so $14 / 7$ must be exactly 2.
# - **The level by clamping and matching**: $k$ is clamped to the first and last maps' levels
#   and compared with the level of each map (a box of zero area lands on the first). Where no
#   map has level $k$, the RoI gets no samples: zeros forward, nothing backward.
# - **int64 offsets**: $N T C$ passes $2^{31}$ from about 94 images of $800 \times 1344$ with 256
#   channels (an evaluation batch, or larger images), so positions are 64-bit before they are
#   multiplied by $C$.
# - **Masks, not branches**: a sample outside the map, a padding bin or channel, or a RoI of
#   an image that does not exist (only possible with `validate=False`) is masked; nothing is read
#   or written out of bounds.
# - **`sem="relaxed"` atomics**: the additions need no ordering among themselves; the default
#   (acquire-release) would fence every one of them.
#
# ### Launch, autograd and the public functions
#
# The launcher checks nothing (the public functions did), picks the tile and launches once. The
# `autograd.Function` packs the levels, allocates the output and launches forward; backward it
# zero-fills the float32 buffer, launches, casts to the feature dtype, and hands each level a
# view of its part of the buffer.

# %%
show_source(roi_align_kernels._launch, roi_align_kernels._RoIAlignFunction)

# %% [markdown]
# ### Checked against the reference
#
# The same tiny case through the kernel and through `roi_align_reference`, forward and backward
# with the same output gradient (the tests do this over many more cases). The RoIs include one
# partly outside the map, one entirely outside and a single point.

# %%
features = torch.randn(2, 5, 9, 11, device=device)
rois = torch.tensor([[0, 2.0, 3.0, 9.5, 10.0], [1, -4.0, -3.0, 3.0, 5.0], [0, 30.0, 30.0, 36.0, 34.0],
                     [0, 7.0, 7.0, 7.0, 7.0]], device=device)  # fmt: skip
for aligned, sampling_ratio in ((False, 2), (True, -1)):
    grad_output = torch.randn(4, 5, 3, 2, device=device)
    results = []
    for pool in (roi_align, roi_align_reference):
        leaf = features.clone().requires_grad_()
        pooled = pool(leaf, rois, (3, 2), 0.5, sampling_ratio, aligned)
        (grad,) = torch.autograd.grad(pooled, leaf, grad_output)
        results.append((pooled, grad))
    (pooled, grad), (expected, expected_grad) = results
    torch.testing.assert_close(pooled, expected)
    torch.testing.assert_close(grad, expected_grad)
    print(f"aligned={aligned}, sampling_ratio={sampling_ratio}: largest difference, output "
          f"{(pooled - expected).abs().max().item():.1e}, gradient {(grad - expected_grad).abs().max().item():.1e}")

# %% [markdown]
# And the multi-level entry point against the reference run on each RoI's own level (P2-P4 of a
# $64 \times 96$ image; the RoIs reach every level and are clamped at both ends):

# %%
pyramid_maps = [f.to(device) for f in tiny_pyramid]
strides = (4, 8, 16)
boxes = torch.tensor([[0, 2.0, 3.0, 20.0, 25.0], [1, 3.0, 5.0, 115.0, 117.0], [0, 1.0, 2.0, 225.0, 226.0],
                      [1, -50.0, -40.0, 900.0, 700.0]], device=device)  # fmt: skip
# FPN's equation: 18 x 22 -> k < 2, clamped to 2; 112 x 112 -> 3; 224 x 224 -> 4; 950 x 740 -> 5, clamped to 4
levels = [2, 3, 4, 4]
pooled = multi_level_roi_align(pyramid_maps, boxes, 2, [1 / s for s in strides], 2, False)
expected = torch.cat([roi_align_reference(pyramid_maps[k - 2], boxes[r : r + 1], 2, 1 / strides[k - 2], 2)
                      for r, k in enumerate(levels)])  # fmt: skip
torch.testing.assert_close(pooled, expected)
print("multi-level: largest difference", (pooled - expected).abs().max().item())

# %% [markdown]
# With the P2 and P4 maps only (strides 4 and 16), the 112 x 112 box belongs to level 3, which is
# not there: it pools zeros. The others are pooled as before, from the maps of their levels.

# %%
gapped = multi_level_roi_align([pyramid_maps[0], pyramid_maps[2]], boxes, 2, [1 / 4, 1 / 16], 2, False)
print("largest value per RoI:", [round(v, 3) for v in gapped.abs().amax(dim=(1, 2, 3)).tolist()])
assert torch.equal(gapped[1], torch.zeros_like(gapped[1])) and torch.equal(gapped[[0, 2, 3]], pooled[[0, 2, 3]])

# %% [markdown]
# ### A handful of operations, no synchronization
#
# What runs around the kernel? Below, every PyTorch operation of one forward and backward of the
# multi-level function is recorded, with the kernel replaced by a stand-in that only notes its
# launch. With the default `validate=True` the values of the RoIs are checked first (finite,
# batch index in range), which reads a result back to the host: a synchronization on a GPU,
# `_local_scalar_dense` below. The model's RoIs are valid by construction, so it passes
# `validate=False`: no synchronization at all. (torchvision's `MultiScaleRoIAlign` runs about 50
# operations and synchronizes once per level, to find out how many RoIs each level has.)

# %%
class RecordOperations(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


class KernelStandIn:
    def __init__(self, record):
        self.record = record

    def __getitem__(self, grid):
        return lambda *args, BACKWARD, **meta: self.record.names.append(
            f"LAUNCH {'backward' if BACKWARD else 'forward'} {grid}"
        )


real_kernel = roi_align_kernels._roi_align_kernel
try:
    for validate in (True, False):
        maps = [f.clone().requires_grad_() for f in pyramid_maps]
        record = RecordOperations()
        roi_align_kernels._roi_align_kernel = KernelStandIn(record)
        with record:
            pooled = multi_level_roi_align(maps, boxes, 7, [1 / s for s in strides], 2, False, validate=validate)
            torch.autograd.grad(pooled, maps, torch.ones_like(pooled))
        views = sum(name in ("permute", "view", "slice", "select") for name in record.names)
        print(f"validate={validate}: {len(record.names)} operations ({views} of them views, no work), "
              f"{record.names.count('_local_scalar_dense')} synchronizing")
        print("   ", ", ".join(record.names))
finally:
    roi_align_kernels._roi_align_kernel = real_kernel

# %% [markdown]
# ### Speed
#
# `benchmarks/roi_align.py` times the kernel against torchvision's `MultiScaleRoIAlign`, the
# library's CPU path and the readable reference, forward and forward + backward, at the training
# shapes above, and writes its tables to `benchmarks/results/`. Timings are only meaningful on a
# GPU; under the interpreter the kernel is thousands of times slower than the PyTorch code.
#
# ## What to try next
#
# - Change `_block_sizes` to tiles of 2048 or 512 values and time both heads on a GPU: where is
#   the optimum, and does it move between float32 and float16?
# - Pass the features in `torch.channels_last` memory format: the packing copy becomes a plain
#   concatenation. How much of the forward time was the transposition?
# - The backward adds every sample's contribution atomically. For a RoI on its own FPN level,
#   neighbouring samples often hit the same pixels: accumulate a RoI's contributions in
#   registers first (the bilinear weights are separable, so a bin's gradient is a small outer
#   product) and count how many atomic adds that saves.
# - Write the forward for the `[N, C, H, W]` layout (vectorize over bins instead of channels) and
#   compare: how much does coalescing buy here?

# %% [markdown]
# ## The mask loss
#
# **Code:** `kernels/mask_loss.py`. **Proof:** `tests/kernels/test_mask_loss_kernel.py` (loss and
# gradient against `mrcnn/mask_loss.py`'s reference: float32, float16, bfloat16, R = 0, 1, many,
# K = 1, 2, 81, M = 14, 28, logits of +-1e4, constant targets, strided logits, bad input).
# **Speed:** `benchmarks/mask_loss.py`.
#
# `kernels/mask_loss.py` fuses the mask loss of section 3 (chapter
# [Mask representation](03_2_mask_representation.py) derives it) into two passes. Forward: one
# kernel reads, for each of the $R M^2$ pixels, the logit of the RoI's own class $k_r$ (through
# the logits' strides) and the target, and writes both a partial sum of
# $\operatorname{softplus}(x) - t x$ and the gradient $(\sigma(x) - t) / (R M^2)$ into a compact
# $[R, M, M]$ buffer; one more single-program kernel adds the partial sums in a fixed order
# (no atomics: the same bits on every run). Backward: one kernel writes the whole
# $[R, K, M, M]$ gradient, $g$ times the saved value on channel $k_r$ and zero elsewhere, into a
# tensor from `torch.empty` (no zero fill). Blocks are 1024 (forward) and 2048 (backward)
# elements for 4 warps on a GPU, and up to $2^{16}$ under the interpreter, where each program
# costs milliseconds.
#
# What the kernel moves through memory at the paper's training size, counted from its code
# (float32 logits and targets), next to the dense gradient of the plain PyTorch loss (gather +
# `binary_cross_entropy_with_logits`), which fills a zero tensor and scatters into it; its
# passes over the gathered pixels, several, depend on the PyTorch version and are left out:

# %%
import kernels.mask_loss as fused  # TRITON_INTERPRET was set at the top when there is no GPU

R, K, M = 512, 81, 28
pixels, dense = R * M * M, R * K * M * M
megabytes = lambda elements: f"{4 * elements / 1e6:7.1f} MB"  # noqa: E731
rows = [
    ("kernel forward: read logits (channel k_r) + targets", 2 * pixels),
    ("kernel forward: write compact gradient", pixels),
    ("kernel backward: read compact gradient", pixels),
    ("kernel backward: write dense gradient", dense),
    ("plain PyTorch: zero fill + scatter into dense gradient", dense + pixels),
]
for what, elements in rows:
    print(f"{what:<58}{megabytes(elements)}")
print(f"{'held between forward and backward, kernel (compact grad)':<58}{megabytes(pixels)}")

# %% [markdown]
# The launchers and the autograd function, the parts chapter 3.2 does not show:

# %%
show_source(fused._forward, fused._backward, fused._MaskLoss, fused.mask_loss)

# %% [markdown]
# Deterministic: the same inputs give the same bits, loss and gradient, on every run.

# %%
logits = torch.randn(40, 3, 28, 28, device=device)
labels = torch.randint(0, 3, (40,), device=logits.device)
targets = torch.rand(40, 28, 28, device=logits.device)
runs = []
for _ in range(2):
    x = logits.clone().requires_grad_()
    loss = fused.mask_loss(x, labels, targets)
    loss.backward()
    runs.append((loss.detach(), x.grad))
print("bit-identical:", torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]))

# %% [markdown]
# The recorded benchmarks (`python benchmarks/mask_loss.py`), forward + backward at R = 512,
# K = 81 and 91, M = 28, plus the mask predictor's last 1x1 convolution computed in full or for
# each RoI's own class only (`mrcnn.mask_loss.gathered_mask_logits`):

# %%
import json

for path in sorted((repository_root() / "benchmarks" / "results").glob("mask_loss_*.json")):
    result = json.loads(path.read_text())
    print(f"{path.name}: {result['meta']['device']}, torch {result['meta']['torch']}, {result['meta']['command']}")
    for row in result["rows"]:
        extra = "" if row["peak_extra_mib"] is None else f", peak extra {row['peak_extra_mib']:.1f} MiB"
        print(f"  {row['what']:<32} R={row['R']:<4} K={row['K']:<3} {row['dtype']:<9} "
              f"median {row['median_ms']:9.3f} ms{extra}")

# %% [markdown]
# ### What to try next with the mask loss
#
# - Store the compact gradient in the logits' dtype instead of float32 and measure the backward
#   on a GPU: is a bfloat16 gradient of the loss still equal to the reference's to tolerance?
# - Fold `gathered_mask_logits` into the kernel: one program per RoI loads row $k_r$ of the
#   predictor's weight and the RoI's 256 feature maps, and writes the loss and the gradients of
#   features and weight; compare with the batched matrix product.
# - Count the synchronizations of `kernels.mask_loss.mask_loss` with the operation recorder used
#   for RoIAlign above: the input check's one with the default `validate=True`, none with
#   `validate=False`?
