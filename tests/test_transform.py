"""The image transform: sizes by hand, torchvision parity, round trips, and input checks."""

import pytest
import torch

from mrcnn.transform import ImageTransform, batch_images, resize_boxes

SIZES = [(48, 64), (61, 47), (30, 100), (64, 64)]  # landscape, portrait, long (hits max_size), square


def box_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[G, H, W] uint8 masks filling each box (pixel centres inside it)."""
    y = torch.arange(height)[None, :, None] + 0.5
    x = torch.arange(width)[None, None, :] + 0.5
    x1, y1, x2, y2 = (boxes[:, i, None, None] for i in range(4))
    return ((x >= x1) & (x < x2) & (y >= y1) & (y < y2)).to(torch.uint8)


def random_target(height: int, width: int, count: int = 3, keypoints: bool = False, min_side: float = 1.0) -> dict:
    x1 = torch.rand(count) * width * 0.5
    y1 = torch.rand(count) * height * 0.5
    x2 = x1 + min_side + torch.rand(count) * (width * 0.5 - min_side)
    y2 = y1 + min_side + torch.rand(count) * (height * 0.5 - min_side)
    boxes = torch.stack([x1, y1, x2, y2], dim=1)
    target = {
        "boxes": boxes,
        "labels": torch.randint(1, 5, (count,)),
        "masks": box_masks(boxes, height, width),
        "image_id": torch.tensor(7),
    }
    if keypoints:
        target["keypoints"] = torch.cat([torch.rand(count, 17, 2) * width, torch.ones(count, 17, 1)], dim=2)
    return target


def test_sizes_by_hand():
    transform = ImageTransform(min_size=800, max_size=1333).eval()
    images = [torch.rand(3, 480, 640), torch.rand(3, 300, 1000), torch.rand(3, 427, 640)]
    batch, image_sizes, _ = transform(images)
    # s = min(800 / 480, 1333 / 640) = 5/3: 480 -> 800, 640 -> floor(1066.67) = 1066
    # s = min(800 / 300, 1333 / 1000) = 1.333:  300 -> floor(399.9) = 399, 1000 -> 1333
    # s = 800 / 427 = 1.8735: 640 -> floor(1199.06) = 1199
    assert image_sizes == [(800, 1066), (399, 1333), (800, 1199)]
    assert batch.shape == (3, 3, 800, 1344)  # 1333 padded up to 42 * 32


def test_normalizes_then_pads_with_zeros():
    transform = ImageTransform(min_size=32, max_size=1000, size_divisible=32).eval()
    image = torch.rand(3, 32, 40)
    batch, image_sizes, _ = transform([image])
    assert image_sizes == [(32, 40)] and batch.shape == (1, 3, 32, 64)
    mean = torch.tensor(transform.image_mean)[:, None, None]
    std = torch.tensor(transform.image_std)[:, None, None]
    torch.testing.assert_close(batch[0, :, :, :40], (image - mean) / std)  # scale 1: no resampling
    assert torch.equal(batch[0, :, :, 40:], torch.zeros(3, 32, 24))


def test_batch_images_pads_to_a_multiple():
    batch = batch_images([torch.ones(3, 5, 7), torch.ones(3, 9, 2)], size_divisible=4)
    assert batch.shape == (2, 3, 12, 8)
    assert batch[0].sum() == 3 * 5 * 7 and batch[1].sum() == 3 * 9 * 2


@pytest.mark.torchvision
@pytest.mark.parametrize("training", [False, True])
def test_matches_torchvision(training):
    pytest.importorskip("torchvision")
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    min_size, max_size = ((40, 48, 56), 90) if training else (50, 90)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    reference = GeneralizedRCNNTransform(min_size, max_size, mean, std).train(training)
    ours = ImageTransform(min_size, max_size, mean, std).train(training)
    images = [torch.rand(3, h, w) for h, w in SIZES]
    targets = [random_target(h, w, keypoints=True) for h, w in SIZES]

    torch.manual_seed(1)  # training draws a min_size per image from torch's generator
    expected_list, expected_targets = reference(images, [dict(t) for t in targets])
    torch.manual_seed(1)
    batch, image_sizes, resized = ours(images, targets)

    assert torch.equal(batch, expected_list.tensors)
    assert image_sizes == [tuple(s) for s in expected_list.image_sizes]
    for ours_target, expected_target in zip(resized, expected_targets):
        assert ours_target.keys() == expected_target.keys()
        for key in ours_target:
            assert ours_target[key].dtype == expected_target[key].dtype, key
            assert torch.equal(ours_target[key], expected_target[key]), key

    detections = [{"boxes": t["boxes"], "scores": torch.rand(len(t["boxes"]))} for t in expected_targets]
    original_sizes = [(h, w) for h, w in SIZES]
    reference.eval()
    expected_back = reference.postprocess([dict(d) for d in detections], expected_list.image_sizes, original_sizes)
    for ours_back, expected in zip(ours.postprocess(detections, image_sizes, original_sizes), expected_back):
        assert torch.equal(ours_back["boxes"], expected["boxes"])
        assert torch.equal(ours_back["scores"], expected["scores"])


def test_training_draws_each_min_size():
    transform = ImageTransform(min_size=(32, 48), max_size=1000).train()
    heights = {transform([torch.rand(3, 16, 16)])[1][0][0] for _ in range(30)}
    assert heights == {32, 48}
    assert transform.eval()([torch.rand(3, 16, 16)])[1][0] == (48, 48)  # eval uses the last


def test_targets_follow_the_image_and_inputs_are_not_modified():
    transform = ImageTransform(min_size=60, max_size=1000).eval()
    target = random_target(30, 40)
    boxes_before = target["boxes"].clone()
    _, image_sizes, (resized,) = transform([torch.rand(3, 30, 40)], [target])
    assert image_sizes == [(60, 80)]
    torch.testing.assert_close(resized["boxes"], boxes_before * 2)
    assert resized["masks"].shape == (3, 60, 80) and resized["masks"].dtype == torch.uint8
    assert torch.equal(resized["masks"], target["masks"].repeat_interleave(2, 1).repeat_interleave(2, 2))
    assert torch.equal(target["boxes"], boxes_before) and target["masks"].shape == (3, 30, 40)
    assert resized["image_id"] is target["image_id"]  # other fields pass through


def mask_extent(masks: torch.Tensor) -> torch.Tensor:
    """[G, H, W] -> [G, 4]: (x1, y1, x2, y2) of the pixels set in each mask, pixel edges."""
    rows, columns = masks.any(dim=2), masks.any(dim=1)  # [G, H], [G, W]
    first = lambda m: m.float().argmax(dim=1)  # noqa: E731
    last = lambda m: m.shape[1] - m.flip(1).float().argmax(dim=1)  # noqa: E731
    return torch.stack([first(columns), first(rows), last(columns), last(rows)], dim=1).float()


def test_round_trip_of_boxes_and_masks():
    transform = ImageTransform(min_size=100, max_size=1333).eval()
    sizes = [(37, 53), (75, 41)]
    targets = [random_target(h, w, count=4, min_side=6) for h, w in sizes]
    _, image_sizes, resized = transform([torch.rand(3, h, w) for h, w in sizes], targets)
    back = transform.postprocess([{"boxes": t["boxes"]} for t in resized], image_sizes, sizes)
    for result, target, resized_target, size, new_size in zip(back, targets, resized, sizes, image_sizes):
        torch.testing.assert_close(result["boxes"], target["boxes"], rtol=1e-5, atol=1e-4)
        # masks stay on their boxes: an edge of the resized mask is off the resized box by at most
        # half an original pixel (the original mask's own rounding) plus one new pixel (nearest)
        scale = new_size[0] / size[0]
        difference = mask_extent(resized_target["masks"]) - mask_extent(box_masks(resized_target["boxes"], *new_size))
        assert difference.abs().max() <= scale / 2 + 1, difference

    # an integer scale (2) is undone exactly by taking every other pixel
    transform = ImageTransform(min_size=50, max_size=1333).eval()
    target = random_target(25, 31, count=3)
    _, _, (resized,) = transform([torch.rand(3, 25, 31)], [target])
    assert torch.equal(resized["masks"][:, ::2, ::2], target["masks"])
    assert torch.equal(resize_boxes(torch.zeros(0, 4), (10, 10), (20, 30)), torch.zeros(0, 4))


def test_images_without_objects():
    transform = ImageTransform(min_size=64, max_size=100).train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 32, 40, dtype=torch.uint8)}
    _, image_sizes, (resized,) = transform([torch.rand(3, 32, 40)], [empty])
    assert resized["boxes"].shape == (0, 4) and resized["masks"].shape == (0, *image_sizes[0])


def good_inputs():
    images = [torch.rand(3, 20, 30), torch.rand(3, 25, 25)]
    targets = [random_target(20, 30), random_target(25, 25, count=4)]
    return images, targets


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda images, targets: images.__setitem__(1, torch.rand(25, 25)), r"image 1: expected a \[3, H, W\]"),
        (lambda images, targets: images.__setitem__(1, torch.rand(4, 25, 25)), r"image 1: expected a \[3, H, W\]"),
        (lambda images, targets: images.__setitem__(1, torch.randint(0, 255, (3, 25, 25), dtype=torch.uint8)), r"image 1: .*floating"),
        (lambda images, targets: images.__setitem__(1, torch.rand(3, 25, 25, dtype=torch.float64)), r"image 1: torch.float64"),
        (lambda images, targets: targets[1]["boxes"].__setitem__((3, 2), 40.0), r"image 1: boxes\[3\] .* outside the 25 x 25 image"),
        (lambda images, targets: targets[1]["boxes"].__setitem__((3, 0), -5.0), r"image 1: boxes\[3\] .* outside"),
        (lambda images, targets: targets[1]["boxes"].__setitem__((3, 2), targets[1]["boxes"][3, 0]), r"image 1: boxes\[3\] .* degenerate"),
        (lambda images, targets: targets[1]["boxes"].__setitem__((2, 1), float("nan")), r"image 1: boxes\[2\] .* not finite"),
        (lambda images, targets: targets[1].__setitem__("boxes", targets[1]["boxes"][:, :3]), r"image 1: boxes must be a \[G, 4\]"),
        (lambda images, targets: targets[1].__setitem__("masks", torch.zeros(4, 25, 24, dtype=torch.uint8)), r"image 1: masks must be \[G, H, W\] = \[4, 25, 25\]"),
        (lambda images, targets: targets[1].__setitem__("masks", torch.zeros(3, 25, 25, dtype=torch.uint8)), r"image 1: masks"),
        (lambda images, targets: targets[1].__setitem__("labels", targets[1]["labels"].int()), r"image 1: labels must be a \[G\] int64"),
        (lambda images, targets: targets[1].pop("labels"), r"image 1: labels"),
        (lambda images, targets: targets.pop(), r"2 images but 1 targets"),
    ],
)
def test_bad_inputs_name_the_image_and_the_field(change, message):
    images, targets = good_inputs()
    change(images, targets)
    with pytest.raises(ValueError, match=message):
        ImageTransform(min_size=32, max_size=64)(images, targets)


def test_boxes_may_touch_the_border():
    images, targets = good_inputs()
    targets[0]["boxes"][0] = torch.tensor([0.0, 0.0, 30.0, 20.0])
    targets[0]["boxes"][1] = torch.tensor([0.0, 0.0, 30.5, 20.5])  # COCO rounding past the border
    ImageTransform(min_size=32, max_size=64)(images, targets)


def test_empty_image_list_raises():
    with pytest.raises(ValueError, match="non-empty list"):
        ImageTransform()([])
