"""Read a COCO-format instance-segmentation data set into the model's input format.

The paper trains and evaluates on COCO (section 4): `train2017` (the old `trainval35k`) for
training, `val2017` (`minival`) for the ablations. One annotation is one object: a category, a
box `[x, y, w, h]`, a mask (polygons, or run-length encoded), and `iscrowd`. A crowd region
(iscrowd=1) covers a group of objects too dense to outline one by one; as in the reference
implementations (torchvision's `ConvertCocoPolysToMask`, detectron2's `DatasetMapper`) crowds are
left out of the training targets, and COCOeval treats them as "ignore" regions when scoring.

    dataset[i] -> image float32 [3, H, W] in [0, 1],
                  target {"boxes": float32 [G, 4] (x1, y1, x2, y2), "labels": int64 [G] in [1, K),
                          "masks": uint8 [G, H, W], "image_id": int, "iscrowd": int64 [G] (zeros),
                          "area": float32 [G]}

Category ids of COCO run 1..90 with gaps; labels are contiguous, 1..K-1 in the order of the
category ids, with 0 the background (`label_to_category_id` maps back for evaluation), and a
warning says so once when the ids are not 1..K-1 already. With `contiguous_labels=False` the
label is the category id itself, as torchvision's COCO models use (K = 91).

The whole annotation file is checked when the data set is built (down to the run lengths of
every compressed RLE, which must cover the image), and then every image is decoded
(`verify_images`), so a broken file fails at once with a `DatasetError` naming the file and
the annotation or image, never hours into training.
Where the reference implementations skip an annotation instead, this one does too, and warns
once with the count: a box with no width or height inside the image (torchvision keeps only
x2 > x1 and y2 > y1 after clipping), a polygon mask with no polygon of at least 3 points inside
the image (detectron2 drops polygons of fewer than 3 points).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mrcnn.data.flip import horizontal_flip
from mrcnn.data.images import ImageReadError, image_to_tensor, load_rgb


class DatasetError(ValueError):
    """A data set file that cannot be used; the message names the file and the entry."""


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _finite_numbers(values: list) -> bool:
    """All entries are finite numbers (one C-speed sum: a string or None raises, NaN/inf propagate)."""
    try:
        return math.isfinite(sum(values))
    except TypeError:
        return False


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_annotation_file(annotation_file: str | os.PathLike) -> dict:
    """Parse a COCO annotation file; a `DatasetError` names the file if it is missing or malformed."""
    path = Path(annotation_file)
    if not path.is_file():
        raise DatasetError(f"annotation file {path} does not exist")
    try:
        with open(path, encoding="utf-8-sig") as f:  # with or without the byte-order mark Windows tools write
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"annotation file {path} is not valid JSON: {error}") from error
    if not isinstance(data, dict) or not all(isinstance(data.get(key), list) for key in ("images", "categories")):
        raise DatasetError(f"annotation file {path} needs a JSON object with lists 'images' and 'categories'")
    if not isinstance(data.setdefault("annotations", []), list):
        raise DatasetError(f"annotation file {path}: 'annotations' must be a list")
    return data


def rle_run_lengths(counts: str) -> list[int] | None:
    """The run lengths of a compressed COCO RLE string, or None if the string is not one.

    COCO writes each run as a number in 5-bit groups, least significant first, one character
    (48 + group) each: 0x20 in a group says another follows, 0x10 in the last is the sign. From
    the fourth run on, the number is the difference to the run two before (pycocotools'
    `rleFrString`, read here without decoding a pixel, so that a string made for another image
    size, or no RLE at all, is caught before `decode` fills a mask from the wrong number of runs).
    """
    if not counts.isascii():
        return None
    runs, value, shift = [], 0, 0
    for character in counts.encode("ascii"):
        group = character - 48
        if not 0 <= group < 64 or shift > 25:  # a character COCO never writes; a number past 30 bits
            return None
        value |= (group & 0x1F) << shift
        shift += 5
        if group & 0x20:
            continue
        if group & 0x10:
            value -= 1 << shift  # negative: sign-extend
        runs.append(value + runs[-2] if len(runs) > 2 else value)
        value, shift = 0, 0
    return runs if shift == 0 else None  # a last number cut off


def segmentation_to_mask(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """Rasterize a COCO segmentation to a uint8 [H, W] mask of 0/1.

    Polygons (a list of [x0, y0, x1, y1, ...] in pixel coordinates) are filled and united;
    an RLE is a dict {"size": [H, W], "counts": ...}, with counts a list of run lengths
    (uncompressed) or COCO's compressed string.
    """
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    with warnings.catch_warnings():  # pycocotools under numpy 2 warns about its own __array__
        warnings.filterwarnings("ignore", "__array__ implementation doesn't accept a copy", DeprecationWarning)
        return mask_utils.decode(rle)


class CocoDataset(torch.utils.data.Dataset):
    """A COCO-format data set: images in `image_dir`, annotations in `annotation_file`.

    train: flip each image horizontally with probability 1/2 (the one augmentation of Detectron's
        and torchvision's Mask R-CNN training recipes), drawn from torch's random generator, so
        `torch.manual_seed` (and the DataLoader's per-worker seeds) make it reproducible.
    remove_images_without_annotations: leave out the images with no training target (no
        annotation, or only crowds and skipped ones), as the reference implementations do for
        training.
    contiguous_labels: labels 1..K-1 in category-id order (default), or the category ids.
    verify_images: decode every image now, as training will read it, to check that it is whole,
        readable and of the size the file says (0.2 ms for a 128 x 128 PNG, a few ms for a COCO
        JPEG: minutes for COCO train2017 on a few cores). With False, a broken image is found when
        it is read, as a `DatasetError` naming it (the trainer then stops, keeping its steps).
    Attributes: `coco` (the pycocotools index of the whole file, for evaluation), `image_ids`,
    `num_classes` (K, with the background), `category_names` (indexed by label),
    `label_to_category_id` and `category_id_to_label` (dicts).
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        annotation_file: str | os.PathLike,
        train: bool = False,
        remove_images_without_annotations: bool = False,
        contiguous_labels: bool = True,
        verify_images: bool = True,
    ):
        self.image_dir, self.annotation_file, self.train = Path(image_dir), Path(annotation_file), train
        data = load_annotation_file(self.annotation_file)
        category_names = self._read_categories(data["categories"])
        category_ids = sorted(category_names)
        if contiguous_labels:
            self.label_to_category_id = {label: c for label, c in enumerate(category_ids, start=1)}
            if category_ids != list(range(1, len(category_ids) + 1)):
                shown = ", ".join(map(str, category_ids[:10])) + (", ..." if len(category_ids) > 10 else "")
                warnings.warn(f"{self.annotation_file}: the category ids ({shown}) are not 1..{len(category_ids)}; "
                              f"the model's labels 1..{len(category_ids)} stand for them in this order (checkpoints "
                              "keep the mapping, and evaluation reports category ids)")  # fmt: skip
        else:
            self.label_to_category_id = {c: c for c in category_ids}
        self.category_id_to_label = {c: label for label, c in self.label_to_category_id.items()}
        self.num_classes = max(self.label_to_category_id, default=0) + 1
        self.category_names = ["__background__"] + ["N/A"] * (self.num_classes - 1)
        for label, c in self.label_to_category_id.items():
            self.category_names[label] = category_names[c]
        self.images = self._read_images(data["images"])
        self.targets = self._read_annotations(data["annotations"])  # image id -> [(label, box, segmentation, area)]
        self.image_ids = sorted(self.images)
        if remove_images_without_annotations:
            self.image_ids = [i for i in self.image_ids if self.targets[i]]
            if not self.image_ids:
                raise self._error(f"none of its {len(self.images)} images has an object to train on (an annotation "
                                  "that is not a crowd, with a box and a mask inside the image)")  # fmt: skip
        if verify_images:  # last: the slow check, once the file itself is known to be good
            self._verify_pictures([self.images[i] for i in self.image_ids])
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints while it indexes
            self.coco.createIndex()

    def _error(self, message: str) -> DatasetError:
        return DatasetError(f"annotation file {self.annotation_file}: {message}")

    def _read_categories(self, categories: list) -> dict[int, str]:
        if not categories:
            raise self._error("'categories' is empty: a data set needs at least one category to detect")
        names: dict[int, str] = {}
        for position, category in enumerate(categories):
            fields = category if isinstance(category, dict) else {}
            if not _integer(fields.get("id")) or not isinstance(fields.get("name"), str):
                raise self._error(f"category #{position} needs an integer 'id' and a string 'name', got {category!r}")
            if category["id"] in names or category["id"] <= 0:
                raise self._error(f"category id {category['id']} is repeated or not positive (0 is the background)")
            names[category["id"]] = category["name"]
        return names

    def _read_images(self, images: list) -> dict[int, dict]:
        if not self.image_dir.is_dir():
            raise DatasetError(f"image folder {self.image_dir} (for {self.annotation_file}) does not exist")
        if not images:
            raise self._error("'images' is empty: there is nothing to train on or to score")
        records: dict[int, dict] = {}
        for position, image in enumerate(images):
            named = isinstance(image, dict) and _integer(image.get("id")) and isinstance(image.get("file_name"), str)
            if not named or not all(_integer(image.get(k)) and image[k] > 0 for k in ("height", "width")):
                raise self._error(f"image #{position} needs an integer 'id', a 'file_name', and positive integers "
                                  "'height' and 'width'")  # fmt: skip
            if image["id"] in records:
                raise self._error(f"image id {image['id']} is repeated")
            path = self.image_dir / image["file_name"]
            if not path.is_file():
                where = f"image id {image['id']} of {self.annotation_file}"
                raise DatasetError(f"image file {path} ({where}) does not exist")
            records[image["id"]] = image
        return records

    def _verify_pictures(self, images: list[dict]) -> None:
        """Decode every image as training will (`_read_picture`), a few at a time; the first broken one,
        in the file's order, is the `DatasetError`. Pillow decodes without Python's lock, so threads help."""
        pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
        try:
            for _ in pool.map(self._read_picture, images):
                pass
        finally:
            pool.shutdown(cancel_futures=True)  # after an error, decode no more

    def _read_picture(self, image: dict) -> np.ndarray:
        """The pixels of an image record as RGB [H, W, 3] (`load_rgb`), checked against the record's size."""
        path = self.image_dir / image["file_name"]
        try:
            rgb, _ = load_rgb(path)
        except ImageReadError as error:
            raise DatasetError(f"image file {path} (image id {image['id']}) cannot be read: {error}") from None
        height, width = rgb.shape[:2]
        if (width, height) != (image["width"], image["height"]):
            raise DatasetError(
                f"image file {path} (image id {image['id']}) is {width}x{height} (width x height) "
                f"but {self.annotation_file} says {image['width']}x{image['height']}"
            )
        return rgb

    def _read_annotations(self, annotations: list) -> dict[int, list]:
        targets: dict[int, list] = {image_id: [] for image_id in self.images}
        no_box, no_polygon = "a box of no width or height inside the image", "no polygon of 3+ points inside the image"
        skipped: dict[str, list] = {no_box: [], no_polygon: []}  # reason -> annotation ids
        seen: set[int] = set()
        for position, annotation in enumerate(annotations):
            if not isinstance(annotation, dict) or not _integer(annotation.get("id")):
                raise self._error(f"annotation #{position} has no integer 'id'")
            where = f"annotation id {annotation['id']}"
            if annotation["id"] in seen:
                raise self._error(f"{where} is repeated")
            if annotation["id"] == 0:  # COCOeval stores the id of a detection's match, 0 meaning none
                raise self._error(f"{where}: COCO's evaluation reads id 0 as 'no match'; number annotations from 1")
            seen.add(annotation["id"])
            for key in ("image_id", "category_id", "bbox", "segmentation", "iscrowd", "area"):
                if key not in annotation:
                    raise self._error(f"{where} has no '{key}'")
            image = self.images.get(annotation["image_id"]) if _integer(annotation["image_id"]) else None
            if image is None:
                raise self._error(f"{where} refers to image id {annotation['image_id']!r}, which is not in 'images'")
            if not _integer(annotation["category_id"]) or annotation["category_id"] not in self.category_id_to_label:
                raise self._error(
                    f"{where} has category_id {annotation['category_id']!r}, not among the file's categories "
                    f"{sorted(self.category_id_to_label)}"
                )
            if annotation["iscrowd"] not in (0, 1) or not _number(annotation["area"]):
                raise self._error(f"{where} needs 'iscrowd' 0 or 1 and a finite number 'area'")
            bbox = annotation["bbox"]
            if not isinstance(bbox, list) or len(bbox) != 4 or not _finite_numbers(bbox):
                raise self._error(f"{where} has bbox {bbox!r}; expected [x, y, width, height] of finite numbers")
            segmentation = self._check_segmentation(annotation["segmentation"], image, where)
            if annotation["iscrowd"]:
                continue  # crowds are ignore regions for COCOeval, never training targets
            width, height = image["width"], image["height"]
            x, y, w, h = bbox
            x1, x2 = min(max(x, 0), width), min(max(x + w, 0), width)  # clipped to the image, as torchvision does
            y1, y2 = min(max(y, 0), height), min(max(y + h, 0), height)
            box = [x1, y1, x2, y2]
            if not (x2 > x1 and y2 > y1):
                skipped[no_box].append(annotation["id"])
            elif not segmentation:
                skipped[no_polygon].append(annotation["id"])
            else:
                label = self.category_id_to_label[annotation["category_id"]]
                targets[image["id"]].append((label, box, segmentation, float(annotation["area"])))
        reasons = [f"{len(ids)} with {reason} (ids {', '.join(map(str, ids[:10]))}{', ...' if len(ids) > 10 else ''})"
                   for reason, ids in skipped.items() if ids]  # fmt: skip
        if reasons:
            total = sum(len(ids) for ids in skipped.values())
            summary = f"{self.annotation_file}: skipped {total} of {len(annotations)} annotations: "
            warnings.warn(summary + "; ".join(reasons))
        return targets

    def _check_segmentation(self, segmentation, image: dict, where: str) -> list | dict:
        """The usable part of a segmentation: the polygons worth filling (maybe none), or the RLE."""
        height, width = image["height"], image["width"]
        if isinstance(segmentation, dict):
            size, counts = segmentation.get("size"), segmentation.get("counts")
            if size != [height, width]:
                raise self._error(f"{where}: RLE size {size!r} is not the image's [height, width], [{height}, {width}]")
            if isinstance(counts, list):
                if not all(_integer(c) and c >= 0 for c in counts) or sum(counts) != height * width:
                    raise self._error(f"{where}: uncompressed RLE counts must be integers >= 0 summing to H*W")
            elif not isinstance(counts, str):
                raise self._error(f"{where}: RLE counts must be a list of integers or a compressed string")
            else:
                runs = rle_run_lengths(counts)
                if runs is None or min(runs, default=0) < 0:
                    raise self._error(f"{where}: RLE counts {counts[:20]!r}{'...' if len(counts) > 20 else ''} "
                                      "are not a compressed COCO RLE")  # fmt: skip
                if sum(runs) != height * width:
                    raise self._error(f"{where}: compressed RLE counts cover {sum(runs)} pixels, but its size "
                                      f"[{height}, {width}] has {height * width} (made for another image?)")  # fmt: skip
            return segmentation
        if not isinstance(segmentation, list) or not all(isinstance(p, list) for p in segmentation):
            kind = type(segmentation).__name__
            if isinstance(segmentation, list) and segmentation and _finite_numbers(segmentation):
                kind = "one flat list of numbers; a polygon goes in a list of its own, [[x0, y0, x1, y1, ...]]"
            raise self._error(f"{where}: segmentation must be a list of polygons or an RLE dict, got {kind}")
        polygons = []
        for polygon in segmentation:
            if not _finite_numbers(polygon):
                raise self._error(f"{where}: a polygon holds something other than finite numbers")
            if len(polygon) < 6 or len(polygon) % 2:
                continue  # fewer than 3 points: no area (detectron2 drops these too)
            xs, ys = polygon[0::2], polygon[1::2]
            if max(xs) > 0 and min(xs) < width and max(ys) > 0 and min(ys) < height:
                polygons.append(polygon)
        return polygons

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image_id = self.image_ids[index]
        record = self.images[image_id]
        height, width = record["height"], record["width"]
        image = image_to_tensor(self._read_picture(record))  # [3, H, W]
        objects = self.targets[image_id]
        masks = [segmentation_to_mask(segmentation, height, width) for _, _, segmentation, _ in objects]
        masks = np.stack(masks) if masks else np.zeros((0, height, width), dtype=np.uint8)  # [G, H, W]
        target = {
            "boxes": torch.tensor([box for _, box, _, _ in objects], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([label for label, _, _, _ in objects], dtype=torch.int64),
            "masks": torch.from_numpy(masks),
            "image_id": image_id,
            "iscrowd": torch.zeros(len(objects), dtype=torch.int64),
            "area": torch.tensor([area for _, _, _, area in objects], dtype=torch.float32),
        }
        if self.train and torch.rand(()) < 0.5:
            image, target = horizontal_flip(image, target)
        return image, target


def coco2017(root: str | os.PathLike, split: str = "val", **options) -> CocoDataset:
    """COCO 2017 in its standard layout: `root/{split}2017/*.jpg` and
    `root/annotations/instances_{split}2017.json`. `options` go to `CocoDataset`."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = Path(root)
    return CocoDataset(root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json", **options)


def collate(batch: list) -> tuple[list, list]:
    """Keep a batch as lists: images differ in size, and the model pads them itself."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
