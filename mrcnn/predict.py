"""Predict on image files: find them, run the model on one batch at a time, draw the detections, write them as JSON.

Inference follows the paper (section 3.1, "Inference"): the box branch scores the proposals,
per-class NMS keeps the best boxes, the mask branch predicts a mask for each kept box, and the
mask of the predicted class is resized to the box and binarized at 0.5 (mrcnn/inference.py).
This module only adds the files around it:

- `image_files`: what the user named, as a list of image files: a file as it is; a folder's
  images (the files with an image suffix, `IMAGE_SUFFIXES`, sorted; not its subfolders unless
  `recursive`; never the `*.pred.png` pictures an earlier prediction drew there); a glob pattern
  the shell left alone (`"photos/*.jpg"`, `"photos/**/*.png"`). Nothing is read yet.
- `check_headers`: before the model runs, every file's header: one that is not a readable image,
  or so thin that the model's resizing leaves less than a pixel of it (a 3 x 2000 strip, for a
  model that scales the longer side to 128), is a `ValueError` naming it.
- reading: `mrcnn.data.images.read_image`, a PNG, JPEG, BMP or TIFF file as a float `[3, H, W]`
  tensor in [0, 1]. The model takes RGB, so a grayscale (8 or 16 bits), palette or RGBA picture
  is converted (RGBA by dropping the alpha channel), and the returned note says so.
- `predict_files`: the images stream through the model `batch_size` at a time (a `DataLoader`
  reads the next batch; the images are never all in memory), and for each one `<stem>.pred.png`
  is drawn (`picture_paths`: `a.png` -> `a.pred.png`; inputs that share a stem, such as `a.png`,
  `a.jpg` and `sub/a.png`, get `a.pred.png`, `a-2.pred.png`, `a-3.pred.png` in the order given).
  At the end, `detections.json` holds the detections of all of them in COCO's results format
  (`mrcnn.evaluate.detections_to_coco_results`: "image_id", "category_id", "bbox" [x, y, w, h],
  "score", "segmentation" (RLE, `pycocotools.mask.decode` reads it), "keypoints" for a keypoint
  model), each with the "file_name" of its image; and `images.json` holds COCO's "images" (id,
  file_name, height, width, and the "picture" drawn) and "categories" (id, name) lists.
"""

from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from mrcnn.data.images import IMAGE_SUFFIXES, read_image
from mrcnn.evaluate import detections_to_coco_results, mixed_precision
from mrcnn.visualize import detections_figure

PICTURE_SUFFIX = ".pred.png"  # what `predict_files` draws; a folder's earlier pictures are not inputs


def image_files(inputs: list, recursive: bool = False) -> list[Path]:
    """The image files that `inputs` (files, folders, glob patterns) name, in order (module docstring).

    A `ValueError` for a path that does not exist, a file without an image suffix, a folder with
    no images, or a pattern that matches none.
    """
    files = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in (path.rglob("*") if recursive else path.iterdir()) if _is_image_file(p))
            if not found:
                deeper = "" if recursive else " (--recursive looks in its subfolders too)"
                raise ValueError(f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}){deeper}")
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise ValueError(f"image {path}: expected an image file ({', '.join(IMAGE_SUFFIXES)})")
            found = [path]
        elif any(character in str(name) for character in "*?["):  # a pattern the shell did not expand
            found = sorted(p for p in map(Path, glob.glob(str(name), recursive=True)) if _is_image_file(p))
            if not found:
                raise ValueError(f"no images match {name}")
        else:
            raise ValueError(f"image {path} does not exist")
        files += found
    return files


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.endswith(PICTURE_SUFFIX)


def check_headers(paths: list, min_size: int, max_size: int) -> None:
    """Read each file's header only: a `ValueError` naming the first that is not a readable image, or that
    the model's resizing (shorter side to `min_size`, longer side at most `max_size`, sizes floored,
    mrcnn/transform.py) would leave less than one pixel wide or tall."""
    for path in paths:
        try:
            with Image.open(path) as picture:
                width, height = picture.size
        except Exception as error:  # Pillow raises several kinds for a file that is no image
            lines = str(error).strip().splitlines()
            raise ValueError(f"image {path} cannot be read: {lines[0] if lines else type(error).__name__}") from None
        scale = min(min_size / min(height, width), max_size / max(height, width))  # s, as ImageTransform.resize
        if math.floor(height * scale) < 1 or math.floor(width * scale) < 1:
            raise ValueError(f"image {path} is {width} x {height} pixels: the model resizes it by {scale:.3g} (shorter side "
                             f"to {min_size}, longer at most {max_size}), to less than a pixel across; crop it into "
                             "squarer pieces")  # fmt: skip


