"""The stick-figure keypoint data set, its COCO files and reader (mrcnn/data/keypoints.py), and flipping its
keypoints (mrcnn/data/flip.py). Their OKS evaluation is tested in tests/test_evaluate.py."""

import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from mrcnn.data.flip import flip_index, flip_keypoints, horizontal_flip
from mrcnn.train import TrainingImages
from mrcnn.data.keypoints import (
    FLIP_INDEX,
    KEYPOINT_NAMES,
    SIGMAS,
    FiguresDataset,
    KeypointCocoDataset,
    generate_figures,
    render_figures,
)


def test_deterministic_and_independent_of_order():
    first = render_figures(7, seed=1)
    render_figures(3, seed=1)  # drawing another image in between changes nothing
    again = render_figures(7, seed=1)
    for a, b in zip(first, again):
        assert np.array_equal(a, b)
    assert not np.array_equal(render_figures(8, seed=1)[0], first[0])
    assert not np.array_equal(render_figures(7, seed=2)[0], first[0])
    assert not np.array_equal(render_figures(7, seed=1, split="val")[0], first[0])
    image, target = FiguresDataset(10, seed=1)[7]
    assert torch.equal(target["keypoints"], torch.from_numpy(first[2])) and torch.equal(target["masks"], torch.from_numpy(first[1]))
    assert torch.equal(target["labels"], torch.ones(len(first[1]), dtype=torch.int64)) and target["image_id"] == 8


def test_visibility_flags_follow_coco():
    """v = 0: outside the image, stored as (0, 0); v = 2: on the figure's own visible pixels;
    v = 1: inside the image but painted over by a later figure."""
    counts = np.zeros(3, dtype=int)
    for index in range(40):
        image, masks, keypoints = render_figures(index, seed=0)
        height, width = image.shape[:2]
        assert keypoints.shape == (len(masks), len(KEYPOINT_NAMES), 3) and keypoints.dtype == np.float32
        for g, points in enumerate(keypoints):
            for x, y, v in points:
                counts[int(v)] += 1
                if v == 0:
                    assert x == 0 and y == 0
                    continue
                assert 0 <= x < width and 0 <= y < height
                later = masks[g + 1 :].any(axis=0) if g + 1 < len(masks) else np.zeros_like(masks[0], dtype=bool)
                covered = any(m[int(y), int(x)] for m in masks[g + 1 :])
                assert covered == (v == 1), (index, g, x, y, v)
                if v == 2:
                    assert masks[g][int(y), int(x)] == 1 and not later[int(y), int(x)]
    assert counts.min() > 0, counts  # every kind occurs


def test_left_is_drawn_on_the_left_and_flipping_swaps_it():
    assert FLIP_INDEX == (0, 1, 3, 2, 5, 4, 6, 8, 7, 10, 9)
    assert flip_index(["nose", "left_eye", "right_eye"]) == [0, 2, 1]
    left, right = KEYPOINT_NAMES.index("left_hand"), KEYPOINT_NAMES.index("right_hand")
    on_the_left = []
    for index in range(30):
        _, _, keypoints = render_figures(index)
        both = (keypoints[:, left, 2] > 0) & (keypoints[:, right, 2] > 0)
        on_the_left += (keypoints[both, left, 0] < keypoints[both, right, 0]).tolist()
    assert np.mean(on_the_left) > 0.95  # the body tilts by up to 20 degrees: nearly always
    image, target = FiguresDataset(1, seed=4)[0]
    width = image.shape[-1]
    flipped = flip_keypoints(target["keypoints"], width, FLIP_INDEX)
    labelled = target["keypoints"][:, right, 2] > 0
    assert torch.allclose(flipped[labelled, left, 0], width - target["keypoints"][labelled, right, 0])
    assert torch.equal(flip_keypoints(flipped, width, FLIP_INDEX), target["keypoints"])  # an involution
    assert bool((flipped[..., :2][flipped[..., 2] == 0] == 0).all())  # unlabelled ones stay at (0, 0)


def test_the_trainers_flip_swaps_left_and_right_keypoints():
    dataset = FiguresDataset(2, seed=4)
    image, target = dataset[0]
    mirrored, flipped = horizontal_flip(image, target, dataset.flip_index)
    assert torch.equal(flipped["keypoints"], flip_keypoints(target["keypoints"], image.shape[-1], FLIP_INDEX))
    assert torch.equal(mirrored, image.flip(-1)) and torch.equal(flipped["masks"], target["masks"].flip(-1))
    with pytest.raises(ValueError, match="flip index"):
        horizontal_flip(image, target)  # keypoints without their names' index would keep left as left
    images = TrainingImages(dataset, seed=0, flip=True)
    keys = [(0, 0, epoch, 0) for epoch in range(8)]  # image 0 in 8 epochs: flipped about half the time
    seen = {bool(torch.equal(images[key][2]["keypoints"], flipped["keypoints"])) for key in keys}
    assert seen == {True, False}


def test_bad_settings_raise_before_drawing():
    with pytest.raises(ValueError, match="figure_height"):
        render_figures(0, figure_height=(8, 20))
    with pytest.raises(ValueError, match="split"):
        render_figures(0, split="test")
    with pytest.raises(ValueError, match="min_figures"):
        FiguresDataset(3, min_figures=3, max_figures=2)


@pytest.fixture(scope="module")
def figures_root(tmp_path_factory):
    return generate_figures(tmp_path_factory.mktemp("figures"), num_train=6, num_val=4, seed=5)


def test_coco_files_load_with_pycocotools_and_read_back_the_same_targets(figures_root):
    annotation_file = figures_root / "annotations" / "person_keypoints_val.json"
    coco = COCO(str(annotation_file))
    category = coco.loadCats(1)[0]
    assert category["keypoints"] == list(KEYPOINT_NAMES) and len(category["skeleton"]) == 10
    annotation = coco.loadAnns(coco.getAnnIds())[0]
    assert len(annotation["keypoints"]) == 3 * len(KEYPOINT_NAMES)
    assert annotation["num_keypoints"] == sum(v > 0 for v in annotation["keypoints"][2::3])

    dataset = KeypointCocoDataset(figures_root / "val", annotation_file)
    assert dataset.keypoint_names == KEYPOINT_NAMES and dataset.sigmas == SIGMAS and dataset.flip_index == FLIP_INDEX
    memory = FiguresDataset(4, seed=5, split="val")
    for index in range(4):
        image, target = dataset[index]
        expected_image, expected = memory[index]
        assert torch.equal(image, expected_image)
        assert torch.equal(target["boxes"], expected["boxes"]) and torch.equal(target["masks"], expected["masks"])
        assert target["keypoints"].shape == expected["keypoints"].shape
        torch.testing.assert_close(target["keypoints"], expected["keypoints"], atol=0.005, rtol=0)  # stored to 0.01 pixel
    with pytest.raises(ValueError, match="train=False"):
        KeypointCocoDataset(figures_root / "val", annotation_file, train=True)


def test_reader_rejects_files_without_keypoint_names(figures_root, tmp_path):
    data = json.loads((figures_root / "annotations" / "person_keypoints_val.json").read_text())
    del data["categories"][0]["keypoints"]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="keypoints"):
        KeypointCocoDataset(figures_root / "val", broken)
