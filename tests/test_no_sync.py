"""The model's inner layers never read a tensor's value back to the host (renovation: checks at the doors).

On a GPU, `bool(t)`, `t.item()`, `torch.nonzero(t)` and indexing with a boolean mask wait for
the device to finish (a synchronisation) and break a `torch.compile` graph. They reach the
dispatcher as `aten._local_scalar_dense` (the scalar reads), `aten.nonzero`, or an index
operator with a boolean index, so a `TorchDispatchMode` that fails on those sees them on a CPU
too. (`t.tolist()` of a CPU tensor reads memory without the dispatcher; on a GPU it is a copy to
the host, which CUDA's sync debug mode below reports.) The model's RoI pooler (the Triton
kernel, run here by Triton's interpreter) and its mask loss run under it, forward and backward,
as the model calls them; where a GPU is present, the same under CUDA's own sync debug mode.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mrcnn.config import shapes_small
from mrcnn.mask_loss import mask_loss
from mrcnn.model import MaskRCNN
from mrcnn.poolers import MultiLevelRoIAlign, kernels_available

aten = torch.ops.aten
HOST_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

pytestmark = pytest.mark.skipif(not kernels_available(), reason="the kernel path needs Triton")


class NoHostReads(TorchDispatchMode):
    """Fail on any operator that reads a tensor's value back to the host."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            raise AssertionError(f"host read: {func}")
        if func in INDEXING and any(i is not None and i.dtype == torch.bool for i in args[1]):
            raise AssertionError(f"host read: {func} with a boolean mask (its size is data-dependent)")
        return func(*args, **(kwargs or {}))


def test_the_guard_sees_each_kind_of_host_read():
    x = torch.tensor([0.0, 2.0])
    for read in (lambda: bool(x.any()), lambda: x.sum().item(), lambda: int(x[0]), lambda: x.nonzero(), lambda: x[x > 1]):
        with pytest.raises(AssertionError, match="host read"), NoHostReads():
            read()


def pyramid_and_rois(device: str, requires_grad: bool = True):
    """A P2-P5 pyramid of 2 images of 512 x 768 and RoIs of every level, as the model's pooler gets them."""
    torch.manual_seed(0)
    features = [torch.randn(2, 4, 512 // s, 768 // s, device=device, requires_grad=requires_grad) for s in (4, 8, 16, 32)]
    boxes = torch.tensor([[0, 2.0, 3.0, 22.0, 33.0],  # sqrt(area) 25: P2
                          [1, 5.0, 5.0, 155.0, 155.0],  # 150: P3
                          [0, 40.0, 10.0, 340.0, 310.0],  # 300: P4
                          [1, 0.0, 0.0, 768.0, 512.0]], device=device)  # 627: P5  # fmt: skip
    return features, boxes


@pytest.mark.parametrize("device", DEVICES)
def test_multi_level_pooler_on_the_kernel_path_reads_nothing_back(device):
    features, rois = pyramid_and_rois(device)
    pooler = MultiLevelRoIAlign(7, (4, 8, 16, 32), sampling_ratio=2)
    with NoHostReads():
        pooled = pooler(features, rois, use_kernel=True)  # [R, C, 7, 7]
        pooled.backward(torch.ones_like(pooled))
    assert pooled.shape == (4, 4, 7, 7) and all(f.grad is not None and f.grad.abs().sum() > 0 for f in features)
    # the same numbers as the CPU path, which the model takes without a kernel
    expected = pooler([f.detach() for f in features], rois, use_kernel=False)
    torch.testing.assert_close(pooled.detach(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_kernel", [True, False])
def test_mask_loss_as_the_model_calls_it_reads_nothing_back(device, use_kernel):
    torch.manual_seed(0)
    class_logits = torch.randn(6, 1, 28, 28, device=device, requires_grad=True)  # [R+, 1, M, M]: each RoI's class
    targets = torch.rand(6, 28, 28, device=device)
    own_channel = torch.zeros(6, dtype=torch.int64, device=device)
    with NoHostReads():
        loss = mask_loss(class_logits, own_channel, targets, use_kernel=use_kernel, validate=False)
        loss.backward()
    assert torch.isfinite(loss) and class_logits.grad.abs().sum() > 0


def test_the_model_pools_without_validation_on_the_kernel_path(monkeypatch):
    # the model's poolers call the kernel with validate=False: no read of the RoIs' values
    import kernels.roi_align as kernel_module  # Triton is there (the module's skipif)

    calls = []
    real = kernel_module.multi_level_roi_align
    monkeypatch.setattr("mrcnn.poolers.multi_level_roi_align_kernel",
                        lambda *args, **kwargs: calls.append(kwargs) or real(*args, **kwargs))  # fmt: skip
    model = MaskRCNN(shapes_small()).eval()
    features, rois = pyramid_and_rois("cpu", requires_grad=False)
    features = [f[:, :1].expand(-1, 64, -1, -1).contiguous() for f in features]  # the model's 64 channels
    model.box_branch.pooler(features, rois, use_kernel=True)
    assert calls and all(call["validate"] is False for call in calls)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync debug mode needs a GPU")
def test_pooler_and_mask_loss_do_not_synchronise_under_cuda_sync_debug():
    features, rois = pyramid_and_rois("cuda")
    pooler = MultiLevelRoIAlign(7, (4, 8, 16, 32), sampling_ratio=2)
    class_logits = torch.randn(6, 1, 28, 28, device="cuda", requires_grad=True)
    targets, own_channel = torch.rand(6, 28, 28, device="cuda"), torch.zeros(6, dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pooled = pooler(features, rois)
        pooled.backward(torch.ones_like(pooled))
        mask_loss(class_logits, own_channel, targets, validate=False).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