def picture_paths(paths: list, output_dir: str | os.PathLike) -> list[Path]:
    """Where `predict_files` draws each image: `<stem>.pred.png` in `output_dir`, one name per input.

    Inputs that share a stem (compared without case, as some file systems do) are numbered in
    the order given: `a.pred.png`, `a-2.pred.png`, ... A `ValueError` if a picture would be
    written over one of the inputs (an input `a.pred.png` in `output_dir`, say).
    """
    output_dir, taken, pictures = Path(output_dir), set(), []
    for path in paths:
        stem = name = Path(path).stem
        number = 2
        while name.casefold() in taken:
            name, number = f"{stem}-{number}", number + 1
        taken.add(name.casefold())
        pictures.append(output_dir / f"{name}{PICTURE_SUFFIX}")
    inputs = {Path(path).resolve(): path for path in paths}
    for path, picture in zip(paths, pictures):
        if picture.resolve() in inputs:
            raise ValueError(f"the picture of {path} would be written over the input {inputs[picture.resolve()]}; "
                             "choose another --output-dir")  # fmt: skip
    return pictures


class ImageFiles(torch.utils.data.Dataset):
    """Image files, read when asked for: item i is `(i, image float32 [3, H, W], note or None)`."""

    def __init__(self, paths: list):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, str | None]:
        image, note = read_image(self.paths[index])
        return index, image, note


def _as_lists(batch: list) -> tuple[list, list, list]:
    indices, images, notes = zip(*batch)
    return list(indices), list(images), list(notes)


def predict_files(model: torch.nn.Module, paths: list, output_dir: str | os.PathLike, class_names,
                  device: str | torch.device = "cpu", score_threshold: float = 0.5, batch_size: int = 1,
                  amp: str = "off", label_to_category_id: dict | None = None, workers: int = 0,
                  progress: bool = True) -> dict:  # fmt: skip
    """Run `model` on image files, `batch_size` images at a time; draw `<stem>.pred.png` for each and write
    `detections.json` and `images.json` (module docstring) in `output_dir`.

    The output names are chosen (`picture_paths`) and the headers checked (`check_headers`, with
    the model's sizes) before the model runs; the images are then read one batch at a time
    (`workers` processes read ahead), so memory stays flat however many there are. Detections
    scoring below `score_threshold` are neither drawn nor written. class_names: indexed by label;
    label_to_category_id: the category id written for a label (default: the label). amp: "bf16"
    or "fp16" runs the forward under autocast. Returns {"images", "detections", "notes"} (notes:
    the images converted to RGB).
    """
    pictures = picture_paths(paths, output_dir)
    config = getattr(model, "config", None)
    if config is not None:
        min_size = config.min_size[-1] if isinstance(config.min_size, tuple) else config.min_size  # eval: the last
        check_headers(paths, min_size, config.max_size)
    autocast = mixed_precision(device, amp)
    category_ids = label_to_category_id or {label: label for label in range(1, len(class_names))}
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    loader = torch.utils.data.DataLoader(ImageFiles(paths), batch_size=batch_size, collate_fn=_as_lists,
                                         num_workers=workers)  # fmt: skip
    images_json, results, notes = [], [], []
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(paths), desc="predict", unit="image", disable=not progress) as bar:
            for indices, images, image_notes in loader:
                with torch.inference_mode(), autocast:
                    batch = model([image.to(device) for image in images])
                for index, image, note, detections in zip(indices, images, image_notes, batch):
                    detections = {k: v.detach().cpu() for k, v in detections.items()}
                    keep = detections["scores"] >= score_threshold
                    detections = {k: v[keep].float() if v.is_floating_point() else v[keep] for k, v in detections.items()}
                    found = detections_to_coco_results([detections], [index + 1], category_ids)
                    results += [{**result, "file_name": str(paths[index])} for result in found]
                    figure = detections_figure([image], [detections], class_names, score_threshold,
                                               titles=[Path(paths[index]).name],
                                               size=max(3.0, min(10.0, image.shape[-1] / 100)))  # fmt: skip
                    figure.savefig(pictures[index], dpi=100)
                    figure.clear()  # its axes and image arrays now, not at the next garbage collection
                    images_json.append({"id": index + 1, "file_name": str(paths[index]), "height": image.shape[1],
                                        "width": image.shape[2], "picture": str(pictures[index])})  # fmt: skip
                    notes += [note] if note else []
                    bar.update()
    finally:
        model.train(was_training)
    categories = [{"id": int(category_ids[label]), "name": class_names[label]} for label in range(1, len(class_names))
                  if label in category_ids]  # fmt: skip
    (output_dir / "detections.json").write_text(json.dumps(results))
    (output_dir / "images.json").write_text(json.dumps({"images": images_json, "categories": categories}, indent=1))
    return {"images": len(images_json), "detections": len(results), "notes": notes}
