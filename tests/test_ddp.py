"""Distributed training: two processes with one image each give the weights of one process with two.

The two processes run the real `train` under torch.distributed (gloo, on the CPU), each with its
share of every global batch; DistributedDataParallel averages their gradients. Because the
trainer's loss is a mean over images computed one image at a time, with the RPN and RoI samplers
seeded per image (mrcnn/train.py), the result must equal a single process's, up to the float
rounding of adding the gradients in another order. The batched forward pass (CUDA's default)
gives each process's images to the model as one list; with one image per process that is the
per-image pass, so it too must give the one-process weights.
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from mrcnn.checkpoint import load_checkpoint
from mrcnn.data.shapes import ShapesDataset
from mrcnn.train import TrainSettings, train

from test_train import TINY_DRAW, read_log, tiny_model

SETTINGS = TrainSettings(iterations=4, batch_size=2, lr=0.02, warmup_iterations=1, decay_steps=(3,), checkpoint_every=4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, output_dir: str, settings: TrainSettings = SETTINGS) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    try:
        train(tiny_model(), ShapesDataset(4, **TINY_DRAW), settings, output_dir, progress=False)
    finally:
        torch.distributed.destroy_process_group()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.slow
@pytest.mark.parametrize("batched_forward", [False, True], ids=["per_image", "batched"])
def test_two_processes_give_the_weights_of_one_process_with_the_same_global_batch(tmp_path, batched_forward):
    settings = TrainSettings(**{**SETTINGS.__dict__, "batched_forward": batched_forward})  # one image per process
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "ddp"), settings), nprocs=2, join=True)
    distributed = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")["model"]

    single = tiny_model()
    initial = {name: value.clone() for name, value in single.state_dict().items()}
    train(single, ShapesDataset(4, **TINY_DRAW), SETTINGS, tmp_path / "single", progress=False)  # per image

    parameters = dict(single.named_parameters())
    moved = 0
    for name, value in single.state_dict().items():
        if name in parameters:  # BatchNorm's running statistics are rank 0's alone (see below)
            torch.testing.assert_close(distributed[name], value, rtol=1e-4, atol=1e-5, msg=name)
            moved += not torch.equal(value, initial[name])
    assert moved > 0.9 * len(parameters), "training must have changed nearly every parameter"
    for a, b in zip(read_log(tmp_path / "ddp" / "log.jsonl"), read_log(tmp_path / "single" / "log.jsonl")):
        assert a["step"] == b["step"] and a["lr"] == b["lr"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), "rank 0 logs the mean over both processes"

    if batched_forward:
        return
    # Not tautological: the same images split into steps of one image give other weights.
    other = tiny_model()
    train(other, ShapesDataset(4, **TINY_DRAW), SETTINGS.__class__(**{**SETTINGS.__dict__, "batch_size": 1}),
          tmp_path / "batch_of_one", progress=False)  # fmt: skip
    difference = max((p - dict(other.named_parameters())[n]).abs().max().item() for n, p in parameters.items())
    assert difference > 1e-3


# BatchNorm's running statistics (used only in evaluation) are updated by each process from its
# own images, and DistributedDataParallel broadcasts rank 0's at every forward pass: after
# training they summarize rank 0's images, a one-process run's summarize all. The parameters
# are unaffected, since in training BatchNorm normalizes with the statistics of the image itself.
