"""COCO evaluation: detections -> COCO results -> COCOeval, with AP values reasoned out by hand.

Ground truth: two 100 x 100 images, each with one 40 x 40 square of category 7 (area 1600:
"medium"). A detection shifted right by dx pixels overlaps its square in (40 - dx) x 40 pixels,
and the union is (40 + dx) x 40, so box IoU = mask IoU = (40 - dx) / (40 + dx).

Keypoints: stick figures (mrcnn/data/keypoints.py) with their keypoints shifted by dx pixels,
against the OKS of the module docstring computed here from its formula.
"""

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mrcnn.data import CocoDataset, generate_shapes
from mrcnn.data.keypoints import KeypointCocoDataset, generate_figures
from mrcnn.evaluate import (
    METRIC_NAMES,
    coco_evaluate,
    detections_to_coco_results,
    evaluate,
    evaluate_keypoints,
    keypoint_metrics,
)

SIZE, SIDE = 100, 40
SQUARES = {1: (10, 20), 2: (30, 40)}  # image id -> (x, y) of the square's top-left corner
THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCO's IoU thresholds
RECALL_POINTS = np.linspace(0, 1, 101)  # COCO's recall points


def square_mask(x: int, y: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[y : y + SIDE, x : x + SIDE] = 1
    return mask


@pytest.fixture
def coco_gt() -> COCO:
    annotations = []
    for image_id, (x, y) in SQUARES.items():
        rle = mask_utils.encode(np.asfortranarray(square_mask(x, y)))
        annotations.append({"id": image_id, "image_id": image_id, "category_id": 7, "iscrowd": 0, "area": SIDE * SIDE,
                            "bbox": [x, y, SIDE, SIDE],
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})  # fmt: skip
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": SIZE, "width": SIZE} for i in SQUARES],
        "annotations": annotations,
        "categories": [{"id": 7, "name": "square"}, {"id": 9, "name": "unused"}],
    }
    coco.createIndex()
    return coco


def shifted_detection(image_id: int, dx: int, score: float = 0.9) -> dict:
    """One detection: the image's square moved right by dx, in the model's output format."""
    x, y = SQUARES[image_id]
    return {
        "boxes": torch.tensor([[x + dx, y, x + dx + SIDE, y + SIDE]], dtype=torch.float32),
        "labels": torch.tensor([1]),
        "scores": torch.tensor([score]),
        "masks": torch.from_numpy(square_mask(x + dx, y)).float()[None, None] * 0.8,  # probabilities
    }


LABEL_TO_CATEGORY = {1: 7, 2: 9}


def results_for(dx_per_image: dict, scores=None) -> list:
    ids = list(dx_per_image)
    detections = [shifted_detection(i, dx, (scores or {}).get(i, 0.9)) for i, dx in dx_per_image.items()]
    return detections_to_coco_results(detections, ids, LABEL_TO_CATEGORY)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools under numpy 2
def test_results_format_round_trips_boxes_and_masks():
    masks = torch.zeros(2, 1, 6, 8)
    masks[0, 0, 1:3, 2:5] = 0.5  # exactly the threshold: inside (>= 0.5)
    masks[0, 0, 4, 0] = 0.49  # just below: outside
    masks[1, 0, 5, 7] = 1.0
    detection = {"boxes": torch.tensor([[2.0, 1.0, 5.0, 3.0], [7.0, 5.0, 8.0, 6.0]]), "labels": torch.tensor([1, 2]),
                 "scores": torch.tensor([0.75, 0.25]), "masks": masks}  # fmt: skip
    results = detections_to_coco_results([detection], [42], {1: 3, 2: 11})
    assert [r["category_id"] for r in results] == [3, 11]
    assert results[0]["bbox"] == [2.0, 1.0, 3.0, 2.0] and results[0]["score"] == 0.75 and results[0]["image_id"] == 42
    json.dumps(results)  # plain JSON types only
    for d, result in enumerate(results):
        assert isinstance(result["segmentation"]["counts"], str)
        decoded = mask_utils.decode(result["segmentation"])
        np.testing.assert_array_equal(decoded, (masks[d, 0] >= 0.5).numpy().astype(np.uint8))
    assert detections_to_coco_results([{k: v[:0] for k, v in detection.items()}], [1], {1: 3}) == []
    with pytest.raises(ValueError, match="label 0"):
        detections_to_coco_results([{**detection, "labels": torch.tensor([0, 1])}], [42], {1: 3, 2: 11})
    with pytest.raises(ValueError, match="2 image ids"):
        detections_to_coco_results([detection], [1, 2], {1: 3, 2: 11})


