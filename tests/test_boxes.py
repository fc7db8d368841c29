"""Boxes: IoU by hand, the box coder's round trip and clamp, NMS vs a naive loop and vs torchvision."""

import math
import time

import pytest
import torch

from mrcnn.boxes import BoxCoder, batched_nms, box_area, box_iou, clip_boxes, nms, remove_small_boxes


def random_boxes(n: int, generator: torch.Generator, size: float = 50.0, whole_pixels: bool = True) -> torch.Tensor:
    """`[n, 4]` boxes; on whole pixels many IoUs are simple fractions, exactly at thresholds."""
    corner = torch.rand(n, 2, generator=generator) * size
    extent = torch.rand(n, 2, generator=generator) * size / 2 + 1
    boxes = torch.cat([corner, corner + extent], dim=1)
    return boxes.round() if whole_pixels else boxes


# --- area, IoU, clipping -------------------------------------------------------------------------


def test_box_area_by_hand():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 1.0, 5.0], [-1.0, -1.0, 1.0, 1.0]])
    assert box_area(boxes).tolist() == [6.0, 0.0, 4.0]


@pytest.mark.parametrize(
    "box_a, box_b, expected",
    [
        ([0, 0, 2, 2], [0, 0, 2, 2], 1.0),  # identical
        ([0, 0, 2, 2], [1, 0, 3, 2], 2 / 6),  # half shifted: |a ∩ b| = 2, union = 6
        ([0, 0, 4, 4], [1, 1, 3, 3], 4 / 16),  # contained
        ([0, 0, 2, 2], [2, 0, 4, 2], 0.0),  # touching edges
        ([0, 0, 2, 2], [5, 5, 6, 6], 0.0),  # far apart
    ],
)
def test_box_iou_by_hand(box_a, box_b, expected):
    a = torch.tensor([box_a], dtype=torch.float64)
    b = torch.tensor([box_b], dtype=torch.float64)
    assert box_iou(a, b).item() == pytest.approx(expected, abs=1e-12)
    assert box_iou(b, a).item() == pytest.approx(expected, abs=1e-12)  # symmetric


@pytest.mark.torchvision
def test_box_iou_shape_and_torchvision():
    torchvision = pytest.importorskip("torchvision")
    generator = torch.Generator().manual_seed(0)
    a, b = random_boxes(7, generator, whole_pixels=False), random_boxes(11, generator, whole_pixels=False)
    iou = box_iou(a, b)
    assert iou.shape == (7, 11)
    assert torch.equal(iou, torchvision.ops.box_iou(a, b))
    assert box_iou(a, b[:0]).shape == (7, 0)


def test_box_iou_rejects_bad_shapes():
    with pytest.raises(ValueError, match="boxes1"):
        box_iou(torch.zeros(3, 5), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="floating point"):
        box_iou(torch.zeros(3, 4), torch.zeros(2, 4, dtype=torch.int64))


def test_clip_boxes_by_hand_and_any_leading_shape():
    boxes = torch.tensor([[-5.0, -1.0, 20.0, 8.0], [2.0, 3.0, 4.0, 5.0]])
    clipped = clip_boxes(boxes, (6, 10))  # height 6, width 10
    assert clipped.tolist() == [[0.0, 0.0, 10.0, 6.0], [2.0, 3.0, 4.0, 5.0]]
    stacked = torch.stack([boxes, boxes])  # [2, 2, 4]
    assert torch.equal(clip_boxes(stacked, (6, 10)), torch.stack([clipped, clipped]))


def test_remove_small_boxes_keeps_sides_at_least_min_size():
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 4.0], [0.0, 0.0, 4.0, 0.99], [1.0, 1.0, 3.0, 2.0]])
    keep = remove_small_boxes(boxes, 1.0)
    assert keep.dtype == torch.int64
    assert keep.tolist() == [0, 3]


# --- box coding ----------------------------------------------------------------------------------


