"""Training: the schedule, the sharded data order, learning, exact resumption, non-finite losses, unreadable data,
the batched forward pass and the losses read back every k steps."""

import json
import re

import numpy as np
import pytest
import torch

from mrcnn.checkpoint import load_checkpoint
from mrcnn.config import shapes_small
from mrcnn.data.coco import CocoDataset
from mrcnn.data.shapes import ShapesDataset, generate_shapes
from mrcnn.model import MaskRCNN
from mrcnn.train import (
    GlobalBatchSampler,
    NonFiniteLossError,
    NonFiniteWeightsError,
    TrainingImages,
    TrainSettings,
    UnreadableDataError,
    for_device,
    learning_rate_factor,
    paper_schedule,
    sampling_seed,
    train,
)

TINY_DRAW = {"image_size": 64, "object_size": (16, 40), "max_objects": 2}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_model(seed: int = 0) -> MaskRCNN:
    """The small preset on 64 x 64 images: a training step takes a few hundredths of a second."""
    torch.manual_seed(seed)
    return MaskRCNN(shapes_small().replace(min_size=64, max_size=64, rpn_pre_nms_top_n_train=200,
                                           rpn_post_nms_top_n_train=100, box_batch_size_per_image=32))  # fmt: skip


def read_log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_paper_schedule_scales_with_the_batch_size():
    paper = paper_schedule(16)
    assert (paper.iterations, paper.lr, paper.decay_steps) == (160_000, 0.02, (120_000,))
    assert (paper.momentum, paper.weight_decay) == (0.9, 1e-4)
    two = paper_schedule(2, schedule=0.5)  # the linear scaling rule: 8x fewer images a step, 8x more steps
    assert two.iterations == 160_000 * 8 // 2 and two.lr == pytest.approx(0.0025) and two.decay_steps == (480_000,)
    assert paper_schedule(4, lr=0.1, iterations=50).lr == 0.1


