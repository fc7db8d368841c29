r"""The numpy half of an exported Mask R-CNN: what runs around the ONNX graphs of mrcnn/export.py.

`mrcnn export` copies this file, as it is, next to the graphs (as `detector.py`). It imports numpy
only (onnxruntime when the graphs are loaded, Pillow to read pictures from the command line), so
the exported model needs neither torch nor this library:

    python detector.py picture.png [more.png ...]     # one JSON line of detections per picture

    from detector import Detector
    detections = Detector("runs/export")(image)       # image [3, H, W] float32 in [0, 1], as the model takes

Each step is the model's own, in numpy, named after it (the module names the original):

    preprocess              transform.ImageTransform: normalize, resize (bilinear), pad to a multiple of 32
    [features.onnx]         backbone, FPN, RPN head, decoding, the top-k of each level
    select_proposals        rpn.RegionProposalNetwork.select_proposals after the top-k: clip, drop tiny and
                            low-scoring boxes, NMS within each level, the post_nms_top_n best
    [box_head.onnx]         RoIAlign, box head, decoding, softmax
    postprocess_detections  box_head.postprocess_detections after the decoding: clip, score threshold,
                            NMS per class, the detections_per_image best
    [mask_head.onnx]        RoIAlign, mask head, the mask of each detection's class
    resize_boxes            transform.resize_boxes: back to the original image
    paste_masks             inference.paste_masks: each mask into an image-sized canvas

Every step does the arithmetic of the original in float32 and in the same order where it
matters (resizing, box clipping, IoU against a float64 threshold, pasting), so the detections
equal the model's to float rounding.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

try:  # optional: only the command line reads picture files
    from PIL import Image
except ImportError:
    Image = None

F32 = np.float32


# --- the input: ImageTransform -------------------------------------------------------------------


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """`[C, h, w]` float32 -> `[C, height, width]`: PyTorch's bilinear interpolation, `align_corners=False`.

    Along each axis, output pixel `i` samples the input at `s = max((in / out) (i + 1/2) - 1/2, 0)`
    between `floor(s)` and the next pixel (the last one at the border).
    """

    def axis(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scale = F32(size_in) / F32(size_out)
        source = np.maximum(scale * (np.arange(size_out, dtype=F32) + F32(0.5)) - F32(0.5), F32(0))
        low = np.minimum(np.floor(source).astype(np.int64), size_in - 1)
        high = low + (low < size_in - 1)
        weight_high = np.clip(source - low.astype(F32), F32(0), F32(1))
        return low, high, weight_high

    y_low, y_high, y_weight = axis(image.shape[1], height)
    x_low, x_high, x_weight = axis(image.shape[2], width)
    rows = image[:, y_low] * (F32(1) - y_weight)[:, None] + image[:, y_high] * y_weight[:, None]  # [C, height, w]
    return (rows[:, :, x_low] * (F32(1) - x_weight) + rows[:, :, x_high] * x_weight).astype(F32)  # [C, height, width]


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """`(floor(h s), floor(w s))` with `s = min(min_size / min(h, w), max_size / max(h, w))`, in float64 as PyTorch."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return math.floor(float(height) * scale), math.floor(float(width) * scale)


