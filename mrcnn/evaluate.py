r"""COCO evaluation with pycocotools: the numbers of the paper's tables (section 4).

A detection is matched to an unmatched ground-truth object of its category, in order of
decreasing score, when their intersection over union reaches a threshold t:

    IoU(a, b) = |a ∩ b| / |a ∪ b|        (boxes: areas; masks: pixel counts)

Going down the score-sorted list gives a precision-recall curve; AP_t is the area under it,
read at 101 recall points r in {0, 0.01, ..., 1} with precision made monotone
(p_interp(r) = max_{r' >= r} p(r')), and averaged over the categories:

    AP_t = 1/|K| sum_k 1/101 sum_r p_interp_k(r)
    AP   = 1/10 sum_{t in {0.50, 0.55, ..., 0.95}} AP_t       ("AP" in the paper: COCO's metric)

AP50 and AP75 are AP_t at one threshold; APs, APm, APl count only objects of area < 32^2,
32^2..96^2, > 96^2 pixels. AR_n is the recall with at most n detections an image, averaged over
the same thresholds. Crowd regions are "ignore": a detection on one is neither right nor wrong.
"bbox" compares boxes, "segm" the masks: the paper reports mask AP (Table 1-3) and box AP
(Table 3). COCOeval computes all of it; this module turns the model's detections into its input.

Keypoints (section 5, Table 4) are scored the same way with another similarity in place of the
IoU: the object keypoint similarity of a detection d with a ground-truth object g of area s^2,
over g's labelled keypoints (v_j > 0),

    OKS(d, g) = sum_j exp(-|p_j^d - p_j^g|^2 / (2 s^2 k_j^2)) [v_j > 0] / sum_j [v_j > 0],   k_j = 2 sigma_j

with a per-keypoint sigma sigma_j (COCO's for its 17 person keypoints, mrcnn/data/keypoints.py
for the stick figures). AP averages precision over OKS thresholds 0.50:0.05:0.95, as AP does
over IoU thresholds (`keypoint_metrics`, `evaluate_keypoints`).

`evaluate` scores any data set of `(image, target)` pairs: a `CocoDataset` (or `KeypointCocoDataset`)
brings its annotation file, any other one (a list, a torchvision-style data set) has its ground
truth built from the targets it yields (`TargetsToCoco`: "image_id", "boxes" (x1, y1, x2, y2),
"labels", and optionally "masks", "keypoints", "iscrowd", "area"), with category id = label.
`amp="bf16"` or `"fp16"` runs the model's forward under `torch.autocast` (`mixed_precision`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from mrcnn.data.coco import collate
from mrcnn.data.keypoints import COCO_PERSON_SIGMAS, KeypointCocoDataset

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
KEYPOINT_METRIC_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
RESULT_KEY = {"bbox": "bbox", "segm": "segmentation"}  # which field of a result each IoU type reads
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def mixed_precision(device: str | torch.device, amp: str = "off"):
    """The context to run a model's forward in: `torch.autocast` on `device`'s type in bfloat16 ("bf16")
    or float16 ("fp16"), or nothing ("off"). The model keeps its box geometry in float32 under it
    (tests/test_amp.py); only features and head activations are 16 bits."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {tuple(AMP_DTYPES)}, got {amp!r}")
    return torch.autocast(torch.device(device).type, dtype=AMP_DTYPES[amp], enabled=amp != "off")


