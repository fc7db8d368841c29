"""The COCO reader on tiny hand-written COCO files: every mask format, crowds, odd images,
label mapping, flipping, and every kind of broken file (a clear error, or a counted skip)."""

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mrcnn.data import CocoDataset, DatasetError, coco2017, collate, horizontal_flip
from mrcnn.data.coco import rle_run_lengths

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # pycocotools, numpy 2
    pytest.mark.filterwarnings("ignore:.*the category ids .* are not 1:UserWarning"),  # the tiny file's 11, 3, 7
]

H, W = 20, 30


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE, written out from its definition: run lengths of the column-major
    pixel order, starting with a run of zeros."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": list(mask.shape), "counts": np.diff(np.concatenate([[0], changes])).tolist()}


def blob(y0, y1, x0, x1) -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


RLE_MASK = blob(3, 9, 5, 20)  # image 2, uncompressed RLE
COMPRESSED_MASK = blob(10, 18, 1, 7) | blob(2, 4, 25, 29)  # image 3, compressed RLE, two parts


def write_dataset(root, edit=None):
    """Four images (RGB, grayscale, RGBA, and one with no objects), categories 11, 3, 7 listed out
    of order, and annotations of every mask format. `edit(data)` may break the file first."""
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(images / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (H, W), dtype=np.uint8)).save(images / "gray.png")
    Image.fromarray(rng.integers(0, 256, (H, W, 4), dtype=np.uint8)).save(images / "rgba.png")
    Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(images / "empty.jpg")
    compressed = mask_utils.encode(np.asfortranarray(COMPRESSED_MASK))
    data = {
        "info": {"description": "tiny"},
        "images": [
            {"id": 1, "file_name": "rgb.png", "height": H, "width": W},
            {"id": 2, "file_name": "gray.png", "height": H, "width": W},
            {"id": 3, "file_name": "rgba.png", "height": H, "width": W},
            {"id": 40, "file_name": "empty.jpg", "height": H, "width": W},
        ],
        "categories": [{"id": 11, "name": "kite"}, {"id": 3, "name": "car"}, {"id": 7, "name": "train"}],
        "annotations": [
            {"id": 101, "image_id": 1, "category_id": 7, "bbox": [2, 2, 10, 8], "area": 80.0, "iscrowd": 0,
             "segmentation": [[2, 2, 12, 2, 12, 10, 2, 10]]},
            {"id": 102, "image_id": 1, "category_id": 11, "bbox": [14, 5.5, 14, 12], "area": 60.0, "iscrowd": 0,
             "segmentation": [[14, 12, 20, 6, 26, 12], [20, 14.5, 28, 14.5, 28, 17.5, 20, 17.5]]},
            {"id": 103, "image_id": 1, "category_id": 3, "bbox": [0, 0, 30, 20], "area": 300.0, "iscrowd": 1,
             "segmentation": uncompressed_rle(blob(0, 20, 0, 30))},
            {"id": 201, "image_id": 2, "category_id": 3, "bbox": [5, 3, 15, 6], "area": 90.0, "iscrowd": 0,
             "segmentation": uncompressed_rle(RLE_MASK)},
            {"id": 301, "image_id": 3, "category_id": 11, "bbox": [1, 2, 28, 16], "area": 56.0, "iscrowd": 0,
             "segmentation": {"size": compressed["size"], "counts": compressed["counts"].decode()}},
        ],
    }  # fmt: skip
    if edit is not None:
        edit(data)
    annotation_file = root / "annotations" / "instances_tiny.json"
    annotation_file.parent.mkdir(exist_ok=True)
    annotation_file.write_text(json.dumps(data))
    return images, annotation_file


@pytest.fixture
def tiny(tmp_path):
    return write_dataset(tmp_path)


def test_labels_are_contiguous_in_category_id_order(tiny):
    dataset = CocoDataset(*tiny)
    assert dataset.label_to_category_id == {1: 3, 2: 7, 3: 11}
    assert dataset.category_id_to_label == {3: 1, 7: 2, 11: 3}
    assert dataset.category_names == ["__background__", "car", "train", "kite"]
    assert dataset.num_classes == 4 and len(dataset) == 4 and dataset.image_ids == [1, 2, 3, 40]
    raw = CocoDataset(*tiny, contiguous_labels=False)  # torchvision's COCO models: label = category id
    assert raw.num_classes == 12 and raw.label_to_category_id == {3: 3, 7: 7, 11: 11}
    assert raw.category_names[7] == "train" and raw.category_names[4] == "N/A"
    assert raw[0][1]["labels"].tolist() == [7, 11]


