r"""Training: SGD on the multi-task loss, reproducible, resumable and distributed (paper section 3.1).

**The loss.** On every sampled RoI the paper minimizes `L = L_cls + L_box + L_mask` (section 3),
and the RPN, trained jointly, adds its objectness and box terms (with FPN, "features are
shared between RPN and Mask R-CNN"). The model returns the five terms; a step minimizes their
sum, averaged over the images of the batch:

    L_step = 1/B sum_{n=1..B} ( L_objectness + L_rpn_box + L_cls + L_box + L_mask )(image n)

Each image is run through the model on its own and its loss is divided by B before the backward
pass, so the gradients of a batch add up in `.grad`. This is what makes the result independent
of how the batch is split across processes: the RoI sampler, the mask loss's average over the
positive RoIs and the batch statistics of `nn.BatchNorm2d` all see one image at a time, exactly
as in a run of B processes with one image each.

**The batched forward pass** (`TrainSettings.batched_forward`; by default on CUDA, where one
image at a time leaves the device idle, and never elsewhere). A process of a world of W gives
its B/W images to the model as one list: one padded batch through the backbone, the FPN and the
RPN, the RoIs still sampled per image (the paper's "N RoIs per image"). Its step minimizes

    L_step = 1/W sum_{w=1..W} L(images of process w)

where L(list) is the model's loss on the list, whose terms are means over the whole list:
L_objectness over the anchors sampled in all its images (256 per image), L_rpn_box and the box
branch's two terms over all its sampled anchors or RoIs (512 per image at most: fewer when an
image has fewer proposals), L_mask over all its positive RoIs. So an image weighs in by its
sampled anchors and RoIs, not 1/B each: an image with more positive RoIs weighs more in L_mask.
Besides, the images are zero-padded to the largest of the list (rounded up to a multiple of
`size_divisible`) instead of each to its own size, so the anchors cover the padding too (more
background anchors to sample from) and the features near an image's bottom and right edges
depend on its neighbours' sizes; the batch statistics of a trainable `nn.BatchNorm2d` are those
of the process's B/W images, padding included; and the samplers draw from one generator seeded
per forward pass, at the first image's position. A run of W processes then no longer gives the
weights of one process. What still holds: with one image per process the batched pass is the
per-image pass (the same weights, any W), and its logged loss is the model's loss on the list.

**Host synchronisation.** A step reads nothing back from the device: its losses stay there until
the log reads `log_every` steps of them at once (by default every step on a CPU, every 20 on
CUDA; always at a checkpoint and at the end). The check that the loss is finite waits for that
read, so with `log_every` k a non-finite loss stops the run up to k - 1 steps late, after
updating the weights with it; but every checkpoint step reads the losses before its update, and
the weights are checked before they are saved (`save_progress`), so no checkpoint ever holds
weights that a non-finite loss, or an update, has touched. The batches come from page-locked
memory (`pin_memory`, by default on CUDA) so that the copies to the device are asynchronous.

**The schedule** (section 3.1, "Training"): "We train on 8 GPUs (so effective minibatch size is
16) for 160k iterations, with a learning rate of 0.02 which is decreased by 10 at the 120k
iteration. We use a weight decay of 0.0001 and momentum of 0.9." `paper_schedule` scales it to
another batch size B with the linear scaling rule of Goyal et al. (2017), which keeps the number
of epochs: `lr = 0.02 B / 16`, `iterations = 160k * 16 / B`, times a `schedule` factor (0.5 is a
half schedule). A linear warm-up starts from a small fraction `f` of the rate (Goyal et al.):

    lr(t) = lr_0 * 0.1^{#\{m in decay_steps : t >= m\}} * (f + (1 - f) t / W   if t < W, else 1)

**Reproducibility.** Everything random in a step is a function of the seed and the position in
the run, never of the process, the data-loader worker or what ran before:

- data order: the images of epoch e are `permutation(seed, e)`; step t takes the t-th slice of B
  images. A process of rank r in a world of size W takes the r-th B/W of that slice.
- augmentation: image i of epoch e is flipped horizontally when `uniform(seed, e, i) < 1/2`.
- sampling: before image p of step t, torch's generator is seeded with `(seed, t, p)`; the RPN's
  anchor sampling and the box branch's RoI sampling draw from it.

So a resumed run (checkpoint, then `resume=True`) repeats the uninterrupted one to the last bit,
and a run on W processes gives the weights of a one-process run with the same global batch (to
float rounding of the gradient all-reduce; tests/test_ddp.py). Under `torchrun` (WORLD_SIZE > 1)
it initializes torch.distributed from the environment (gloo on CPU, nccl on CUDA) and wraps the
model in DistributedDataParallel; rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from mrcnn.checkpoint import load_checkpoint, load_model_state, save_checkpoint, set_rng_states
from mrcnn.data.coco import DatasetError
from mrcnn.data.flip import horizontal_flip

PAPER_ITERATIONS, PAPER_BATCH_SIZE, PAPER_LR, PAPER_DECAY_AT = 160_000, 16, 0.02, (0.75,)  # 120k of 160k
CHECKPOINT_NAME, LOG_NAME = "checkpoint.pt", "log.jsonl"


class NonFiniteError(RuntimeError):
    """A step gave NaN or infinite values: the run stopped, and its last finite checkpoint is kept."""


class NonFiniteLossError(NonFiniteError):
    """The loss of a step is NaN or infinite; the weights were not updated."""


class NonFiniteWeightsError(NonFiniteError):
    """The weights became NaN or infinite in an update (a finite loss, too large a step); they were not saved."""


class UnreadableDataError(DatasetError):
    """An image or annotation of a step could not be read: the run stopped there, with the steps before it saved."""


@dataclass(frozen=True)
class TrainSettings:
    iterations: int  # optimizer steps in the whole run
    batch_size: int = 16  # B: images per step, over all processes
    lr: float = 0.02  # the rate after warm-up, before decay
    momentum: float = 0.9
    weight_decay: float = 1e-4
    decay_steps: tuple[int, ...] = (120_000,)  # the rate is multiplied by decay_factor at each
    decay_factor: float = 0.1
    warmup_iterations: int = 1000  # W
    warmup_factor: float = 0.001  # f: the rate starts at f * lr
    clip_grad_norm: float | None = None  # clip the global gradient norm (not in the paper)
    amp: str = "off"  # "bf16" (autocast, on CUDA or a CPU) or "fp16" (CUDA, with a GradScaler)
    flip: bool = True  # horizontal flipping, the one augmentation of the reference recipes
    seed: int = 0
    checkpoint_every: int = 1000
    workers: int = 0  # data-loader processes
    # None: decided by the device (`for_device`): batched, pinned and read every 20 steps on CUDA;
    # per image, unpinned and read every step elsewhere (module docstring)
    batched_forward: bool | None = None  # a process's images in one forward pass, not one at a time
    pin_memory: bool | None = None  # batches in page-locked memory, copied to the device asynchronously
    log_every: int | None = None  # k: the losses of k steps are read from the device (and logged) at once

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError(f"iterations, batch_size and checkpoint_every must be >= 1, got {self.iterations}, "
                             f"{self.batch_size}, {self.checkpoint_every}")  # fmt: skip
        if self.log_every is not None and self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.amp not in ("off", "bf16", "fp16"):
            raise ValueError(f"amp must be off, bf16 or fp16, got {self.amp!r}")
        if self.warmup_iterations < 0 or not 0 < self.warmup_factor <= 1:
            raise ValueError(f"need warmup_iterations >= 0 and 0 < warmup_factor <= 1, got "
                             f"{self.warmup_iterations}, {self.warmup_factor}")  # fmt: skip


def paper_schedule(batch_size: int = 16, schedule: float = 1.0, lr: float | None = None,
                   iterations: int | None = None, **settings) -> TrainSettings:  # fmt: skip
    """The paper's schedule for a global batch of `batch_size` images (module docstring).

    lr and iterations, when given, replace the scaled values; the decay step stays at 3/4 of the
    run and the warm-up takes min(1000, iterations / 10) steps unless `settings` say otherwise.
    """
    if schedule <= 0:
        raise ValueError(f"schedule must be > 0, got {schedule}")
    iterations = iterations or max(1, round(PAPER_ITERATIONS * schedule * PAPER_BATCH_SIZE / batch_size))
    settings.setdefault("decay_steps", tuple(round(fraction * iterations) for fraction in PAPER_DECAY_AT))
    settings.setdefault("warmup_iterations", min(1000, iterations // 10))
    lr = lr or PAPER_LR * batch_size / PAPER_BATCH_SIZE  # the linear scaling rule
    return TrainSettings(iterations=iterations, batch_size=batch_size, lr=lr, **settings)


def for_device(settings: TrainSettings, device: torch.device) -> TrainSettings:
    """`settings` with the choices left to the device made (module docstring): on CUDA a batched
    forward pass, pinned memory and the losses read every 20 steps; elsewhere the exact per-image
    pass, nothing pinned and the losses read every step."""
    cuda = device.type == "cuda"
    choices = {"batched_forward": cuda, "pin_memory": cuda, "log_every": 20 if cuda else 1}
    return dataclasses.replace(settings, **{name: value for name, value in choices.items()
                                            if getattr(settings, name) is None})  # fmt: skip


def learning_rate_factor(step: int, settings: TrainSettings) -> float:
    """lr(t) / lr_0 for step t (0-based): warm-up, then step decay (module docstring)."""
    factor = settings.decay_factor ** sum(step >= milestone for milestone in settings.decay_steps)
    if step < settings.warmup_iterations:
        alpha = step / settings.warmup_iterations
        factor *= settings.warmup_factor * (1 - alpha) + alpha
    return factor


def sampling_seed(seed: int, step: int, position: int) -> int:
    """The seed of torch's generator before image `position` of step `step` (module docstring)."""
    return int(np.random.SeedSequence((seed, step, position)).generate_state(1)[0])


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This process's share of each step's global batch, for steps `start_step` to `iterations - 1`.

    Yields one list per step of keys `(step, position, epoch, index)`: `index` is the data set
    index, `position` its place in the global batch of `batch_size`. Epoch e visits the images
    in `numpy.random.default_rng((seed, e)).permutation(num_images)`; an epoch is
    `num_images // batch_size` steps (the incomplete last batch is left out).
    """

    def __init__(self, num_images: int, batch_size: int, seed: int, iterations: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1):  # fmt: skip
        if batch_size % world_size:
            raise ValueError(f"the batch size {batch_size} must be a multiple of the number of processes {world_size}")
        if num_images < batch_size:
            raise ValueError(f"the data set has {num_images} images, fewer than one batch of {batch_size}")
        self.num_images, self.batch_size, self.seed = num_images, batch_size, seed
        self.iterations, self.start_step, self.rank, self.world_size = iterations, start_step, rank, world_size
        self.steps_per_epoch = num_images // batch_size

    def __len__(self) -> int:
        return max(0, self.iterations - self.start_step)

    def __iter__(self):
        local = self.batch_size // self.world_size
        epoch_order = (-1, None)
        for step in range(self.start_step, self.iterations):
            epoch, batch_in_epoch = divmod(step, self.steps_per_epoch)
            if epoch_order[0] != epoch:
                epoch_order = (epoch, np.random.default_rng((self.seed, epoch)).permutation(self.num_images))
            start = batch_in_epoch * self.batch_size + self.rank * local
            positions = range(self.rank * local, (self.rank + 1) * local)
            yield [(step, p, epoch, int(i)) for p, i in zip(positions, epoch_order[1][start : start + local])]


class TrainingImages(torch.utils.data.Dataset):
    """A data set read by key `(step, position, epoch, index)`, flipped as a function of (seed, epoch, index).

    dataset: gives `(image [3, H, W], target)` for an index, without augmentation of its own
    (a `CocoDataset` built with `train=False`, or a `ShapesDataset`). An index it cannot read (a
    `DatasetError`, which names the file) gives `(key, None, message)`: returned, not raised, so
    that the trainer gets the one line from a DataLoader worker too, not the worker's traceback.
    """

    def __init__(self, dataset, seed: int = 0, flip: bool = True):
        if getattr(dataset, "train", False):
            raise ValueError("build the data set with train=False: the trainer flips images itself, reproducibly")
        self.dataset, self.seed, self.flip = dataset, seed, flip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int, int]) -> tuple[tuple, torch.Tensor, dict]:
        _, _, epoch, index = key
        try:
            image, target = self.dataset[index]
        except DatasetError as error:  # a file broken since start-up, or never checked (verify_images=False)
            return key, None, str(error)
        if self.flip and np.random.default_rng((self.seed, epoch, index)).random() < 0.5:
            # keypoints: left <-> right
            image, target = horizontal_flip(image, target, getattr(self.dataset, "flip_index", None))
        return key, image, target


def _collate(batch: list) -> tuple[list, list, list]:
    keys, images, targets = zip(*batch)
    return list(keys), list(images), list(targets)


def distributed_setup(device: str | torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; joins the process group when WORLD_SIZE > 1.

    Under torchrun each process takes the CUDA device of its LOCAL_RANK (nccl), or the CPU (gloo).
    """
    device = torch.device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return (dist.get_rank() if world_size > 1 else 0), world_size, device


