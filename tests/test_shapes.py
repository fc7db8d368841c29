"""The synthetic shapes data set: deterministic, occlusion-aware, readable by pycocotools."""

import hashlib
import json
import time

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from mrcnn.data import CATEGORY_NAMES, CocoDataset, ShapesDataset, generate_shapes, render_image
from mrcnn.data.shapes import masks_to_boxes


def tree_digest(root) -> dict:
    """Every file under root -> the hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_render_is_deterministic_and_seeded():
    image, masks, labels = render_image(7, seed=3)
    again = render_image(7, seed=3)
    assert image.dtype == np.uint8 and image.shape == (128, 128, 3)
    assert masks.dtype == np.uint8 and masks.shape == (len(labels), 128, 128) and labels.dtype == np.int64
    for a, b in zip((image, masks, labels), again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(image, render_image(7, seed=4)[0])
    assert not np.array_equal(image, render_image(7, seed=3, split="val")[0])
    assert not np.array_equal(image, render_image(8, seed=3)[0])


def test_images_have_the_promised_variety_and_visible_disjoint_masks():
    counts, classes, sizes = [], set(), []
    for index in range(40):
        image, masks, labels = render_image(index, min_objects=2, max_objects=5)
        counts.append(len(labels))
        classes |= set(labels.tolist())
        # visible masks never share a pixel: each pixel shows at most one instance
        assert masks.sum(axis=0).max() <= 1
        areas = masks.reshape(len(masks), -1).sum(axis=1)
        assert (areas >= 64).all()
        sizes += np.sqrt(areas).tolist()
        # the background is textured, not flat
        background = image[masks.sum(axis=0) == 0]
        assert background.std(axis=0).max() > 3
    assert min(counts) >= 1 and max(counts) == 5 and np.mean(counts) > 2.5
    assert classes == {1, 2, 3, 4}
    assert min(sizes) < 20 and max(sizes) > 35


def test_occluded_instances_keep_enough_visible():
    # with many large objects, some placements are refused; the kept ones stay mostly visible
    for index in range(10):
        _, masks, labels = render_image(index, min_objects=6, max_objects=6, object_size=(40, 60))
        assert 1 <= len(labels) <= 6 and masks.sum(axis=0).max() <= 1


def test_bad_settings_are_refused():
    for bad in ({"image_size": 8}, {"image_size": (200, 100)}, {"min_objects": 0}, {"min_objects": 3, "max_objects": 2},
                {"object_size": (10, 500)}, {"split": "test"}):  # fmt: skip
        with pytest.raises(ValueError):
            render_image(0, **bad)


def test_image_size_range():
    shapes = {render_image(i, image_size=(96, 160))[0].shape[:2] for i in range(12)}
    assert len(shapes) > 6 and all(96 <= s <= 160 for shape in shapes for s in shape)


def test_generation_is_byte_identical_and_independent_of_count(tmp_path):
    first = generate_shapes(tmp_path / "a", num_train=6, num_val=3, seed=1, workers=0)
    generate_shapes(tmp_path / "b", num_train=6, num_val=3, seed=1, workers=0)
    digest = tree_digest(tmp_path / "a")
    assert digest == tree_digest(tmp_path / "b")
    assert sorted(digest) == sorted(
        ["annotations/instances_train.json", "annotations/instances_val.json", "shapes.json"]
        + [f"train/{i:06d}.png" for i in range(6)] + [f"val/{i:06d}.png" for i in range(3)]
    )  # fmt: skip
    # fewer images: the same first images, byte for byte, and the same annotations for them
    generate_shapes(tmp_path / "c", num_train=3, num_val=1, seed=1, workers=0)
    fewer = tree_digest(tmp_path / "c")
    for i in range(3):
        assert fewer[f"train/{i:06d}.png"] == digest[f"train/{i:06d}.png"]
    small, large = COCO(tmp_path / "c/annotations/instances_train.json"), COCO(first.train_annotations)
    assert small.loadAnns(small.getAnnIds()) == large.loadAnns(large.getAnnIds(imgIds=[1, 2, 3]))


def test_worker_processes_write_the_same_files(tmp_path):
    generate_shapes(tmp_path / "serial", num_train=64, num_val=0, workers=0)
    generate_shapes(tmp_path / "parallel", num_train=64, num_val=0, workers=2)
    assert tree_digest(tmp_path / "serial") == tree_digest(tmp_path / "parallel")


def test_existing_data_set_is_reused_unless_settings_change(tmp_path):
    paths = generate_shapes(tmp_path, num_train=4, num_val=2, workers=0)
    stamp = paths.train_annotations.stat().st_mtime_ns
    assert generate_shapes(tmp_path, num_train=4, num_val=2, workers=0) == paths
    assert paths.train_annotations.stat().st_mtime_ns == stamp
    generate_shapes(tmp_path, num_train=2, num_val=2, workers=0)  # other settings: redrawn
    assert len(list(paths.train_images.glob("*.png"))) == 2


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools under numpy 2
def test_pycocotools_reads_it_and_masks_round_trip(tmp_path):
    paths = generate_shapes(tmp_path, num_train=5, num_val=4, seed=2, workers=0)
    coco = COCO(paths.val_annotations)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CATEGORY_NAMES)
    assert coco.getImgIds() == [1, 2, 3, 4]
    dataset = CocoDataset(paths.val_images, paths.val_annotations)
    in_memory = ShapesDataset(4, seed=2, split="val")
    for index in range(4):
        image, masks, labels = render_image(index, seed=2, split="val")
        read_image, target = dataset[index]
        assert torch.equal(read_image, torch.from_numpy(image).permute(2, 0, 1).float() / 255)
        assert torch.equal(target["masks"], torch.from_numpy(masks)) and torch.equal(target["labels"], torch.from_numpy(labels))
        for annotation, mask in zip(coco.loadAnns(coco.getAnnIds(imgIds=[index + 1])), masks):
            np.testing.assert_array_equal(coco.annToMask(annotation), mask)  # pycocotools' own decoding
            assert annotation["area"] == mask.sum()
        assert torch.equal(target["boxes"], masks_to_boxes(masks))  # COCO's box [x, y, w, h] -> corners
        memory_image, memory_target = in_memory[index]
        assert torch.equal(memory_image, read_image)
        for key in ("boxes", "labels", "masks"):
            assert torch.equal(memory_target[key], target[key])
        assert memory_target["image_id"] == target["image_id"] == index + 1


def test_masks_to_boxes_is_the_tight_pixel_box():
    masks = np.zeros((2, 5, 6), dtype=np.uint8)
    masks[0, 1:3, 2:5] = 1
    boxes = masks_to_boxes(masks)
    assert boxes.tolist() == [[2, 1, 5, 3], [0, 0, 0, 0]]


def test_generation_is_fast():
    # the whole default data set (1100 images) is meant to take seconds: a few ms of CPU an image
    start = time.process_time()
    for index in range(50):
        render_image(index)
    per_image = (time.process_time() - start) / 50
    assert per_image < 0.05, f"{per_image * 1e3:.1f} ms of CPU per image"


def test_files_it_did_not_write_are_refused_unless_overwrite(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "000000.png").write_bytes(b"someone else's picture")  # our name, but no manifest: not ours
    (tmp_path / "README").write_text("my data")
    with pytest.raises(FileExistsError, match="2 files that generate_shapes did not write"):
        generate_shapes(tmp_path, num_train=2, num_val=1, workers=0)
    assert tree_digest(tmp_path) == {"README": hashlib.sha256(b"my data").hexdigest(),
                                     "val/000000.png": hashlib.sha256(b"someone else's picture").hexdigest()}  # fmt: skip
    paths = generate_shapes(tmp_path, num_train=2, num_val=1, workers=0, overwrite=True)
    assert len(list(paths.val_images.glob("*.png"))) == 1 and (tmp_path / "README").read_text() == "my data"


def test_a_drawing_stopped_half_way_is_drawn_again_without_overwrite(tmp_path):
    paths = generate_shapes(tmp_path, num_train=3, num_val=1, workers=0)
    whole = tree_digest(tmp_path)
    manifest = json.loads((tmp_path / "shapes.json").read_text())
    (tmp_path / "shapes.json").write_text(json.dumps({**manifest, "complete": False}))  # as a killed run leaves it
    paths.val_annotations.unlink()
    assert generate_shapes(tmp_path, num_train=3, num_val=1, workers=0) == paths
    assert tree_digest(tmp_path) == whole