def test_learning_rate_warms_up_linearly_then_decays_by_ten():
    settings = TrainSettings(iterations=100, lr=1.0, decay_steps=(60, 80), warmup_iterations=10, warmup_factor=0.1)
    factors = [learning_rate_factor(step, settings) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[5] == pytest.approx(0.1 * 0.5 + 0.5)
    assert factors[10:60] == [1.0] * 50
    assert factors[60:80] == pytest.approx([0.1] * 20) and factors[80:] == pytest.approx([0.01] * 20)


def test_sampler_shards_each_global_batch_and_depends_only_on_seed_and_epoch():
    single = list(GlobalBatchSampler(10, 4, seed=3, iterations=7))
    assert all(len(batch) == 4 for batch in single)
    epochs = [[key[3] for batch in single[e * 2 : e * 2 + 2] for key in batch] for e in range(3)]
    assert all(len(set(e)) == len(e) for e in epochs), "an epoch visits an image at most once"
    assert epochs[0] != epochs[1]
    shards = [list(GlobalBatchSampler(10, 4, seed=3, iterations=7, rank=r, world_size=2)) for r in range(2)]
    assert [a + b for a, b in zip(*shards)] == single
    assert list(GlobalBatchSampler(10, 4, seed=3, iterations=7, start_step=5)) == single[5:]
    assert list(GlobalBatchSampler(10, 4, seed=4, iterations=7)) != single
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        GlobalBatchSampler(10, 3, seed=0, iterations=1, world_size=2)


def test_flip_is_a_function_of_seed_epoch_and_index():
    images = TrainingImages(ShapesDataset(4, **TINY_DRAW), seed=1)
    flips = {}
    for epoch in range(8):
        _, image, target = images[(0, 0, epoch, 2)]
        _, again, _ = images[(5, 1, epoch, 2)]  # another step and position: the same picture
        assert torch.equal(image, again)
        original, _ = images.dataset[2]
        flips[epoch] = not torch.equal(image, original)
        if flips[epoch]:
            assert torch.equal(image, original.flip(-1))
    assert 0 < sum(flips.values()) < 8
    with pytest.raises(ValueError, match="train=False"):
        TrainingImages(type("Flipping", (), {"train": True})())


@pytest.mark.parametrize("batched_forward", [False, True], ids=["per_image", "batched"])
def test_a_few_steps_lower_the_loss(tmp_path, batched_forward):
    settings = TrainSettings(iterations=16, batch_size=2, lr=0.01, decay_steps=(), warmup_iterations=2,
                             checkpoint_every=100, batched_forward=batched_forward)  # fmt: skip
    summary = train(tiny_model(), ShapesDataset(4, **TINY_DRAW), settings, tmp_path, progress=False)
    records = read_log(tmp_path / "log.jsonl")
    assert [r["step"] for r in records] == list(range(1, 17)) and summary["steps"] == 16
    assert set(records[0]) >= {"lr", "loss", "loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    first, last = np.mean([r["loss"] for r in records[:4]]), np.mean([r["loss"] for r in records[-4:]])
    assert last < 0.6 * first, (first, last)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 16


def test_the_device_decides_what_the_settings_leave_open():
    for device, chosen in (("cpu", (False, False, 1)), ("cuda", (True, True, 20))):
        settings = for_device(TrainSettings(iterations=1), torch.device(device))
        assert (settings.batched_forward, settings.pin_memory, settings.log_every) == chosen
    asked = TrainSettings(iterations=1, batched_forward=False, pin_memory=False, log_every=3)
    assert for_device(asked, torch.device("cuda")) == asked
    with pytest.raises(ValueError, match="log_every"):
        TrainSettings(iterations=1, log_every=0)


def test_the_batched_step_minimizes_the_models_loss_on_the_list(tmp_path):
    """Batched, a step's loss is the model's loss on the process's images as one list (its samplers
    seeded at the first image's position), not the mean of the images' losses (module docstring)."""
    data = ShapesDataset(4, **TINY_DRAW)
    settings = TrainSettings(iterations=1, batch_size=2, lr=0.01, warmup_iterations=0, batched_forward=True)
    train(tiny_model(), data, settings, tmp_path / "batched", progress=False)
    (logged,) = read_log(tmp_path / "batched" / "log.jsonl")

    (keys,) = GlobalBatchSampler(len(data), 2, seed=0, iterations=1)
    _, images, targets = zip(*(TrainingImages(data)[key] for key in keys))
    model = tiny_model().train()
    torch.manual_seed(sampling_seed(0, 0, keys[0][1]))
    losses = model(list(images), list(targets))
    assert {name: logged[name] for name in losses} == {name: value.item() for name, value in losses.items()}

    train(tiny_model(), data, TrainSettings(**{**settings.__dict__, "batched_forward": False}), tmp_path / "per_image",
          progress=False)  # fmt: skip
    (per_image,) = read_log(tmp_path / "per_image" / "log.jsonl")
    assert per_image["loss"] != pytest.approx(logged["loss"], rel=1e-3), "the two passes weigh the images otherwise"


def test_batched_with_one_image_is_the_per_image_pass(tmp_path):
    data = ShapesDataset(4, **TINY_DRAW)
    models = {}
    for batched in (False, True):
        models[batched] = tiny_model()
        settings = TrainSettings(iterations=3, batch_size=1, lr=0.01, warmup_iterations=0, batched_forward=batched)
        train(models[batched], data, settings, tmp_path / str(batched), progress=False)
    assert read_log(tmp_path / "False" / "log.jsonl")[-1]["loss"] == read_log(tmp_path / "True" / "log.jsonl")[-1]["loss"]
    for (name, a), b in zip(models[False].state_dict().items(), models[True].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12, msg=name)  # allocation order: see the resume test


def test_losses_read_every_k_steps_are_the_losses_read_every_step(tmp_path):
    data = ShapesDataset(4, **TINY_DRAW)
    models, logs = {}, {}
    for log_every in (1, 3):
        models[log_every] = tiny_model()
        settings = TrainSettings(iterations=5, batch_size=2, lr=0.01, warmup_iterations=0, checkpoint_every=4,
                                 log_every=log_every)  # fmt: skip
        train(models[log_every], data, settings, tmp_path / str(log_every), progress=False)
        records = read_log(tmp_path / str(log_every) / "log.jsonl")
        logs[log_every] = [{k: v for k, v in r.items() if k != "seconds"} for r in records]
    assert [r["step"] for r in logs[3]] == [1, 2, 3, 4, 5] and logs[3] == logs[1]
    for (name, a), b in zip(models[1].state_dict().items(), models[3].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12, msg=name)  # allocation order: see the resume test


class Interrupted(Exception):
    pass


class InterruptAt(torch.utils.data.Dataset):
    """The data set, until the trainer asks for an image of `step`: then the run 'crashes'."""

    def __init__(self, dataset, step):
        self.dataset, self.step, self.calls = dataset, step, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        self.calls += 1
        if self.calls > self.step * 2:
            raise Interrupted
        return self.dataset[index]


def test_resume_gives_the_same_weights_and_losses_as_an_uninterrupted_run(tmp_path):
    data = ShapesDataset(6, **TINY_DRAW)
    settings = TrainSettings(iterations=7, batch_size=2, lr=0.01, decay_steps=(5,), warmup_iterations=2, checkpoint_every=3)
    whole = tiny_model()
    train(whole, data, settings, tmp_path / "whole", progress=False)

    with pytest.raises(Interrupted):  # crashes during step 5, after the checkpoint of step 3
        train(tiny_model(), InterruptAt(data, 4), settings, tmp_path / "resumed", progress=False)
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["step"] == 3
    assert len(read_log(tmp_path / "resumed" / "log.jsonl")) == 4  # step 4 was logged, then lost
    torch.manual_seed(12345)  # another process, another global random state
    resumed = tiny_model(seed=1)  # other initial weights: the checkpoint must replace them all
    summary = train(resumed, data, settings, tmp_path / "resumed", resume=True, progress=False)
    assert summary["resumed_from"] == 3

    drop_time = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]  # noqa: E731
    assert drop_time(read_log(tmp_path / "resumed" / "log.jsonl")) == drop_time(read_log(tmp_path / "whole" / "log.jsonl"))
    # The losses agree to the last bit. The weights may differ in the last bit of an element:
    # PyTorch's CPU kernels can sum in another order when a tensor sits at another address
    # (vectorized loops with alignment-dependent heads); two fresh uninterrupted runs whose
    # models were allocated differently differ the same way.
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12, msg=name)