def read_log(path: str | os.PathLike, up_to_step: int | None = None) -> list[dict]:
    """The records of a training log (`log.jsonl`), those of steps 1..up_to_step if given."""
    path = Path(path)
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [record for record in records if up_to_step is None or record["step"] <= up_to_step]


def train(model: nn.Module, dataset, settings: TrainSettings, output_dir: str | os.PathLike,
          device: str | torch.device = "cpu", resume: bool = False, progress: bool = True,
          metadata: dict | None = None) -> dict:  # fmt: skip
    """Train `model` (a `MaskRCNN`, its `config` is saved with it) on `dataset` with `settings`.

    Writes under `output_dir`: `checkpoint.pt` every `settings.checkpoint_every` steps and at the
    end (atomically), and `log.jsonl`, one JSON record per step: {"step" (1-based), "lr", "loss"
    and each loss term (means over the batch), "seconds" since the start}. resume: continue from
    `output_dir/checkpoint.pt` when it exists. Raises `NonFiniteLossError` when a step's loss is
    not finite, before the weights change (with `log_every` k > 1: up to k - 1 steps later,
    before they are saved), and `NonFiniteWeightsError` when the weights stop being finite,
    before they are saved; the last checkpoint is kept either way. An image or annotation that
    cannot be read stops the run before its step with an `UnreadableDataError` naming the file,
    after saving the steps done before it. metadata: saved in the checkpoints for whoever uses the
    weights (e.g. {"category_names": [...]}). Returns a summary dict. The steps are the functions
    below, in the order they run.
    """
    run = start_run(model, settings, Path(output_dir), device, resume, metadata or {})
    settings = run.settings  # the device's choices made (for_device)
    loader = training_loader(dataset, settings, run.start_step, run.rank, run.world_size)
    with TrainingLog(run, progress) as log:
        for keys, images, targets in loader:
            step = keys[0][0]  # 0-based; the record and the checkpoint count steps done, step + 1
            unreadable = unreadable_images(run, images, targets)  # in any process: every process stops
            if unreadable:
                check_finite(run, log.read(), step + 1)  # the steps done, before they are saved
                raise stop_on_unreadable_data(run, step, unreadable[0])
            losses = forward_backward(run, keys, images, targets)  # the gradients of L_step, in .grad
            log.hold(step + 1, run.optimizer.param_groups[0]["lr"], losses)
            checkpoint = (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.iterations
            if checkpoint or (step + 1) % settings.log_every == 0:
                check_finite(run, log.read(), step + 1)  # the one host synchronisation of these steps
            update_weights(run)
            if checkpoint:
                save_progress(run, step + 1)
    images = (settings.iterations - run.start_step) * settings.batch_size
    return {"steps": settings.iterations, "resumed_from": run.start_step, "seconds": log.seconds, "rank": run.rank,
            "images_per_second": images / max(log.seconds, 1e-9), "final": log.records[-1] if log.records else None,
            "checkpoint": str(run.checkpoint_path), "log": str(log.path)}  # fmt: skip


@dataclass
class Run:
    """What a training run holds from one step to the next (made by `start_run`)."""

    model: nn.Module  # the MaskRCNN being trained
    network: nn.Module  # what runs a step: the model, or DistributedDataParallel around it
    optimizer: torch.optim.SGD
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler  # fp16 only: scales the loss so that its gradients do not underflow
    settings: TrainSettings  # with the device's choices made (for_device)
    device: torch.device
    rank: int  # this process, of world_size; rank 0 logs and writes the checkpoints
    world_size: int
    checkpoint_path: Path
    metadata: dict  # saved in every checkpoint
    start_step: int  # steps done before this call: 0, or the resumed checkpoint's
    last_saved: int  # the step of the last checkpoint written (0: none yet)
    control: object = None  # under DDP, a CPU (gloo) process group for the processes' agreements


def start_run(model: nn.Module, settings: TrainSettings, output_dir: Path, device: str | torch.device,
              resume: bool, metadata: dict) -> Run:  # fmt: skip
    """Join the process group, build the optimizer and schedule, resume, and wrap the model for DDP."""
    rank, world_size, device = distributed_setup(device)
    settings = for_device(settings, device)
    if settings.amp == "fp16" and device.type != "cuda":  # bfloat16 autocast runs on a CPU too
        raise ValueError(f"float16 mixed precision (amp=fp16) needs a CUDA device, got {device}; use amp=bf16")
    model.to(device).train()
    optimizer, scheduler, scaler = build_optimizer(model, settings, device)
    checkpoint_path = output_dir / CHECKPOINT_NAME
    start_step = 0
    if resume and checkpoint_path.exists():
        start_step = resume_from_checkpoint(checkpoint_path, model, optimizer, scheduler, scaler, settings, device)
    network = model
    if world_size > 1:
        network = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    control = dist.new_group(backend="gloo") if world_size > 1 else None  # host-side: no device synchronisation
    return Run(model, network, optimizer, scheduler, scaler, settings, device, rank, world_size, checkpoint_path,
               metadata, start_step, last_saved=start_step, control=control)  # fmt: skip


def build_optimizer(model: nn.Module, settings: TrainSettings, device: torch.device) -> tuple:
    """SGD with momentum and weight decay on the trainable weights, the warm-up and step schedule
    (`learning_rate_factor`), and the loss scaler of fp16 training (a no-op otherwise)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, settings))
    scaler = torch.amp.GradScaler(device.type, enabled=settings.amp == "fp16")
    return optimizer, scheduler, scaler


def resume_from_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, scaler, settings: TrainSettings,
                           device: torch.device) -> int:  # fmt: skip
    """Restore the weights, the optimizer's momentum, the schedule and the random generators saved in
    `path`; returns the number of steps done. A `ValueError` if the run cannot continue with `settings`."""
    checkpoint = load_checkpoint(path, map_location=device)
    trained = checkpoint["settings"]
    if trained.get("seed") != settings.seed or trained.get("batch_size") != settings.batch_size:
        raise ValueError(f"{path} was trained with another seed or batch size; resuming would change the data order")
    if checkpoint["step"] > settings.iterations:
        raise ValueError(f"{path} has done {checkpoint['step']} steps, more than the {settings.iterations} "
                         "iterations asked for; ask for at least as many to resume it")  # fmt: skip
    load_model_state(model, checkpoint, path)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint["scaler"] is not None:
        scaler.load_state_dict(checkpoint["scaler"])
    set_rng_states(checkpoint["rng"])
    return checkpoint["step"]


def training_loader(dataset, settings: TrainSettings, start_step: int, rank: int, world_size: int):
    """The images of this process, step by step from `start_step`: a `DataLoader` over `GlobalBatchSampler`
    and `TrainingImages`, which yields (keys, images, targets) lists."""
    sampler = GlobalBatchSampler(len(dataset), settings.batch_size, settings.seed, settings.iterations, start_step,
                                 rank, world_size)  # fmt: skip
    return torch.utils.data.DataLoader(
        TrainingImages(dataset, settings.seed, settings.flip), batch_sampler=sampler, collate_fn=_collate,
        num_workers=settings.workers, pin_memory=bool(settings.pin_memory),
        generator=torch.Generator().manual_seed(settings.seed),
    )  # fmt: skip


def forward_backward(run: Run, keys: list, images: list, targets: list) -> dict[str, torch.Tensor]:
    """One step's forward and backward passes: one image at a time, or this process's images as one
    list (`settings.batched_forward`; module docstring).

    Each forward pass's loss is divided by the number of passes before its backward pass, so that
    `.grad` ends up holding the gradient of this process's part of L_step; under DDP the gradients
    are averaged over the processes with the last pass's backward. Returns each loss term of
    L_step, averaged over the processes: 0-dim tensors left on the device (nothing is read back).
    """
    settings, device = run.settings, run.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if settings.amp == "bf16" else torch.float16,
                              enabled=settings.amp != "off")  # fmt: skip
    step, shares = keys[0][0], list(zip(keys, images, targets))
    passes = [shares] if settings.batched_forward else [[share] for share in shares]
    totals, names = None, []
    for index, batch in enumerate(passes):
        torch.manual_seed(sampling_seed(settings.seed, step, batch[0][0][1]))  # the RPN's and the box branch's samplers
        batch_images = [image.to(device, non_blocking=True) for _, image, _ in batch]
        batch_targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in target.items()}
                         for _, _, target in batch]  # fmt: skip
        last = index == len(passes) - 1
        with run.network.no_sync() if run.world_size > 1 and not last else contextlib.nullcontext():
            with autocast:
                losses = run.network(batch_images, batch_targets)
            names = list(losses)
            loss = sum(losses.values()) / len(passes)  # this pass's share of L_step
            run.scaler.scale(loss).backward()
        terms = torch.stack([value.detach().float() for value in losses.values()]) / len(passes)
        totals = terms if totals is None else totals + terms
    if run.world_size > 1:
        dist.all_reduce(totals)
        totals /= run.world_size
    return dict(zip(names, totals.unbind()))


def update_weights(run: Run) -> None:
    """Clip the gradient norm (if asked), take the SGD step, advance the schedule, clear the gradients."""
    if run.settings.clip_grad_norm is not None:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.optimizer.param_groups[0]["params"], run.settings.clip_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


def save_progress(run: Run, steps: int) -> None:
    """Write the checkpoint of `steps` steps (rank 0; the other processes wait for it).

    A model whose weights are no longer finite is not saved: `NonFiniteWeightsError`, and the last
    checkpoint stays as it was.
    """
    weights = [value for value in run.model.state_dict().values() if value.is_floating_point()]
    if not torch.stack([torch.isfinite(value).all() for value in weights]).all():
        raise NonFiniteWeightsError(stopped(run, steps, "the weights are not finite after this step's update; "
                                                        "they were not saved"))  # fmt: skip
    if run.rank == 0:
        save_checkpoint(run.checkpoint_path, run.model, run.model.config, steps, run.optimizer, run.scheduler,
                        run.scaler, dataclasses.asdict(run.settings), run.metadata)  # fmt: skip
    run.last_saved = steps
    if run.world_size > 1:
        dist.barrier()


def unreadable_images(run: Run, images: list, targets: list) -> list[str]:
    """The messages of this step's images that cannot be read (`TrainingImages` gives None and the
    message in their place), those of every process under DDP: the processes agree before the step,
    over the CPU group `run.control`, so that all of them stop together instead of one stopping and
    the others failing in the gradients' all-reduce. One integer a step is all they exchange."""
    unreadable = [message for image, message in zip(images, targets) if image is None]
    if run.world_size == 1:
        return unreadable
    count = torch.tensor([len(unreadable)])
    dist.all_reduce(count, group=run.control)
    if not count.item():
        return []
    everyones = [None] * run.world_size
    dist.all_gather_object(everyones, unreadable, group=run.control)
    return [message for messages in everyones for message in messages]


