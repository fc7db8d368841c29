"""A synthetic instance-segmentation data set: coloured shapes on textured backgrounds.

The real experiments of the paper (section 4) use COCO, which takes GPUs and days. To see the
whole method train, evaluate and predict on a laptop, this module draws a small data set with
the same difficulties in miniature: several instances per image, of 4 classes (circle, square,
triangle, star), of varied size, colour and rotation, that overlap and occlude each other, on a
textured background (a colour gradient, smooth noise and sometimes stripes).

Occlusion. Shapes are painted in order, so shape j hides the parts of every earlier shape i < j
that it covers. The ground-truth mask of an instance is its *visible* region,

    visible_i = full_i AND NOT (full_{i+1} OR ... OR full_{G})

A new shape is only accepted where it leaves every earlier instance with at least
`min_visible_fraction` of its own area (and `min_visible_pixels`) visible; otherwise another
placement is tried, and after a few tries the shape is left out. Every painted pixel of a shape
therefore belongs to a labelled instance: nothing in the picture is an unlabelled object.

Determinism. Image `index` of split `split` with seed `seed` draws all its randomness from
`numpy.random.default_rng((seed, split_number, index))`, so it is the same image whatever the
number of images generated and in whatever order.

`generate_shapes` writes the standard COCO layout (PNG images, instances JSON with RLE masks), so
the same `CocoDataset` and pycocotools evaluation serve this data set and COCO itself.
`render_image` and `ShapesDataset` are the in-memory path that tests use.

Shapes: H x W image, G instances.
"""

from __future__ import annotations

import colorsys
import json
import multiprocessing
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from mrcnn.data.images import image_to_tensor

CATEGORY_NAMES = ("circle", "square", "triangle", "star")
SPLITS = ("train", "val")  # the position is the split's number in the random seed
MANIFEST_NAME = "shapes.json"  # the settings of the data set drawn in a folder
IMAGE_NAME = re.compile(r"\d{6}\.png")  # the images' names: 000000.png, 000001.png, ...


def _check_size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    low, high = (image_size, image_size) if isinstance(image_size, int) else image_size
    if not (32 <= low <= high):
        raise ValueError(f"image_size must be an int >= 32 or a range (low, high), 32 <= low <= high; got {image_size}")
    return int(low), int(high)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled Gaussian noise on a (cells + 1)^2 grid: a float32 [3, H, W] field."""
    grid = rng.standard_normal(size=(3, cells + 1, cells + 1), dtype=np.float32)
    y = np.linspace(0, cells, height, dtype=np.float32)
    x = np.linspace(0, cells, width, dtype=np.float32)
    y0 = np.minimum(y.astype(np.int64), cells - 1)  # [H]
    x0 = np.minimum(x.astype(np.int64), cells - 1)  # [W]
    fy = (y - y0.astype(np.float32))[None, :, None]  # [1, H, 1]
    fx = (x - x0.astype(np.float32))[None, None, :]  # [1, 1, W]
    rows = grid[:, :, x0] * (1 - fx) + grid[:, :, x0 + 1] * fx  # along x first: [3, cells + 1, W]
    return rows[:, y0] * (1 - fy) + rows[:, y0 + 1] * fy  # then along y: [3, H, W]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A muted (low saturation) textured background, float32 [3, H, W] in about [0, 1]."""
    base = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.3, 0.75)))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) / max(height, width)  # [H, W] each
    angle = rng.uniform(0, 2 * np.pi)
    ramp = xx * np.float32(np.cos(angle)) + yy * np.float32(np.sin(angle))  # [H, W]
    texture = np.float32(rng.uniform(-0.2, 0.2)) * (ramp - ramp.mean())  # a gradient, [H, W]
    if rng.random() < 0.5:  # stripes of period 6..20 px at a random angle
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 20)
        across = xx * np.float32(np.cos(angle)) + yy * np.float32(np.sin(angle))  # [H, W]
        phase = across * np.float32(max(height, width) / period)
        texture += np.float32(rng.uniform(0.03, 0.08)) * np.sin(np.float32(2 * np.pi) * phase)
    blotches = np.float32(0.06) * _smooth_noise(rng, height, width, cells=int(rng.integers(2, 7)))  # [3, H, W]
    return base.astype(np.float32)[:, None, None] + texture[None] + blotches