def nan_at_step_4(model):
    """`model` whose mask loss is NaN on the first image of step 4 (the 7th forward pass: batches of 2)."""
    forward, calls = model.forward, []

    def poisoned(images, targets=None):
        losses = forward(images, targets)
        calls.append(1)
        if len(calls) == 7:  # the first image of step 4
            losses["loss_mask"] = losses["loss_mask"] * float("nan")
        return losses

    model.forward = poisoned
    return model


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    model = nan_at_step_4(tiny_model())
    settings = TrainSettings(iterations=10, batch_size=2, lr=0.01, warmup_iterations=0, checkpoint_every=2)
    with pytest.raises(NonFiniteLossError, match=r"step 4: the loss is not finite \(.*loss_mask=nan.*\).*checkpoint.pt \(step 2\), is kept"):
        train(model, ShapesDataset(4, **TINY_DRAW), settings, tmp_path, progress=False)
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert checkpoint["step"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters()), "the bad step must not update the weights"
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())


def test_a_non_finite_loss_read_steps_later_is_never_saved(tmp_path):
    """With the losses read every 5 steps, a NaN at step 4 is found at step 5, after the update of
    step 4: the run stops there, before the checkpoint of step 6, and keeps that of step 3."""
    model = nan_at_step_4(tiny_model())
    settings = TrainSettings(iterations=10, batch_size=2, lr=0.01, warmup_iterations=0, checkpoint_every=3,
                             log_every=5)  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"step 4: the loss is not finite \(.*loss_mask=nan.*\); training "
                       r"stopped at step 5, .*every 5 steps\), after the weights were updated with it: they were not "
                       r"saved, and the last checkpoint, .*checkpoint.pt \(step 3\), is kept"):  # fmt: skip
        train(model, ShapesDataset(4, **TINY_DRAW), settings, tmp_path, progress=False)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == [1, 2, 3, 4, 5]