def test_polygons_rle_and_crowds_become_targets(tiny):
    dataset = CocoDataset(*tiny)
    reference = COCO()  # pycocotools' own decoding is the reference for polygons
    reference.dataset = json.loads(tiny[1].read_text())
    reference.createIndex()

    image, target = dataset[0]
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    expected = np.asarray(Image.open(tiny[0] / "rgb.png")).transpose(2, 0, 1) / 255
    assert torch.allclose(image, torch.from_numpy(expected).float())
    assert target["image_id"] == 1
    assert target["labels"].tolist() == [2, 3]  # the crowd (id 103) is left out
    assert target["boxes"].dtype == torch.float32
    assert target["boxes"].tolist() == [[2, 2, 12, 10], [14, 5.5, 28, 17.5]]  # [x, y, w, h] -> corners
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (2, H, W)
    for mask, annotation_id in zip(target["masks"], [101, 102]):
        np.testing.assert_array_equal(mask.numpy(), reference.annToMask(reference.anns[annotation_id]))
    assert target["masks"][0].sum() == 80  # the 10 x 8 rectangle
    assert target["iscrowd"].tolist() == [0, 0] and target["area"].tolist() == [80, 60]

    _, target = dataset[1]
    np.testing.assert_array_equal(target["masks"][0].numpy(), RLE_MASK)
    _, target = dataset[2]
    np.testing.assert_array_equal(target["masks"][0].numpy(), COMPRESSED_MASK)
    assert dataset.coco.anns[103]["iscrowd"] == 1  # still there for COCOeval's ignore regions


def test_grayscale_and_rgba_images_become_rgb(tiny):
    dataset = CocoDataset(*tiny)
    gray = np.array(Image.open(tiny[0] / "gray.png"))
    image, _ = dataset[1]
    for channel in image:
        assert torch.equal(channel, torch.from_numpy(gray).float() / 255)
    rgba = np.array(Image.open(tiny[0] / "rgba.png"))
    image, _ = dataset[2]
    assert torch.equal(image, torch.from_numpy(rgba[..., :3].transpose(2, 0, 1).copy()).float() / 255)


def test_image_without_annotations(tiny):
    dataset = CocoDataset(*tiny)
    image, target = dataset[3]
    assert image.shape == (3, H, W) and target["image_id"] == 40
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,) and target["masks"].shape == (0, H, W)
    kept = CocoDataset(*tiny, remove_images_without_annotations=True)
    assert kept.image_ids == [1, 2, 3]


def test_crowd_only_image_is_removed_for_training(tmp_path):
    def crowd_only(data):
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 1 or a["iscrowd"]]

    dataset = CocoDataset(*write_dataset(tmp_path, crowd_only), remove_images_without_annotations=True)
    assert dataset.image_ids == [2, 3]


def test_flip_moves_boxes_and_masks_together(tiny):
    image, target = CocoDataset(*tiny)[0]
    flipped_image, flipped = horizontal_flip(image, target)
    assert torch.equal(flipped_image, image.flip(-1)) and torch.equal(flipped["masks"], target["masks"].flip(-1))
    assert flipped["boxes"].tolist() == [[W - 12, 2, W - 2, 10], [W - 28, 5.5, W - 14, 17.5]]
    for g in range(2):  # the gaps between a box and its mask's pixels swap sides, to the bit
        def gaps(box, mask):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            return [float(xs.min() - box[0]), float(box[2] - xs.max() - 1), float(ys.min() - box[1]), float(box[3] - ys.max() - 1)]

        left, right, top, bottom = gaps(target["boxes"][g], target["masks"][g])
        assert gaps(flipped["boxes"][g], flipped["masks"][g]) == [right, left, top, bottom]
    assert torch.equal(horizontal_flip(flipped_image, flipped)[1]["boxes"], target["boxes"])  # twice: identity
    assert target["boxes"].tolist()[0] == [2, 2, 12, 10]  # the input was not changed


def test_training_flips_half_the_time_reproducibly(tiny):
    plain = CocoDataset(*tiny)[0]
    training = CocoDataset(*tiny, train=True)
    torch.manual_seed(0)
    draws = [training[0] for _ in range(40)]
    flipped = [bool(torch.equal(image, plain[0].flip(-1))) for image, _ in draws]
    assert 8 < sum(flipped) < 32
    for (image, target), was_flipped in zip(draws, flipped):
        expected_image, expected = horizontal_flip(*plain) if was_flipped else plain
        assert torch.equal(image, expected_image) and torch.equal(target["boxes"], expected["boxes"])
        assert torch.equal(target["masks"], expected["masks"])
    torch.manual_seed(0)
    assert [bool(torch.equal(training[0][0], plain[0].flip(-1))) for _ in range(40)] == flipped


