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
# # Ablations
#
# **Paper:** section 4.2, "Ablation Experiments" (Table 2), and the Faster against Mask R-CNN
# rows of section 4.3, "Bounding Box Detection Results" (Table 3).
# **Code:** the switches of `mrcnn/config.py` (`roi_pooler`, `mask_loss`, `class_agnostic_masks`,
# `mask_head`, `mask`), which choose among `mrcnn/roi_align.py` (RoIAlign, RoIPool),
# `mrcnn/roi_warp.py` (RoIWarp), `mrcnn/mask_loss.py` (per-class sigmoid, softmax over classes,
# class-agnostic) and `mrcnn/mask_head.py` (FCN or MLP head). The sweep is the script
# `experiments/ablations.py`, which trains every arm for several seeds and records the results.
# **Proof:** `tests/test_ablations.py` (each arm is the config it claims: paired arms differ in
# one switch only; runs resume and are skipped when done; the mean and spread over seeds; one
# arm end to end), `tests/test_roi_warp.py`, `tests/test_roi_align.py`, `tests/test_mask_loss.py`,
# `tests/test_mask_head.py`.
#
# Table 2 of the paper takes Mask R-CNN apart one design choice at a time and measures each
# on COCO: the backbone (2a), per-class sigmoid masks against a softmax over classes (2b),
# RoIAlign against RoIPool and RoIWarp at stride 16 (2c) and stride 32 (2d), an FCN mask head
# against an MLP (2e). Section 4.3 adds one more comparison: the same model with and without its
# mask branch, scored on boxes alone. Each took days of GPU time per row.
#
# This chapter repeats each comparison in miniature on the synthetic shapes: a small trunk
# trained from scratch, every arm with the same budget and schedule, several seeds per arm,
# scored with the same COCO AP. The question is which of the paper's directions still show at
# this scale, and which drown in the noise between seeds. The sweep takes hours on a CPU, so
# the chapter reads its recorded results (`experiments/results/ablations.json`) and computes
# only small illustrations itself. Every number the chapter gives for our runs, and every
# verdict on the paper's claims, is computed below from that file: when the sweep is run again
# with other settings, the page says what the new file shows.

# %%
# %matplotlib inline
import json

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Markdown, display
from matplotlib.patches import Rectangle

from book_helpers import demo_results, repository_root, show_source, shown_path
from mrcnn.demo import DEMO_DEFAULTS
from mrcnn.config import shapes_small
from mrcnn.mask_loss import mask_loss, multinomial_mask_loss
from mrcnn.architectures import mask_head_and_predictor
from mrcnn.mask_head import MaskBranch, softmax_decision
from mrcnn.model import MaskRCNN
from mrcnn.roi_align import roi_pool, roi_pool_bins, sampling_grid
from mrcnn.poolers import fpn_level, roi_align
from mrcnn.roi_warp import quantize_rois, roi_warp

torch.manual_seed(0)
torch.set_num_threads(1)  # everything below is tiny

results_path = repository_root() / "experiments" / "results" / "ablations.json"
results = json.loads(results_path.read_text()) if results_path.exists() else None
if results is None:
    print(f"{shown_path(results_path)} is not there: run `python experiments/ablations.py` to make it. "
          "The tables and charts below are left empty.")  # fmt: skip
else:
    settings, machine = results["settings"], results["machine"]
    print(f"{len(results['arms'])} arms, seeds {settings['seeds']}, {settings['iterations']} iterations of batch "
          f"{settings['batch_size']} each (lr {settings['lr']}, warm-up {settings['warmup']}, clipping "
          f"{settings['clip_grad_norm']}), {settings['num_train']} training and {settings['num_val']} held-out "
          "images")  # fmt: skip
    print(f"machine: {machine['processor']}, {machine['cpu_count']} cores, torch {machine['torch']}, "
          f"{machine['threads_per_run']} thread per run, {machine['processes']} runs at once")  # fmt: skip
    if results["missing_runs"]:
        print("not run:", ", ".join(results["missing_runs"]))

# %% [markdown]
# ## How the runs are made
#
# Every arm is the `shapes_small` preset (or its C4 or C5 variant, for Tables 2a, 2c and 2d)
# with one switch changed by `config.replace(...)`. All arms train on the same images with the
# demo's recipe (SGD with momentum, a linear warm-up, gradient clipping; the batch and rate above) for the
# same number of steps, printed above, and are scored on the same held-out images. The **seed**
# of a run sets its initial weights, the order of its images and the RoIs it samples; running
# each arm with several seeds tells how much of a difference between arms is the arms and how
# much is luck. We report the mean and the sample standard deviation
# $s = \sqrt{\frac{1}{n-1}\sum_i (x_i - \bar x)^2}$ over the $n$ seeds, and every seed's value.
#
# Where two arms ran with the same seeds, the cleaner comparison is **paired**: arm A and arm B
# with seed $i$ start from the same random numbers, so $d_i = x^A_i - x^B_i$ cancels part of the
# luck. The readings below use these differences.
#
# The budget of the sweep against the demo's (the demo's figures from
# `experiments/results/demo.json`, its settings from `mrcnn/demo.py`):

# %% tags=["remove-input"]
if results is not None:
    demo = demo_results()["report"]
    steps, batch = settings["iterations"], settings["batch_size"]
    default_arm = results["arms"].get("fpn")
    level = f"{default_arm['mask_AP']['mean']:.1f}" if default_arm else "(not run)"
    display(Markdown(
        f"Each run trains {steps:,} steps of {batch} images ({steps * batch:,} images), "
        f"{steps / DEMO_DEFAULTS['iterations']:.0%} of the demo's {DEMO_DEFAULTS['iterations']:,} steps. "
        f"The default arm (FPN, sigmoid masks) reaches a mean mask AP of {level} on the held-out shapes; "
        f"the demo's model, the same preset after its full schedule, reached {100 * demo['mask_AP']:.1f} "
        f"(one run, seed {demo['arguments']['seed']}). "
        + ("The models of the sweep are therefore far from converged, which is worth keeping in mind for every "
           "comparison below: a short run measures how fast a design learns as much as how good it is."
           if default_arm and default_arm["mask_AP"]["mean"] < 0.8 * 100 * demo["mask_AP"] else
           "The sweep's runs are thus near the demo's level: the comparisons below are between trained models.")))

