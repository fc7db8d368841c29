r"""Keypoints in COCO format: a synthetic data set of stick figures and its reader (paper section 5).

**The figures.** COCO's person keypoints take GPUs and days; these stick figures take seconds.
Each has J = 11 keypoints (head, neck, elbows, hands, pelvis, knees, feet), joined by thick
limbs in one colour, in a random pose: arms raised or lowered, elbows and knees bent, the body
tilted by up to 20 degrees, 40 to 90 pixels tall, on the textured backgrounds of
mrcnn/data/shapes.py. "Left" is the figure's own left, drawn on the left of the picture as for a
person facing the camera; flipping an image swaps left and right (`FLIP_INDEX`, from
mrcnn/data/flip.py).

**Visibility**, as COCO: v = 2 visible, v = 1 labelled but hidden (here: covered by a figure
painted later), v = 0 not labelled (here: outside the image; stored as x = y = 0). Figures are
painted in order and a new one is only accepted where every earlier one keeps half of its area
visible, as in the shapes. Box and mask are those of the visible pixels, as COCO's.

**Sigmas.** COCO scores keypoints by the object keypoint similarity (OKS, mrcnn/evaluate.py),
which weighs each keypoint's error by a per-keypoint sigma. The figures' sigmas are COCO's for
the matching joint (`SIGMAS`); `COCO_PERSON_SIGMAS` are those of COCO's 17 person keypoints.

Determinism: image `index` of `split` with `seed` draws from `default_rng((seed, split_number,
index))`, as the shapes do. Shapes: H x W image, G figures, J keypoints.
"""

from __future__ import annotations

import colorsys
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from mrcnn.data.coco import CocoDataset, DatasetError, _finite_numbers
from mrcnn.data.flip import flip_index
from mrcnn.data.images import image_to_tensor
from mrcnn.data.shapes import SPLITS, _background, _check_size, masks_to_boxes

KEYPOINT_NAMES = ("head", "neck", "left_elbow", "right_elbow", "left_hand", "right_hand",
                  "pelvis", "left_knee", "right_knee", "left_foot", "right_foot")  # fmt: skip
SKELETON = ((1, 2), (2, 3), (2, 4), (3, 5), (4, 6), (2, 7), (7, 8), (7, 9), (8, 10), (9, 11))  # 1-based, as COCO
# COCO's sigma of the matching joint (shoulders for the head and neck, wrists for hands, hips, ankles)
SIGMAS = (0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.087, 0.087, 0.089, 0.089)
COCO_PERSON_SIGMAS = (0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062,
                      0.107, 0.107, 0.087, 0.087, 0.089, 0.089)  # fmt: skip
FLIP_INDEX = tuple(flip_index(KEYPOINT_NAMES))


def _pose(rng: np.random.Generator, height: float) -> np.ndarray:
    """The 11 joints of a figure `height` tall in its own frame (pelvis at 0, y down): float [J, 2]."""
    def limb(start, angle, length, side):  # angle from straight down, towards the figure's `side` (-1 left)
        return start + length * np.array([side * np.sin(angle), np.cos(angle)])

    pelvis = np.zeros(2)
    neck = np.array([rng.uniform(-0.05, 0.05) * height, -0.3 * height])
    head = neck + np.array([0.0, -0.11 * height])
    joints = {"head": head, "neck": neck, "pelvis": pelvis}
    for side, name in ((-1, "left"), (1, "right")):
        upper = np.radians(rng.uniform(30, 150))  # the arm, from hanging down (0) to raised (180)
        joints[f"{name}_elbow"] = limb(neck, upper, 0.17 * height, side)
        joints[f"{name}_hand"] = limb(joints[f"{name}_elbow"], upper + np.radians(rng.uniform(-45, 45)), 0.17 * height, side)
        thigh = np.radians(rng.uniform(5, 45))
        joints[f"{name}_knee"] = limb(pelvis, thigh, 0.25 * height, side)
        joints[f"{name}_foot"] = limb(joints[f"{name}_knee"], thigh + np.radians(rng.uniform(-np.degrees(thigh), 30)),
                                      0.25 * height, side)  # fmt: skip
    return np.stack([joints[name] for name in KEYPOINT_NAMES])


