"""Checkpoints: atomic writes, exact round trips, and one clear error for every unusable file."""

import errno
import os
import random

import numpy as np
import pytest
import torch

from mrcnn.checkpoint import (
    CheckpointError,
    atomic_save,
    config_from_checkpoint,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
)
from mrcnn.config import shapes_small
from mrcnn.model import MaskRCNN


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MaskRCNN(shapes_small())


def _optimizer_and_scheduler(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    for parameter in model.parameters():  # one step, so the momentum buffers exist
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return optimizer, scheduler


def test_round_trip_restores_model_optimizer_step_config_and_random_generators(model, tmp_path):
    optimizer, scheduler = _optimizer_and_scheduler(model)
    torch.manual_seed(123), np.random.seed(7), random.seed(5)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, model.config, 17, optimizer, scheduler, settings={"seed": 3})
    expected = (torch.rand(3), np.random.rand(3), random.random())

    checkpoint = load_checkpoint(path)
    assert checkpoint["step"] == 17 and checkpoint["settings"] == {"seed": 3}
    assert config_from_checkpoint(checkpoint) == model.config
    torch.manual_seed(0)
    fresh = MaskRCNN(config_from_checkpoint(checkpoint))
    load_model_state(fresh, checkpoint)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    new_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    new_optimizer.load_state_dict(checkpoint["optimizer"])
    buffers = [s["momentum_buffer"] for s in new_optimizer.state.values()]
    assert len(buffers) == len(list(model.parameters())) and all(torch.equal(b, torch.full_like(b, 1.0)) for b in buffers)
    assert checkpoint["scheduler"]["last_epoch"] == 1

    from mrcnn.checkpoint import set_rng_states

    torch.manual_seed(999), np.random.seed(999), random.seed(999)
    set_rng_states(checkpoint["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_a_failure_while_writing_leaves_the_previous_checkpoint_intact(model, tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, model.config, 5)
    before = path.read_bytes()

    def failing_save(obj, file, *args, **kwargs):
        file.write(b"half a checkpoint")  # the write starts, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, model, model.config, 6)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"], "the temporary file must be removed"


def test_an_interrupt_while_writing_leaves_no_file_behind(tmp_path, monkeypatch):
    def interrupted(obj, file, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"a": 1}, tmp_path / "new.pt")
    assert list(tmp_path.iterdir()) == []


def test_unusable_files_raise_one_clear_error(model, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="not a readable PyTorch file"):
        load_checkpoint(garbage)
    good = tmp_path / "good.pt"
    save_checkpoint(good, model, model.config, 1)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch file"):
        load_checkpoint(truncated)
    state_dict = tmp_path / "state_dict.pt"
    torch.save(model.state_dict(), state_dict)
    with pytest.raises(CheckpointError, match="not an mrcnn training checkpoint"):
        load_checkpoint(state_dict)


def test_weights_of_another_model_do_not_load(model, tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, model.config, 1)
    other = MaskRCNN(shapes_small(num_classes=3))  # a predictor for 3 classes instead of 5
    with pytest.raises(CheckpointError, match="does not fit this model: weights .* of another shape"):
        load_model_state(other, load_checkpoint(path), path)
    faster = MaskRCNN(shapes_small().replace(mask=False))
    with pytest.raises(CheckpointError, match="unexpected .*mask_branch"):
        load_model_state(faster, load_checkpoint(path), path)


def test_configs_saved_before_architecture_existed_still_load(model):
    saved = {**vars(model.config), "fpn": True}
    del saved["architecture"]
    assert config_from_checkpoint({"config": saved}) == model.config  # every such model was FPN
    with pytest.raises(CheckpointError, match="does not know: fpn"):
        config_from_checkpoint({"config": {**saved, "fpn": False}})  # a C4 flag that was never honoured


def test_c4_round_trip_keeps_the_shared_res5_shared(tmp_path):
    from mrcnn.config import shapes_small_c4

    torch.manual_seed(0)
    c4 = MaskRCNN(shapes_small_c4())
    path = tmp_path / "c4.pt"
    save_checkpoint(path, c4, c4.config, 1)
    checkpoint = load_checkpoint(path)
    fresh = MaskRCNN(config_from_checkpoint(checkpoint))
    load_model_state(fresh, checkpoint, path)
    res5 = fresh.box_branch.head.res5
    assert res5 is fresh.mask_branch.head.res5  # one stage, two heads
    torch.testing.assert_close(res5[0].conv1.weight, c4.box_branch.head.res5[0].conv1.weight)


class FullDisk:
    """A file that takes `room` bytes and then fails as a full disk does."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def test_a_full_disk_is_reported_as_one_and_names_the_file(model, tmp_path, monkeypatch):
    """torch.save turns a failed write into a RuntimeError about zip positions; the save says what happened."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, model.config, 5)
    before = path.read_bytes()
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, file: real_save(obj, FullDisk(file, 4096)))
    with pytest.raises(OSError, match="No space left on device") as caught:
        save_checkpoint(path, model, model.config, 6)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_temporary_files_left_by_a_killed_run_are_removed_by_the_next_save(tmp_path):
    leftover = tmp_path / ".checkpoint.pt.k1ll3d.tmp"  # what SIGKILL during a save leaves
    leftover.write_bytes(b"half a checkpoint")
    other = tmp_path / ".other.pt.abc.tmp"  # another file's: not ours to remove
    other.write_bytes(b"")
    atomic_save({"a": 1}, tmp_path / "checkpoint.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.abc.tmp", "checkpoint.pt"]