# %% [markdown]
# Two helpers draw every table and chart of this chapter from the results file: ours (AP in %
# on the held-out shapes) next to the paper's (AP in % on COCO).

# %%
METRICS = ("AP", "AP50", "AP75")
# the other readings of the softmax arm's masks (its "mask" is the class that wins each pixel)
READINGS = {"mask_p_k": "$p_k > 1/2$", "mask_two_way": "$m_k > m_0$"}


def arm_stats(arm):
    return None if results is None else results["arms"].get(arm)


def show_table(table):
    """Our mean ± std over seeds (and each seed) next to the paper's numbers, for one paper table."""
    if results is None:
        return
    spec = results["tables"][table]
    primary = "box" if table == "3" else "mask"
    rows = [f"**{spec['title']}**", "",
            f"| arm | {primary} AP | {primary} AP50 | {primary} AP75 | {'mask' if primary == 'box' else 'box'} AP "
            f"| {primary} AP per seed | paper {primary} AP, AP50, AP75 |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in spec["rows"]:
        stats, paper = arm_stats(row["arm"]), row["paper"].get(primary)
        paper_text = ", ".join("-" if v is None else f"{v}" for v in paper.values()) if paper else "-"
        if stats is None:
            rows.append(f"| {row['label']} | not run | | | | | {paper_text} |")
            continue
        cell = lambda key: f"{stats[key]['mean']:.1f} ± {stats[key]['std']:.1f}" if key in stats else "-"  # noqa: E731
        other = "mask" if primary == "box" else "box"
        per_seed = ", ".join(f"{v:.1f}" for v in stats[f"{primary}_AP"]["values"])
        read = ", read by the winning class" if any(f"{key}_AP" in stats for key in READINGS) else ""
        rows.append(f"| {row['label']}{read} | {cell(primary + '_AP')} | {cell(primary + '_AP50')} "
                    f"| {cell(primary + '_AP75')} "
                    f"| {cell(other + '_AP')} | {per_seed} | {paper_text} |")  # fmt: skip
        for key in READINGS:  # the softmax arm's same models, their masks read the other ways
            if f"{key}_AP" in stats:
                per_seed = ", ".join(f"{v:.1f}" for v in stats[f"{key}_AP"]["values"])
                rows.append(f"| {row['label']}, read as {READINGS[key]} | {cell(key + '_AP')} | {cell(key + '_AP50')} "
                            f"| {cell(key + '_AP75')} | {cell('box_AP')} | {per_seed} | |")  # fmt: skip
    display(Markdown("\n".join(rows)))


def bar_chart(table, metrics=("AP", "AP75"), title=None):
    """Left: the paper's COCO numbers; right: ours, mean with a bar of ± one std, and a dot per seed."""
    if results is None:
        return
    spec = results["tables"][table]
    primary = "box" if table == "3" else "mask"
    labels = [row["label"] for row in spec["rows"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.2))
    width = 0.8 / len(metrics)
    for m, metric in enumerate(metrics):
        x = np.arange(len(labels)) + (m - (len(metrics) - 1) / 2) * width
        paper = [row["paper"].get(primary, {}).get(metric) for row in spec["rows"]]
        left.bar(x, [np.nan if v is None else v for v in paper], width, label=f"{primary} {metric}")
        ours = [arm_stats(row["arm"]) for row in spec["rows"]]
        means = [s[f"{primary}_{metric}"]["mean"] if s else np.nan for s in ours]
        stds = [s[f"{primary}_{metric}"]["std"] if s else 0 for s in ours]
        right.bar(x, means, width, yerr=stds, capsize=3, label=f"{primary} {metric}", alpha=0.85)
        for xi, s in zip(x, ours):
            if s:
                values = s[f"{primary}_{metric}"]["values"]
                right.plot([xi] * len(values), values, "k.", ms=4)
    for ax, name in ((left, "paper (COCO)"), (right, "ours (shapes), ± std, dots: seeds")):
        ax.set_xticks(np.arange(len(labels)))
        ax.set_xticklabels([label.replace(" (", "\n(") for label in labels], fontsize=8)
        ax.set_ylabel("AP (%)")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(title or spec["title"], fontsize=10)
    plt.tight_layout()
    plt.show()


def paired_difference(arm_a, arm_b, key="mask_AP", key_b=None):
    """Per-seed differences a - b over the seeds both arms ran: (mean, std, values) or None."""
    a, b, key_b = arm_stats(arm_a), arm_stats(arm_b), key_b or key
    if not a or not b or key not in a or key_b not in b:
        return None
    by_seed_a, by_seed_b = dict(zip(a["seeds"], a[key]["values"])), dict(zip(b["seeds"], b[key_b]["values"]))
    d = [by_seed_a[s] - by_seed_b[s] for s in sorted(set(by_seed_a) & set(by_seed_b))]
    if not d:
        return None
    return float(np.mean(d)), float(np.std(d, ddof=1)) if len(d) > 1 else 0.0, d


# %% [markdown]
# ## How a comparison is read
#
# Each of the paper's comparisons becomes one verdict, decided from the paired differences:
#
# - **beyond the seeds** when the mean difference $\bar d$ is larger than twice its standard
#   error $s_d / \sqrt{n}$ (a rough two-sigma rule; with two or three seeds it is a weak test);
# - **reproduced** when the difference is beyond the seeds and has the paper's sign; for the two
#   claims that two arms are on par (RoIWarp against RoIPool, class-agnostic against
#   class-specific masks), when it is *not* beyond the seeds, which with few seeds is weak
#   evidence of parity rather than proof;
# - **not reproduced** otherwise: within the spread of the seeds, or beyond it with the sign
#   reversed;
# - **not measurable here** when either arm's mean is below a floor of `FLOOR` AP points: such a
#   model has barely started to detect, and a difference between it and another says more
#   about that than about the design the paper measures.

# %%
FLOOR = 2.0  # AP points

# (paper table, arm a, arm b, metric, the paper's a and b, the paper's claim, metric of b if another)
COMPARISONS = [
    ("2c", "c4_align", "c4_pool", "mask_AP", (30.3, 26.9), "better", None),
    ("2c", "c4_align", "c4_warp", "mask_AP", (30.3, 27.1), "better", None),
    ("2c", "c4_warp", "c4_pool", "mask_AP", (27.1, 26.9), "on par", None),
    ("2c", "c4_align", "c4_pool", "mask_AP75", (31.5, 26.4), "better", None),
    ("2d", "c5_align", "c5_pool", "mask_AP", (30.9, 23.6), "better", None),
    ("2d", "c5_align", "c5_pool", "mask_AP75", (32.1, 21.6), "better", None),
    ("2d", "c5_align", "c5_pool", "box_AP", (34.0, 28.2), "better", None),
    ("2d", "c5_align", "c5_warp", "mask_AP", (None, None), "better", None),  # not in the paper's Table 2d
    ("2b", "fpn", "fpn_softmax", "mask_AP", (30.3, 24.8), "better", None),
    ("2b", "fpn", "fpn_softmax", "mask_AP", (30.3, 24.8), "better", "mask_p_k_AP"),
    ("2b", "fpn", "fpn_softmax", "mask_AP", (30.3, 24.8), "better", "mask_two_way_AP"),
    ("2b", "fpn", "fpn_agnostic", "mask_AP", (30.3, 29.7), "on par", None),
    ("2e", "fpn", "fpn_mlp", "mask_AP", (33.6, 31.5), "better", None),
    ("2a", "fpn", "c4_align", "mask_AP", (33.6, 30.3), "better", None),
    ("3", "fpn", "faster_fpn", "box_AP", (38.2, 37.3), "better", None),
]


def verdict(a, b, key, claim, key_b=None):
    """(verdict, paired difference or None) for the paper's claim that arm a is `claim` ("better" or
    "on par") against b."""
    d = paired_difference(a, b, key, key_b)
    if d is None:
        return "not run", None
    mean, std, values = d
    levels = arm_stats(a)[key]["mean"], arm_stats(b)[key_b or key]["mean"]
    beyond = len(values) > 1 and abs(mean) > 2 * std / np.sqrt(len(values))
    if min(levels) < FLOOR:
        return "not measurable here", d
    if claim == "on par":
        if beyond:
            return "not reproduced: they differ beyond the seeds", d
        return "reproduced: on par within the seeds", d
    if not beyond:
        side = "the paper's direction" if mean > 0 else "the other direction"
        return f"not reproduced: within the spread of the seeds ({side})", d
    return ("reproduced" if mean > 0 else "not reproduced: reversed, beyond the seeds"), d


def label(arm, key_b=None):
    return f"{arm} (read as {READINGS[key_b.removesuffix('_AP')]})" if key_b else arm


def paper_text(paper_a, paper_b):
    if paper_a is None:
        return "not in the paper's Table 2d, whose direction here is 2c's (RoIAlign ahead of RoIWarp)"
    return f"paper {paper_a - paper_b:+.1f} ({paper_a} against {paper_b})"


def show_reading(table):
    """One line per comparison of a paper table: ours per seed, the arms' levels, the paper's, the verdict."""
    if results is None:
        return
    lines = []
    for t, a, b, key, (paper_a, paper_b), claim, key_b in COMPARISONS:
        if t != table:
            continue
        text, d = verdict(a, b, key, claim, key_b)
        if d is None:
            lines.append(f"- {a} − {label(b, key_b)}, {key}: not run")
            continue
        mean, std, values = d
        level_a, level_b = arm_stats(a)[key]["mean"], arm_stats(b)[key_b or key]["mean"]
        lines.append(f"- {a} − {label(b, key_b)}, {key}: {mean:+.1f} ± {std:.1f} over {len(values)} seeds "
                     f"({', '.join(f'{v:+.1f}' for v in values)}), from {level_a:.1f} against {level_b:.1f}; "
                     f"{paper_text(paper_a, paper_b)}. **{text.capitalize()}.**")  # fmt: skip
    display(Markdown("\n".join(lines)))


# %% [markdown]
# ## Table 2c and 2d: RoIAlign, RoIWarp and RoIPool
#
# A RoI $(x_1, y_1, x_2, y_2)$ in image pixels must become a $P \times P$ grid of features
# from a map of stride $S$ (16 for C4, 32 for C5). The paper compares three ways:
#
# - **RoIPool** (Fast R-CNN) rounds twice: the corners to the feature grid,
#   $\hat x_1 = [x_1 / S]$, and then the bins to whole feature pixels; it takes the max of each bin.
# - **RoIWarp** (Dai et al., MNC) rounds the corners the same way, but then samples the rounded
#   box bilinearly, so its bins are not rounded.
# - **RoIAlign** rounds nothing: each bin is sampled at $2 \times 2$ regular points by bilinear
#   interpolation, and the samples are averaged.
#
# RoIWarp is the experiment that isolates the cause. It interpolates like RoIAlign, yet the
# paper finds it "on par with RoIPool and much worse than RoIAlign": what hurts is the first
# rounding, which both older layers keep. In this library RoIWarp is literally that: the RoI
# rounded to the grid, then RoIAlign.

# %%
show_source(quantize_rois, roi_warp)

# %% [markdown]
# Where does each layer look? Below, one box at stride 16 (grid lines every 16 pixels), pooled to
# $P = 4$ for legibility. Green: the box; blue dots: RoIAlign's sampling points, regular in the
# box. Orange: RoIWarp's box after rounding and its sampling points. Red: the feature pixels
# RoIPool's bins cover (each bin takes the max over its cells). The rounding moves each corner
# by up to $S/2$ pixels: here the rounded box is several pixels off on every side, a large
# fraction of a 50-pixel object.

# %%
box = torch.tensor([[0.0, 21.0, 37.0, 70.0, 82.0]])  # [R, 5]: (batch_index, x1, y1, x2, y2) in image pixels
P, sampling_ratio = 4, 2


def sample_points(rois, stride):
    """RoIAlign's sampling points in image pixels: x [P * g], y [P * g]."""
    # [R, P, g] each, in feature pixels
    y, x, _, _, _ = sampling_grid(rois, (P, P), 1 / stride, sampling_ratio, aligned=False)
    return x[0].flatten() * stride, y[0].flatten() * stride


fig, axes = plt.subplots(1, 2, figsize=(11, 5))
for ax, stride in zip(axes, (16, 32)):
    for v in range(0, 129, stride):
        ax.axvline(v, color="0.85", lw=0.8)
        ax.axhline(v, color="0.85", lw=0.8)
    y_low, y_high, x_low, x_high = roi_pool_bins(box, (P, P), 1 / stride, 128 // stride, 128 // stride)
    for p in range(P):
        for q in range(P):
            x0, x1, y0, y1 = int(x_low[0, q]), int(x_high[0, q]), int(y_low[0, p]), int(y_high[0, p])
            ax.add_patch(Rectangle((x0 * stride, y0 * stride), (x1 - x0) * stride, (y1 - y0) * stride, fill=False,
                                   ec="tab:red", lw=1.2, ls=":"))  # fmt: skip
    x1, y1, x2, y2 = box[0, 1:].tolist()
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="tab:green", lw=2.5))
    warped = quantize_rois(box, 1 / stride)
    wx1, wy1, wx2, wy2 = warped[0, 1:].tolist()
    ax.add_patch(Rectangle((wx1, wy1), wx2 - wx1, wy2 - wy1, fill=False, ec="tab:orange", lw=2, ls="--"))
    xs, ys = sample_points(box, stride)
    ax.plot(*np.meshgrid(xs, ys), "o", color="tab:blue", ms=3)
    xs, ys = sample_points(warped, stride)
    ax.plot(*np.meshgrid(xs, ys), "x", color="tab:orange", ms=4)
    ax.set_xlim(0, 128)
    ax.set_ylim(128, 0)
    ax.set_aspect("equal")
    ax.set_title(f"stride {stride}: box (green), RoIAlign (blue), RoIWarp (orange), RoIPool cells (red)", fontsize=9)
