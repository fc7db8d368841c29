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
# # Training
#
# **Paper:** section 3 ("Mask R-CNN": the multi-task loss) and section 3.1, "Implementation
# Details", paragraph "Training".
# **Code:** `mrcnn/train.py` (the loop, the schedule, reproducible data order), the loss terms
# in `mrcnn/rpn.py`, `mrcnn/box_head.py` and `mrcnn/mask_loss.py`, `mrcnn/checkpoint.py`.
# **Proof:** `tests/test_train.py` (the schedule, the data order, a few steps lower the loss, a
# resumed run equals an uninterrupted one, a non-finite loss stops the run, non-finite weights
# are never saved),
# `tests/test_ddp.py` (two processes give the weights of one), `tests/test_checkpoint.py`,
# `tests/test_determinism.py` (the same seed gives the same bits).
#
# Mask R-CNN is trained end to end with one objective. "Formally, during training, we define
# a multi-task loss on each sampled RoI as $L = L_{cls} + L_{box} + L_{mask}$." In this library
# the region proposal network trains at the same time, on the same features, with its own two
# terms; the paper trained it separately for its experiments, and a few more details of the
# recipe here are not the paper's (section "Where this recipe is not the paper's", below). This
# chapter takes the model apart at training time: what the five losses are, which anchors and
# RoIs they see, how the batch and the learning rate are organized, and it trains a small model
# for a few seconds.
#
# Legend: $N$ images, $A$ anchors, $R$ RoIs, $K$ classes (background included), $M$ mask size.

# %%
# %matplotlib inline
import math
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from book_helpers import show_source
from mrcnn.config import shapes_small
from mrcnn.data.shapes import ShapesDataset
from mrcnn.model import MaskRCNN
from mrcnn.checkpoint import load_checkpoint
from mrcnn.train import (
    GlobalBatchSampler,
    NonFiniteError,
    TrainingImages,
    TrainingLog,
    TrainSettings,
    build_optimizer,
    forward_backward,
    learning_rate_factor,
    paper_schedule,
    read_log,
    resume_from_checkpoint,
    sampling_seed,
    save_progress,
    start_run,
    train,
    update_weights,
)
from mrcnn.demo import DEMO_DEFAULTS
from mrcnn.visualize import loss_curve_figure, training_samples, training_samples_figure

torch.set_num_threads(1)  # small tensors: a second thread barely helps, and on a shared machine it waits
_ = torch.manual_seed(0)

# %% [markdown]
# ## The five losses
#
# In training mode the model takes images and their targets (boxes, labels, masks) and
# returns its losses. The small preset (`shapes_small`: a narrow ResNet, 64-channel FPN, images
# of 128 pixels) on one picture of the synthetic shapes data set:

# %%
model = MaskRCNN(shapes_small())
data = ShapesDataset(64, seed=0)
image, target = data[1]
model.train()
losses = model([image], [target])
for name, value in losses.items():
    print(f"{name:18s} {value.item():.3f}")
print(f"{'L (the sum)':18s} {sum(losses.values()).item():.3f}")

# %%
with torch.no_grad():  # the mask logits of the ground-truth boxes, in training mode as in the loss
    batch, _, resized_targets = model.transform([image], [target])
    features, _ = model.feature_maps(batch)
    boxes, labels = resized_targets[0]["boxes"], resized_targets[0]["labels"]  # [G, 4], [G]
    own_logits = model.mask_branch.mask_logits(features[:4], [boxes])[torch.arange(len(boxes)), labels]  # [G, M, M]
    mask_targets = model.mask_branch.mask_targets(resized_targets, [boxes], [torch.arange(len(boxes))],
                                                  own_logits.shape[-1])  # fmt: skip
print(f"initial mask logits of the {len(boxes)} objects: mean {own_logits.mean():.2f}, std {own_logits.std():.2f}, "
      f"mean |z| {own_logits.abs().mean():.2f}")
cross_entropy = torch.nn.functional.binary_cross_entropy_with_logits(own_logits, mask_targets)
print(f"their binary cross-entropy: {cross_entropy:.3f} "
      f"nats a pixel (the loss above); with every logit 0: log 2 = {math.log(2):.3f}")