def preprocess(image: np.ndarray, config: dict) -> tuple[np.ndarray, tuple[int, int]]:
    """image `[3, H, W]` in [0, 1] -> the batch `[1, 3, H_pad, W_pad]` features.onnx takes, and the
    resized size `(h, w)` before padding."""
    mean = np.asarray(config["image_mean"], dtype=F32)[:, None, None]
    std = np.asarray(config["image_std"], dtype=F32)[:, None, None]
    image = (image.astype(F32) - mean) / std  # x' = (x - mean_c) / std_c
    height, width = resized_size(image.shape[1], image.shape[2], config["min_size"], config["max_size"])
    image = resize_bilinear(image, height, width)
    divisible = config["size_divisible"]
    batch = np.zeros((1, 3, -(-height // divisible) * divisible, -(-width // divisible) * divisible), dtype=F32)
    batch[0, :, :height, :width] = image
    return batch, (height, width)


def resize_boxes(boxes: np.ndarray, original_size: tuple[int, int], new_size: tuple[int, int]) -> np.ndarray:
    """Boxes `[D, 4]` from an image of `original_size` (h, w) to `new_size`: ratios `new / old` in float32."""
    ratio_height, ratio_width = (F32(new) / F32(old) for new, old in zip(new_size, original_size))
    return (boxes * np.array([ratio_width, ratio_height, ratio_width, ratio_height], dtype=F32)).astype(F32)


# --- boxes and NMS: mrcnn/boxes.py -----------------------------------------------------------------


def clip_boxes(boxes: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Clip boxes `[..., 4]` to an image of `(height, width)`."""
    height, width = image_size
    limits = np.array([width, height, width, height], dtype=F32)
    return np.minimum(np.maximum(boxes, F32(0)), limits).astype(F32)


def remove_small_boxes(boxes: np.ndarray, min_size: float) -> np.ndarray:
    """Indices of the boxes `[B, 4]` whose sides are both >= `min_size`."""
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return np.nonzero((widths >= min_size) & (heights >= min_size))[0]


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box `[4]` with each of `boxes [B, 4]`, in float32: `|a ∩ b| / (|a| + |b| - |a ∩ b|)`."""
    width = np.maximum(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), F32(0))
    height = np.maximum(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), F32(0))
    intersection = width * height
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return intersection / (area + areas - intersection)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS: indices of the kept boxes, best first. Visit the boxes by decreasing score (ties by
    index); keep one unless a kept box overlaps it with IoU > threshold (compared in float64)."""
    order = np.argsort(-scores, kind="stable")
    ordered = boxes[order]
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed[i + 1 :] |= box_iou(ordered[i], ordered[i + 1 :]).astype(np.float64) > iou_threshold
    return order[np.asarray(keep, dtype=np.int64)]


def batched_nms(boxes: np.ndarray, scores: np.ndarray, categories: np.ndarray, iou_threshold: float) -> np.ndarray:
    """NMS within each category, as mrcnn.boxes.batched_nms chooses: up to 1000 boxes shifted apart by
    category and one NMS, more boxes one NMS per category. Kept indices, best first."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    if boxes.size <= 4000:
        offsets = categories.astype(F32) * (boxes.max() + F32(1))
        return nms(boxes + offsets[:, None], scores, iou_threshold)
    kept = np.concatenate([np.nonzero(categories == c)[0][nms(boxes[categories == c], scores[categories == c], iou_threshold)]
                           for c in np.unique(categories)])  # fmt: skip
    return kept[np.argsort(-scores[kept], kind="stable")]


# --- the RPN's and the box branch's selections -----------------------------------------------------


def select_proposals(boxes: np.ndarray, scores: np.ndarray, levels: np.ndarray, image_size: tuple[int, int],
                     config: dict) -> np.ndarray:  # fmt: skip
    """features.onnx's candidates `[K, 4]`, `[K]`, `[K]` -> the proposals `[R, 4]` of the image, best first."""
    boxes = clip_boxes(boxes, image_size)
    keep = remove_small_boxes(boxes, config["rpn_min_size"])
    boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
    keep = np.nonzero(scores >= config["rpn_score_thresh"])[0]
    boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
    keep = batched_nms(boxes, scores, levels, config["rpn_nms_thresh"])  # within each level
    return boxes[keep[: config["rpn_post_nms_top_n"]]]


def postprocess_detections(boxes: np.ndarray, scores: np.ndarray, image_size: tuple[int, int],
                           config: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """box_head.onnx's boxes `[R, K, 4]` and probabilities `[R, K]` -> boxes `[D, 4]`, scores `[D]`,
    labels `[D]` int64: every (RoI, foreground class) above the threshold, NMS per class, the best."""
    boxes = clip_boxes(boxes, image_size)
    labels = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
    keep = np.nonzero(scores > config["box_score_thresh"])[0]
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = remove_small_boxes(boxes, 1e-2)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = batched_nms(boxes, scores, labels, config["box_nms_thresh"])[: config["detections_per_image"]]
    return boxes[keep], scores[keep], labels[keep].astype(np.int64)


# --- pasting: mrcnn/inference.py -------------------------------------------------------------------


def paste_matrix(start: np.ndarray, length: np.ndarray, image_length: int, source_length: int) -> np.ndarray:
    """`[D, image_length, S]`: row `i` of detection `d` holds the bilinear weights of image pixel `i`
    in the mask resized to the box `start .. start + length - 1` (zeros outside it)."""
    local = np.arange(image_length)[None, :] - start[:, None]  # [D, L]
    inside = (local >= 0) & (local < length[:, None])
    scale = F32(source_length) / length.astype(F32)  # S / w
    source = np.maximum(scale[:, None] * (local.astype(F32) + F32(0.5)) - F32(0.5), F32(0))  # s(i)
    low = np.minimum(np.floor(source).astype(np.int64), source_length - 1)
    high = np.where(low < source_length - 1, low + 1, low)
    weight_high = np.clip(source - low.astype(F32), F32(0), F32(1))
    matrix = np.zeros((len(start), image_length, source_length), dtype=F32)
    detection, pixel = np.indices(low.shape)
    np.add.at(matrix, (detection, pixel, low), ((F32(1) - weight_high) * inside).astype(F32))
    np.add.at(matrix, (detection, pixel, high), (weight_high * inside).astype(F32))
    return matrix


def paste_masks(masks: np.ndarray, boxes: np.ndarray, image_size: tuple[int, int], padding: int = 1) -> np.ndarray:
    """masks `[D, 1, M, M]` probabilities, boxes `[D, 4]` in the image of `image_size` -> `[D, 1, H, W]`."""
    height, width = image_size
    if len(masks) == 0:
        return np.zeros((0, 1, height, width), dtype=F32)
    mask_size = masks.shape[-1]
    source_size = mask_size + 2 * padding
    padded = np.pad(masks[:, 0].astype(F32), ((0, 0), (padding, padding), (padding, padding)))  # [D, S, S]
    half_width, half_height = (boxes[:, 2] - boxes[:, 0]) * F32(0.5), (boxes[:, 3] - boxes[:, 1]) * F32(0.5)
    centre_x, centre_y = (boxes[:, 2] + boxes[:, 0]) * F32(0.5), (boxes[:, 3] + boxes[:, 1]) * F32(0.5)
    scale = F32(source_size / mask_size)  # the box enlarged by S / M, about its centre
    half_width, half_height = half_width * scale, half_height * scale
    x0, y0 = (centre_x - half_width).astype(np.int64), (centre_y - half_height).astype(np.int64)  # truncated
    x1, y1 = (centre_x + half_width).astype(np.int64), (centre_y + half_height).astype(np.int64)
    rows = paste_matrix(y0, np.maximum(y1 - y0 + 1, 1), height, source_size)  # [D, H, S]
    columns = paste_matrix(x0, np.maximum(x1 - x0 + 1, 1), width, source_size)  # [D, W, S]
    return np.matmul(rows, np.matmul(padded, columns.transpose(0, 2, 1)))[:, None]  # [D, 1, H, W]


# --- the graphs and the steps together ---------------------------------------------------------------


class Detector:
    """An exported model, loaded: `detector(image)` gives the detections of one image.

    Args:
        directory: the folder `mrcnn export` wrote.
        threads: onnxruntime's threads per graph (default: its choice).
    """

    def __init__(self, directory: str | Path, threads: int | None = None):
        import onnxruntime  # optional: needed to run the graphs, not to import the numpy steps

        directory = Path(directory)
        self.config = json.loads((directory / "config.json").read_text())
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.sessions = {name: onnxruntime.InferenceSession(str(directory / file), options, providers=["CPUExecutionProvider"])
                         for name, file in self.config["graphs"].items()}  # fmt: skip

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """image `[3, H, W]` float in [0, 1] -> "boxes" `[D, 4]` (x1, y1, x2, y2 in the image), "labels" `[D]`,
        "scores" `[D]` and (with a mask graph) "masks" `[D, 1, H, W]` probabilities: what the model returns."""
        original_size = (image.shape[1], image.shape[2])
        batch, size = preprocess(np.asarray(image), self.config)
        *maps, boxes, scores, levels = self.sessions["features"].run(None, {"batch": batch})
        features = dict(zip(self.config["feature_names"], maps))
        proposals = select_proposals(boxes, scores, levels, size, self.config)
        boxes, scores, labels = np.zeros((0, 4), F32), np.zeros(0, F32), np.zeros(0, np.int64)
        if len(proposals):
            refined, probabilities = self.sessions["box_head"].run(None, {**features, "proposals": proposals})
            boxes, scores, labels = postprocess_detections(refined, probabilities, size, self.config)
        detections = {"boxes": resize_boxes(boxes, size, original_size), "labels": labels, "scores": scores}
        if "mask_head" in self.sessions:
            masks = np.zeros((0, 1, 28, 28), F32)
            if len(boxes):
                (masks,) = self.sessions["mask_head"].run(None, {**features, "boxes": boxes, "labels": labels})
            detections["masks"] = paste_masks(masks, detections["boxes"], original_size)
        return detections


def read_picture(path: Path) -> np.ndarray:
    """A picture file as float32 `[3, H, W]` in [0, 1], read as the library reads it: 8-bit channels
    / 255, 16-bit grey / 65535 (32-bit integer grey taken as 16-bit values), float grey as it is,
    other modes (palette, grey with alpha, RGBA, CMYK) converted to RGB by Pillow."""
    with Image.open(path) as picture:
        picture.load()  # the whole file: a truncated one fails here
        if picture.mode.startswith("I"):
            grey = np.asarray(picture).astype(F32).clip(0, 65535) / F32(65535)  # [H, W]
        elif picture.mode == "F":
            grey = np.asarray(picture, dtype=F32).clip(0, 1)  # [H, W]
        else:
            return np.asarray(picture.convert("RGB"), dtype=F32).transpose(2, 0, 1) / F32(255)  # [3, H, W]
    return np.repeat(grey[None], 3, axis=0)  # [3, H, W]


def main(argv: list[str] | None = None) -> int:
    """`python detector.py [--threads N] [--score-threshold T] picture.png ...`: one JSON line per picture."""
    parser = argparse.ArgumentParser(description="Run an exported Mask R-CNN on pictures (numpy and onnxruntime).")
    parser.add_argument("pictures", type=Path, nargs="+", help="PNG or JPEG files")
    parser.add_argument("--model", type=Path, default=Path(__file__).resolve().parent, help="the exported folder (default: here)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="print detections scoring at least this")
    args = parser.parse_args(argv)
    if Image is None:
        parser.error("reading pictures needs Pillow (pip install pillow)")
    images = {}
    for path in args.pictures:  # every picture is read before the model runs on any
        try:
            images[path] = read_picture(path)
        except Exception as error:  # Pillow raises several kinds (OSError, SyntaxError, ValueError, ...)
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            print(f"detector.py: error: picture {path} cannot be read: {reason}", file=sys.stderr)
            return 2
    detector = Detector(args.model, args.threads)
    for path, image in images.items():
        found = detector(image)
        chosen = found["scores"] >= args.score_threshold
        records = [{"box": [round(float(v), 2) for v in box], "label": int(label), "score": round(float(score), 4)}
                   for box, label, score in zip(found["boxes"][chosen], found["labels"][chosen], found["scores"][chosen])]  # fmt: skip
        print(json.dumps({"file": str(path), "detections": records}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
