"""The launch users type: `torchrun --nproc_per_node 2 -m mrcnn train ...` gives the one-process weights.

tests/test_ddp.py proves it for `train` itself, started by `torch.multiprocessing`. This test
goes through the whole door instead: torchrun (`python -m torch.distributed.run`, static
rendezvous on a free `--master-port`) starts two processes of the `mrcnn train` command on a
small shapes data set drawn by `mrcnn shapes`; each joins the process group from torchrun's
environment (gloo on the CPU) and trains on its half of every global batch of 2. The
checkpoint must hold the parameters of `mrcnn train` run once with the same options, to the
float rounding of adding the gradients in another order. (BatchNorm's running statistics are
rank 0's alone under DDP, see tests/test_ddp.py: only the parameters are compared.)
"""

import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from mrcnn.checkpoint import config_from_checkpoint, load_checkpoint, model_from_checkpoint
from mrcnn.model import MaskRCNN

TRAIN = ["train", "--data", "data", "--device", "cpu", "--iterations", "3", "--batch-size", "2", "--lr", "0.02",
         "--warmup", "1", "--threads", "1", "--checkpoint-every", "3"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(arguments: list[str], cwd) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run(arguments, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(arguments)} exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def _read_log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_torchrun_with_two_processes_gives_the_weights_of_one_process(tmp_path):
    mrcnn = [sys.executable, "-m", "mrcnn"]
    _run([*mrcnn, "shapes", "--output-dir", "data", "--num-train", "4", "--num-val", "0", "--image-size", "64",
          "--max-objects", "2"], tmp_path)  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", str(_free_port())]
    _run([*torchrun, "-m", "mrcnn", *TRAIN, "--output-dir", "torchrun"], tmp_path)
    _run([*mrcnn, *TRAIN, "--output-dir", "single"], tmp_path)

    checkpoints = {name: load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("torchrun", "single")}
    assert checkpoints["torchrun"]["step"] == checkpoints["single"]["step"] == 3
    parameters = dict(model_from_checkpoint(checkpoints["single"], tmp_path / "single").named_parameters())
    distributed = checkpoints["torchrun"]["model"]
    for name, value in parameters.items():
        torch.testing.assert_close(distributed[name], value.detach(), rtol=1e-4, atol=1e-5, msg=name)
    torch.manual_seed(0)  # the command's initial weights (--seed 0): training moved nearly all of them
    initial = MaskRCNN(config_from_checkpoint(checkpoints["single"])).state_dict()
    moved = sum(not torch.equal(distributed[name], initial[name]) for name in parameters)
    assert moved > 0.9 * len(parameters), (moved, len(parameters))

    logs = {name: _read_log(tmp_path / name / "log.jsonl") for name in ("torchrun", "single")}
    assert [r["step"] for r in logs["torchrun"]] == [1, 2, 3], "rank 0 alone writes the log"
    for a, b in zip(logs["torchrun"], logs["single"]):
        assert a["lr"] == b["lr"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)


@pytest.mark.slow
def test_torchrun_stops_every_process_at_an_image_one_of_them_cannot_read(tmp_path):
    """The second process meets a truncated image at step 3: both stop before that step, with the steps done
    saved and the file named by the first process, instead of one stopping and the other failing in DDP."""
    import numpy as np

    mrcnn = [sys.executable, "-m", "mrcnn"]
    _run([*mrcnn, "shapes", "--output-dir", "data", "--num-train", "6", "--num-val", "0", "--image-size", "64",
          "--max-objects", "2"], tmp_path)  # fmt: skip
    index = int(np.random.default_rng((0, 0)).permutation(6)[5])  # step 3, position 1 of 2: the second process's
    broken = tmp_path / "data" / "train" / f"{index:06d}.png"
    broken.write_bytes(broken.read_bytes()[:200])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", str(_free_port())]
    options = [*TRAIN, "--checkpoint-every", "100", "--no-verify-images", "--output-dir", "run"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([*torchrun, "-m", "mrcnn", *options], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode != 0
    ours = re.findall(r"mrcnn: error: [^\r\n]*", output)  # after the first process's progress bar, if any
    assert len(ours) == 2 and ours[0] == ours[1], output[-3000:]  # each process says the same one line
    assert f"step 3: image file {broken.relative_to(tmp_path)} (image id {index + 1}) cannot be read" in ours[0], ours[0]
    assert "the checkpoint of the 2 steps done" in ours[0] and "--resume" in ours[0]
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 2
    assert [r["step"] for r in _read_log(tmp_path / "run" / "log.jsonl")] == [1, 2]
    for symptom in ("DistributedDataParallel", "Connection closed by peer", "gloo/transport"):  # the other process failing in DDP
        assert symptom not in output, output[-3000:]