def _outline(label: int, centre: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """The polygon of a shape of circumradius `radius`: float [V, 2] of (x, y) vertices."""
    name = CATEGORY_NAMES[label - 1]
    if name == "circle":
        theta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        radii = np.full(48, radius)
    elif name == "star":  # 5 points; inner radius 0.45 of the outer one
        theta = np.linspace(0, 2 * np.pi, 10, endpoint=False)
        radii = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
    else:
        corners = 4 if name == "square" else 3
        theta = np.linspace(0, 2 * np.pi, corners, endpoint=False)
        radii = np.full(corners, radius)
    theta = theta + angle
    return centre + radii[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)  # [V, 2]


def _rasterize(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in polygon.tolist()], fill=1)
    return np.asarray(canvas, dtype=bool)


def render_image(
    index: int,
    seed: int = 0,
    split: str = "train",
    image_size: int | tuple[int, int] = 128,
    min_objects: int = 1,
    max_objects: int = 4,
    object_size: tuple[int, int] = (16, 56),
    min_visible_fraction: float = 0.5,
    min_visible_pixels: int = 64,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw image `index` of the synthetic data set.

    image_size: the side of a square image, or a range (low, high) from which height and width
    are drawn. object_size: the range of a shape's circumscribed diameter, in pixels.
    Returns `image` uint8 [H, W, 3], `masks` uint8 [G, H, W] (visible parts, 0/1) and `labels`
    int64 [G] in 1..4 (the position in `CATEGORY_NAMES` plus one), in painting order.
    """
    low, high = _check_size(image_size)
    if not (1 <= min_objects <= max_objects):
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if not (4 <= object_size[0] <= object_size[1] <= low):
        raise ValueError(f"object_size must be a range (low, high) within [4, {low}], got {object_size}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng((seed, SPLITS.index(split), index))
    height, width = (int(rng.integers(low, high + 1)) for _ in range(2))
    image = _background(rng, height, width)

    full_masks: list[np.ndarray] = []  # each shape's whole region, bool [H, W]
    visible: list[np.ndarray] = []  # what is left of it after the later shapes, bool [H, W]
    labels: list[int] = []
    hues: list[float] = []
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        for _attempt in range(20):
            label = int(rng.integers(1, len(CATEGORY_NAMES) + 1))
            radius = rng.uniform(*object_size) / 2
            centre = np.array([rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)])
            full = _rasterize(_outline(label, centre, radius, rng.uniform(0, 2 * np.pi)), height, width)
            still_visible = [v & ~full for v in visible]
            if all(
                s.sum() >= max(min_visible_fraction * f.sum(), min_visible_pixels)
                for s, f in zip(still_visible, full_masks)
            ) and full.sum() >= min_visible_pixels:
                break
        else:
            continue  # no placement left the others visible enough: leave this shape out
        # a saturated colour whose hue differs from the other shapes', so touching shapes separate
        hue, gap = rng.random(), min(0.12, 0.45 / max_objects)  # the gaps cover at most 90% of hues
        while any(min(abs(hue - h), 1 - abs(hue - h)) < gap for h in hues):
            hue = rng.random()
        colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.65, 1.0)))
        shade_angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.nonzero(full)
        shade = ((xx - centre[0]) * np.cos(shade_angle) + (yy - centre[1]) * np.sin(shade_angle)) / radius
        image[:, yy, xx] = colour[:, None] * (1 + 0.12 * shade[None])  # a little lighting across it
        visible = still_visible + [full]
        full_masks.append(full)
        labels.append(label)
        hues.append(hue)

    image += np.float32(0.015) * rng.standard_normal(size=image.shape, dtype=np.float32)  # sensor noise
    image = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0).copy()  # [H, W, 3]
    masks = np.stack(visible).astype(np.uint8) if visible else np.zeros((0, height, width), np.uint8)
    return image, masks, np.array(labels, dtype=np.int64)


@dataclass(frozen=True)
class ShapesPaths:
    """Where `generate_shapes` put the data set: image folders and COCO annotation files."""

    root: Path
    train_images: Path
    train_annotations: Path
    val_images: Path
    val_annotations: Path


def _draw_and_save(job: tuple) -> tuple[dict, list[dict]]:
    """Draw one image, save it as PNG, and return its COCO image record and annotations."""
    index, seed, split, image_dir, draw = job
    image, masks, labels = render_image(index, seed, split, **draw)
    file_name = f"{index:06d}.png"  # IMAGE_NAME
    Image.fromarray(image).save(Path(image_dir) / file_name, compress_level=0)  # stored: fastest to write and read
    record = {"id": index + 1, "file_name": file_name, "height": image.shape[0], "width": image.shape[1]}
    annotations = []
    for mask, label in zip(masks, labels):
        rle = mask_utils.encode(np.asfortranarray(mask))  # column-major, as COCO stores masks
        annotations.append(
            {
                "image_id": index + 1,
                "category_id": int(label),
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                "area": float(mask_utils.area(rle)),
                "bbox": mask_utils.toBbox(rle).tolist(),  # [x, y, w, h] of the visible pixels
                "iscrowd": 0,
            }
        )
    return record, annotations


def _coco_file(split: str, count: int, seed: int, image_dir: Path, workers: int, draw: dict) -> dict:
    jobs = [(index, seed, split, str(image_dir), draw) for index in range(count)]
    if workers > 1 and count >= 64:
        with multiprocessing.get_context("spawn" if sys.platform != "linux" else "fork").Pool(workers) as pool:
            drawn = pool.map(_draw_and_save, jobs, chunksize=32)  # in index order, whatever the pool does
    else:
        drawn = [_draw_and_save(job) for job in jobs]
    images, annotations = [], []
    for record, image_annotations in drawn:
        images.append(record)
        for annotation in image_annotations:
            annotations.append({"id": len(annotations) + 1, **annotation})  # COCOeval reads id 0 as "unmatched"
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CATEGORY_NAMES)]
    return {
        "info": {"description": f"mrcnn synthetic shapes, split {split}, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def _read_manifest(root: Path) -> dict | None:
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and {"num_train", "num_val", "seed"} <= set(manifest) else None


def foreign_files(root: str | os.PathLike) -> list[Path]:
    """The files under `root` that `generate_shapes` did not write: all of them, unless its manifest
    (`shapes.json`) is there; then all but the manifest, the annotation files and the images."""
    root = Path(root)
    files = sorted(path for path in root.rglob("*") if not path.is_dir()) if root.is_dir() else []
    if _read_manifest(root) is None:
        return files
    ours = {root / MANIFEST_NAME} | {root / "annotations" / f"instances_{split}.json" for split in SPLITS}
    return [path for path in files if path not in ours
            and not (path.parent in (root / split for split in SPLITS) and IMAGE_NAME.fullmatch(path.name))]  # fmt: skip


def generate_shapes(
    root: str | os.PathLike,
    num_train: int = 1000,
    num_val: int = 100,
    image_size: int | tuple[int, int] = 128,
    seed: int = 0,
    min_objects: int = 1,
    max_objects: int = 4,
    object_size: tuple[int, int] = (16, 56),
    overwrite: bool = False,
    workers: int | None = None,
) -> ShapesPaths:
    """Write the synthetic data set in COCO layout under `root` and return its paths.

    Layout: `root/train/*.png`, `root/val/*.png`, `root/annotations/instances_{train,val}.json`
    (RLE masks of the visible region, box [x, y, w, h] of the visible pixels, category ids 1..4).
    `root/shapes.json` records the settings; when it matches, the data set is already there and
    nothing is redrawn (pass `overwrite=True` to redraw anyway). A data set drawn here before with
    other settings is redrawn; any other file under `root` (`foreign_files`) is a
    `FileExistsError`, before anything is written, unless `overwrite=True`, which deletes the PNG
    images of `root/train` and `root/val` and replaces the annotation files. `workers` processes
    draw the images (default: up to 4, one per CPU core); the files are the same for any number.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train}, {num_val}")
    draw = {"image_size": image_size, "min_objects": min_objects, "max_objects": max_objects, "object_size": object_size}
    render_image(0, seed, "train", **draw)  # checks the settings before anything is written
    root = Path(root)
    paths = ShapesPaths(
        root, root / "train", root / "annotations" / "instances_train.json",
        root / "val", root / "annotations" / "instances_val.json",
    )  # fmt: skip
    settings = {"num_train": num_train, "num_val": num_val, "seed": seed, **draw}
    settings["image_size"], settings["object_size"] = list(_check_size(image_size)), list(object_size)  # as JSON reads
    manifest = root / MANIFEST_NAME
    if not overwrite and _read_manifest(root) == settings:
        if all(p.exists() for p in (paths.train_annotations, paths.val_annotations)):
            return paths
    others = [] if overwrite else foreign_files(root)
    if others:
        raise FileExistsError(f"{root} holds {len(others)} files that generate_shapes did not write (e.g. "
                              f"{others[0].relative_to(root)}); overwrite=True replaces its images and annotations")  # fmt: skip
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({**settings, "complete": False}))  # the folder is ours, even if drawing stops half-way
    for split, count, image_dir, annotation_file in (
        ("train", num_train, paths.train_images, paths.train_annotations),
        ("val", num_val, paths.val_images, paths.val_annotations),
    ):
        image_dir.mkdir(exist_ok=True)
        for old in image_dir.glob("*.png"):  # a smaller data set must not keep stale images
            old.unlink()
        workers = min(4, os.cpu_count() or 1) if workers is None else workers
        annotation_file.write_text(json.dumps(_coco_file(split, count, seed, image_dir, workers, draw)))
    manifest.write_text(json.dumps(settings))
    return paths