def test_encode_by_hand():
    proposal = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float64)  # centre (5, 5), 10 x 10
    target = torch.tensor([[5.0, 0.0, 15.0, 20.0]], dtype=torch.float64)  # centre (10, 10), 10 x 20
    deltas = BoxCoder().encode(target, proposal)
    assert deltas[0].tolist() == pytest.approx([0.5, 0.5, 0.0, math.log(2.0)])
    weighted = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)).encode(target, proposal)
    assert weighted[0].tolist() == pytest.approx([5.0, 5.0, 0.0, 5 * math.log(2.0)])


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_then_decode_gives_back_the_boxes(weights):
    generator = torch.Generator().manual_seed(1)
    proposals = random_boxes(50, generator, whole_pixels=False).double()
    targets = random_boxes(50, generator, whole_pixels=False).double()
    coder = BoxCoder(weights=weights)
    decoded = coder.decode(coder.encode(targets, proposals), proposals)
    assert decoded.shape == (50, 1, 4)
    torch.testing.assert_close(decoded[:, 0], targets, rtol=0, atol=1e-9)


def test_decode_several_boxes_per_reference():
    generator = torch.Generator().manual_seed(2)
    boxes = random_boxes(6, generator, whole_pixels=False)
    deltas = torch.randn(6, 3 * 4, generator=generator) * 0.1  # k = 3 (e.g. one per class)
    coder = BoxCoder()
    decoded = coder.decode(deltas, boxes)
    assert decoded.shape == (6, 3, 4)
    for k in range(3):
        assert torch.equal(decoded[:, k], coder.decode(deltas[:, 4 * k : 4 * k + 4].contiguous(), boxes)[:, 0])


def test_decode_clamps_the_size_deltas():
    box = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    huge = torch.tensor([[0.0, 0.0, 50.0, 50.0]])  # exp(50) would overflow float32
    decoded = BoxCoder().decode(huge, box)[0, 0]
    assert torch.isfinite(decoded).all()
    # the width is exp(log(1000 / 16)) * 16 = 1000 around the centre 8
    assert decoded.tolist() == pytest.approx([8 - 500.0, 8 - 500.0, 8 + 500.0, 8 + 500.0], rel=1e-5)
    shrink = BoxCoder().decode(torch.tensor([[0.0, 0.0, -50.0, -50.0]]), box)[0, 0]  # no lower clamp
    assert (shrink[2] - shrink[0]).item() == pytest.approx(16 * math.exp(-50.0), rel=1e-3)


@pytest.mark.torchvision
def test_box_coder_matches_torchvision_bit_for_bit():
    pytest.importorskip("torchvision")
    from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder

    generator = torch.Generator().manual_seed(3)
    proposals = random_boxes(300, generator, size=800, whole_pixels=False)
    targets = random_boxes(300, generator, size=800, whole_pixels=False)
    deltas = torch.randn(300, 91 * 4, generator=generator)
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        ours, theirs = BoxCoder(weights), TorchvisionBoxCoder(weights)
        assert torch.equal(ours.encode(targets, proposals), theirs.encode_single(targets, proposals))
        assert torch.equal(ours.decode(deltas, proposals), theirs.decode(deltas, [proposals]))


# --- non-maximum suppression ---------------------------------------------------------------------


