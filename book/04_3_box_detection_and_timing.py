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
# # Box detection and timing
#
# **Paper:** section 4.3, "Bounding Box Detection Results" (Table 3), and section 4.4, "Timing".
# **Code:** `mrcnn/model.py` (the stages timed here are the steps of its `forward`),
# `benchmarks/stages.py` (seconds per stage, forward and backward), `benchmarks/inference.py`
# and `benchmarks/train_step.py` (our model against torchvision's on the same weights),
# `benchmarks/determinism.py` (what bit-exact runs cost), `experiments/ablations.py` (Table 3
# on the shapes).
# **Proof:** `tests/test_benchmarks.py` (every benchmark runs and writes its results; the stage
# ranges account for the whole call; the model is left as it was).
#
# Two short sections of the paper close its COCO experiments. Section 4.3 asks whether the mask
# branch costs the boxes anything, and finds it helps them. Section 4.4 reports how fast the
# model runs and trains. This chapter reads both, then takes the model apart in time: which of
# its stages costs what, on this machine's CPU, in inference and in a training step.
#
# Legend: $N$ images, $C$ channels, $R$ RoIs, $K$ classes, $P$ pooled size, $M$ mask size,
# $D$ detections.

# %%
# %matplotlib inline
import json
import os
import statistics
import sys
import time

import matplotlib.pyplot as plt
import torch

from book_helpers import repository_root, show_source
from mrcnn.config import shapes_small
from mrcnn.model import MaskRCNN

ROOT = repository_root()
sys.path.insert(0, str(ROOT))  # the benchmarks live next to the library, outside the package
from benchmarks import stages  # noqa: E402
from benchmarks.common import benchmark_images  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # torch.profiler's own log lines (profiler_start, _stop) stay off stderr
torch.set_num_threads(1)  # small tensors: a second thread barely helps, and on a shared machine it waits
_ = torch.manual_seed(0)

# %% [markdown]
# ## 4.3 Box detection: does the mask branch help the boxes?
#
# For Table 3 "even though the full Mask R-CNN model is trained, only the classification and
# box outputs are used at inference (the mask output is ignored)". Against the detectors of the
# time, Mask R-CNN with ResNet-101-FPN wins, and the paper isolates why with one more row: "we
# trained a version of Mask R-CNN but without the mask branch, denoted by 'Faster R-CNN,
# RoIAlign'". The paper's reading of its Table 3 (COCO `test-dev`, box AP in %):
#
# | model | backbone | $AP^{bb}$ | $AP^{bb}_{50}$ | $AP^{bb}_{75}$ |
# |---|---|---|---|---|
# | Faster R-CNN w FPN (the FPN paper) | ResNet-101-FPN | 36.2 | 59.1 | 39.0 |
# | Faster R-CNN, RoIAlign | ResNet-101-FPN | 37.3 | 59.6 | 40.3 |
# | Mask R-CNN | ResNet-101-FPN | 38.2 | 60.3 | 41.7 |
# | Mask R-CNN | ResNeXt-101-FPN | 39.8 | 62.3 | 43.4 |
#
# RoIAlign alone lifts Faster R-CNN by 1.1 points; the mask branch adds 0.9 more, a gap "due
# solely to the benefits of multi-task training": the same boxes, classifier and features,
# trained with one more loss on the shared features. And the box AP of 39.8 sits only 2.7 points
# above the mask AP of the same model (37.1, Table 1).
#
# In this library Faster R-CNN is the same model with the mask branch switched off
# (`config.mask=False`): the box branch, the RPN and the trunk are the same modules.

# %%
for mask in (True, False):
    model = MaskRCNN(shapes_small().replace(mask=mask))
    parameters = sum(p.numel() for p in model.parameters())
    print(f"mask={mask!s:5}  mask branch: {type(model.mask_branch).__name__:10}  parameters: {parameters / 1e6:.2f} M")