# %% [markdown]
# Each term averages over a sample, never over everything:
#
# - **RPN** (Faster R-CNN's; trained jointly with the heads here, not in the paper's experiments): over $|S| = 256$ sampled anchors per image (128
#   in the small preset), half of them positive at most,
#   $L_{objectness} = \frac{1}{|S|}\sum_{a \in S} \mathrm{BCE}(o_a, y_a)$ and
#   $L_{rpn\_box} = \frac{1}{|S|}\sum_{a \in S^+} \mathrm{smooth}_{L_1}(t_a - t^*_a)$.
# - **Box branch** (Fast R-CNN's): over the sampled RoIs, "a RoI is considered positive if it has
#   IoU with a ground-truth box of at least 0.5 and negative otherwise", with "a ratio of 1:3 of
#   positive to negatives" and $N = 512$ RoIs per image for FPN:
#   $L_{cls} = -\frac{1}{R}\sum_r \log p_r[u_r]$ and
#   $L_{box} = \frac{1}{R}\sum_{r: u_r \ge 1} \mathrm{smooth}_{L_1}(t^{u_r}_r - v_r)$.
#   With random weights every class is equally likely, so $L_{cls}$ starts near
#   $\log K = \log 5 \approx 1.61$.
# - **Mask branch**: "$L_{mask}$ is defined only on positive RoIs", the average binary
#   cross-entropy of the $M \times M$ mask of the RoI's own class (chapter "Mask representation").
#   A mask that says $\frac12$ at every pixel (logits 0) costs $\log 2 \approx 0.69$ nats a
#   pixel. The untrained model's mask loss above is far larger: the mask predictor's initial
#   weights (Kaiming normal over the fan-out of its $K$ output channels, as in torchvision and
#   Detectron) give logits of a spread of several units, and a pixel whose logit $z$ sits on
#   the wrong side costs about $|z|$ nats. The positive RoIs of this untrained model are the
#   ground-truth boxes themselves (the box branch adds them to its sample), so the loss can be
#   recomputed from those boxes:
#
# ## Which anchors and RoIs are trained
#
# The samplers decide what each loss sees. Left, the anchors the RPN loss scores; middle, the
# best proposals (with random weights, they are almost arbitrary boxes); right, the RoIs the
# heads train on, drawn from the proposals *and the ground-truth boxes*, which is why a fresh
# model already has positive RoIs to learn masks from.

# %%
training_samples_figure(model, image, target)

# %% [markdown]
# ## A batch, one image at a time
#
# The paper trains "on 8 GPUs (so effective minibatch size is 16)", two images per GPU. Each
# GPU's losses average over its own RoIs and positives, and the gradients are then averaged over
# the GPUs. How a batch is split therefore changes the result a little (the mask loss, for one,
# averages over the positives of whatever images share a GPU).
#
# `mrcnn/train.py` makes the split irrelevant: the loss of a step is the mean over the $B$
# images of each image's own losses,
#
# $$L_{step} = \frac{1}{B} \sum_{n=1}^{B} \big(L_{objectness} + L_{rpn\_box} + L_{cls} + L_{box} + L_{mask}\big)(\text{image } n),$$
#
# computed one image at a time, with the gradients of the $B$ images added up before the
# optimizer steps. A batch of two in one process, and two processes of one image each
# (DistributedDataParallel, which averages the processes' gradients) then give the same weights;
# `tests/test_ddp.py` checks it. Everything random is a function of the position in the run:
# the data order of an epoch, the flip of an image, and the seed of the RPN's and box head's
# samplers before each image.

# %%
for rank in (0, 1):
    shard = list(GlobalBatchSampler(num_images=10, batch_size=4, seed=0, iterations=3, rank=rank, world_size=2))
    print(f"rank {rank}: " + "  ".join(str([index for (_, _, _, index) in step]) for step in shard))