def detections_to_coco_results(
    detections: list[dict], image_ids: list[int], label_to_category_id, mask_threshold: float = 0.5
) -> list[dict]:
    """Turn the model's detections into COCO's results format, one dict per detection.

    detections: one dict per image, {"boxes": float [D, 4] (x1, y1, x2, y2) in the original
    image's pixels, "labels": int64 [D], "scores": float [D], and optionally "masks": float
    [D, 1, H, W] probabilities and "keypoints" float [D, J, 3]}. Each result is {"image_id",
    "category_id", "bbox": [x, y, w, h], "score"} plus "segmentation", the RLE (counts as str) of
    the mask binarized at `mask_threshold` (paper section 3.1, Inference: "binarized at a
    threshold of 0.5"), and "keypoints", [x, y, v] * J, when the detections have them.
    label_to_category_id: maps a label to the data set's category id (a dict or a sequence).
    """
    if len(detections) != len(image_ids):
        raise ValueError(f"got detections for {len(detections)} images but {len(image_ids)} image ids")
    results = []
    for detection, image_id in zip(detections, image_ids):
        boxes = detection["boxes"].detach().to("cpu", torch.float64)  # [D, 4]
        scores = detection["scores"].detach().cpu().tolist()  # [D]
        labels = detection["labels"].detach().cpu().tolist()  # [D]
        if boxes.dim() != 2 or boxes.shape[1] != 4 or not (len(boxes) == len(scores) == len(labels)):
            raise ValueError(f"image {image_id}: boxes {tuple(boxes.shape)}, {len(scores)} scores and "
                             f"{len(labels)} labels do not describe the same detections")  # fmt: skip
        widths_heights = boxes[:, 2:] - boxes[:, :2]  # [D, 2]
        xywh = torch.cat([boxes[:, :2], widths_heights], dim=1).tolist()  # [D, 4]: COCO's box format
        rles = []
        if "masks" in detection and len(boxes):
            masks = detection["masks"].detach()
            if masks.dim() != 4 or masks.shape[:2] != (len(boxes), 1):
                shape = tuple(masks.shape)
                raise ValueError(f"image {image_id}: masks must be [D, 1, H, W] with D = {len(boxes)}, got {shape}")
            binary = (masks[:, 0] >= mask_threshold).to("cpu", torch.uint8).numpy()  # [D, H, W]
            rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))  # [H, W, D] column-major
        keypoints = None
        if "keypoints" in detection:
            keypoints = detection["keypoints"].detach().to("cpu", torch.float32)  # [D, J, 3]
            keypoints = keypoints.reshape(len(boxes), -1).tolist()  # [D, 3J]
        for d in range(len(boxes)):
            try:
                category_id = label_to_category_id[labels[d]]
            except (KeyError, IndexError):
                message = f"image {image_id}: label {labels[d]} has no category id (background or out of range)"
                raise ValueError(message) from None
            result = {"image_id": int(image_id), "category_id": int(category_id), "bbox": xywh[d],
                      "score": float(scores[d])}  # fmt: skip
            if rles:
                result["segmentation"] = {"size": rles[d]["size"], "counts": rles[d]["counts"].decode("ascii")}
            if keypoints is not None:
                result["keypoints"] = keypoints[d]
            results.append(result)
    return results


def _no_results(coco_gt: COCO) -> COCO:
    """A results index with no detections, which pycocotools' `loadRes` cannot make."""
    empty = COCO()
    empty.dataset = {"images": copy.deepcopy(coco_gt.dataset["images"]), "annotations": [],
                     "categories": copy.deepcopy(coco_gt.dataset["categories"])}  # fmt: skip
    empty.createIndex()
    return empty


def coco_evaluate(
    coco_gt: COCO, results: list[dict], iou_types=("bbox", "segm"), image_ids=None, verbose: bool = True
) -> dict[str, dict[str, float]]:
    """Run COCOeval for each IoU type and return {"bbox": {"AP": .., ...}, "segm": {...}}.

    results: COCO results (see `detections_to_coco_results`); may be empty (AP 0 where there
    are objects). image_ids: evaluate only these images (default: all images of `coco_gt`), as
    when a model ran on part of the data set. Prints COCO's 12-line table per type if verbose.
    A value of -1 means "undefined": no ground truth of that kind (e.g. no large objects).
    """
    for iou_type in iou_types:
        if iou_type not in RESULT_KEY:
            raise ValueError(f"iou_types must be among {tuple(RESULT_KEY)}, got {iou_type!r}")
    known = set(coco_gt.getImgIds())
    unknown = sorted({r["image_id"] for r in results} - known) + sorted(set(image_ids or ()) - known)
    if unknown:
        raise ValueError(f"image id {unknown[0]} is not in the ground truth")
    metrics = {}
    for iou_type in iou_types:
        key = RESULT_KEY[iou_type]
        typed = [{"image_id": r["image_id"], "category_id": r["category_id"], "score": r["score"], key: r[key]}
                 for r in results if key in r]  # fmt: skip
        if len(typed) < len(results):
            raise ValueError(f"{len(results) - len(typed)} results have no '{key}' to evaluate '{iou_type}' with")
        chatter = io.StringIO()  # pycocotools prints progress; keep only the table
        with contextlib.redirect_stdout(chatter):
            # loadRes fills in area (and the box of a mask) itself; typed copies keep `results` intact
            coco_dt = coco_gt.loadRes(typed) if typed else _no_results(coco_gt)
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = sorted(set(image_ids))
            evaluator.evaluate()
            evaluator.accumulate()
        with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(chatter):
            print(f"IoU metric: {iou_type}")
            evaluator.summarize()
        metrics[iou_type] = {name: float(value) for name, value in zip(METRIC_NAMES, evaluator.stats)}
    return metrics