def test_coco2017_layout(tmp_path):
    images, annotation_file = write_dataset(tmp_path)
    images.rename(tmp_path / "val2017")
    annotation_file.rename(annotation_file.with_name("instances_val2017.json"))
    dataset = coco2017(tmp_path, "val", remove_images_without_annotations=True)
    assert dataset.image_ids == [1, 2, 3] and dataset.image_dir == tmp_path / "val2017"
    with pytest.raises(DatasetError, match="instances_train2017.json does not exist"):
        coco2017(tmp_path, "train")


def test_collate_keeps_lists(tiny):
    dataset = CocoDataset(*tiny)
    images, targets = next(iter(torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate)))
    assert isinstance(images, list) and len(images) == 3 and [t["image_id"] for t in targets] == [1, 2, 3]
    assert collate([]) == ([], [])


# ---------------------------------------------------------------------------- broken files


def break_with(tmp_path, edit, **options):
    return CocoDataset(*write_dataset(tmp_path, edit), **options)


def annotation(data, annotation_id):
    return next(a for a in data["annotations"] if a["id"] == annotation_id)


def skip_warnings(record) -> list[str]:
    """The warnings about skipped annotations (the tiny file also gets one about its category ids)."""
    return [str(w.message) for w in record if "skipped" in str(w.message)]


def compressed(mask: np.ndarray) -> str:
    return mask_utils.encode(np.asfortranarray(mask))["counts"].decode()


OTHER_SIZE = compressed(np.ones((10, 10), dtype=np.uint8))  # 100 pixels, for a 20 x 30 image
TOO_LARGE = compressed(blob(0, 2, 0, 2).repeat(2, axis=0))  # 40 x 30: 1200 pixels
NEGATIVE_RUN = "5M" + compressed(COMPRESSED_MASK)[2:]  # 'M' is -3: the runs read 5, -3, ...


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: annotation(d, 101).update(category_id=99), "annotation id 101 has category_id 99, not among"),
        (lambda d: annotation(d, 201).update(image_id=77), "annotation id 201 refers to image id 77"),
        (lambda d: annotation(d, 102).update(bbox=[1, 2, 3]), "annotation id 102 has bbox"),
        (lambda d: annotation(d, 102).update(bbox=[1, 2, float("nan"), 3]), "annotation id 102 has bbox"),
        (lambda d: annotation(d, 102).pop("segmentation"), "annotation id 102 has no 'segmentation'"),
        (lambda d: annotation(d, 102).pop("iscrowd"), "annotation id 102 has no 'iscrowd'"),
        (lambda d: annotation(d, 101).update(iscrowd=2), "annotation id 101 needs 'iscrowd' 0 or 1"),
        (lambda d: annotation(d, 101).update(segmentation=[[1, 2, "x", 4, 5, 6]]), "annotation id 101: a polygon"),
        (lambda d: annotation(d, 101).update(segmentation="a mask"), "annotation id 101: segmentation must be"),
        (lambda d: annotation(d, 201)["segmentation"].update(size=[H, W + 1]), "annotation id 201: RLE size"),
        (lambda d: annotation(d, 201)["segmentation"]["counts"].append(5), "annotation id 201: uncompressed RLE"),
        (lambda d: annotation(d, 301)["segmentation"].update(counts=7), "annotation id 301: RLE counts"),
        (lambda d: d["annotations"].append(copy.deepcopy(annotation(d, 201))), "annotation id 201 is repeated"),
        (lambda d: d["annotations"].append({"image_id": 1}), "annotation #5 has no integer 'id'"),
        (lambda d: d["categories"].append({"id": 3, "name": "again"}), "category id 3 is repeated"),
        (lambda d: d["categories"].append({"name": "no id"}), "category #3 needs an integer 'id'"),
        (lambda d: d["images"][1].pop("height"), "image #1 needs"),
        (lambda d: d["images"].append(dict(d["images"][0])), "image id 1 is repeated"),
        (lambda d: d.pop("categories"), "needs a JSON object with lists 'images' and 'categories'"),
        (lambda d: d.update(categories=[]), "'categories' is empty: a data set needs at least one category"),
        (lambda d: d.update(images=[], annotations=[]), "'images' is empty"),
        (lambda d: annotation(d, 101).update(id=0), "annotation id 0: COCO's evaluation reads id 0 as 'no match'"),
        (lambda d: annotation(d, 101).update(segmentation=[2, 2, 12, 2, 12, 10]), "annotation id 101: .*one flat list"),
        (lambda d: annotation(d, 301)["segmentation"].update(counts=OTHER_SIZE),
         r"annotation id 301: compressed RLE counts cover 100 pixels, but its size \[20, 30\] has 600"),
        (lambda d: annotation(d, 301)["segmentation"].update(counts=TOO_LARGE), "annotation id 301: .*cover 1200 pixels"),
        (lambda d: annotation(d, 301)["segmentation"].update(counts="garbage!!"),
         "annotation id 301: RLE counts 'garbage!!' are not a compressed COCO RLE"),
        (lambda d: annotation(d, 301)["segmentation"].update(counts=compressed(COMPRESSED_MASK) + "o"),
         "annotation id 301: .* are not a compressed COCO RLE"),  # 'o' says another character follows: none does
        (lambda d: annotation(d, 301)["segmentation"].update(counts="été"), "annotation id 301: .* not a compressed"),
        (lambda d: annotation(d, 301)["segmentation"].update(counts=NEGATIVE_RUN), "annotation id 301: .* not a compressed"),
    ],
)
def test_broken_annotation_file_names_file_and_entry(tmp_path, edit, message):
    with pytest.raises(DatasetError, match=message) as error:
        break_with(tmp_path, edit)
    assert "instances_tiny.json" in str(error.value)
    assert isinstance(error.value, ValueError)