print("one process:",
      "  ".join(str([key[3] for key in step]) for step in GlobalBatchSampler(10, 4, seed=0, iterations=3)))  # fmt: skip
print("sampler seed of image 1 of step 2:", sampling_seed(seed=0, step=2, position=1))

# %%
show_source(GlobalBatchSampler.__iter__, TrainingImages.__getitem__, sampling_seed)

# %% [markdown]
# ## The schedule
#
# "We train on 8 GPUs (so effective minibatch size is 16) for 160k iterations, with a learning
# rate of 0.02 which is decreased by 10 at the 120k iteration. We use a weight decay of 0.0001
# and momentum of 0.9." To train with another batch size $B$, `paper_schedule` follows the
# linear scaling rule of Goyal et al. (2017): the learning rate is $0.02\,B/16$ and the number
# of iterations $160\text{k} \times 16 / B$, so the model sees the same number of images; a
# `schedule` factor shortens or lengthens the whole. The rate starts with a linear warm-up
# from $f\,lr_0$ ($f = 0.001$) over $W$ steps, $W = \min(1000, \text{iterations} / 10)$. The
# warm-up is not in the paper, which names only the rate, its decay, the weight decay and the
# momentum: it comes from Goyal et al. (2017), and these values of $f$ and $W$ are those of
# detectron2 and of torchvision's reference training script (Detectron, the code its authors
# released, starts at $lr_0 / 3$ over 500 steps).
#
# $$lr(t) = lr_0 \cdot 0.1^{\#\{m \in \text{decay steps}: t \ge m\}} \cdot
#   \begin{cases} f + (1 - f)\,t / W & t < W \\ 1 & \text{otherwise.} \end{cases}$$

# %%
figure, axes = plt.subplots(1, 2, figsize=(11, 3.2), layout="constrained")
for batch_size in (16, 8):
    settings = paper_schedule(batch_size)
    steps = range(0, settings.iterations, 500)
    axes[0].plot(steps, [settings.lr * learning_rate_factor(t, settings) for t in steps], label=f"B = {batch_size}")
axes[0].set(xlabel="iteration", ylabel="learning rate", title="the paper's schedule, and scaled to B = 8")
axes[0].legend()
settings = paper_schedule(16)
axes[1].plot(range(1500), [settings.lr * learning_rate_factor(t, settings) for t in range(1500)])
axes[1].set(xlabel="iteration", title=f"the first 1500 iterations: warm-up over W = {settings.warmup_iterations}")
plt.show()
show_source(learning_rate_factor)

# %% [markdown]
# ## Where this recipe is not the paper's
#
# The library trains the way Detectron and torchvision do, which differs from the paper's text
# in four places:
#
# - **The RPN is trained with the heads, on shared features.** The paper, section 3.1: "For
#   convenient ablation, RPN is trained separately and does not share features with Mask R-CNN,
#   unless specified. For every entry in this paper, RPN and Mask R-CNN have the same backbones
#   and so they are shareable." Its shared-feature model is the one timed in section 4.4,
#   trained "following the 4-step training of Faster R-CNN" (alternating RPN and detector
#   training). Here, as in Detectron and torchvision, one network with one trunk is trained on
#   the sum of all five losses at once, Faster R-CNN's "approximate joint training": the
#   proposals are treated as constants, no gradient flows through their coordinates
#   (`mrcnn/rpn.py`).
# - **A warm-up** of the learning rate, which the paper does not mention (the schedule above).
# - **One image per forward pass.** The paper puts "2 images per GPU" in a mini-batch, and each
#   GPU's losses average over the RoIs of both; here every image is a forward pass of its own,
#   its losses averaged over its own samples, and the gradients of the $B$ images of a step are
#   added with weight $1/B$ (the section "A batch, one image at a time" above).
# - **Horizontal flips.** The paper names no data augmentation for its COCO models (it resizes
#   every image to a shorter side of 800 pixels). Detectron and torchvision flip each training
#   image horizontally with probability 1/2, and so does `mrcnn/train.py` (`TrainSettings.flip`,
#   each flip decided by the seed, the epoch and the image).
#
# The demo and the book's trained model also clip the gradient norm (`clip_grad_norm` in the
# demo's settings, `DEMO_DEFAULTS` in `mrcnn/demo.py`; off by default in `TrainSettings`), which
# the paper does not do either: trained from scratch, the small model's box losses can otherwise
# spike early and diverge.