# %% [markdown]
# `experiments/ablations.py` trains both on the synthetic shapes with the same seeds, data
# order and budget, and stores their box AP under the key `"table3"` of
# `experiments/results/ablations.json`:

# %%
ablations_path = ROOT / "experiments" / "results" / "ablations.json"
table3 = json.loads(ablations_path.read_text()).get("table3") if ablations_path.is_file() else None
ran = table3 is not None and "mask_rcnn" in table3 and "faster_rcnn" in table3
if ran:
    print(f"{'':14s} {'box AP':>14s} {'AP50':>14s} {'AP75':>14s}   paper AP")
    for key, name in (("faster_rcnn", "Faster R-CNN"), ("mask_rcnn", "Mask R-CNN")):
        row = table3[key]
        cells = " ".join(f"{row[m]['mean']:7.1f} ± {row[m]['std']:4.1f}" for m in ("AP", "AP50", "AP75"))
        print(f"{name:14s} {cells}   {table3['paper_box_AP'][key]['AP']:.1f}")
    if "box_AP_gain_per_seed" in table3:
        gain = table3["box_AP_gain_per_seed"]
        print(f"\nMask R-CNN - Faster R-CNN, same seed: {gain['mean']:+.1f} ± {gain['std']:.1f} box AP "
              f"over {gain['n']} seeds {[round(v, 1) for v in gain['values']]}; paper: +0.9")
else:
    print(f"Not there yet: {ablations_path.relative_to(ROOT)} has no Faster / Mask R-CNN pair under 'table3' "
          "(the experiment is still running). Run `python experiments/ablations.py --table 3` to make it.")

# %%
fig, ax = plt.subplots(figsize=(7, 3.2))
paper = {"Faster R-CNN, RoIAlign": 37.3, "Mask R-CNN": 38.2}
ax.barh([f"paper (COCO): {k}" for k in paper], list(paper.values()), color=["tab:gray", "tab:blue"])
if ran:
    ours = {k: table3[key]["AP"] for k, key in (("Faster R-CNN", "faster_rcnn"), ("Mask R-CNN", "mask_rcnn"))}
    ax.barh([f"shapes: {k}" for k in ours], [v["mean"] for v in ours.values()], xerr=[v["std"] for v in ours.values()],
            color=["tab:gray", "tab:blue"], alpha=0.6)
else:
    ax.text(1, -0.9, "our shapes experiment: not there yet", fontsize=9, va="center")
    ax.set_ylim(-1.5, 1.5)
ax.set_xlabel("box AP (%)")
ax.set_title("Table 3's comparison: the same detector with and without the mask branch")
plt.tight_layout()
plt.show()

# %% [markdown]
# Read a difference of one point with the spread in mind: on COCO 0.9 AP is well beyond the
# noise of a single run; on a few hundred synthetic images with minutes of training, the seed
# to seed spread printed above can be of the same size. The per-seed difference (same seed:
# same initial trunk, data order and sampling) is the fairer reading.
#
# ## 4.4 Timing: the paper's numbers
#
# **Inference.** "We train a ResNet-101-FPN model that shares features between the RPN and
# Mask R-CNN stages [...]. This model runs at 195ms per image on an Nvidia Tesla M40 GPU (plus
# 15ms CPU time resizing the outputs to the original resolution), and achieves statistically
# the same mask AP as the unshared one. We also report that the ResNet-101-C4 variant takes
# ∼400ms as it has a heavier box head (Figure 4), so we do not recommend using the C4 variant in
# practice." The paper adds that its "design is not optimized for speed": image sizes and
# proposal numbers trade speed for accuracy.
#
# **Training.** "Training with ResNet-50-FPN on COCO `trainval35k` takes 32 hours in our
# synchronized 8-GPU implementation (0.72s per 16-image mini-batch), and 44 hours with
# ResNet-101-FPN."
#
# The abstract's "5 fps", easily read as a property of the method, is these 195 + 15 ms: about 4.8 images a
# second, on a 2017 GPU. It is a measurement of one implementation on one machine, not a
# property of the method; the tables below are the same kind of measurement on a 2-core CPU.
#
# ## Where the time goes
#
# The stages are the steps of the model's `forward`, in order:

# %%
show_source(MaskRCNN.forward)

# %% [markdown]
# `benchmarks/stages.py` times them without copying any of it. Each stage opens a
# `torch.profiler` range around its calls: modules (the backbone, the FPN, the RPN head, each
# RoIAlign pooler, each head) through forward hooks, the steps inside them that are functions or
# methods (proposal selection, RoI sampling, the losses, per-class NMS, pasting) by wrapping
# them for the time of the measurement. A stage's own time is its ranges minus the ranges
# inside them. In the backward pass every node the autograd engine runs carries the sequence
# number of the forward operation that created it; the range that operation ran in names the
# stage its gradient belongs to.

# %%
show_source(stages.stage_ranges)

# %% [markdown]
# The recorded breakdown (`python benchmarks/stages.py`): the `torchvision_maskrcnn_resnet50_fpn`
# preset on an 800 x 1066 image (padded to 800 x 1088) with 2 threads, and `shapes_small` on
# 128 x 128 images with one (its small operations would wait at every parallel region for a
# second thread that the loaded machine has put aside), inference on one image and a training
# step on two. The
# ResNet-50 model has random weights set up to detect (its frozen norms calibrated on the image,
# five classes given a bias), so that 100 detections reach the mask branch as they would with a
# trained model.

# %%
stages_path = RESULTS / "stages_cpu.json"
recorded = json.loads(stages_path.read_text()) if stages_path.is_file() else None
if recorded is None:
    print(f"{stages_path.relative_to(ROOT)} is not there yet: run `python benchmarks/stages.py`")
else:
    print(f"{recorded['command']}: {recorded['device_name']}, torch "
          f"{recorded['versions']['torch']}, load average {recorded['load_before']} before, "
          f"{recorded['load_after']} after")
    for run, modes in recorded["runs"].items():
        for mode, result in modes.items():
            print(f"\n{run}, {mode}, {result.get('threads', recorded['threads'])} thread(s): {result['plain_s']:.3f} s "
                  f"(the stages' medians sum to {result['profiled_total_s']:.3f} s)")
            print(f"  {'stage':24s} {'forward s':>10s} {'backward s':>11s} {'share':>7s}")
            for stage, phases in result["stages_s"].items():
                total = sum(phases.values())
                backward = f"{phases['backward']:11.4f}" if "backward" in phases else " " * 11
                forward = phases.get("forward", phases.get("update", 0.0))
                print(f"  {stage:24s} {forward:10.4f} {backward} {total / result['profiled_total_s']:7.1%}")

# %% [markdown]
# The same numbers as stacked bars, one bar per model and mode; each stage's share of the call
# (forward and backward together):


# %%
def stacked_bars(ax, runs: dict[str, dict], title: str) -> None:
    """One horizontal bar per (label -> stages_s), stages stacked in the model's order, in seconds."""
    colors = plt.get_cmap("tab20")(range(len(stages.STAGES)))
    for row, (label, stage_times) in enumerate(runs.items()):
        left = 0.0
        for stage, color in zip(stages.STAGES, colors):
            seconds = sum(stage_times.get(stage, {}).values())
            ax.barh(row, seconds, left=left, color=color, label=stage if row == 0 else None)
            left += seconds
    ax.set_yticks(range(len(runs)), list(runs))
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(title, fontsize=10)


if recorded is not None:
    names = list(recorded["runs"])
    fig, axes = plt.subplots(1, len(names), figsize=(13, 3.4))
    for ax, run in zip(axes if len(names) > 1 else [axes], names):
        stacked_bars(ax, {mode: result["stages_s"] for mode, result in recorded["runs"][run].items()}, run)
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    plt.tight_layout()
    plt.show()