def _draw_figure(points: np.ndarray, height: float, size: tuple[int, int]) -> np.ndarray:
    """Rasterize the limbs (round-ended strokes) and the head disk: bool [H, W]."""
    canvas = Image.new("L", (size[1], size[0]), 0)
    draw = ImageDraw.Draw(canvas)
    width = max(3, int(round(0.07 * height)))
    for a, b in SKELETON:
        draw.line([tuple(points[a - 1]), tuple(points[b - 1])], fill=1, width=width)
    for x, y in points[1:]:  # round joints
        draw.ellipse([x - width / 2, y - width / 2, x + width / 2, y + width / 2], fill=1)
    x, y, r = points[0, 0], points[0, 1], 0.09 * height
    draw.ellipse([x - r, y - r, x + r, y + r], fill=1)
    return np.asarray(canvas, dtype=bool)


def render_figures(
    index: int,
    seed: int = 0,
    split: str = "train",
    image_size: int | tuple[int, int] = 128,
    min_figures: int = 1,
    max_figures: int = 3,
    figure_height: tuple[int, int] = (40, 90),
    min_visible_fraction: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw image `index`: `image` uint8 [H, W, 3], `masks` uint8 [G, H, W] (visible parts) and
    `keypoints` float32 [G, J, 3] (x, y, v) in painting order (module docstring)."""
    low, high = _check_size(image_size)
    if not (1 <= min_figures <= max_figures):
        raise ValueError(f"need 1 <= min_figures <= max_figures, got {min_figures}, {max_figures}")
    if not (16 <= figure_height[0] <= figure_height[1]):
        raise ValueError(f"figure_height must be a range (low, high) with 16 <= low <= high, got {figure_height}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng((seed, SPLITS.index(split), index))
    height, width = (int(rng.integers(low, high + 1)) for _ in range(2))
    image = _background(rng, height, width)
    full_masks, visible, joints, hues = [], [], [], []
    for _ in range(int(rng.integers(min_figures, max_figures + 1))):
        for _attempt in range(20):
            tall = rng.uniform(*figure_height)
            tilt = np.radians(rng.uniform(-20, 20))
            rotation = np.array([[np.cos(tilt), -np.sin(tilt)], [np.sin(tilt), np.cos(tilt)]])
            centre = np.array([rng.uniform(0.1, 0.9) * width, rng.uniform(0.15, 0.85) * height])  # the pelvis
            points = _pose(rng, tall) @ rotation.T + centre  # [J, 2]
            full = _draw_figure(points, tall, (height, width))
            still_visible = [v & ~full for v in visible]
            if full.sum() >= 64 and all(s.sum() >= min_visible_fraction * f.sum() for s, f in zip(still_visible, full_masks)):
                break
        else:
            continue  # no placement left the others visible enough: leave this figure out
        hue, gap = rng.random(), min(0.12, 0.45 / max_figures)
        while any(min(abs(hue - h), 1 - abs(hue - h)) < gap for h in hues):
            hue = rng.random()
        colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.65, 1.0)), dtype=np.float32)
        image[:, full] = colour[:, None]
        visible = still_visible + [full]
        full_masks.append(full)
        joints.append(points)
        hues.append(hue)
    image += np.float32(0.015) * rng.standard_normal(size=image.shape, dtype=np.float32)  # sensor noise
    image = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0).copy()  # [H, W, 3]
    keypoints = np.zeros((len(joints), len(KEYPOINT_NAMES), 3), dtype=np.float32)  # [G, J, 3]
    for g, points in enumerate(joints):
        inside = (points[:, 0] >= 0) & (points[:, 0] < width) & (points[:, 1] >= 0) & (points[:, 1] < height)
        columns, rows = np.clip(points[:, 0].astype(int), 0, width - 1), np.clip(points[:, 1].astype(int), 0, height - 1)
        hidden = np.zeros(len(points), dtype=bool)
        for later in full_masks[g + 1:]:
            hidden |= later[rows, columns]  # the pixel holding the keypoint is painted over
        keypoints[g, :, :2] = np.where(inside[:, None], points, 0)
        keypoints[g, :, 2] = np.where(inside, np.where(hidden, 1, 2), 0)
    masks = np.stack(visible).astype(np.uint8) if visible else np.zeros((0, height, width), np.uint8)
    return image, masks, keypoints


def _category(sigmas=SIGMAS) -> dict:
    return {"id": 1, "name": "figure", "supercategory": "figure", "keypoints": list(KEYPOINT_NAMES),
            "skeleton": [list(edge) for edge in SKELETON], "sigmas": list(sigmas)}  # fmt: skip


def generate_figures(root: str | os.PathLike, num_train: int = 1000, num_val: int = 100, seed: int = 0, **draw) -> Path:
    """Write the figures in COCO keypoint layout under `root` and return `root`: `root/{train,val}/*.png`
    and `root/annotations/person_keypoints_{train,val}.json` (`keypoints` as flat [x, y, v] * J,
    `num_keypoints`, an RLE mask, the box of the visible pixels; the category names its keypoints,
    skeleton, and sigmas). `draw` goes to `render_figures`; files already there are redrawn."""
    render_figures(0, seed, "train", **draw)  # checks the settings before anything is written
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("val", num_val)):
        (root / split).mkdir(exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            image, masks, keypoints = render_figures(index, seed, split, **draw)
            file_name = f"{index:06d}.png"
            Image.fromarray(image).save(root / split / file_name, compress_level=1)
            images.append({"id": index + 1, "file_name": file_name, "height": image.shape[0], "width": image.shape[1]})
            for mask, points in zip(masks, keypoints):
                rle = mask_utils.encode(np.asfortranarray(mask))
                annotations.append({
                    "id": len(annotations) + 1, "image_id": index + 1, "category_id": 1, "iscrowd": 0,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                    "area": float(mask_utils.area(rle)), "bbox": mask_utils.toBbox(rle).tolist(),
                    "keypoints": [round(float(v), 2) for v in points.reshape(-1)],
                    "num_keypoints": int((points[:, 2] > 0).sum()),
                })  # fmt: skip
        data = {"info": {"description": f"mrcnn stick figures, split {split}, seed {seed}"}, "images": images,
                "annotations": annotations, "categories": [_category()]}  # fmt: skip
        (root / "annotations" / f"person_keypoints_{split}.json").write_text(json.dumps(data))
    return root


class FiguresDataset(torch.utils.data.Dataset):
    """The figures drawn in memory: `(image float32 [3, H, W], target)` with "boxes" `[G, 4]`,
    "labels" `[G]` (all 1), "masks" uint8 `[G, H, W]`, "keypoints" float32 `[G, J, 3]`, "image_id"."""

    num_classes, category_names = 2, ("__background__", "figure")
    keypoint_names, skeleton, sigmas, flip_index = KEYPOINT_NAMES, SKELETON, SIGMAS, FLIP_INDEX

    def __init__(self, num_images: int, seed: int = 0, split: str = "train", **draw):
        render_figures(0, seed, split, **draw)  # checks the settings now
        self.num_images, self.seed, self.split, self.draw = num_images, seed, split, draw

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        image, masks, keypoints = render_figures(index, self.seed, self.split, **self.draw)
        return image_to_tensor(image), {"boxes": masks_to_boxes(masks), "labels": torch.ones(len(masks), dtype=torch.int64),
                                        "masks": torch.from_numpy(masks), "keypoints": torch.from_numpy(keypoints),
                                        "image_id": index + 1}  # fmt: skip


class KeypointCocoDataset(CocoDataset):
    """A COCO keypoint file (COCO's `person_keypoints_*.json`, or `generate_figures`'s) read as `CocoDataset`
    reads instances, with targets that add "keypoints" float32 `[G, J, 3]`.

    Every category must name the same J keypoints. Attributes: `keypoint_names`, `skeleton`,
    `flip_index` and `sigmas` (from the argument, the category's "sigmas", or COCO's for its 17
    person keypoints). Flipping needs the keypoints permuted, which `CocoDataset`'s flip does not
    do: build it with `train=False` and flip with `mrcnn.data.flip.flip_keypoints`.
    """

    def __init__(self, image_dir, annotation_file, sigmas: tuple[float, ...] | None = None, **options):
        if options.get("train"):
            raise ValueError("KeypointCocoDataset needs train=False: CocoDataset's flip would not swap left and right keypoints")
        super().__init__(image_dir, annotation_file, **options)
        categories = self.coco.dataset["categories"]
        names = {tuple(c.get("keypoints", ())) for c in categories}
        if len(names) != 1 or not next(iter(names)):
            raise DatasetError(f"annotation file {self.annotation_file}: every category must name the same keypoints")
        self.keypoint_names = next(iter(names))
        self.skeleton = tuple(tuple(edge) for edge in categories[0].get("skeleton", ()))
        self.flip_index = tuple(flip_index(self.keypoint_names))
        if sigmas is None:
            sigmas = categories[0].get("sigmas") or (COCO_PERSON_SIGMAS if len(self.keypoint_names) == 17 else None)
        if sigmas is None or len(sigmas) != len(self.keypoint_names):
            raise DatasetError(f"annotation file {self.annotation_file}: need one OKS sigma per keypoint, got {sigmas}")
        self.sigmas = tuple(float(s) for s in sigmas)
        self.keypoints = self._read_keypoints()  # image id -> float32 [G, J, 3]

    def _read_keypoints(self) -> dict[int, np.ndarray]:
        """The keypoints of the objects `CocoDataset` kept, in its order (it skips crowds, empty boxes and masks)."""
        num_keypoints, keypoints = len(self.keypoint_names), {}
        for image_id, objects in self.targets.items():
            image = self.images[image_id]
            kept = []
            for annotation in self.coco.imgToAnns.get(image_id, []):
                x, y, w, h = annotation["bbox"]
                box_inside = min(x + w, image["width"]) > max(x, 0) and min(y + h, image["height"]) > max(y, 0)
                if annotation["iscrowd"] or not box_inside:
                    continue
                if not self._check_segmentation(annotation["segmentation"], image, f"annotation id {annotation['id']}"):
                    continue
                points = annotation.get("keypoints", [0] * 3 * num_keypoints)
                if not isinstance(points, list) or len(points) != 3 * num_keypoints or not _finite_numbers(points):
                    got = f"{len(points)} values" if isinstance(points, list) else type(points).__name__
                    raise DatasetError(f"annotation file {self.annotation_file}: annotation id {annotation['id']} needs "
                                       f"'keypoints' of {3 * num_keypoints} finite numbers (x, y, v for each of "
                                       f"{num_keypoints}), got {got}")  # fmt: skip
                kept.append(points)
            if len(kept) != len(objects):
                raise DatasetError(f"annotation file {self.annotation_file}: image id {image_id}: keypoints of "
                                   f"{len(kept)} objects for {len(objects)} kept objects")  # fmt: skip
            keypoints[image_id] = np.asarray(kept, dtype=np.float32).reshape(len(kept), num_keypoints, 3)
        return keypoints

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image, target = super().__getitem__(index)
        return image, {**target, "keypoints": torch.from_numpy(self.keypoints[target["image_id"]].copy())}
