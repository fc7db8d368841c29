"""The box branch (mrcnn/box_head.py): hand-checked rules, and torchvision's RoIHeads step by step."""

import math

import pytest
import torch

from mrcnn.box_head import (
    BoxBranch,
    BoxHead,
    BoxPredictor,
    boxes_to_rois,
    fast_rcnn_loss,
    postprocess_detections,
    select_training_rois,
)
from mrcnn.boxes import BoxCoder
from mrcnn.matcher import BalancedSampler, Matcher
from mrcnn.poolers import MultiLevelRoIAlign

BOX_CODER = BoxCoder((10.0, 10.0, 5.0, 5.0))


def logits_for(probabilities: list[list[float]]) -> torch.Tensor:
    """Class logits whose softmax is the given probabilities (rows summing to 1)."""
    return torch.tensor(probabilities).log()


# --- inference rules, by hand --------------------------------------------------------------


def test_score_threshold_is_strict_and_background_is_never_detected():
    # K = 3: RoI 0 is class 1 at 0.9, class 2 at 0.04 (below 0.05); RoI 1 is background at 0.95
    class_logits = logits_for([[0.06, 0.9, 0.04], [0.95, 0.03, 0.02]])
    proposals = [torch.tensor([[10.0, 10.0, 30.0, 40.0], [50.0, 50.0, 60.0, 70.0]])]
    boxes, scores, labels = postprocess_detections(class_logits, torch.zeros(2, 12), proposals, [(100, 100)], BOX_CODER)
    assert labels[0].tolist() == [1]
    assert torch.allclose(scores[0], torch.tensor([0.9]))
    assert torch.allclose(boxes[0], proposals[0][:1])  # zero deltas decode to the proposal itself
    # a score exactly at the threshold is dropped: "> score_thresh"
    probabilities = torch.softmax(class_logits, dim=-1)
    _, scores, _ = postprocess_detections(class_logits, torch.zeros(2, 12), proposals, [(100, 100)], BOX_CODER,
                                          score_thresh=float(probabilities[0, 1]))
    assert scores[0].numel() == 0


def test_per_class_nms_keeps_overlapping_boxes_of_different_classes():
    same_box = [20.0, 20.0, 60.0, 60.0]
    proposals = [torch.tensor([same_box, same_box, [21.0, 20.0, 61.0, 60.0]])]
    # RoIs 0 and 2 (nearly the same box) both say class 1; RoI 1 (the same box) says class 2
    class_logits = logits_for([[0.1, 0.9, 0.0 + 1e-9], [0.2, 1e-9, 0.8], [0.3, 0.7, 1e-9]])
    boxes, scores, labels = postprocess_detections(class_logits, torch.zeros(3, 12), proposals, [(100, 100)], BOX_CODER)
    assert labels[0].tolist() == [1, 2]  # the class-1 duplicate (0.7) is suppressed, class 2 survives
    assert torch.allclose(scores[0], torch.tensor([0.9, 0.8]))


def test_top_detections_per_image_best_first():
    # 150 disjoint boxes, one class: NMS keeps all, the cap keeps the 100 best
    corner = torch.arange(150, dtype=torch.float32)[:, None] * 20
    proposals = [torch.cat([corner, torch.zeros(150, 1), corner + 10, torch.full((150, 1), 10.0)], dim=1)]
    foreground = torch.linspace(0.2, 0.9, 150)
    class_logits = torch.stack([1 - foreground, foreground], dim=1).log()  # [150, 2]
    boxes, scores, labels = postprocess_detections(class_logits, torch.zeros(150, 8), proposals, [(20, 4000)], BOX_CODER)
    assert scores[0].shape == (100,)
    assert torch.equal(scores[0], scores[0].sort(descending=True).values)
    assert torch.allclose(scores[0], foreground[50:].flip(0))
    _, scores, _ = postprocess_detections(class_logits, torch.zeros(150, 8), proposals, [(20, 4000)], BOX_CODER,
                                          detections_per_img=7)
    assert scores[0].shape == (7,)