def test_ground_truth_as_detections_scores_one(coco_gt, capsys):
    metrics = coco_evaluate(coco_gt, results_for({1: 0, 2: 0}))
    assert set(metrics) == {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        m = metrics[iou_type]
        assert list(m) == list(METRIC_NAMES)
        for name in ("AP", "AP50", "AP75", "APm", "AR1", "AR100"):
            assert m[name] == pytest.approx(1.0)  # COCOeval's precision is tp / (tp + fp + eps)
        assert m["APs"] == m["APl"] == -1.0  # no small or large objects: undefined
    printed = capsys.readouterr().out
    assert "IoU metric: bbox" in printed and "IoU metric: segm" in printed
    assert printed.count("Average Precision") == 12 and "Loading and preparing" not in printed


@pytest.mark.parametrize(
    "dx, thresholds_passed",
    [
        (13, 1),  # IoU 27/53 = 0.509: a hit only at t = 0.50
        (6, 5),  # IoU 34/46 = 0.739: hits at t = 0.50, 0.55, 0.60, 0.65, 0.70
        (2, 9),  # IoU 38/42 = 0.905: hits at every t up to 0.90
    ],
)
def test_shifted_detections_lose_the_strict_thresholds(coco_gt, dx, thresholds_passed):
    iou = (SIDE - dx) / (SIDE + dx)
    assert np.sum(THRESHOLDS <= iou) == thresholds_passed
    # every image's single detection is a hit (precision 1 at every recall) or a miss (AP_t = 0)
    expected = thresholds_passed / 10
    metrics = coco_evaluate(coco_gt, results_for({1: dx, 2: dx}), verbose=False)
    for iou_type in ("bbox", "segm"):
        m = metrics[iou_type]
        assert m["AP"] == pytest.approx(expected) and m["AR100"] == pytest.approx(expected)
        assert m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(1.0 if iou >= 0.75 else 0.0)


def test_a_ranking_of_hit_and_near_miss_gives_the_interpolated_precision(coco_gt):
    # image 1: exact (score 0.9); image 2: IoU 0.509 (score 0.8). At t = 0.50 both hit: AP_t = 1.
    # At the 9 stricter t the ranking is hit, miss: recall 1/2 at precision 1, then no more
    # recall, so the interpolated precision is 1 at the recall points r <= 1/2 and 0 above.
    metrics = coco_evaluate(coco_gt, results_for({1: 0, 2: 13}, {1: 0.9, 2: 0.8}), verbose=False)
    points = np.sum(RECALL_POINTS <= 0.5)  # 51 of the 101
    assert metrics["bbox"]["AP"] == pytest.approx((1 + 9 * points / 101) / 10)
    assert metrics["bbox"]["AR100"] == pytest.approx((1 + 9 * 0.5) / 10)
    # the ranking reversed: the miss comes first, the hit at precision 1/2
    metrics = coco_evaluate(coco_gt, results_for({1: 0, 2: 13}, {1: 0.8, 2: 0.9}), verbose=False)
    assert metrics["segm"]["AP"] == pytest.approx((1 + 9 * 0.5 * points / 101) / 10)


def test_empty_results_give_zero_not_a_crash(coco_gt):
    metrics = coco_evaluate(coco_gt, [], verbose=False)
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == 0.0 and metrics[iou_type]["AR100"] == 0.0
        assert metrics[iou_type]["APl"] == -1.0


def test_bad_evaluation_inputs_are_named(coco_gt):
    results = results_for({1: 0})
    with pytest.raises(ValueError, match="image id 5"):
        coco_evaluate(coco_gt, [{**results[0], "image_id": 5}])
    with pytest.raises(ValueError, match="segmentation"):
        coco_evaluate(coco_gt, [{k: v for k, v in results[0].items() if k != "segmentation"}])
    with pytest.raises(ValueError, match="iou_types"):
        coco_evaluate(coco_gt, results, iou_types=("keypoints",))
    assert "area" not in results[0]  # pycocotools' loadRes did not write into the caller's results


def test_image_ids_restrict_the_evaluation(coco_gt):
    # a detection only for image 1: over both images recall is 1/2; over image 1 alone it is 1
    results = results_for({1: 0})
    assert coco_evaluate(coco_gt, results, verbose=False)["bbox"]["AR100"] == pytest.approx(0.5)
    assert coco_evaluate(coco_gt, results, image_ids=[1], verbose=False)["bbox"]["AP"] == pytest.approx(1.0)


class GroundTruthModel(torch.nn.Module):
    """A stand-in for Mask R-CNN that 'detects' the ground truth of each image it recognizes."""

    def __init__(self, dataset: CocoDataset):
        super().__init__()
        self.answers = {}
        for index in range(len(dataset)):
            image, target = dataset[index]
            self.answers[image.numpy().tobytes()] = {
                "boxes": target["boxes"], "labels": target["labels"],
                "scores": torch.linspace(1.0, 0.5, len(target["labels"])),
                "masks": target["masks"][:, None].float(),
            }  # fmt: skip
            if "keypoints" in target:  # a Keypoint R-CNN's detections also carry [D, J, 3] keypoints
                self.answers[image.numpy().tobytes()]["keypoints"] = target["keypoints"]
        self.calls = 0

    def forward(self, images):
        assert not self.training
        self.calls += 1
        return [self.answers[image.numpy().tobytes()] for image in images]


@pytest.fixture(scope="module")
def shapes_val(tmp_path_factory):
    paths = generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=0, num_val=6, workers=0)
    return CocoDataset(paths.val_images, paths.val_annotations)