# %% [markdown]
# ## A short training run
#
# To see the losses fall in seconds, the small preset on even smaller pictures (64 pixels, at
# most two shapes), 32 images, a batch of 2 and a rate of 0.01 after 5 warm-up steps. The whole
# method runs: sampling, the five losses, SGD with momentum and weight decay, a checkpoint at
# the end and a log of every step.

# %%
tiny = shapes_small().replace(min_size=64, max_size=64, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                              box_batch_size_per_image=32)
small_pictures = {"image_size": 64, "object_size": (16, 40), "max_objects": 2}
run_dir = Path(tempfile.mkdtemp(prefix="training_chapter_"))
torch.manual_seed(0)
small_model = MaskRCNN(tiny)
settings = TrainSettings(iterations=60, batch_size=2, lr=0.01, decay_steps=(50,), warmup_iterations=5,
                         checkpoint_every=30)  # fmt: skip
started = time.perf_counter()
summary = train(small_model, ShapesDataset(32, **small_pictures), settings, run_dir / "run", progress=False)
print(f"{summary['steps']} steps in {time.perf_counter() - started:.1f} s "
      f"({summary['images_per_second']:.1f} images/s)")
loss_curve_figure(read_log(run_dir / "run" / "log.jsonl"), smoothing=8)

# %% [markdown]
# The log, loss by loss: the mean of the first five steps, the lowest step, the mean of the
# last ten.

# %%
log = read_log(run_dir / "run" / "log.jsonl")
print(f"{'loss':18s} {'steps 1-5':>10s} {'lowest (at step)':>17s} {'last 10 steps':>14s}")
for name in ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"):
    values = [record[name] for record in log]
    lowest = min(range(len(values)), key=values.__getitem__)
    print(f"{name:18s} {statistics.mean(values[:5]):10.3f} {values[lowest]:9.3f} ({lowest + 1:3d})  "
          f"{statistics.mean(values[-10:]):14.3f}")
print(f"log 2 = {math.log(2):.3f}: the mask loss of a mask that says 1/2 at every pixel")

# %% [markdown]
# Read against the table:
#
# - **Objectness** starts at $\log 2$, a coin flip per anchor, and falls the most: telling
#   shapes from background is the easy part, and the RPN learns it first.
# - **The mask loss** starts high for the reason given at the top of the chapter (large random
#   logits); the first steps pull the logits towards 0, where the loss is $\log 2$, and in 60
#   steps it gets little further: compare its last steps with $\log 2$. The mask head has
#   barely begun to learn shapes.
# - **The classifier and box losses** are not simply falling: compare the lowest value of each
#   with its last steps. They are averages over a sample that changes as the RPN learns. At
#   first the RPN proposes almost nothing near the objects, so the box branch's positive RoIs
#   are little more than the ground-truth boxes it adds to the sample, and the classifier
#   can score well by calling nearly everything background. As the proposals improve, more
#   sampled RoIs overlap an object: more positives, each one a harder question for the
#   classifier (which of four shapes?) and one more term in $L_{box}$, which sums over the
#   positives and divides by all $R$ RoIs. The positives per image, before and after the run,
#   on the same 32 pictures:

# %%
torch.manual_seed(0)
untrained = MaskRCNN(tiny)  # the weights the run started from
pictures_of_the_run = ShapesDataset(32, **small_pictures)
for name, weights in (("before the run", untrained), ("after 60 steps", small_model)):
    positives = [int((training_samples(weights, *pictures_of_the_run[i]).roi_labels > 0).sum()) for i in range(32)]
    print(f"{name}: {statistics.mean(positives):.1f} positive RoIs per image (of the sampled RoIs)")

# %% [markdown]
# A model that detects well needs far more steps than this, as the demo's settings show:

# %%
print(f"the demo: {DEMO_DEFAULTS['iterations']:,} steps of {DEMO_DEFAULTS['batch_size']} images "
      f"from {DEMO_DEFAULTS['num_train']:,} pictures of {shapes_small().min_size} pixels "
      "(mrcnn/demo.py, DEMO_DEFAULTS); "
      f"this run: {settings.iterations} steps of {settings.batch_size} from 32 pictures of {tiny.min_size} pixels")

# %% [markdown]
# And the training samples of the run's model on one of its pictures, as at the top of the
# chapter (the counts are in the panel titles):

# %%
small_image, small_target = ShapesDataset(32, **small_pictures)[3]
training_samples_figure(small_model, small_image, small_target)

# %% [markdown]
# ## Resuming gives the same run
#
# A checkpoint holds the weights, the optimizer's momentum, the scheduler, the step and the
# random generators' states, and is written atomically (a temporary file, then a rename), so a
# crash while writing leaves the previous one intact. Because the data order, the flips and the
# sampling depend only on the seed and the position in the run, a run stopped after its
# checkpoint and resumed logs the same losses as one that never stopped:

# %%
short = TrainSettings(iterations=6, batch_size=2, lr=0.01, warmup_iterations=2, checkpoint_every=3)
pictures = ShapesDataset(8, **small_pictures)
torch.manual_seed(0)
train(MaskRCNN(tiny), pictures, short, run_dir / "whole", progress=False)
torch.manual_seed(0)  # the same run, stopped after its checkpoint of step 3 ...
train(MaskRCNN(tiny), pictures, TrainSettings(**{**short.__dict__, "iterations": 3}), run_dir / "resumed",
      progress=False)  # fmt: skip
torch.manual_seed(1)  # ... and continued by a new process, from other random weights that the checkpoint replaces
train(MaskRCNN(tiny), pictures, short, run_dir / "resumed", resume=True, progress=False)
for whole, resumed in zip(read_log(run_dir / "whole" / "log.jsonl"), read_log(run_dir / "resumed" / "log.jsonl")):
    print(f"step {whole['step']}: uninterrupted {whole['loss']:.6f}   resumed {resumed['loss']:.6f}   "
          f"{'same' if whole['loss'] == resumed['loss'] else 'DIFFERENT'}")

# %% [markdown]
# (The stopped run had a schedule of 3 steps, with the same warm-up as the 6-step run and no
# decay within either, so its learning rates are those of the first 3 steps of the long run.)

# %% [markdown]
# ## Deterministic by choice
#
# "The same seed gives the same run" also needs every sum to be added in the same order each
# time. One sum is at risk: RoIAlign's backward pass, where every sample of every RoI adds its
# share of the gradient into four feature pixels, and many RoIs share pixels. A GPU kernel does
# this with atomic additions, whose order changes from run to run, so the gradients (and then
# the weights) differ in their last bits. With `torch.use_deterministic_algorithms(True)` the
# Triton path (`kernels/roi_align_deterministic.py`) instead sorts the contributions by
# destination pixel and adds each pixel's in a fixed order; the CPU path is ordered that way
# always (`mrcnn/roi_align_cpu.py`: a stable sort, then one bag per pixel). The whole short run
# above, repeated in deterministic mode, gives the same losses to the last bit
# (`tests/test_determinism.py` holds this, with two threads; `benchmarks/determinism.py`
# measures what it costs):

# %%
torch.use_deterministic_algorithms(True)
try:
    torch.manual_seed(0)
    train(MaskRCNN(tiny), pictures, short, run_dir / "deterministic", progress=False)
finally:
    torch.use_deterministic_algorithms(False)
repeated = [r["loss"] for r in read_log(run_dir / "deterministic" / "log.jsonl")]
first = [r["loss"] for r in read_log(run_dir / "whole" / "log.jsonl")]
print("the same losses, bit for bit:", repeated == first)
assert repeated == first

# %% [markdown]
# ## The loop
#
# The library's training function reads as the list of its steps; each step is a function of
# `mrcnn/train.py`, shown below in the order it runs.