# %% [markdown]
# The same tables grouped the way the paper's discussion groups them: the trunk that runs once
# per image (backbone, FPN and the RPN head over every level), the heads that run once per RoI
# or detection, RoIAlign, and the selection steps around them (proposals, sampling, NMS,
# pasting); and, in training, how much the backward pass of each trained stage costs against
# its forward pass.

# %%
GROUPS = {
    "trunk (backbone, FPN, RPN head)": ("backbone", "FPN", "RPN head"),
    "heads (box, mask)": ("box head", "mask head"),
    "RoIAlign (box, mask)": ("box RoIAlign", "mask RoIAlign"),
    "selection (proposals, sampling, NMS, paste)": ("RPN proposals", "box sampling and loss", "box NMS", "mask paste"),
}
if recorded is not None:
    for run, modes in recorded["runs"].items():
        for mode, result in modes.items():
            total = result["profiled_total_s"]
            shares = {group: sum(sum(result["stages_s"].get(s, {}).values()) for s in members) / total
                      for group, members in GROUPS.items()}  # fmt: skip
            print(f"{run}, {mode}: " + ", ".join(f"{group} {share:.0%}" for group, share in shares.items()))
            if "training" in mode:
                trained = ("backbone", "FPN", "RPN head", "box RoIAlign", "box head", "mask RoIAlign", "mask head")
                ratios = {stage: result["stages_s"][stage]["backward"] / result["stages_s"][stage]["forward"]
                          for stage in trained}  # fmt: skip
                print("    backward / forward: " + ", ".join(f"{stage} {ratio:.1f}" for stage, ratio in ratios.items()))

# %% [markdown]
# How to read it:
#
# - At 800 x 1066 the trunk is most of the time: ResNet-50, the FPN and the RPN head's 3x3
#   convolution over all five levels. In inference the mask head comes next, four 256-channel
#   convolutions and a deconvolution over $D = 100$ detections of $14 \times 14$, then pasting
#   those 100 masks into the image (the paper's "15ms CPU time resizing the outputs", here a
#   few percent). RoIAlign, the operation the paper made famous, and NMS are a few percent too.
# - A training step adds the backward pass, about twice its forward for a layer that trains,
#   less for the backbone, whose frozen stem and `res2` need none. The mask head costs little in
#   training: it runs on the positive RoIs only (at most a quarter of the 512 sampled per image,
#   fewer when the images hold few objects), not on 100 detections. The RPN's selection costs
#   more than in inference: two images, and 2000 boxes per level before NMS instead of 1000.
# - On `shapes_small` the trunk is tiny. In inference the mask head, four convolutions over each
#   of up to 50 detections, takes the largest share; in training, with few positive RoIs, the
#   fixed costs that do not shrink with the image (proposal selection, sampling, targets, Python
#   between operations) weigh as much as the convolutions. These are milliseconds, so the load
#   of a shared machine moves them most.
#
# ## Ours against torchvision
#
# `benchmarks/inference.py` and `benchmarks/train_step.py` time this library's model against
# torchvision's `maskrcnn_resnet50_fpn` on the same machine, with the same random weights (made
# once in torchvision's model and imported with `mrcnn.weights.from_torchvision`), the same
# image(s), interleaved, and check that both give the same detections and losses:

# %%
for name in ("inference_cpu.json", "train_step_cpu.json"):
    path = RESULTS / name
    if not path.is_file():
        print(f"{name}: not recorded yet (python benchmarks/{name.split('_cpu')[0]}.py)")
        continue
    result = json.loads(path.read_text())
    times = ", ".join(f"{model} {timing['median_s']:.2f} s" for model, timing in result["results"].items())
    ratio = result.get("ratio_ours_over_torchvision")
    print(f"{name}: {result['what']}\n  {times}")
    print(f"  ratio ours / torchvision: {ratio:.2f}" if ratio else f"  torchvision: {result['torchvision']}")
    print(f"  {result['threads']} threads, torch {result['versions']['torch']}, "
          f"torchvision {result['versions']['torchvision']}, "
          f"load average {result['load_before']} before, {result['load_after']} after")