def base_dataset(dataset):
    """The data set under `dataset`, which may be a `Subset` (of a `Subset` ...) of it."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset


class _SameIds(dict):
    """label -> category id for ground truth built from targets: the label is the id (0 is the background)."""

    def __missing__(self, label: int) -> int:
        if label < 1:
            raise KeyError(label)
        return label


class TargetsToCoco:
    """COCO ground truth built from the targets a data set yields, for a data set with no COCO file.

    `add(image, target)` takes one image float [3, H, W] and its torchvision-style target:
    "image_id" (an int, or a one-element tensor), "boxes" float [G, 4] (x1, y1, x2, y2), "labels"
    int [G] (used as the category ids), and optionally "masks" uint8 [G, H, W], "keypoints" float
    [G, J, 3], "iscrowd" [G] and "area" [G] (default: the mask's pixels, else the box's area).
    `coco(extra_category_ids)` is the pycocotools index, filled in memory. Masks are scored only
    when every target had them (`with_masks`), keypoints when some target had them.
    """

    def __init__(self, category_names=None):
        self.category_names = list(category_names) if category_names else []  # indexed by label
        self.images, self.annotations, self.with_masks, self.with_keypoints = [], [], True, False
        self.image_ids: set[int] = set()

    def add(self, image: torch.Tensor, target: dict) -> int:
        """Record one image's ground truth; returns its image id."""
        image_id = int(torch.as_tensor(target["image_id"]).reshape(-1)[0])
        if image_id in self.image_ids:
            raise ValueError(f"image id {image_id} appears twice in the data set: each image needs its own")
        self.image_ids.add(image_id)
        height, width = image.shape[-2:]
        self.images.append({"id": image_id, "height": int(height), "width": int(width)})
        boxes = torch.as_tensor(target["boxes"]).detach().to("cpu", torch.float64).reshape(-1, 4)  # [G, 4]
        labels = torch.as_tensor(target["labels"]).reshape(-1).tolist()  # [G]
        count = len(labels)
        crowd = torch.as_tensor(target.get("iscrowd", torch.zeros(count))).reshape(-1).tolist()
        masks = target.get("masks")
        self.with_masks = self.with_masks and masks is not None
        rles = []
        if masks is not None and count:
            binary = torch.as_tensor(masks).detach().to("cpu", torch.uint8).numpy().reshape(count, height, width)
            rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))  # [H, W, G] column-major
        keypoints = target.get("keypoints")
        if keypoints is not None:
            self.with_keypoints = True
            keypoints = torch.as_tensor(keypoints).detach().to("cpu", torch.float64).reshape(count, -1, 3)  # [G, J, 3]
        for g in range(count):
            x1, y1, x2, y2 = boxes[g].tolist()
            annotation = {"id": len(self.annotations) + 1, "image_id": image_id, "category_id": int(labels[g]),
                          "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": int(crowd[g])}  # fmt: skip
            if rles:
                annotation["segmentation"] = {"size": rles[g]["size"], "counts": rles[g]["counts"].decode("ascii")}
            if "area" in target:
                annotation["area"] = float(torch.as_tensor(target["area"]).reshape(-1)[g])
            else:
                annotation["area"] = float(mask_utils.area(rles[g])) if rles else (x2 - x1) * (y2 - y1)
            if keypoints is not None:
                annotation["keypoints"] = keypoints[g].reshape(-1).tolist()
                annotation["num_keypoints"] = int((keypoints[g, :, 2] > 0).sum())
            self.annotations.append(annotation)
        return image_id

    def coco(self, extra_category_ids=()) -> COCO:
        """The pycocotools index of what `add` recorded; the categories are the labels seen (and `extra_category_ids`)."""
        ids = sorted({a["category_id"] for a in self.annotations} | set(extra_category_ids))
        names = self.category_names
        categories = [{"id": k, "name": names[k] if 0 <= k < len(names) else f"class {k}"} for k in ids]
        annotations = self.annotations if self.with_masks else [{k: v for k, v in a.items() if k != "segmentation"}
                                                                 for a in self.annotations]  # fmt: skip
        coco = COCO()
        coco.dataset = {"images": self.images, "annotations": annotations, "categories": categories}
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints while it indexes
            coco.createIndex()
        return coco