def test_boxes_are_clipped_and_empty_boxes_removed():
    # RoI 0 reaches past the image; RoI 1 lies wholly outside it, so clipping leaves it empty
    proposals = [torch.tensor([[-10.0, 5.0, 50.0, 30.0], [120.0, 10.0, 150.0, 40.0]])]
    class_logits = logits_for([[0.1, 0.9], [0.1, 0.9]])
    boxes, _, _ = postprocess_detections(class_logits, torch.zeros(2, 8), proposals, [(40, 100)], BOX_CODER)
    assert torch.allclose(boxes[0], torch.tensor([[0.0, 5.0, 50.0, 30.0]]))


# --- training rules, by hand ---------------------------------------------------------------


def test_fast_rcnn_loss_by_hand():
    # two RoIs, K = 2: RoI 0 positive (class 1), RoI 1 background
    class_logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    labels = torch.tensor([1, 0])
    box_deltas = torch.zeros(2, 8)
    box_deltas[0, 4:] = torch.tensor([0.05, -1.0, 0.0, 0.0])  # class 1's deltas of RoI 0
    box_deltas[1, 4:] = 100.0  # a background RoI's deltas are not trained
    regression_targets = torch.zeros(2, 4)
    loss_classifier, loss_box_reg = fast_rcnn_loss(class_logits, box_deltas, labels, regression_targets)
    expected_classifier = (math.log(2) + math.log(1 + math.exp(-2.0))) / 2
    # smooth L1 with beta = 1/9: 0.5 * 0.05^2 * 9 (|x| < beta) + (1 - 0.5 / 9), then / R = 2
    expected_box = (0.5 * 0.05**2 * 9 + (1 - 0.5 / 9)) / 2
    assert math.isclose(loss_classifier.item(), expected_classifier, rel_tol=1e-6)
    assert math.isclose(loss_box_reg.item(), expected_box, rel_tol=1e-6)