# %% [markdown]
# Where does the difference come from? The inference benchmark was run with `--profile`, which
# records the operators with the most self time in one call of each model:

# %%
path = RESULTS / "inference_cpu.json"
profiles = json.loads(path.read_text()).get("profile", {}) if path.is_file() else {}
for model_name, table in profiles.items():
    print(f"{model_name}:")
    for row in table[:6]:
        print(f"  {row['op']:32s} {row['calls']:5d} calls {row['self_s']:7.2f} s  {row['share']:6.1%}")
if not profiles:
    print("no profile recorded (python benchmarks/inference.py --profile)")

# %% [markdown]
# Most of both is oneDNN's convolutions, and ours spend less time in them: the batch is laid out
# channels-last, the layout those kernels run fastest in, and each frozen batch norm is folded
# into its convolution's weights, so ours skips the per-channel multiply and add that
# torchvision's frozen norms run over every activation map (part of its `aten::mul` and
# `aten::add` above; `mrcnn/fuse.py`). The next difference is RoIAlign:
# torchvision's kernel, called once per level, is among its largest operators, while ours, one
# sparse matrix product over all levels (`SparseRoIAlignFunction` and its `embedding_bag`,
# `mrcnn/roi_align_cpu.py`), takes a small fraction of that time. The ratio depends on the
# machine and on its load, which the results files state.
#
# ## A live timing, here
#
# The same instrument on `shapes_small`, now, with one thread: inference on one 128 x 128 shapes
# image and a training step on two, the median of three calls per stage.

# %%
images, targets = benchmark_images(2, 128, 128)
model = MaskRCNN(shapes_small())
live = {
    "inference (1 image)": stages.measure(model, images[:1], None, False, "cpu", repeats=3),
    "training step (2 images)": stages.measure(model, images, targets, True, "cpu", repeats=3),
}
for mode, result in live.items():
    top = sorted(result["stages_s"].items(), key=lambda item: -sum(item[1].values()))[:4]
    print(f"{mode}: {result['plain_s'] * 1e3:.1f} ms; largest stages: "
          + ", ".join(f"{stage} {sum(phases.values()) * 1e3:.1f} ms" for stage, phases in top))

fig, ax = plt.subplots(figsize=(10, 2.4))
stacked_bars(ax, {mode: result["stages_s"] for mode, result in live.items()},
             "shapes_small, measured in this notebook (1 thread)")  # fmt: skip
ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, ncol=2)
plt.tight_layout()
plt.show()

# %% [markdown]
# The live numbers move from run to run with the machine's load (the recorded files state the
# load average before and after every measurement); the proportions move much less.
#
# ## What determinism costs
#
# `benchmarks/determinism.py` times RoIAlign's backward pass and a whole `shapes_small`
# training step with `torch.use_deterministic_algorithms(True)` and without, and checks whether
# two runs give the same bits. On a CPU the sparse RoIAlign sums in a fixed order in both modes;
# on a GPU the Triton kernel's default backward adds with atomics, and its deterministic one
# sorts and sums in a fixed order instead.

# %%
path = RESULTS / "determinism_cpu.json"
if path.is_file():
    result = json.loads(path.read_text())
    for name, timing in result["results"].items():
        default, strict = timing["default"], timing["deterministic"]
        print(f"{name}: default {default['median_s']:.3f} s (same bits twice: {default['two_runs_same_bits']}), "
              f"deterministic {strict['median_s']:.3f} s (same bits twice: {strict['two_runs_same_bits']}), "
              f"ratio {timing['cost_deterministic_over_default']:.2f}")
else:
    print("determinism_cpu.json: not recorded yet (python benchmarks/determinism.py)")