class ShapesDataset(torch.utils.data.Dataset):
    """The synthetic images drawn in memory, in the model's input format (no files).

    `dataset[i]` is `(image, target)`: image float32 [3, H, W] in [0, 1]; target
    {"boxes": float32 [G, 4] (x1, y1, x2, y2), "labels": int64 [G], "masks": uint8 [G, H, W],
    "image_id": i + 1}, the same as `CocoDataset` gives for the files `generate_shapes` writes.
    """

    num_classes = len(CATEGORY_NAMES) + 1  # K, with the background
    category_names = ("__background__",) + CATEGORY_NAMES
    label_to_category_id = {label: label for label in range(1, len(CATEGORY_NAMES) + 1)}  # as the files say

    def __init__(self, num_images: int, seed: int = 0, split: str = "train", **draw):
        render_image(0, seed, split, **draw)  # checks the settings now
        self.num_images, self.seed, self.split, self.draw = num_images, seed, split, draw

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        image, masks, labels = render_image(index, self.seed, self.split, **self.draw)
        return image_to_tensor(image), {
            "boxes": masks_to_boxes(masks),
            "labels": torch.from_numpy(labels),
            "masks": torch.from_numpy(masks),
            "image_id": index + 1,
        }


def masks_to_boxes(masks: np.ndarray) -> torch.Tensor:
    """The tight box (x1, y1, x2, y2) of each mask, float32 [G, 4]; a pixel spans [x, x + 1).

    This matches COCO's `toBbox` of the mask's RLE turned into corners, so in-memory and on-disk
    targets agree.
    """
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for g, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        if len(xs):
            boxes[g] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return torch.from_numpy(boxes)