plt.tight_layout()
plt.show()
print("box:", box[0, 1:].tolist())
for stride in (16, 32):
    print(f"rounded to the stride-{stride} grid:", quantize_rois(box, 1 / stride)[0, 1:].tolist())

# %% [markdown]
# The same through the real layers. Give them a feature map whose channels are the feature
# pixel's own coordinates, $F_0(y, x) = x$ and $F_1(y, x) = y$: bilinear interpolation of a
# linear function is exact, so RoIAlign and RoIWarp return, for each bin, the centre of the
# points they sampled. RoIPool takes a max, so we give it $-x$ and $-y$ too: the max of $x$ and
# of $-x$ are the two ends of the cells its bin covers, and their mean is the centre it read.
# Times the stride, these are positions in the image; each arrow below goes from a bin's true
# centre (in the box) to where the layer read it.

# %%
def where_each_bin_reads(rois, stride, size=7):
    """Per layer, the image position [R, 2, P, P] (x, y) whose features each bin of each RoI reads."""
    cells = 128 // stride
    positions = torch.arange(cells, dtype=torch.float32)  # [128 / S]
    y, x = torch.meshgrid(positions, positions, indexing="ij")
    features = torch.stack([x, y, -x, -y])[None]  # [N, C, H, W] = [1, 4, 128 / S, 128 / S]
    align = roi_align(features, rois, size, 1 / stride, sampling_ratio=2)[:, :2]  # [R, 2, P, P]
    warp = roi_warp(features, rois, size, 1 / stride, sampling_ratio=2)[:, :2]  # [R, 2, P, P]
    pooled = roi_pool(features, rois, size, 1 / stride)  # [R, 4, P, P]: max x, max y, -min x, -min y
    pool = (pooled[:, :2] - pooled[:, 2:]) / 2  # [R, 2, P, P]: the centre of the cells each bin covers
    return {name: position * stride for name, position in (("RoIAlign", align), ("RoIWarp", warp), ("RoIPool", pool))}