def test_evaluate_runs_a_model_and_writes_its_files(shapes_val, tmp_path):
    model = GroundTruthModel(shapes_val).train()
    metrics = evaluate(model, shapes_val, "cpu", batch_size=4, output_dir=tmp_path, progress=False)
    assert model.calls == 2 and model.training  # 6 images in batches of 4; mode restored
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    detections = json.loads((tmp_path / "detections.json").read_text())
    assert len(detections) == len(shapes_val.coco.getAnnIds())
    assert {d["image_id"] for d in detections} == set(shapes_val.image_ids)


def test_evaluate_scores_only_the_images_it_ran(shapes_val):
    subset = torch.utils.data.Subset(shapes_val, [0, 2, 3])
    metrics = evaluate(GroundTruthModel(shapes_val), subset, batch_size=2, progress=False)
    assert metrics["segm"]["AP"] == pytest.approx(1.0) and metrics["bbox"]["AR100"] == pytest.approx(1.0)


def test_evaluate_box_only_model_and_refusals(shapes_val):
    class BoxesOnly(GroundTruthModel):
        def forward(self, images):
            return [{k: v for k, v in d.items() if k != "masks"} for d in super().forward(images)]

    metrics = evaluate(BoxesOnly(shapes_val), shapes_val, progress=False)
    assert set(metrics) == {"bbox"} and metrics["bbox"]["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="train=False"):
        evaluate(BoxesOnly(shapes_val), CocoDataset(shapes_val.image_dir, shapes_val.annotation_file, train=True))
    with pytest.raises(ValueError, match="amp must be one of"):
        evaluate(BoxesOnly(shapes_val), shapes_val, amp="fp8")


# --- any data set: the ground truth built from its targets ----------------------------------------


class Nudged(GroundTruthModel):
    """The ground truth, with every other detection moved right by 3 pixels and its mask by 3 columns:
    an imperfect model, so that the scores below are not all 1."""

    def forward(self, images):
        detections = []
        for detection in super().forward(images):
            boxes, masks = detection["boxes"].clone(), detection["masks"].clone()
            boxes[::2, 0::2] += 3
            masks[::2] = masks[::2].roll(3, dims=-1)
            detections.append({**detection, "boxes": boxes, "masks": masks})
        return detections


def torchvision_style(dataset) -> list:
    """The data set as a plain list of (image, target), targets with only torchvision's keys (image_id a tensor)."""
    pairs = []
    for index in range(len(dataset)):
        image, target = dataset[index]
        kept = {k: target[k] for k in ("boxes", "labels", "masks", "keypoints") if k in target}
        pairs.append((image, {**kept, "image_id": torch.tensor([target["image_id"]])}))
    return pairs


def test_a_plain_list_is_scored_as_its_coco_file_scores_it(shapes_val):
    pairs = torchvision_style(shapes_val)
    from_file = evaluate(Nudged(shapes_val), shapes_val, progress=False, verbose=False)
    from_targets = evaluate(Nudged(shapes_val), pairs, batch_size=2, progress=False, verbose=False)
    assert 0.2 < from_file["segm"]["AP"] < 0.95 and 0.2 < from_file["bbox"]["AP"] < 0.95  # an imperfect model
    for iou_type in ("bbox", "segm"):
        assert from_targets[iou_type] == pytest.approx(from_file[iou_type]), iou_type

    boxes_only = [(image, {k: v for k, v in target.items() if k != "masks"}) for image, target in pairs]
    metrics = evaluate(GroundTruthModel(shapes_val), boxes_only, progress=False, verbose=False)
    assert set(metrics) == {"bbox"} and metrics["bbox"]["AP"] == pytest.approx(1.0)  # no masks to score masks against
    with pytest.raises(ValueError, match="image id 1 appears twice"):
        evaluate(GroundTruthModel(shapes_val), [pairs[0], pairs[0]], progress=False, verbose=False)


# --- keypoints: OKS (section 5) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def figures_root(tmp_path_factory):
    return generate_figures(tmp_path_factory.mktemp("figures"), num_train=0, num_val=4, seed=5)


def figures_val(root) -> KeypointCocoDataset:
    return KeypointCocoDataset(root / "val", root / "annotations" / "person_keypoints_val.json")


def shifted_keypoints(dataset: KeypointCocoDataset, dx: float) -> list[dict]:
    """Every object's ground truth as a keypoint result, its labelled keypoints moved right by dx pixels."""
    results = []
    for annotation in dataset.coco.loadAnns(dataset.coco.getAnnIds()):
        points = np.array(annotation["keypoints"], dtype=np.float64).reshape(-1, 3)
        points[points[:, 2] > 0, 0] += dx
        results.append({"image_id": annotation["image_id"], "category_id": 1, "keypoints": points.reshape(-1).tolist(),
                        "score": 1.0})  # fmt: skip
    return results


def oks(annotation: dict, dx: float, sigmas) -> float:
    """OKS of the annotation's keypoints moved by dx: mean over labelled j of exp(-dx^2 / (2 s^2 (2 sigma_j)^2))."""
    labelled = np.array(annotation["keypoints"]).reshape(-1, 3)[:, 2] > 0
    k = 2 * np.asarray(sigmas)[labelled]
    return float(np.mean(np.exp(-(dx**2) / (2 * annotation["area"] * k**2))))


@pytest.mark.parametrize("dx", [0.0, 1.5, 3.0, 6.0])
def test_keypoint_ap_of_one_figure_counts_the_thresholds_its_oks_reaches(figures_root, dx):
    """One object and one detection: AP_t is 1 when OKS >= t and 0 otherwise, so AP is the share of
    the ten thresholds 0.50..0.95 that the OKS reaches."""
    dataset = figures_val(figures_root)
    image_id = next(i for i in dataset.image_ids if len(dataset.coco.getAnnIds(imgIds=[i])) == 1)
    (annotation,) = dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=[image_id]))
    similarity = oks(annotation, dx, dataset.sigmas)
    assert np.abs(similarity - THRESHOLDS).min() > 1e-6  # not on a threshold, where rounding would decide
    results = [r for r in shifted_keypoints(dataset, dx) if r["image_id"] == image_id]
    metrics = keypoint_metrics(dataset.coco, results, dataset.sigmas, image_ids=[image_id])
    assert metrics["AP"] == pytest.approx(float(np.mean(similarity >= THRESHOLDS)))
    assert metrics["AR"] == pytest.approx(float(np.mean(similarity >= THRESHOLDS)))


