"""Pasting mask probabilities into the image (mrcnn/inference.py): hand-checked cases and torchvision."""

import time

import pytest
import torch

from mrcnn.inference import expand_boxes, paste_detection_masks, paste_masks


def test_box_of_exactly_m_pixels_copies_the_mask():
    # padding 0 and a box covering pixels 5..5+M-1: the resize is M -> M, an exact copy
    mask_size = 6
    masks = torch.rand(1, 1, mask_size, mask_size)
    boxes = torch.tensor([[5.0, 3.0, 5.0 + mask_size - 1, 3.0 + mask_size - 1]])
    pasted = paste_masks(masks, boxes, (12, 14), padding=0)
    assert pasted.shape == (1, 1, 12, 14)
    expected = torch.zeros(12, 14)
    expected[3 : 3 + mask_size, 5 : 5 + mask_size] = masks[0, 0]
    assert torch.equal(pasted[0, 0], expected)


def test_constant_mask_fills_its_whole_pixel_box():
    # without padding a constant mask stays constant; the box x1=2.7, x2=6.2 covers pixels 2..6
    masks = torch.full((1, 1, 4, 4), 0.75)
    pasted = paste_masks(masks, torch.tensor([[2.7, 1.2, 6.2, 3.9]]), (8, 9), padding=0)
    expected = torch.zeros(8, 9)
    expected[1:4, 2:7] = 0.75
    assert torch.equal(pasted[0, 0], expected)


def test_two_times_upsampling_by_hand():
    # M = 2 into 4 pixels: s(i) = (i + 1/2) / 2 - 1/2 = -1/4 (-> 0), 1/4, 3/4, 5/4 (-> the last pixel)
    a, b = 0.2, 1.0
    masks = torch.tensor([[a, b], [a, b]]).reshape(1, 1, 2, 2)
    pasted = paste_masks(masks, torch.tensor([[0.0, 0.0, 3.0, 1.0]]), (2, 4), padding=0)
    row = torch.tensor([a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b])
    assert torch.allclose(pasted[0, 0], row.expand(2, 4), atol=1e-7, rtol=0)


def test_padding_fades_the_border_and_keeps_the_inside():
    # M = 28, box 10..38: enlarged by 30/28 about its centre to 9..39, pixels 9..39 inclusive
    masks = torch.ones(1, 1, 28, 28)
    boxes = torch.tensor([[10.0, 10.0, 38.0, 38.0]])
    assert torch.equal(expand_boxes(boxes, 30 / 28), torch.tensor([[9.0, 9.0, 39.0, 39.0]]))
    pasted = paste_masks(masks, boxes, (50, 50))[0, 0]
    outside = torch.ones(50, 50, dtype=torch.bool)
    outside[9:40, 9:40] = False
    assert bool((pasted[outside] == 0).all())
    assert torch.equal(pasted[12:37, 12:37], torch.ones(25, 25))  # s(i) in [1, 28]: the mask's ones
    assert bool(((pasted >= 0) & (pasted <= 1)).all())
    assert 0 < pasted[20, 10] < 1  # the fade across the box's edge


def test_box_partly_outside_and_tiny_boxes():
    masks = torch.ones(3, 1, 28, 28)
    boxes = torch.tensor([[-5.0, -5.0, 4.0, 4.0], [20.0, 20.0, 20.3, 20.2], [15.0, 2.0, 40.0, 9.0]])
    pasted = paste_masks(masks, boxes, (24, 30))
    assert pasted.shape == (3, 1, 24, 30)
    assert pasted[0, 0, 0, 0] == 1 and pasted[0, 0, 10:, :].abs().sum() == 0
    # a box under a pixel wide: enlarged to 19.99..20.31 x 19.99..20.21, it covers pixels 19 and 20
    assert pasted[1, 0, 19:21, 19:21].sum() > 0 and pasted[1, 0].abs().sum() == pasted[1, 0, 19:21, 19:21].abs().sum()
    assert pasted[2, 0, :, :14].abs().sum() == 0 and pasted[2, 0, 5, 29] > 0  # clipped at the right edge


def test_no_detections():
    pasted = paste_masks(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (7, 9))
    assert pasted.shape == (0, 1, 7, 9)