# %% [markdown]
# ## Mixed precision: 16-bit features, 32-bit boxes
#
# On a GPU, most of the time above is convolutions, and they run two to four times faster in
# 16 bits (`torch.autocast`, `--amp bf16` or `--amp fp16` on the command line). Features and
# head activations tolerate it: they are sums of many terms, each with a relative error of
# $2^{-8}$ (bfloat16) or $2^{-11}$ (float16). Coordinates do not. A number in $[1024, 2048)$ has a
# spacing of $2^{10-7} = 8$ in bfloat16, so a box corner at pixel 1330 of an 800 x 1333 image
# becomes 1328:

# %%
coordinates = torch.tensor([37.3, 517.0, 800.6, 1330.0])
for dtype in (torch.bfloat16, torch.float16):
    rounded = coordinates.to(dtype).float()
    print(f"{str(dtype):>15}: {[round(v, 2) for v in rounded.tolist()]}  (off by up to "
          f"{(rounded - coordinates).abs().max().item():.2f} px)")

# %% [markdown]
# Two pixels at the scale of the image is half a pixel of P2 and, worse, a different sampling
# grid for RoIAlign, whose whole point (section 3) is to sample at the exact box. So in this
# library every box quantity is float32 whatever autocast does: anchors, the RPN's and the box
# head's deltas and scores (`mrcnn.boxes.geometry_dtype`), proposals, NMS, the RoIs handed to
# RoIAlign (which samples in float32 and only returns the features' dtype), and the pasting of
# masks. Here is the difference it makes to one RoI pooled from bfloat16 features, against the
# float64 answer:

# %%
from mrcnn.poolers import roi_align  # noqa: E402
from mrcnn.roi_align import roi_align_reference  # noqa: E402

features = torch.randn(1, 8, 40, 360).to(torch.bfloat16)  # a P2-like map of a 160 x 1440 strip
roi = torch.tensor([[0.0, 1325.3, 20.7, 1338.9, 140.2]])  # float32, as the model keeps it
exact = roi_align_reference(features.double(), roi.double(), 7, 0.25, 2)
kept = roi_align(features, roi, 7, 0.25, 2).double()  # float32 RoI, bfloat16 features
rounded = roi_align(features, roi.to(torch.bfloat16).float(), 7, 0.25, 2).double()  # the RoI rounded to 16 bits first
print(f"RoI in float32:  largest error {(kept - exact).abs().max().item():.4f}")
print(f"RoI in bfloat16: largest error {(rounded - exact).abs().max().item():.4f}")

# %% [markdown]
# The first error is the rounding of the result to 16 bits; the second is a feature sampled at
# the wrong place. `tests/test_amp.py` checks the whole pipeline: under bfloat16 autocast every
# box tensor is float32, and a trained small model gives the same detections as in float32
# (matched boxes within a pixel, the same COCO AP within a point). What 16 bits buy in speed is a
# GPU measurement (`benchmarks/gpu.sh`); its results, where a GPU run has recorded them:

# %%
cuda_results = sorted(RESULTS.glob("*_cuda.md"))
print("\n".join(f"benchmarks/results/{p.name}" for p in cuda_results) if cuda_results else
      "no GPU run recorded yet: benchmarks/results/ holds CPU results only")

# %% [markdown]
# ## What to try next
#
# - Time the C4 variant the paper advises against (the `res5` head of mrcnn/backbone.py on every
#   RoI) with `benchmarks/stages.py`, and see where its "heavier box head" shows.
# - Halve the test-time proposals (`rpn_post_nms_top_n_test`, 1000 -> 500) or the image size
#   (`min_size`) and measure the speed/accuracy trade-off section 4.4 leaves "beyond the scope".
# - Run `python benchmarks/stages.py --device cuda` on a GPU: with the Triton RoIAlign and mask
#   loss, which stage dominates once the convolutions run on the GPU?
# - Switch off `fast_convolutions` in the config and rerun `benchmarks/inference.py`: how much of
#   the gap to torchvision is the folded batch norm?
# - Repeat the Table 3 experiment with more seeds until the per-seed gain's spread is smaller
#   than the gain itself.