def test_keypoint_ap_falls_with_the_error_and_is_zero_without_results(figures_root):
    dataset = figures_val(figures_root)
    aps = [keypoint_metrics(dataset.coco, shifted_keypoints(dataset, dx), dataset.sigmas)["AP"] for dx in (0.0, 2.0, 5.0)]
    assert aps[0] == pytest.approx(1.0) and aps[0] > aps[1] > aps[2]
    assert keypoint_metrics(dataset.coco, [], dataset.sigmas)["AP"] == 0


def test_evaluate_keypoints_runs_a_model_and_scores_boxes_masks_and_keypoints(figures_root):
    dataset = figures_val(figures_root)
    model = GroundTruthModel(dataset).train()
    metrics = evaluate_keypoints(model, dataset)
    assert model.training  # mode restored
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)
    assert metrics["keypoints"]["AP"] == pytest.approx(1.0)
    assert evaluate(model, torch.utils.data.Subset(dataset, [0, 1]), progress=False, verbose=False)["keypoints"]["AP"] == 1


class WithSigmas(list):
    sigmas = None


def test_keypoints_of_a_plain_list_are_scored_with_its_sigmas(figures_root):
    dataset = figures_val(figures_root)
    pairs = WithSigmas(torchvision_style(dataset))
    with pytest.raises(ValueError, match="needs one OKS sigma per keypoint"):  # 11 keypoints: COCO's 17 sigmas do not fit
        evaluate(GroundTruthModel(dataset), list(pairs), progress=False, verbose=False)
    pairs.sigmas = dataset.sigmas
    metrics = evaluate(GroundTruthModel(dataset), pairs, progress=False, verbose=False)
    assert metrics["keypoints"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)