@pytest.mark.parametrize(
    "masks, boxes, size, message",
    [
        (torch.rand(2, 1, 28, 27), torch.rand(2, 4), (9, 9), "masks"),
        (torch.rand(2, 28, 28), torch.rand(2, 4), (9, 9), "masks"),
        (torch.rand(2, 1, 28, 28), torch.rand(3, 4), (9, 9), "2 masks but 3 boxes"),
        (torch.rand(1, 1, 28, 28), torch.tensor([[5.0, 0.0, 4.0, 3.0]]), (9, 9), "x2 >= x1"),
        (torch.rand(1, 1, 28, 28), torch.tensor([[0.0, 0.0, float("nan"), 3.0]]), (9, 9), "finite"),
        (torch.rand(1, 1, 28, 28), torch.tensor([[0.0, 0.0, 1.0, 3.0]]), (0, 9), "image_size"),
        (torch.randint(0, 2, (1, 1, 28, 28)), torch.tensor([[0.0, 0.0, 1.0, 3.0]]), (5, 9), "floating point"),
    ],
)
def test_bad_inputs_raise(masks, boxes, size, message):
    with pytest.raises(ValueError, match=message):
        paste_masks(masks, boxes, size)


def test_paste_detection_masks_per_image():
    detections = [
        {"boxes": torch.tensor([[1.0, 1.0, 5.0, 6.0]]), "labels": torch.tensor([3]), "masks": torch.rand(1, 1, 28, 28)},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 1, 28, 28)},
    ]
    results = paste_detection_masks(detections, [(10, 12), (4, 5)])
    assert results[0]["masks"].shape == (1, 1, 10, 12) and results[1]["masks"].shape == (0, 1, 4, 5)
    assert results[0]["labels"] is detections[0]["labels"]
    assert torch.equal(results[0]["masks"], paste_masks(detections[0]["masks"], detections[0]["boxes"], (10, 12)))
    with pytest.raises(ValueError, match="2 images but 1 image sizes"):
        paste_detection_masks(detections, [(10, 12)])


def random_boxes(generator: torch.Generator, count: int, height: int, width: int) -> torch.Tensor:
    """Boxes of every size that overlap the image, some partly outside it, some under a pixel."""
    size = torch.tensor([width, height], dtype=torch.float32)
    low = torch.rand(count, 2, generator=generator) * size * 1.1 - 0.2 * size  # [count, 2]
    scale = torch.tensor([0.01, 0.3, 1.0])[torch.randint(0, 3, (count, 1), generator=generator)]  # tiny, mid, large
    high = low + torch.rand(count, 2, generator=generator) * size * scale
    keep = (high[:, 0] > 1) & (high[:, 1] > 1) & (low[:, 0] < width - 1) & (low[:, 1] < height - 1)
    return torch.cat([low, high], dim=1)[keep]


@pytest.mark.torchvision
@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torchvision_paste_masks_in_image(padding, dtype):
    roi_heads = pytest.importorskip("torchvision.models.detection.roi_heads")
    generator = torch.Generator().manual_seed(padding)
    height, width = 61, 83
    boxes = random_boxes(generator, 60, height, width).to(dtype)  # every box overlaps the image, as detections do
    masks = torch.rand(boxes.shape[0], 1, 28, 28, generator=generator, dtype=dtype)
    expected = roi_heads.paste_masks_in_image(masks, boxes, (height, width), padding=padding)
    pasted = paste_masks(masks, boxes, (height, width), padding=padding)
    assert pasted.dtype == expected.dtype and pasted.shape == expected.shape
    # Same pixels, same formula; only rounding differs: PyTorch's compiled resize fuses some
    # multiply-adds (one rounding instead of two) and, for small boxes, multiplies the row and
    # column weights first. Over many seeds the two differ by at most 8 (float32) and 16
    # (float64) units of machine epsilon, on probabilities in [0, 1].
    tolerance = 32 * torch.finfo(dtype).eps
    assert torch.allclose(pasted, expected, atol=tolerance, rtol=0)


def test_speed_of_pasting_100_masks_into_800_by_1066():
    # The result alone is 100 x 800 x 1066 floats (340 MB), so the time is measured against one
    # write of an array that size on the same machine, which may be shared and loaded: the
    # paste costs 2-5 such writes there (torchvision's loop over detections 4-8). The bound
    # only catches a pathological slowdown, such as a Python loop over pixels.
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(100, 1, 28, 28, generator=generator)
    boxes = random_boxes(generator, 140, 800, 1066)[:100]
    paste_seconds, write_seconds = [], []
    for _ in range(3):
        start = time.perf_counter()
        paste_masks(masks, boxes, (800, 1066))
        paste_seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
        torch.empty(100, 1, 800, 1066).fill_(0.5)
        write_seconds.append(time.perf_counter() - start)
    assert min(paste_seconds) < 10 * min(write_seconds) + 0.1