def test_malformed_or_missing_json(tmp_path):
    images, annotation_file = write_dataset(tmp_path)
    annotation_file.write_text('{"images": [}')
    with pytest.raises(DatasetError, match=r"instances_tiny.json is not valid JSON: .*line 1 column 13"):
        CocoDataset(images, annotation_file)
    with pytest.raises(DatasetError, match="nowhere.json does not exist"):
        CocoDataset(images, tmp_path / "nowhere.json")
    with pytest.raises(DatasetError, match="image folder .*missing"):
        CocoDataset(tmp_path / "missing", write_dataset(tmp_path / "other")[1])


def test_missing_or_unreadable_image_is_named_before_training(tmp_path):
    images, annotation_file = write_dataset(tmp_path)
    (images / "gray.png").unlink()
    with pytest.raises(DatasetError, match=r"image file .*gray.png \(image id 2 of .*instances_tiny.json\) does not exist"):
        CocoDataset(images, annotation_file)
    (images / "gray.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match=r"image file .*gray.png \(image id 2\) cannot be read"):
        CocoDataset(images, annotation_file)
    dataset = CocoDataset(images, annotation_file, verify_images=False)  # found when the image is read
    with pytest.raises(DatasetError, match=r"gray.png \(image id 2\) cannot be read"):
        dataset[1]
    Image.fromarray(np.zeros((H + 1, W, 3), dtype=np.uint8)).save(images / "gray.png")
    with pytest.raises(DatasetError, match=r"gray.png \(image id 2\) is 30x21 .* says 30x20"):
        CocoDataset(images, annotation_file)


def test_degenerate_boxes_are_skipped_and_counted_once(tmp_path):
    def flatten(data):
        annotation(data, 101)["bbox"] = [2, 2, 0, 8]  # no width
        annotation(data, 201)["bbox"] = [5, 3, 15, -6]  # negative height
        annotation(data, 103)["bbox"] = [0, 0, 0, 0]  # a crowd: never a target, not counted

    with pytest.warns(UserWarning) as record:
        dataset = break_with(tmp_path, flatten)
    assert len(skip_warnings(record)) == 1
    message = skip_warnings(record)[0]
    assert "instances_tiny.json: skipped 2 of 5 annotations: 2 with a box of no width or height" in message
    assert "(ids 101, 201)" in message
    assert dataset[0][1]["labels"].tolist() == [3] and len(dataset[1][1]["labels"]) == 0


def test_box_outside_the_image_is_skipped_and_a_straddling_one_clipped(tmp_path):
    def move(data):
        annotation(data, 101)["bbox"] = [40, 2, 10, 8]  # entirely right of the 30-pixel-wide image
        annotation(data, 102)["bbox"] = [20, -5, 20, 12]  # straddles two borders

    with pytest.warns(UserWarning, match=r"1 with a box of no width .*\(ids 101\)"):
        dataset = break_with(tmp_path, move)
    assert dataset[0][1]["boxes"].tolist() == [[20, 0, 30, 7]]


def test_empty_short_or_outside_polygons_are_skipped_and_counted(tmp_path):
    def spoil(data):
        annotation(data, 101)["segmentation"] = []  # empty
        annotation(data, 102)["segmentation"] = [[1, 2, 3, 4], []]  # only 2 points, and nothing
        annotation(data, 201)["segmentation"] = [[100, 100, 120, 100, 120, 110]]  # outside the image

    with pytest.warns(UserWarning) as record:
        dataset = break_with(tmp_path, spoil)
    assert len(skip_warnings(record)) == 1
    assert "skipped 3 of 5 annotations: 3 with no polygon of 3+ points inside the image (ids 101, 102, 201)" in (
        skip_warnings(record)[0]
    )
    assert len(dataset[0][1]["labels"]) == 0 and len(dataset[1][1]["labels"]) == 0


def renumber_categories(data):
    """The tiny file with its categories 3, 7, 11 numbered 1, 2, 3."""
    new_id = {3: 1, 7: 2, 11: 3}
    for item in data["categories"] + data["annotations"]:
        key = "id" if "name" in item else "category_id"
        item[key] = new_id[item[key]]


def test_good_file_gives_no_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CocoDataset(*write_dataset(tmp_path, renumber_categories))


def test_category_ids_other_than_1_to_k_are_mapped_and_said_so_once(tmp_path):
    with pytest.warns(UserWarning) as record:
        dataset = CocoDataset(*write_dataset(tmp_path))
    assert len(record) == 1
    assert "instances_tiny.json: the category ids (3, 7, 11) are not 1..3; the model's labels 1..3 stand for them" in (
        str(record[0].message)
    )
    assert dataset.label_to_category_id == {1: 3, 2: 7, 3: 11}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CocoDataset(*write_dataset(tmp_path), contiguous_labels=False)  # the labels are the ids: nothing mapped
        many = CocoDataset(*write_dataset(tmp_path / "many", renumber_categories))
    assert many.label_to_category_id == {1: 1, 2: 2, 3: 3}


def test_annotation_file_with_a_byte_order_mark_is_read(tmp_path):
    images, annotation_file = write_dataset(tmp_path)
    annotation_file.write_text("\ufeff" + annotation_file.read_text(), encoding="utf-8")  # as Windows tools write
    assert len(CocoDataset(images, annotation_file)) == 4


def test_training_set_with_nothing_to_train_on_is_refused(tmp_path):
    def crowds_only(data):
        for item in data["annotations"]:
            item["iscrowd"] = 1

    images, annotation_file = write_dataset(tmp_path, crowds_only)
    assert len(CocoDataset(images, annotation_file)) == 4  # to evaluate on: fine
    with pytest.raises(DatasetError, match="instances_tiny.json: none of its 4 images has an object to train on"):
        CocoDataset(images, annotation_file, remove_images_without_annotations=True)


@pytest.mark.parametrize("height, width", [(20, 30), (1, 1), (7, 1), (257, 131), (1200, 900)])
def test_run_lengths_of_compressed_rle_are_those_pycocotools_decodes(height, width):
    """Random masks (blobs and noise, so runs long and short, rising and falling: positive and negative
    differences, numbers of one to five characters), against the run lengths of the decoded mask."""
    rng = np.random.default_rng(height * width)
    for density in (0.0, 0.02, 0.5, 0.98, 1.0):
        mask = (rng.random((height, width)) < density).astype(np.uint8)
        mask[: height // 2, : width // 3] = 1
        counts = compressed(mask)
        decoded = mask_utils.decode({"size": [height, width], "counts": counts})
        assert rle_run_lengths(counts) == uncompressed_rle(decoded)["counts"]


@pytest.mark.torchvision
def test_flip_agrees_with_torchvision(tiny):
    pytest.importorskip("torchvision")
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as F

    image, target = CocoDataset(*tiny)[0]
    flipped_image, flipped = horizontal_flip(image, target)
    boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(H, W))
    assert torch.equal(F.horizontal_flip(boxes), flipped["boxes"])
    assert torch.equal(F.horizontal_flip(tv_tensors.Mask(target["masks"])), flipped["masks"])
    assert torch.equal(F.horizontal_flip(tv_tensors.Image(image)), flipped_image)
