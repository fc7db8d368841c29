"""Deterministic by choice: the same seed gives the same bits, run after run.

On a CPU the two paths that sum many contributions into one value are RoIAlign's backward
(`mrcnn.roi_align_cpu`: each feature pixel's gradient is one `embedding_bag` bag, summed in
the order of a stable sort, whatever the threads) and the mask loss (a mean). Both repeat
their bits without any switch; these tests hold them to it, with two threads, under
`torch.use_deterministic_algorithms(True)` too, and then a whole short training run, whose
losses must repeat exactly. The Triton kernels' deterministic mode has its own tests in
tests/kernels/test_roi_align_determinism.py; the mask loss kernel is checked here.
"""

import os

import pytest
import torch

from mrcnn.config import shapes_small
from mrcnn.data.shapes import ShapesDataset
from mrcnn.mask_loss import mask_loss_reference
from mrcnn.model import MaskRCNN
from mrcnn.poolers import MultiLevelRoIAlign
from mrcnn.train import TrainSettings, read_log, train

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DEVICES = (["cpu"] if INTERPRETER else []) + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def deterministic_mode():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def pooler_gradients(features, rois, grad_output, threads: int | None = None):
    if threads is not None:
        torch.set_num_threads(threads)
    maps = [f.detach().clone().requires_grad_() for f in features]
    out = MultiLevelRoIAlign(7, (4, 8, 16, 32), sampling_ratio=2)(maps, rois, use_kernel=False)
    return torch.autograd.grad(out, maps, grad_output)


def overlapping_rois(count: int, image_size: int = 128, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    corner = torch.rand(count, 2, generator=generator) * image_size * 0.7
    size = 4 + torch.rand(count, 2, generator=generator) * image_size * 0.5
    batch = torch.randint(0, 2, (count, 1), generator=generator).float()
    return torch.cat([batch, corner, corner + size], dim=1)  # [R, 5], many sharing pixels


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_cpu_roi_align_backward_repeats_its_bits_whatever_the_threads(two_threads, layout):
    """512 RoIs on the four levels of two 128 x 128 images: hundreds of terms per pixel."""
    features = [torch.randn(2, 32, 128 // s, 128 // s).contiguous(memory_format=layout) for s in (4, 8, 16, 32)]
    rois = overlapping_rois(512)
    grad_output = torch.randn(512, 32, 7, 7)
    first = pooler_gradients(features, rois, grad_output)
    for threads in (2, 2, 1, 2):
        again = pooler_gradients(features, rois, grad_output, threads)
        assert all(torch.equal(a, b) for a, b in zip(first, again)), f"{threads} threads"


def test_cpu_roi_align_backward_in_deterministic_mode(two_threads, deterministic_mode):
    """torch's deterministic mode accepts the CPU path (no op of it raises) and changes none of its bits."""
    features = [torch.randn(2, 8, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    rois = overlapping_rois(64, image_size=64)
    grad_output = torch.randn(64, 8, 7, 7)
    strict = pooler_gradients(features, rois, grad_output)
    torch.use_deterministic_algorithms(False)
    default = pooler_gradients(features, rois, grad_output)
    assert all(torch.equal(a, b) for a, b in zip(strict, default))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_mask_loss_kernel_repeats_its_bits(device):
    """Partial sums per program, then one program adds them in a fixed order: no atomics anywhere."""
    from kernels.mask_loss import mask_loss

    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(40, 3, 28, 28, generator=generator) * 4).to(device)
    labels = torch.randint(0, 3, (40,), generator=generator).to(device)
    targets = torch.rand(40, 28, 28, generator=generator).to(device)
    results = []
    for _ in range(3):
        x = logits.clone().requires_grad_()
        loss = mask_loss(x, labels, targets)
        (grad,) = torch.autograd.grad(loss, x)
        results.append((loss, grad))
    assert all(torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1]) for loss, grad in results)
    torch.testing.assert_close(results[0][0], mask_loss_reference(logits, labels, targets), atol=1e-6, rtol=1e-5)


def tiny_model() -> MaskRCNN:
    torch.manual_seed(0)
    return MaskRCNN(shapes_small().replace(min_size=64, max_size=64, rpn_pre_nms_top_n_train=200,
                                           rpn_post_nms_top_n_train=100, box_batch_size_per_image=32))  # fmt: skip


def training_run(directory, seed: int = 0) -> tuple[list[dict], MaskRCNN]:
    data = ShapesDataset(8, image_size=64, object_size=(16, 40), max_objects=2)
    settings = TrainSettings(iterations=4, batch_size=2, lr=0.01, decay_steps=(), warmup_iterations=2, seed=seed,
                             checkpoint_every=100)  # fmt: skip
    model = tiny_model()
    train(model, data, settings, directory, progress=False)
    records = [{k: v for k, v in record.items() if k != "seconds"} for record in read_log(directory / "log.jsonl")]
    return records, model


@pytest.mark.slow
def test_a_short_training_run_repeats_its_losses_exactly(tmp_path, two_threads, deterministic_mode):
    """mrcnn.train twice with one seed, in torch's deterministic mode: the same losses to the last bit."""
    first, model = training_run(tmp_path / "first")
    again, repeated = training_run(tmp_path / "again")
    assert len(first) == 4 and first == again
    assert all(record["loss_mask"] > 0 for record in first)  # every term was trained, the mask loss included
    for (name, a), b in zip(model.state_dict().items(), repeated.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12, msg=name)  # see tests/test_train.py on the last bit
    other, _ = training_run(tmp_path / "other", seed=1)
    assert other != first  # the seed matters: another data order and other samples