# %%
show_source(train)

# %% [markdown]
# **Starting a run.** Under `torchrun` each process joins the process group and takes its
# device; the optimizer is the paper's SGD (momentum 0.9, weight decay $10^{-4}$) with the
# schedule $lr(t)$ above as a multiplier, and a loss scaler that only fp16 training uses. A
# resumed run reloads everything that decides the next step: the weights, the momentum
# buffers, the schedule's position and the random generators. With several processes the model
# is wrapped in `DistributedDataParallel`, which averages the gradients.

# %%
show_source(start_run, build_optimizer, resume_from_checkpoint)

# %% [markdown]
# **One step.** On a CPU (the default there, `batched_forward=False`) the $B$ images of a step
# run one at a time, each with its samplers seeded by its position in the run; each image's loss
# is divided by $B$ before its backward pass, so that the gradients add up to those of
# $L_{step}$, and $W$ processes give the weights of one. On CUDA the default is one padded batch
# per process (`batched_forward=True`, `--forward batched`): faster, but each loss is then a mean
# over the batch's sampled anchors and RoIs rather than over images, and the padding depends on
# the batch, so the equality across process counts holds only to the batch's composition (the
# module docstring of `mrcnn/train.py` says exactly what changes). Under DDP the processes
# exchange gradients once per step, with the last pass (`no_sync` before it).

# %%
show_source(forward_backward)

# %% [markdown]
# **The update.** Clip the gradient norm if asked, take the SGD step, move the schedule on, clear
# the gradients. The losses are read back from the device every `log_every` steps (every step on
# a CPU, every 20 on CUDA, where each read is a synchronisation) and checked for a non-finite
# value there; a checkpoint step always reads first, so no checkpoint holds weights that a
# non-finite loss touched.

# %%
show_source(update_weights)

# %% [markdown]
# **Checkpoints.** Every `checkpoint_every` steps and at the end, written atomically by the
# first process. A finite loss does not make finite weights: one step with too large a rate can
# send them to infinity, and the loss only turns NaN on the next step. So the weights are
# checked before they are saved, and a run that diverges keeps its last finite checkpoint.
# Here the rate jumps from 0.03 to $3 \times 10^{38}$ at step 2:

# %%
show_source(save_progress)
diverging = TrainSettings(iterations=4, batch_size=2, lr=3e38, warmup_iterations=1, warmup_factor=1e-40,
                          checkpoint_every=1)
torch.manual_seed(0)
try:
    train(MaskRCNN(tiny), pictures, diverging, run_dir / "diverging", progress=False)
except NonFiniteError as error:  # its message names the checkpoint kept, in this run's temporary folder
    print(f"{type(error).__name__}: {str(error).replace(str(run_dir), '<run_dir>')}")
print("checkpoint kept: step", load_checkpoint(run_dir / "diverging" / "checkpoint.pt")["step"])

# %% [markdown]
# **The log.** One JSON line per step: the rate, the loss and its five terms, and the seconds
# since the start (which go on across a resumed run).

# %%
show_source(TrainingLog.write)

# %% [markdown]
# ## What to try next
#
# - `mrcnn train --data data/shapes --iterations 2000` after `mrcnn shapes`, then
#   `mrcnn evaluate`: the demo (`make demo`) does exactly this, and chapter 4.1 reads the numbers.
# - Raise the learning rate of the short run to 0.05 and watch the box losses explode within a
#   few steps; then add `clip_grad_norm=10.0` to `TrainSettings`.
# - Train the short run with a batch of 1 and twice the iterations: same number of images, other
#   weights. Which trains faster per image?
# - Launch two processes: `torchrun --nproc_per_node 2 -m mrcnn train --data data/shapes
#   --threads 1 ...`; the log and the checkpoint match a one-process run with the same batch.
# - Replace `nn.BatchNorm2d` of the small backbone by a GroupNorm (`resnet_small(norm=...)` in
#   `mrcnn/backbone.py`): the statistics then no longer depend on the image alone at training
#   time and on running averages at test time.