def test_weights_that_stop_being_finite_are_never_saved(tmp_path):
    """A finite loss with too large a step: the update itself makes the weights infinite. The
    checkpoint of that step is refused and the last finite one kept (the loss check alone would
    only stop the run one step later, after saving the broken weights)."""
    settings = TrainSettings(iterations=4, batch_size=2, lr=3e38, warmup_iterations=1, warmup_factor=1e-40,
                             checkpoint_every=1)  # step 1 at lr 0.03, step 2 at 3e38  # fmt: skip
    with pytest.raises(NonFiniteWeightsError, match=r"step 2: the weights are not finite .*checkpoint.pt \(step 1\), is kept"):
        train(tiny_model(), ShapesDataset(4, **TINY_DRAW), settings, tmp_path, progress=False)
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert checkpoint["step"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == [1, 2]


def test_resuming_with_fewer_iterations_than_done_is_refused(tmp_path):
    data = ShapesDataset(4, **TINY_DRAW)
    settings = TrainSettings(iterations=2, batch_size=2, lr=0.01, warmup_iterations=0, checkpoint_every=1)
    train(tiny_model(), data, settings, tmp_path, progress=False)
    fewer = TrainSettings(**{**settings.__dict__, "iterations": 1})
    with pytest.raises(ValueError, match="has done 2 steps, more than the 1 iterations asked for"):
        train(tiny_model(), data, fewer, tmp_path, resume=True, progress=False)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools, numpy 2
def test_an_unreadable_image_stops_the_run_after_saving_the_steps_done(tmp_path):
    """A file that breaks after start-up (or was never checked, verify_images=False) stops the run before
    its step, with the steps done saved, so that fixing the file and resuming loses nothing."""
    paths = generate_shapes(tmp_path / "data", num_train=4, num_val=0, workers=1, **TINY_DRAW)
    data = CocoDataset(paths.train_images, paths.train_annotations, verify_images=False)
    settings = TrainSettings(iterations=4, batch_size=2, lr=0.01, warmup_iterations=0, checkpoint_every=100)
    second_step = int(np.random.default_rng((0, 0)).permutation(4)[2])  # an image of step 2 (epoch 0, seed 0)
    path = paths.train_images / f"{second_step:06d}.png"
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UnreadableDataError, match=rf"step 2: image file {re.escape(str(path))} \(image id {second_step + 1}\) "
                       r"cannot be read: image file is truncated; training stopped, and the checkpoint of the 1 step done"):  # fmt: skip
        train(tiny_model(), data, settings, tmp_path / "run", progress=False)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 1
    assert [r["step"] for r in read_log(tmp_path / "run" / "log.jsonl")] == [1]

    path.write_bytes(whole)  # fixed: the run goes on from its checkpoint
    summary = train(tiny_model(), data, settings, tmp_path / "run", resume=True, progress=False)
    assert summary["resumed_from"] == 1 and load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 4

    path.write_bytes(whole[: len(whole) // 2])
    seed_1 = TrainSettings(**{**settings.__dict__, "seed": 1})  # reads that image in its first step
    assert second_step in np.random.default_rng((1, 0)).permutation(4)[:2]
    with pytest.raises(UnreadableDataError, match=r"step 1: .*no step was done \(no checkpoint\)"):
        train(tiny_model(), data, seed_1, tmp_path / "first", progress=False)
    assert not (tmp_path / "first" / "checkpoint.pt").exists()