def naive_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> list[int]:
    """The definition, one pair at a time: visit by decreasing score (ties: lower index first), keep
    a box unless a kept box overlaps it with IoU > threshold. IoU in the boxes' dtype, as the kernels."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i].item(), i))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept = []
    for i in order:
        suppressed = False
        for j in kept:
            width = (torch.min(boxes[i, 2], boxes[j, 2]) - torch.max(boxes[i, 0], boxes[j, 0])).clamp(min=0)
            height = (torch.min(boxes[i, 3], boxes[j, 3]) - torch.max(boxes[i, 1], boxes[j, 1])).clamp(min=0)
            intersection = width * height
            if (intersection / (area[j] + area[i] - intersection)).item() > iou_threshold:
                suppressed = True
                break
        if not suppressed:
            kept.append(i)
    return kept


def test_nms_by_hand():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 9.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    # box 3 (best) suppresses box 0 (IoU 0.9) but not box 1 (IoU 72 / 118 < 0.7)
    assert nms(boxes, scores, 0.7).tolist() == [3, 1, 2]
    assert nms(boxes, scores, 0.5).tolist() == [3, 2]


def test_nms_iou_exactly_at_threshold_is_kept():
    boxes = torch.tensor([[0.0, 0.0, 3.0, 1.0], [1.0, 0.0, 4.0, 1.0]])  # IoU = 2 / 4 = 0.5 exactly
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]  # suppress only when IoU > threshold
    assert nms(boxes, scores, 0.4999).tolist() == [0]


def test_nms_ties_keep_the_lower_index_first():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    scores = torch.tensor([0.5, 0.5, 0.5])
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]


@pytest.mark.parametrize("seed", range(10))
def test_nms_matches_the_naive_loop(seed):
    generator = torch.Generator().manual_seed(seed)
    boxes = random_boxes(40, generator, size=30)
    scores = (torch.rand(40, generator=generator) * 6).round() / 6  # many ties
    for iou_threshold in [0.3, 0.5, 1 / 3, 0.7]:
        assert nms(boxes, scores, iou_threshold).tolist() == naive_nms(boxes, scores, iou_threshold)


def test_nms_empty_and_bad_inputs():
    keep = nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert keep.dtype == torch.int64 and keep.shape == (0,)
    with pytest.raises(ValueError, match="scores"):
        nms(torch.zeros(3, 4), torch.zeros(2), 0.5)
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).shape == (0,)


def test_batched_nms_never_suppresses_across_categories():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3)
    scores = torch.tensor([0.9, 0.8, 0.7])
    categories = torch.tensor([0, 1, 0])
    assert batched_nms(boxes, scores, categories, 0.5).tolist() == [0, 1]


@pytest.mark.torchvision
@pytest.mark.parametrize("num_boxes", [40, 400, 1500])  # 1500 boxes takes torchvision's per-category path
def test_nms_and_batched_nms_match_torchvision(num_boxes):
    torchvision = pytest.importorskip("torchvision")
    for seed in range(5 if num_boxes < 1000 else 2):
        generator = torch.Generator().manual_seed(seed)
        boxes = random_boxes(num_boxes, generator, size=200, whole_pixels=seed % 2 == 0)
        scores = (torch.rand(num_boxes, generator=generator) * 20).round()  # ties
        categories = torch.randint(0, 5, (num_boxes,), generator=generator)
        for iou_threshold in [0.3, 0.5, 0.7]:
            assert torch.equal(nms(boxes, scores, iou_threshold), torchvision.ops.nms(boxes, scores, iou_threshold))
            assert torch.equal(
                batched_nms(boxes, scores, categories, iou_threshold),
                torchvision.ops.batched_nms(boxes, scores, categories, iou_threshold),
            )


@pytest.mark.torchvision
def test_nms_threshold_compared_in_double_like_torchvision():
    # 0.3 rounds up in float32; an IoU equal to float32(0.3) is above 0.3 and must suppress
    torchvision = pytest.importorskip("torchvision")
    generator = torch.Generator().manual_seed(4)
    boxes = random_boxes(400, generator, size=60)
    scores = torch.rand(400, generator=generator)
    iou = box_iou(boxes, boxes)
    at_float_threshold = (iou == torch.tensor(0.3, dtype=torch.float32)).sum().item()
    assert at_float_threshold > 0  # the case occurs in this data
    assert torch.equal(nms(boxes, scores, 0.3), torchvision.ops.nms(boxes, scores, 0.3))


def test_nms_is_vectorized_on_4000_boxes():
    """A guard against a Python loop over box pairs (minutes), not a speed goal: those live in benchmarks/."""
    generator = torch.Generator().manual_seed(5)
    boxes = random_boxes(4000, generator, size=800, whole_pixels=False)
    scores = torch.rand(4000, generator=generator)
    start = time.process_time()  # CPU time: robust to other jobs sharing the machine
    keep = nms(boxes, scores, 0.7)
    elapsed = time.process_time() - start
    assert keep.numel() > 0
    assert elapsed < 5.0, f"NMS on 4000 boxes took {elapsed:.2f} s of CPU time"