def stop_on_unreadable_data(run: Run, steps: int, message: str) -> UnreadableDataError:
    """The error of a run whose next step has data that cannot be read (`message` names the file),
    once the `steps` steps done are saved: nothing already trained is lost. Every process stops here
    (`unreadable_images`), so the checkpoint is written as at any other step."""
    if steps > run.last_saved:
        save_progress(run, steps)
    if steps:
        done = f"{steps} step" + ("s" if steps > 1 else "")
        what = f"the checkpoint of the {done} done is {run.checkpoint_path}: fix the file, then continue with --resume"
    else:
        what = "no step was done (no checkpoint): fix the file, then start again"
    return UnreadableDataError(f"step {steps + 1}: {message}; training stopped, and {what}")


def check_finite(run: Run, records: list[dict], step: int) -> None:
    """Stop the run at the first of `records` (steps just read back by `TrainingLog.read`) whose loss is
    not finite: `NonFiniteLossError`. `step` (1-based) is the step whose update has not been made yet:
    when the bad step is an earlier one (`log_every` > 1), the updates since it were made, and are
    not saved."""
    bad = next((record for record in records if not math.isfinite(record["loss"])), None)
    if bad is None:
        return
    run.optimizer.zero_grad(set_to_none=True)
    terms = ", ".join(f"{name}={value:.4g}" for name, value in bad.items() if name.startswith("loss_"))
    if bad["step"] == step:
        what = "training stopped before updating the weights"
    else:  # read log_every steps at a time: the weights moved since, and are not saved
        what = (f"training stopped at step {step}, where it was read (the losses are read every "
                f"{run.settings.log_every} steps), after the weights were updated with it: they were not saved")  # fmt: skip
    raise NonFiniteLossError(stopped(run, bad["step"], f"the loss is not finite ({terms}); {what}"))


