"""Predict on image files: read them, run the model, draw the detections, write them as JSON.

Inference follows the paper (section 3.1, "Inference"): the box branch scores the proposals,
per-class NMS keeps the best boxes, the mask branch predicts a mask for each kept box, and the
mask of the predicted class is resized to the box and binarized at 0.5 (mrcnn/inference.py).
This module only adds the files around it:

- `read_image`: a PNG or JPEG as a float `[3, H, W]` tensor in [0, 1]. The model takes RGB, so
  a grayscale, palette or RGBA picture is converted (RGBA by dropping the alpha channel), and
  the returned note says so.
- `predict_files`: for each image, `<stem>.pred.png` with the detections drawn (`picture_paths`:
  `a.png` -> `a.pred.png`; inputs that share a stem, such as `a.png`, `a.jpg` and `sub/a.png`,
  get `a.pred.png`, `a-2.pred.png`, `a-3.pred.png` in the order given), and one
  `detections.json` for all of them: per image its file, size and detections, each with
  "label", "category", "score", "box" (x1, y1, x2, y2 in pixels) and "mask" (COCO's
  run-length encoding of the binarized mask, readable with `pycocotools.mask.decode`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from mrcnn.data.images import image_to_tensor
from mrcnn.visualize import detections_figure

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_image(path: str | os.PathLike) -> tuple[torch.Tensor, str | None]:
    """A PNG or JPEG file as float32 `[3, H, W]` in [0, 1], and a note if it had to be converted to RGB.

    Raises `FileNotFoundError` for a missing file and `ValueError` for one that is not a readable
    PNG or JPEG image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"image {path}: expected a PNG or JPEG file ({', '.join(IMAGE_SUFFIXES)})")
    try:
        with Image.open(path) as picture:
            picture.load()
            mode, note = picture.mode, None
            if mode != "RGB":
                note = f"{path.name}: converted from {mode} to RGB" + (" (alpha channel dropped)" if "A" in mode else "")
                picture = picture.convert("RGB")
            array = np.asarray(picture)  # [H, W, 3] uint8
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"image {path} cannot be read: {error}") from None
    return image_to_tensor(array), note


def detections_to_json(detections: dict, class_names, score_threshold: float = 0.0, mask_threshold: float = 0.5) -> list[dict]:
    """One image's detections as JSON-ready dicts (module docstring), those scoring >= `score_threshold`."""
    keep = torch.where(detections["scores"].detach().cpu() >= score_threshold)[0]
    boxes = detections["boxes"].detach().cpu()[keep].tolist()
    labels = detections["labels"].detach().cpu()[keep].tolist()
    scores = detections["scores"].detach().cpu()[keep].tolist()
    rles = []
    if "masks" in detections and len(keep):
        binary = (detections["masks"].detach().cpu()[keep, 0] >= mask_threshold).numpy().astype(np.uint8)  # [D, H, W]
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))  # column-major [H, W, D]
    results = []
    for d, (box, label, score) in enumerate(zip(boxes, labels, scores)):
        name = class_names[label] if 0 <= label < len(class_names) else f"class {label}"
        result = {"label": int(label), "category": name, "score": round(float(score), 5), "box": [round(v, 2) for v in box]}
        if rles:
            result["mask"] = {"size": rles[d]["size"], "counts": rles[d]["counts"].decode("ascii")}
        results.append(result)
    return results


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
        pictures.append(output_dir / f"{name}.pred.png")
    inputs = {Path(path).resolve(): path for path in paths}
    for path, picture in zip(paths, pictures):
        if picture.resolve() in inputs:
            raise ValueError(f"the picture of {path} would be written over the input {inputs[picture.resolve()]}; "
                             "choose another --output-dir")  # fmt: skip
    return pictures


def predict_files(model: torch.nn.Module, paths: list, output_dir: str | os.PathLike, class_names,
                  device: str | torch.device = "cpu", score_threshold: float = 0.5) -> list[dict]:  # fmt: skip
    """Run `model` on image files; write `<stem>.pred.png` (drawn) per image and `detections.json` (all).

    Every path is read (and checked) and every output name chosen (`picture_paths`) before the
    model runs. Returns the records written to the JSON file; prints a note for each image
    converted to RGB.
    """
    pictures = picture_paths(paths, output_dir)
    images, notes = zip(*(read_image(path) for path in paths)) if paths else ((), ())
    for note in notes:
        if note:
            print(f"note: {note}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    records = []
    try:
        for path, image, picture in zip(paths, images, pictures):
            with torch.inference_mode():
                detections = {k: v.cpu() for k, v in model([image.to(device)])[0].items()}
            found = detections_to_json(detections, class_names, score_threshold)
            figure = detections_figure([image], [detections], class_names, score_threshold, titles=[Path(path).name],
                                       size=max(3.0, min(10.0, image.shape[-1] / 100)))  # fmt: skip
            figure.savefig(picture, dpi=100)
            records.append({"file": str(path), "height": image.shape[1], "width": image.shape[2],
                            "picture": str(picture), "detections": found})  # fmt: skip
    finally:
        model.train(was_training)
    (output_dir / "detections.json").write_text(json.dumps(records, indent=1))
    return records