def bin_centres(boxes, size=7):
    """The true centres (x, y) [R, 2, P, P] of the P x P bins of each box [R, 4]."""
    steps = (torch.arange(size) + 0.5) / size  # [P]
    x = boxes[:, 0:1] + steps * (boxes[:, 2:3] - boxes[:, 0:1])  # [R, P]
    y = boxes[:, 1:2] + steps * (boxes[:, 3:4] - boxes[:, 1:2])  # [R, P]
    return torch.stack([x[:, None, :].expand(-1, size, -1), y[:, :, None].expand(-1, -1, size)], dim=1)


x1, y1, x2, y2 = box[0, 1:].tolist()
true_x, true_y = bin_centres(box[:, 1:])[0]  # [P, P] each: where each bin should read
fig, axes = plt.subplots(1, 2, figsize=(11, 5))
for ax, stride in zip(axes, (16, 32)):
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="tab:green", lw=2))
    for (name, read), colour in zip(where_each_bin_reads(box, stride).items(), ("tab:blue", "tab:orange", "tab:red")):
        dx, dy = read[0, 0] - true_x, read[0, 1] - true_y  # [P, P] each, image pixels
        ax.quiver(true_x, true_y, dx, dy, angles="xy", scale_units="xy", scale=1, color=colour, width=0.004,
                  label=f"{name}: mean shift {torch.sqrt(dx**2 + dy**2).mean():.1f} px")  # fmt: skip
    ax.plot(true_x, true_y, "k.", ms=3)
    ax.set_xlim(0, 100)
    ax.set_ylim(100, 20)
    ax.set_aspect("equal")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"stride {stride}: where each of the 7 x 7 bins reads", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# RoIAlign's arrows have length zero: every bin reads its own part of the box, at any stride.
# RoIWarp's and RoIPool's point to the rounded box, and they lengthen with the stride.
#
# How far off is the rounded box, on average? For corners that fall anywhere within a grid
# cell, the rounding error is uniform on $[-S/2, S/2]$, so its mean size is $S/4$: 4 pixels at
# stride 16, 8 at stride 32. On COCO's objects of a few hundred pixels that is a few percent of
# the box; on our shapes, of 16 to 56 pixels, it is a large part of it. Measured on random boxes
# of the shapes' sizes, with the IoU between each box and its rounded version:

# %%
generator = torch.Generator().manual_seed(0)
centres = torch.rand(2000, 2, generator=generator) * 80 + 24  # [R, 2] in a 128 x 128 image
sides = torch.rand(2000, 2, generator=generator) * 40 + 16  # [R, 2]: 16 to 56 pixels, as the shapes
boxes = torch.cat([centres - sides / 2, centres + sides / 2], dim=1)  # [R, 4]
rois = torch.cat([torch.zeros(2000, 1), boxes], dim=1)  # [R, 5]


def box_iou_pairs(a, b):
    """IoU of a[r] with b[r]: [R, 4] x [R, 4] -> [R]."""
    low, high = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (high - low).clamp(min=0).prod(dim=1)
    area = lambda z: (z[:, 2:] - z[:, :2]).clamp(min=0).prod(dim=1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


print("stride | mean corner shift (px) | mean IoU(box, rounded box) | boxes with IoU < 0.7")
for stride in (4, 8, 16, 32):
    rounded = quantize_rois(rois, 1 / stride)[:, 1:]  # [R, 4]
    iou = box_iou_pairs(boxes, rounded)
    print(f"{stride:6d} | {(rounded - boxes).abs().mean():22.2f} | {iou.mean():26.3f} | "
          f"{(iou < 0.7).float().mean():.0%}")
levels = fpn_level(boxes, 2, 5)
print("FPN level of these boxes (eq. 1 of the FPN paper):",
      {f"P{int(k)}": int((levels == k).sum()) for k in levels.unique()})  # fmt: skip
print("\nmean distance (px) from each 7 x 7 bin's centre to where the layer reads it, over the same boxes:")
read_error = {}
for stride in (16, 32):
    for name, read in where_each_bin_reads(rois, stride).items():  # [R, 2, P, P] each
        read_error[name, stride] = (read - bin_centres(boxes)).norm(dim=1).mean().item()
    layers = ("RoIAlign", "RoIWarp", "RoIPool")
    print(f"stride {stride}: " + ", ".join(f"{name} {read_error[name, stride]:.1f}" for name in layers))

# %% [markdown]
# The last line matters for reading our results: with FPN, a RoI is pooled from the level that
# suits its size, $k = \lfloor 4 + \log_2(\sqrt{wh}/224) \rfloor$, and every shape of 16 to 56
# pixels lands on P2, stride 4, where rounding costs a pixel (the table's first row). That is why the paper measures
# RoIAlign on C4 (stride 16) and C5 (stride 32), single maps, and why we do too: only there
# does the rounding bite. (The paper reports a smaller gain with FPN: +1.5 mask AP.)
#
# RoIAlign is easily misread as taking the max of its four samples. The paper tried both
# the max and the average of the four samples (Table 2c: 30.2 and 30.3 AP) and uses the
# average; so does this library, and so does RoIWarp here (the paper's RoIWarp rows: 27.2 max,
# 27.1 average).
#
# The paper's Table 2c (ResNet-50-C4, COCO minival, mask AP) and Table 2d (ResNet-50-C5): at
# stride 16 RoIAlign gains about 3 AP and 5 AP$_{75}$ over both other layers; at stride 32,
# 7.3 AP and 10.5 AP$_{75}$, and 5.8 box AP. Ours, on the shapes:

# %%
show_table("2c")
bar_chart("2c")
show_table("2d")
bar_chart("2d")

# %% [markdown]
# What the paired differences say for each claim of these two tables (the rules of "How a
# comparison is read" above):

# %%
show_reading("2c")
show_reading("2d")

# %% [markdown]
# How to read them. RoIWarp interpolates like RoIAlign but rounds the box like RoIPool, so in the
# paper it isolates the cause: RoIWarp "performs on par with RoIPool and much worse than
# RoIAlign", hence bilinear sampling alone buys nothing and not rounding the box is what counts.
# The C4 model's box head reads the same pooled features, so a gap can show in box AP too (the
# tables' box AP column; the paper reports box AP only for stride 32). What the shapes say:

# %% tags=["remove-input"]
if results is not None and all(arm_stats(a) for a in ("c4_align", "c4_warp", "c4_pool")):
    said = lambda a, b, key="mask_AP", claim="better": verdict(a, b, key, claim)[0]  # noqa: E731
    align_ahead = said("c4_align", "c4_pool") == said("c4_align", "c4_warp") == "reproduced"
    warp_pool = said("c4_warp", "c4_pool", claim="on par")
    warp_minus_pool = paired_difference("c4_warp", "c4_pool")[0]
    kept = arm_stats("c4_pool")["mask_AP"]["mean"] / arm_stats("c4_align")["mask_AP"]["mean"]
    text = [("At stride 16 RoIAlign is ahead of both older layers beyond the seeds, as in the paper, and by more: "
             if align_ahead else "At stride 16 RoIAlign is not ahead of both older layers beyond the seeds: ")
            + f"RoIPool keeps {kept:.0%} of its mask AP here, {26.9 / 30.3:.0%} on COCO. "]
    if warp_pool.startswith("reproduced"):
        text.append("RoIWarp sits with RoIPool, within the seeds: the paper's finding, and its reading holds here too.")
    else:
        side = "below" if warp_minus_pool < 0 else "above"
        text.append(
            f"RoIWarp, though, is {side} RoIPool, beyond the seeds ({warp_minus_pool:+.1f} mask AP), where the paper "
            "found them on par. ")
        if side == "below" and read_error["RoIWarp", 16] < read_error["RoIPool", 16]:
            text.append(
                "It is not where they read: over the shapes' boxes RoIWarp's bins read "
                f"{read_error['RoIWarp', 16]:.1f} px from their centres at stride 16, RoIPool's "
                f"{read_error['RoIPool', 16]:.1f} px (the distances above). The "
                "two older layers differ in more than the rounding of the bins: RoIPool takes the maximum over whole "
                "cells, RoIWarp a bilinear average, and at this scale that difference, which this page does not "
                "measure, outweighs the rounding. The paper's use of RoIWarp, to isolate the rounding, therefore does "
                "not carry over; the comparison of RoIAlign with RoIWarp, which share their sampling and differ only "
                "in rounding the box, still does.")
    display(Markdown("".join(text)))

# %% [markdown]
# Where RoIPool keeps a smaller share of RoIAlign's AP here than on COCO, the cell before the
# tables gives one reason: rounding the corners of boxes of the shapes' sizes to a 16-pixel grid
# leaves a box that overlaps the true one only with the mean IoU printed there, while COCO's
# objects, mostly larger at 800 pixels a side, lose a smaller share of their area.
#
# At stride 32 the C5 map of a 128-pixel image is 4 x 4 cells (the paper's C5 map of an
# 800 x 1216 image has 25 x 38), so every anchor and every RoI sits on a handful of cells. Even
# RoIAlign misreads there (its distance at stride 32 above): a RoI narrower than one feature
# pixel is widened to one (the rule of `aligned=False`, the paper's RoIAlign and torchvision's
# default), and bilinear interpolation has nothing to read beyond the last feature pixel, at 96
# pixels.

# %% tags=["remove-input"]
if results is not None and all(arm_stats(a) for a in ("c4_align", "c4_pool", "c5_align", "c5_pool")):
    level = lambda arm: arm_stats(arm)["mask_AP"]["mean"]  # noqa: E731
    gap16, gap32 = paired_difference("c4_align", "c4_pool")[0], paired_difference("c5_align", "c5_pool")[0]
    kept16, kept32 = level("c4_pool") / level("c4_align"), level("c5_pool") / level("c5_align")
    text = [f"Every stride-32 model stays far below the stride-16 ones (RoIAlign: {level('c5_align'):.1f} mask AP at "
            f"stride 32, {level('c4_align'):.1f} at stride 16). "]
    if gap32 < gap16:
        text.append(f"The paper's gap grows from stride 16 to stride 32 (+3.4 to +7.3 mask AP); here it shrinks, from "
                    f"{gap16:+.1f} to {gap32:+.1f}, ")
        shares = f"RoIPool keeps {kept32:.0%} of RoIAlign's mask AP at stride 32, {kept16:.0%} at stride 16. "
        text.append(("and as a share too: " if kept32 > kept16 else "although as a share it grows: ") + shares)
        text.append("Its direction holds (the verdicts above), but the claim that the gap grows with the stride "
                    "is not reproduced at this scale: with every stride-32 model this weak, there is little room "
                    "for a large gap. ")
    else:
        text.append(f"As in the paper the gap grows, from {gap16:+.1f} mask AP at stride 16 to {gap32:+.1f} "
                    "at stride 32. ")
    if arm_stats("c5_warp"):
        order = sorted(("c5_align", "c5_warp", "c5_pool"), key=level, reverse=True)
        names = {"c5_align": "RoIAlign", "c5_warp": "RoIWarp", "c5_pool": "RoIPool"}
        text.append("RoIWarp, which the paper did not run at stride 32, lands at "
                    f"{level('c5_warp'):.1f}: the order of the "
                    f"three layers is {' > '.join(names[a] for a in order)}. ")
    display(Markdown("".join(text)))

# %% [markdown]
# Testing Table 2d at a level closer to the paper's needs larger images or a longer run, for
# example `python experiments/ablations.py --table 2d --iterations 3000 --output-dir
# runs/ablations_2d_long --results experiments/results/ablations_2d_long.json` (RoIPool's CPU
# path makes that hours of CPU time).

# %% [markdown]
# ## Table 2b: per-class sigmoid masks against a softmax over classes
#
# Mask R-CNN predicts $K$ masks per RoI and trains only the one of the RoI's class $k$, each
# pixel with its own sigmoid and a binary cross-entropy:
#
# $$L_{mask} = -\frac{1}{M^2}\sum_{i,j} \big[y_{ij}\log\sigma(m^k_{ij}) + (1-y_{ij})\log(1-\sigma(m^k_{ij}))\big].$$
#
# The masks of the other classes get no gradient: the classes do not compete, and the box
# branch alone decides the class. The alternative of Table 2b is the semantic-segmentation FCN's
# loss: a softmax over the $K$ classes at each pixel, $p_{ij} = \mathrm{softmax}_c(m^c_{ij})$,
# with the RoI's class as the target inside the object and the background outside,
#
# $$L_{mask}^{softmax} = -\frac{1}{M^2}\sum_{i,j} \big[y_{ij}\log p^k_{ij} + (1-y_{ij})\log p^0_{ij}\big],$$
#
# so every pixel's classes compete. The paper measures a loss of 5.5 mask AP. A class-agnostic
# head goes the other way: one mask per RoI whatever its class ($K = 1$ output); the paper finds
# it "nearly as effective" (29.7 against 30.3 AP). Here it is only a shape: a predictor of one
# channel, every RoI's "class" that channel 0, and the same `mask_loss`
# (`MaskBranch.mask_channel`).

# %%
show_source(multinomial_mask_loss, MaskBranch.mask_channel)

# %% [markdown]
# The difference shows even on one RoI. Take mask logits that separate the object well in the
# channel of its class (2) and, for the softmax, in the background channel (0); then raise
# another class's channel (3) everywhere, as for an object that looks a little like class 3.
# The sigmoid loss never reads channel 3; the softmax loss grows with it, and its gradient
# pushes channel 3 down inside the object, a job the box branch's classifier already does.

# %%
K, M = 5, 28
target = torch.zeros(1, M, M)
target[0, 7:21, 7:21] = 1.0  # [R, M, M]: a square object
logits = torch.full((1, K, M, M), -4.0)  # [R, K, M, M]
logits[0, 2] = 8 * target[0] - 4  # class 2's channel: +4 inside, -4 outside
logits[0, 0] = 4 - 8 * target[0]  # the background channel (used by the softmax only): -4 inside, +4 outside
labels = torch.tensor([2])
for other in (-4.0, 0.0, 4.0):
    logits[0, 3] = other  # another class's channel, everywhere
    print(f"class 3's logit {other:+.0f}: sigmoid loss {mask_loss(logits, labels, target):.4f}, "
          f"softmax loss {multinomial_mask_loss(logits, labels, target):.4f}")  # fmt: skip

# %% [markdown]
# Ours, on the shapes. The paper ran 2b on ResNet-50-C4; we run it on the default FPN model of
# the shapes (its numbers are in the table for the direction, not the level).

# %%
show_table("2b")
bar_chart("2b")

# %% [markdown]
# The paired differences:

# %%
show_reading("2b")

# %% [markdown]
# How to read them. **How a softmax mask is decoded.** A per-pixel softmax over classes is read
# the way a semantic-segmentation FCN reads it: the pixel belongs to the class that wins it,
# $m_k > m_j$ for every other channel $j$, the background among them. That is the library's rule
# for this variant and the arm's first row above. As a map that is pasted into the image and cut
# at one half like the sigmoid's probabilities, it is $\sigma(m_k - \max_{j \ne k} m_j)$:

# %%
show_source(softmax_decision)

# %% [markdown]
# Two other readings of the same models are printed beside it, because they separate what the
# loss learned from how its output is read. **$p_k > 1/2$**, the softmax probability of the
# detection's class over all $K$ classes, drops the pixels that class wins with less than half
# of the probability; **$m_k > m_0$**, the class against the background alone, ignores the other
# object classes. They bracket the winning-class rule: every pixel $p_k > 1/2$ keeps, the winner
# keeps, and every pixel the winner keeps, $m_k > m_0$ keeps (`tests/test_ablations.py` checks
# both inclusions). The pixels $m_k > m_0$ keeps and the winner drops are those where another
# object class outscores the detection's own: the competition between classes that the paper
# blames for the softmax's loss.

# %% tags=["remove-input"]
if results is not None and arm_stats("fpn") and arm_stats("fpn_softmax"):
    winner = paired_difference("fpn", "fpn_softmax")
    two_way = paired_difference("fpn", "fpn_softmax", key_b="mask_two_way_AP")
    loss_costs = verdict("fpn", "fpn_softmax", "mask_AP", "better", "mask_two_way_AP")[0] == "reproduced"
    gap, remains = round(winner[0], 1), round(two_way[0], 1)  # as printed: the two parts add up to the whole
    text = [
        f"On the shapes, the softmax arm read by the winning class is {gap:.1f} mask AP below the sigmoid "
        f"(paper: 5.5), "
        + ("a larger gap than on COCO. " if winner[0] > 5.5 else "a gap no larger than on COCO. ")
        + f"Of that gap, {gap - remains:.1f} points are the pixels another object class takes from the detection's "
        f"(the winning class against $m_k > m_0$, the same models), and {remains:.1f} remain when the other "
        "classes are ignored: "
        + ("the softmax masks are worse even against the background alone, so the loss, not only the "
           "competition at decoding, costs accuracy." if loss_costs
           else "against the background alone the softmax masks are within the seeds' spread of the sigmoid's: "
                "what the softmax loses is the competition between classes.")
    ]  # fmt: skip
    if winner[0] > 5.5:
        text.append(
            " Four classes of shapes that do not look alike might have been expected to compete less than COCO's "
            "80, many of them similar. This page does not measure why they compete more; one candidate is the "
            "budget: the softmax must push every other class's channel below the object's at every pixel, and a "
            "pixel where an unrelated channel is still ahead is lost to the winning-class reading.")
    display(Markdown("".join(text)))

# %% [markdown]
# **Class-agnostic masks** (the paper: "nearly as effective", 29.7 against 30.3). With one mask
# channel every positive RoI trains the same weights, four times the data per channel of the
# class-specific head, which after a CPU-sized run may help more than the specialisation costs.
# Either way the paper's point is that a class-specific head is unnecessary once the box
# branch has named the class; the verdict above says whether the shapes agree.

# %% [markdown]
# ## Table 2e: an FCN mask head against an MLP
#
# The FCN head keeps the RoI a $14 \times 14$ map through four $3 \times 3$ convolutions and a
# deconvolution: each output pixel sees a small neighbourhood, and the same weights serve every
# position. The MLP flattens the RoI into one vector and predicts all $K M^2$ logits with fully
# connected layers: it must learn the spatial layout from data. The paper: the FCN gains 2.1 mask
# AP (33.6 against 31.5, ResNet-50-FPN). Here the MLP's hidden layers have the width of the
# box head's (256, for the paper's 1024), and it has far more weights than the FCN:

# %%
show_source(mask_head_and_predictor)
weights = {}
for head_name in ("fcn", "mlp"):
    model = MaskRCNN(shapes_small().replace(mask_head=head_name))
    weights[head_name] = sum(p.numel() for p in model.mask_branch.parameters())
    print(f"{head_name}: {weights[head_name]:,} mask-branch weights")
print(f"the MLP's mask branch has {weights['mlp'] / weights['fcn']:.0f} times the FCN's weights")

# %%
show_table("2e")
bar_chart("2e")

# %%
show_reading("2e")
share = {}
if results is not None and arm_stats("fpn") and arm_stats("fpn_mlp"):
    for metric in ("mask_AP50", "mask_AP75", "box_AP"):
        share[metric] = arm_stats("fpn_mlp")[metric]["mean"] / arm_stats("fpn")[metric]["mean"]
        print(f"{metric}: the MLP arm reaches {share[metric]:.0%} of the FCN arm's")

# %% [markdown]
# How to read them. The breakdown by IoU threshold tells where an MLP head loses, if it does:
# a head that finds the objects but draws them coarsely keeps its AP$_{50}$ and loses its AP$_{75}$.
# With no convolution the MLP must learn from data that neighbouring pixels go together, and its
# many more weights (printed above) learn from the same RoIs.

# %% tags=["remove-input"]
if share:
    coarse = share["mask_AP75"] < share["mask_AP50"] - 0.05
    display(Markdown(
        (f"Here the MLP keeps {share['mask_AP50']:.0%} of the FCN's AP$_{{50}}$ and {share['mask_AP75']:.0%} of its "
         "AP$_{75}$: " + ("it loses most where the outline must be exact, the paper's reading (the FCN keeps the "
                          "spatial layout)." if coarse else "it loses about as much at the loose threshold as at the "
                          "strict one, so the loss is not only in the outline."))
        + (f" Its box AP falls too ({share['box_AP']:.0%} of the FCN arm's): the mask loss also trains the "
           "trunk and the "
           "FPN that the box branch reads (section 4.3 below asks how much), so a worse mask head can cost box AP too."
           if share["box_AP"] < 0.95 else "")))

# %% [markdown]
# ## Table 2a: FPN against C4 features
#
# The paper's Table 2a shows that deeper trunks and FPN help (ResNet-50-C4 30.3, ResNet-50-FPN
# 33.6 mask AP). We have one small trunk, so we compare only its FPN and C4 variants.

# %%
show_table("2a")
bar_chart("2a")

# %%
show_reading("2a")

# %% [markdown]
# How to read it. The comparison is the paper's, but not a clean one-switch ablation: the C4
# model (`shapes_small_c4` in `mrcnn/config.py`) also trains 64 RoIs per image instead of 128,
# as the paper's C4 does, predicts $14 \times 14$ masks instead of $28 \times 28$, and its res5
# head costs more per RoI. And on these small objects FPN has a structural edge: it pools every
# RoI from P2, stride 4 (the level count printed in the RoIAlign section), where C4 pools from
# stride 16.

# %% [markdown]
# ## Section 4.3: does the mask branch help the boxes?
#
# Table 3 compares Mask R-CNN with the same model trained without its mask branch ("Faster
# R-CNN, RoIAlign"), both scored on boxes alone: 38.2 against 37.3 box AP (ResNet-101-FPN,
# COCO test-dev). Since the two differ only in the mask loss, the paper credits the 0.9 points
# "solely to the benefits of multi-task training". We train `mask=False` and the default model
# with the same seeds, so each seed gives one paired difference.

# %%
show_table("3")
bar_chart("3")
show_reading("3")

# %% [markdown]
# How to read it. Both models use RoIAlign, so the difference is the extra loss alone: the mask
# gradient flows into the shared trunk and the RoI features, and a second, denser training
# signal may also speed up learning. With few seeds, the per-seed values say more than the
# mean: seeds that disagree on the size show at most the sign. The chapter on box detection and
# timing (`04_3_box_detection_and_timing.py`) reads the same numbers from the same file.

# %% tags=["remove-input"]
d = paired_difference("fpn", "faster_fpn", "box_AP")
if d is not None:
    mean, std, values = d
    positive = sum(v > 0 for v in values)
    text = (f"Here {positive} of {len(values)} seeds give the model with the mask branch the better boxes, "
            "with a median "
            f"difference of {float(np.median(values)):+.1f} box AP (paper: +0.9).")
    if positive in (0, len(values)) and verdict("fpn", "faster_fpn", "box_AP", "better")[0] != "reproduced":
        text += (f" The sign is the same for every seed, the size is not ({', '.join(f'{v:+.1f}' for v in values)}), "
                 "so the mean is not beyond the seeds by the two-sigma rule; and one sign repeated over "
                 f"{len(values)} seeds happens by chance once in {1 / (2 * 0.5 ** len(values)):.0f} tries. "
                 "The direction agrees with the paper's; more seeds would tell whether the gain is real.")
    display(Markdown(text))

# %% [markdown]
# ## Which directions reproduce
#
# Each of the paper's comparisons as a paired difference over seeds, ours against the paper's,
# with the verdict of the rules above:

# %%
rows = ["| table | comparison | metric | paper | ours: mean ± s (per seed) | verdict |", "|---|---|---|---|---|---|"]
by_verdict = {}
for table, a, b, key, (paper_a, paper_b), claim, key_b in COMPARISONS:
    text, d = verdict(a, b, key, claim, key_b)
    ours = "not run" if d is None else f"{d[0]:+.1f} ± {d[1]:.1f} ({', '.join(f'{v:+.1f}' for v in d[2])})"
    paper = "not in the paper (2c's direction)" if paper_a is None else f"{paper_a - paper_b:+.1f}"
    rows.append(f"| {table} | {a} − {label(b, key_b)} | {key} | {paper} | {ours} | {text} |")
    extra = "; 2c's direction at stride 32" if paper_a is None else ""
    by_verdict.setdefault(text.split(":")[0], []).append(f"{table} {a} − {label(b, key_b)} ({key}{extra})")
if results is not None:
    display(Markdown("\n".join(rows)))

# %% [markdown]
# In short, at this scale (the settings printed at the top, four classes of simple shapes):

# %% tags=["remove-input"]
if results is not None:
    order = ("reproduced", "not reproduced", "not measurable here", "not run")
    display(Markdown("\n".join(f"- **{name}**: {'; '.join(by_verdict[name])}" for name in order if name in by_verdict)))
    commits = ", ".join(commit[:7] for commit in results.get("code_commits", [])) or "not recorded"
    load = results.get("load_average_1min_over_runs")
    load = f" (one-minute load average {load[0]} to {load[1]} over the runs)" if load else ""
    rescored = results.get("rescored", [])
    if rescored:
        commits += ("; the softmax arm's runs were scored again from their checkpoints, by the winning class, "
                    "at commit "
                    f"{', '.join(sorted({entry.split()[-1][:7] for entry in rescored}))} (`--rescore`)")
    display(Markdown(
        f"The sweep: {len(results['arms'])} arms, seeds {settings['seeds']}, code commit(s) {commits}, on "
        f"{machine['cpu_count']} cores{load}. The spread over seeds is printed with every number; few seeds make "
        "\"beyond the seeds\" a weak test, and the COCO numbers next to ours are there for the direction, "
        "not the level."))

# %% [markdown]
# ## What to try next
#
# - Run one table with more seeds, `python experiments/ablations.py --table 2c --seeds 0 1 2 3 4`:
#   the finished runs are kept, only the new seeds train. Does the spread shrink as $1/\sqrt{n}$?
# - Train longer (`--iterations 3000`, in a new `--output-dir`): do the small gaps of these runs
#   grow or vanish once every arm has converged?
# - Make the objects smaller (`object_size` of `generate_shapes` in `mrcnn/data/shapes.py`) and
#   rerun 2d: at stride 32 a 16-pixel object is half a feature pixel.
# - Pool with RoIAlign at FPN levels but force every RoI onto P4 (stride 16) by changing
#   `fpn_level`'s canonical size, and compare RoIPool there: the FPN version of Table 2c.
# - Add the paper's other aggregation: a RoIWarp that takes the max of its bilinear samples
#   instead of the mean (Table 2c's 27.2 row), and check that it changes little.