def test_select_training_rois_by_hand():
    gt = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    proposals = [
        torch.tensor([[12.0, 10.0, 50.0, 50.0], [100.0, 100.0, 140.0, 140.0]]),  # a near copy, and far away
        torch.tensor([[0.0, 0.0, 20.0, 20.0]]),
    ]
    targets = [
        {"boxes": gt, "labels": torch.tensor([7])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # no objects
    ]
    sampled = select_training_rois(proposals, targets, Matcher(0.5, 0.5), BalancedSampler(512, 0.25), BOX_CODER)
    # image 0: the ground-truth box joins the proposals; everything is sampled (fewer than 512)
    assert torch.equal(sampled.boxes[0], torch.cat([proposals[0], gt]))
    assert sampled.labels[0].tolist() == [7, 0, 7]
    assert sampled.matched_gt_index[0].tolist() == [0, 0, 0]
    assert torch.allclose(sampled.regression_targets[0][2], torch.zeros(4))  # the gt box onto itself
    expected = BOX_CODER.encode(gt, proposals[0][:1])
    assert torch.equal(sampled.regression_targets[0][0], expected[0])
    # image 1: all background
    assert sampled.labels[1].tolist() == [0] and sampled.matched_gt_index[1].tolist() == [0]


def test_sampler_bounds_the_batch_and_the_positives():
    gt = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    near = gt + torch.randn(40, 4) * 0.5  # 40 positives
    far = torch.rand(200, 4) * 20 + torch.tensor([100.0, 100.0, 130.0, 130.0])  # 200 negatives
    targets = [{"boxes": gt, "labels": torch.tensor([3])}]
    sampled = select_training_rois([torch.cat([near, far])], targets, Matcher(0.5, 0.5), BalancedSampler(64, 0.25), BOX_CODER)
    assert sampled.labels[0].numel() == 64
    assert int((sampled.labels[0] > 0).sum()) == 16  # 25% of 64


def test_training_needs_valid_targets():
    proposals = [torch.rand(3, 4)]
    args = (Matcher(0.5, 0.5), BalancedSampler(8, 0.25), BOX_CODER)
    with pytest.raises(ValueError, match="training needs targets"):
        select_training_rois(proposals, None, *args)
    with pytest.raises(ValueError, match="int64"):
        select_training_rois(proposals, [{"boxes": torch.rand(1, 4), "labels": torch.tensor([1.0])}], *args)
    with pytest.raises(ValueError, match="1 images but 2 targets"):
        select_training_rois(proposals, [{"boxes": torch.rand(1, 4), "labels": torch.tensor([1])}] * 2, *args)


# --- modules and key maps -------------------------------------------------------------------


def test_shapes_and_key_maps():
    head, predictor = BoxHead(8, 7, 32), BoxPredictor(32, 5)
    class_logits, box_deltas = predictor(head(torch.rand(3, 8, 7, 7)))
    assert class_logits.shape == (3, 5) and box_deltas.shape == (3, 20)
    branch = BoxBranch(MultiLevelRoIAlign(7), head, predictor)
    key_map = branch.torchvision_key_map()
    assert set(key_map) == set(branch.state_dict())
    assert key_map["head.fc6.weight"] == "roi_heads.box_head.fc6.weight"
    assert key_map["predictor.class_logits.bias"] == "roi_heads.box_predictor.cls_score.bias"
    assert key_map["predictor.box_deltas.weight"] == "roi_heads.box_predictor.bbox_pred.weight"


def test_boxes_to_rois():
    rois = boxes_to_rois([torch.ones(2, 4), torch.zeros(0, 4), torch.full((1, 4), 2.0)])
    assert rois[:, 0].tolist() == [0.0, 0.0, 2.0] and rois.shape == (3, 5)


# --- against torchvision ------------------------------------------------------------------


def random_proposals(generator: torch.Generator, count: int, height: int, width: int) -> torch.Tensor:
    xy = torch.rand(count, 2, generator=generator) * torch.tensor([width, height]) * 0.9
    wh = torch.rand(count, 2, generator=generator) * torch.tensor([width, height]) * 0.5 + 2
    return torch.cat([xy, xy + wh], dim=1)


def random_targets(generator: torch.Generator, counts: list[int], height: int, width: int, num_classes: int):
    return [
        {"boxes": random_proposals(generator, g, height, width),
         "labels": torch.randint(1, num_classes, (g,), generator=generator)}
        for g in counts
    ]


class SharedPooler(torch.nn.Module):
    """Our pooler behind torchvision's pooler interface, so that both branches pool the same
    features: RoIAlign's own agreement with torchvision (to float rounding) is tested in
    tests/test_roi_align.py, and an exact comparison of the rest needs identical inputs."""

    def __init__(self, pooler: MultiLevelRoIAlign):
        super().__init__()
        self.pooler = pooler

    def forward(self, features: dict, proposals: list, image_shapes: list) -> torch.Tensor:
        return self.pooler(list(features.values()), boxes_to_rois(proposals))


def torchvision_roi_heads(branch: BoxBranch | None = None, **settings):
    """torchvision's RoIHeads with the paper's settings, and our branch's weights if given."""
    roi_heads = pytest.importorskip("torchvision.models.detection.roi_heads")
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    pool = head = predictor = None
    if branch is not None:
        pool = SharedPooler(branch.pooler)
        head = TwoMLPHead(branch.head.fc6.in_features, branch.head.fc6.out_features)
        predictor = FastRCNNPredictor(branch.predictor.class_logits.in_features, branch.predictor.class_logits.out_features)
        ours = branch.state_dict()
        state = {v.removeprefix("roi_heads."): ours[k] for k, v in branch.torchvision_key_map().items()}
        head.load_state_dict({k.removeprefix("box_head."): v for k, v in state.items() if k.startswith("box_head.")})
        predictor.load_state_dict({k.removeprefix("box_predictor."): v for k, v in state.items() if k.startswith("box_predictor.")})
    defaults = dict(fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=512, positive_fraction=0.25,
                    bbox_reg_weights=None, score_thresh=0.05, nms_thresh=0.5, detections_per_img=100)
    return roi_heads.RoIHeads(pool, head, predictor, **{**defaults, **settings})


@pytest.mark.torchvision
def test_heads_match_torchvision_with_copied_weights():
    branch = BoxBranch(MultiLevelRoIAlign(7), BoxHead(32, 7, 256), BoxPredictor(256, 91))  # narrow, to keep it fast
    reference = torchvision_roi_heads(branch)
    x = torch.randn(20, 32, 7, 7)
    assert torch.equal(branch.head(x), reference.box_head(x))
    for ours, theirs in zip(branch.predictor(branch.head(x)), reference.box_predictor(reference.box_head(x))):
        assert torch.equal(ours, theirs)


@pytest.mark.torchvision
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_select_training_rois_matches_torchvision(seed):
    reference = torchvision_roi_heads(batch_size_per_image=128)
    generator = torch.Generator().manual_seed(seed)
    proposals = [random_proposals(generator, n, 120, 160) for n in (300, 50, 80)]
    targets = random_targets(generator, [6, 0, 2], 120, 160, 91)  # the middle image has no objects
    proposals[0][:20] = targets[0]["boxes"].repeat(4, 1)[:20] + torch.rand(20, 4, generator=generator)  # positives

    torch.manual_seed(seed)
    boxes, matched, labels, regression = reference.select_training_samples([p.clone() for p in proposals], targets)
    torch.manual_seed(seed)
    sampled = select_training_rois(proposals, targets, Matcher(0.5, 0.5), BalancedSampler(128, 0.25), BOX_CODER)
    for i in range(3):
        assert torch.equal(sampled.boxes[i], boxes[i])
        assert torch.equal(sampled.labels[i], labels[i])
        assert torch.equal(sampled.matched_gt_index[i], matched[i])
        torch.testing.assert_close(sampled.regression_targets[i], regression[i], rtol=0, atol=0, equal_nan=True)


@pytest.mark.torchvision
def test_fast_rcnn_loss_matches_torchvision():
    roi_heads = pytest.importorskip("torchvision.models.detection.roi_heads")
    labels = [torch.randint(0, 5, (40,)), torch.randint(0, 5, (24,))]
    targets = [torch.randn(40, 4), torch.randn(24, 4)]
    class_logits, box_deltas = torch.randn(64, 5), torch.randn(64, 20)
    expected = roi_heads.fastrcnn_loss(class_logits, box_deltas, labels, targets)
    ours = fast_rcnn_loss(class_logits, box_deltas, torch.cat(labels), torch.cat(targets))
    assert torch.equal(ours[0], expected[0]) and torch.equal(ours[1], expected[1])


@pytest.mark.torchvision
@pytest.mark.parametrize("sharpness", [3.0, 0.3])  # peaked scores (few candidates), flat ones (thousands: NMS per class)
def test_postprocess_detections_matches_torchvision(sharpness):
    reference = torchvision_roi_heads()
    generator = torch.Generator().manual_seed(0)
    sizes = [(120, 160), (90, 70)]
    proposals = [random_proposals(generator, 400, *sizes[0]), random_proposals(generator, 150, *sizes[1])]
    class_logits = torch.randn(550, 91, generator=generator) * sharpness
    class_logits[:, 1:12] += 4.0  # a handful of likely classes, so that many candidates pass 0.05
    box_deltas = torch.randn(550, 91 * 4, generator=generator) * 0.5
    expected = reference.postprocess_detections(class_logits, box_deltas, proposals, sizes)
    ours = postprocess_detections(class_logits, box_deltas, proposals, sizes, BOX_CODER)
    for theirs, mine in zip(expected, ours):
        for a, b in zip(theirs, mine):
            assert a.numel() > 0 and torch.equal(a, b)


@pytest.mark.torchvision
def test_box_branch_matches_torchvision_roi_heads():
    torch.manual_seed(0)
    branch = BoxBranch(MultiLevelRoIAlign(7), BoxHead(16, 7, 64), BoxPredictor(64, 6), batch_size_per_image=64)
    reference = torchvision_roi_heads(branch, batch_size_per_image=64)
    sizes = [(64, 96), (60, 80)]
    features = [torch.randn(2, 16, 64 // s, 96 // s) for s in (4, 8, 16, 32)]
    generator = torch.Generator().manual_seed(1)
    proposals = [random_proposals(generator, 100, *size) for size in sizes]
    targets = random_targets(generator, [3, 2], 60, 80, 6)
    named = dict(zip("0123", features))

    branch.eval(), reference.eval()
    detections, _ = branch(features, proposals, sizes)
    expected, _ = reference(named, proposals, sizes)
    for ours, theirs in zip(detections, expected):
        assert ours["boxes"].numel() > 0
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(ours[key], theirs[key])

    branch.train(), reference.train()
    torch.manual_seed(5)
    _, losses = branch(features, proposals, sizes, targets)
    torch.manual_seed(5)
    _, expected_losses = reference(named, [p.clone() for p in proposals], sizes, targets)
    assert set(losses) == set(expected_losses)
    for key in losses:
        assert torch.equal(losses[key], expected_losses[key])