def evaluate(
    model: torch.nn.Module,
    dataset,
    device: str | torch.device = "cpu",
    batch_size: int = 1,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
    num_workers: int = 0,
    amp: str = "off",
    verbose: bool = True,
) -> dict[str, dict[str, float]]:
    """Run `model` over `dataset` in eval mode and score its detections with COCOeval.

    model(images) takes a list of float [3, H, W] images and returns one detection dict per
    image, boxes and masks in the original image's pixels. dataset: a `CocoDataset` (its file is
    the ground truth, its `label_to_category_id` maps the labels back), or any data set of
    `(image, target)` pairs, whose ground truth is built from the targets (`TargetsToCoco`; label
    = category id, named by the data set's `category_names` if it has them); or a `Subset` of one.
    Box AP is always computed, mask AP when the detections and the ground truth have masks,
    keypoint AP ("keypoints", OKS with the data set's `sigmas`, COCO's for 17 keypoints) when
    both have keypoints. amp: "bf16" or "fp16" runs the forward under autocast (`mixed_precision`).
    With `output_dir`, writes `detections.json` (COCO results) and `metrics.json` there; verbose
    prints COCO's tables. The model's train/eval mode is restored afterwards.
    """
    base = base_dataset(dataset)
    if getattr(base, "train", False):
        raise ValueError("evaluate needs a dataset built with train=False: flipping would move the objects")
    autocast = mixed_precision(device, amp)  # checks `amp` before any work
    coco_gt = getattr(base, "coco", None)
    truth = TargetsToCoco(getattr(base, "category_names", None)) if coco_gt is None else None
    label_to_category_id = base.label_to_category_id if coco_gt is not None else _SameIds()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                                         num_workers=num_workers)  # fmt: skip
    was_training = model.training
    model.eval()
    results, image_ids, with_masks, with_keypoints = [], [], False, False
    try:
        with torch.inference_mode():
            for images, targets in tqdm(loader, desc="evaluate", unit="batch", disable=not progress):
                with autocast:
                    detections = model([image.to(device) for image in images])
                if truth is not None:
                    ids = [truth.add(image, target) for image, target in zip(images, targets)]
                else:
                    ids = [int(torch.as_tensor(target["image_id"]).reshape(-1)[0]) for target in targets]
                with_masks = with_masks or any("masks" in detection for detection in detections)
                with_keypoints = with_keypoints or any("keypoints" in detection for detection in detections)
                results += detections_to_coco_results(detections, ids, label_to_category_id)
                image_ids += ids
    finally:
        model.train(was_training)
    if truth is not None:
        coco_gt = truth.coco(extra_category_ids={r["category_id"] for r in results})
        with_masks, with_keypoints = with_masks and truth.with_masks, with_keypoints and truth.with_keypoints
    iou_types = ("bbox", "segm") if with_masks else ("bbox",)
    metrics = coco_evaluate(coco_gt, results, iou_types, image_ids=image_ids, verbose=verbose)
    sigmas = getattr(base, "sigmas", None)
    if with_keypoints and (sigmas is not None or truth is not None):
        num_keypoints = len(next(r["keypoints"] for r in results if "keypoints" in r)) // 3 if results else 0
        if sigmas is None and num_keypoints not in (0, len(COCO_PERSON_SIGMAS)):
            raise ValueError(f"keypoint AP needs one OKS sigma per keypoint ({num_keypoints}): give the data set "
                             "a `sigmas` attribute")  # fmt: skip
        keypoint_results = [{k: r[k] for k in ("image_id", "category_id", "keypoints", "score")} for r in results]
        metrics["keypoints"] = keypoint_metrics(coco_gt, keypoint_results, sigmas or COCO_PERSON_SIGMAS, image_ids,
                                                verbose)  # fmt: skip
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "detections.json").write_text(json.dumps(results))
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def keypoint_metrics(coco_gt: COCO, results: list[dict], sigmas, image_ids=None, verbose: bool = False) -> dict[str, float]:
    """COCO's keypoint AP and AR (OKS, module docstring) of `results` against `coco_gt`.

    results: COCO keypoint results, {"image_id", "category_id", "keypoints": [x, y, v] * J,
    "score"}; sigmas: J floats. Returns {"AP", "AP50", "AP75", "APm", "APl", "AR", ...}.
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        coco_dt = coco_gt.loadRes([dict(r) for r in results]) if results else None
        if coco_dt is None:
            return {name: 0.0 for name in KEYPOINT_METRIC_NAMES}
        evaluator = COCOeval(coco_gt, coco_dt, "keypoints")
        evaluator.params.kpt_oks_sigmas = sigmas  # COCO's are for the 17 person keypoints
        if image_ids is not None:
            evaluator.params.imgIds = sorted(set(image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
    with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(chatter):
        evaluator.summarize()
    return {name: float(value) for name, value in zip(KEYPOINT_METRIC_NAMES, evaluator.stats)}


def evaluate_keypoints(model: torch.nn.Module, dataset: KeypointCocoDataset, device="cpu", verbose: bool = False,
                       amp: str = "off") -> dict:  # fmt: skip
    """Run a Keypoint R-CNN over `dataset` and score it: {"bbox": ..., "segm": ... (with masks), "keypoints": ...}.

    `evaluate` without its files and progress bar. The score of a detection's keypoints is its box
    score, as torchvision's COCO evaluation does.
    """
    return evaluate(model, dataset, device, progress=False, amp=amp, verbose=verbose)
