"""The normalization options (mrcnn/norms.py): each trains, and synchronised batch norm is one batch norm
over all processes."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from mrcnn.backbone import FrozenBatchNorm2d
from mrcnn.config import from_scratch, shapes_small, torchvision_maskrcnn_resnet50_fpn
from mrcnn.model import MaskRCNN
from mrcnn.norms import SyncBatchNorm2d, group_norm
from mrcnn.data.shapes import ShapesDataset

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def norm_types(module: nn.Module) -> set[type]:
    """The kinds of norm in `module` (a frozen norm folded into its convolution counts as frozen)."""
    kinds = (SyncBatchNorm2d, nn.BatchNorm2d, nn.GroupNorm, FrozenBatchNorm2d)  # the most specific first
    return {next(k for k in kinds if isinstance(m, k)) for m in module.modules() if isinstance(m, kinds)}


@pytest.mark.parametrize("norm, head_norm", [("bn", None), ("gn", "gn"), ("sync_bn", "sync_bn"), ("frozen_bn", "gn")])
def test_each_norm_builds_where_asked_and_trains(norm, head_norm):
    torch.manual_seed(0)
    model = MaskRCNN(shapes_small().replace(norm=norm, head_norm=head_norm))
    expected = {"bn": {nn.BatchNorm2d}, "gn": {nn.GroupNorm}, "sync_bn": {SyncBatchNorm2d},
                "frozen_bn": {FrozenBatchNorm2d}, None: set()}  # fmt: skip
    assert norm_types(model.backbone) == expected[norm]
    assert norm_types(model.mask_branch.head) == norm_types(model.fpn) == expected[head_norm]
    image, target = ShapesDataset(1, seed=0)[0]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    totals = []
    for _ in range(12):
        loss = sum(model.train()([image], [target]).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        totals.append(loss.item())
    assert all(torch.isfinite(torch.tensor(totals))) and totals[-1] < 0.7 * totals[0], totals


def test_the_default_norms_are_the_papers_and_from_scratch_learns():
    assert norm_types(MaskRCNN(torchvision_maskrcnn_resnet50_fpn()).backbone) == {FrozenBatchNorm2d}
    assert norm_types(MaskRCNN(shapes_small()).backbone) == {nn.BatchNorm2d}
    scratch = from_scratch(torchvision_maskrcnn_resnet50_fpn())
    assert (scratch.norm, scratch.trainable_stages) == ("bn", 5)
    assert from_scratch(shapes_small().replace(norm="gn")).norm == "gn"  # a norm that learns is kept


def test_group_norm_groups_divide_the_channels():
    assert group_norm(256).num_groups == 32 and group_norm(16).num_groups == 16 and group_norm(48).num_groups == 16


def test_sync_batch_norm_is_batch_norm_in_one_process():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    sync, plain = SyncBatchNorm2d(3), nn.BatchNorm2d(3)
    torch.testing.assert_close(sync(x), plain(x))
    torch.testing.assert_close(sync.running_var, plain.running_var)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_worker(rank: int, port: int, directory: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        x = torch.randn(4, 3, 5, 5) * 3 + 1  # the whole batch; this process takes its half
        norm = SyncBatchNorm2d(3)
        with torch.no_grad():
            norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        part = x[2 * rank : 2 * rank + 2].clone().requires_grad_()
        y = norm(part)
        (y * torch.arange(y.numel()).view_as(y)).sum().backward()
        torch.save({"y": y.detach(), "grad": part.grad, "running_var": norm.running_var,
                    "weight_grad": norm.weight.grad}, f"{directory}/rank{rank}.pt")  # fmt: skip
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_sync_batch_norm_over_two_processes_is_batch_norm_over_the_whole_batch(tmp_path):
    mp.spawn(_sync_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    torch.manual_seed(0)
    x = (torch.randn(4, 3, 5, 5) * 3 + 1).requires_grad_()
    plain = nn.BatchNorm2d(3)
    with torch.no_grad():
        plain.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
    y = plain(x)
    # each process weighted its outputs by its own arange: the same weights, half by half
    weights = torch.cat([torch.arange(y[:2].numel()).view_as(y[:2])] * 2)
    (y * weights).sum().backward()
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([p["grad"] for p in parts]), x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts[0]["running_var"], plain.running_var)
    torch.testing.assert_close(parts[0]["weight_grad"] + parts[1]["weight_grad"], plain.weight.grad, atol=1e-4, rtol=1e-5)