def stopped(run: Run, step: int, what: str) -> str:
    """The message of a run stopped at `step` (1-based) because of `what`: which checkpoint is kept."""
    kept = (f"the last checkpoint, {run.checkpoint_path} (step {run.last_saved}), is kept" if run.last_saved
            else "no checkpoint was written yet")  # fmt: skip
    return f"step {step}: {what}, and {kept}. Try a lower --lr or --clip-grad-norm."


class TrainingLog:
    """`log.jsonl` (rank 0 writes it), the progress bar and the run's clock.

    On a resumed run the log keeps the records of the steps the checkpoint holds and drops those
    after it (they were lost with the crash), and the clock goes on from the last kept record.
    A step's losses are held on the device (`hold`) until `read` brings those of all held steps back
    at once and writes their records: one host synchronisation per read, not per step.
    """

    def __init__(self, run: Run, progress: bool = True):
        self.path, self.rank = run.checkpoint_path.parent / LOG_NAME, run.rank
        self.records = read_log(self.path, run.start_step) if run.rank == 0 else []
        self.file = None
        if run.rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(record) + "\n" for record in self.records))
            self.file = self.path.open("a")
        self.bar = tqdm(total=run.settings.iterations, initial=run.start_step, desc="train", unit="step",
                        disable=not progress or run.rank != 0)  # fmt: skip
        self.running: dict[str, float] = {}  # smoothed over about 20 steps, for the progress bar
        self.earlier_seconds = self.records[-1]["seconds"] if self.records else 0.0
        self.started, self.seconds = time.perf_counter(), 0.0
        self.held: list[tuple] = []  # (step, lr, names, terms [T] on the device, seconds) of steps not yet read

    def hold(self, step: int, lr: float, losses: dict[str, torch.Tensor]) -> None:
        """Keep step `step`'s losses (0-dim tensors, on the device) until the next `read`; no synchronisation."""
        seconds = time.perf_counter() - self.started
        self.held.append((step, lr, list(losses), torch.stack(list(losses.values())), seconds))

    def read(self) -> list[dict]:
        """Bring the held steps' losses back from the device in one transfer, log them, return their records."""
        if not self.held:
            return []
        values = torch.stack([terms for _, _, _, terms, _ in self.held]).tolist()  # [steps, T]: waits for the device
        held, self.held = self.held, []
        held[-1] = (*held[-1][:4], time.perf_counter() - self.started)  # its work is done now, not when queued
        return [self.write(step, lr, dict(zip(names, row)), seconds)
                for (step, lr, names, _, seconds), row in zip(held, values)]  # fmt: skip

    def write(self, step: int, lr: float, losses: dict[str, float], seconds: float | None = None) -> dict:
        """Log step `step` (1-based): its learning rate, its loss L_step and each term of it, and the
        time it was done (`seconds` since this `TrainingLog` started, else now)."""
        self.seconds = time.perf_counter() - self.started if seconds is None else seconds
        record = {"step": step, "lr": lr, "loss": sum(losses.values()), **losses,
                  "seconds": round(self.earlier_seconds + self.seconds, 3)}  # fmt: skip
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        self.records.append(record)
        for name in ["loss", *losses]:
            self.running[name] = (
                record[name] if name not in self.running else 0.95 * self.running[name] + 0.05 * record[name]
            )
        self.bar.set_postfix(
            {name.replace("loss_", ""): f"{value:.3f}" for name, value in self.running.items()}, refresh=False
        )
        self.bar.update()
        return record

    def __enter__(self) -> "TrainingLog":
        return self

    def __exit__(self, kind, *exception) -> None:
        if kind is not None and self.held:  # a run stopped between reads: log the steps it did
            with contextlib.suppress(Exception):  # a device that failed may fail this read too
                self.read()
        self.seconds = time.perf_counter() - self.started
        self.bar.leave = kind is None  # a stopped run clears its bar: the line that says why stands alone
        self.bar.close()
        if self.file is not None:
            self.file.close()
