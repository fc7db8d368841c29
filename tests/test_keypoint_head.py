"""The keypoint branch (mrcnn/keypoint_head.py): one-hot targets, the loss, decoding, torchvision, learning."""

import math

import pytest
import torch
import torch.nn.functional as F

from mrcnn.box_head import TrainingRoIs
from mrcnn.keypoint_head import (
    KeypointBranch,
    KeypointHead,
    KeypointPredictor,
    heatmaps_to_keypoints,
    keypoint_loss,
    keypoint_targets,
    uniform_loss,
)
from mrcnn.poolers import MultiLevelRoIAlign

STRIDES = (4, 8, 16, 32)


def small_branch(channels: int = 8, num_keypoints: int = 5, strides=STRIDES) -> KeypointBranch:
    return KeypointBranch(MultiLevelRoIAlign(14, strides), KeypointHead(channels, (channels,) * 3),
                          KeypointPredictor(channels, num_keypoints))  # fmt: skip


def test_shapes_and_initialization():
    head, predictor = KeypointHead(16, (32,) * 8), KeypointPredictor(32, 17)
    assert len(head.layers) == 8
    logits = predictor(head(torch.randn(3, 16, 14, 14)))
    assert logits.shape == (3, 17, 56, 56)
    paper = KeypointHead(256)
    assert [conv.out_channels for conv in paper.layers] == [512] * 8  # "eight 3x3 512-d conv layers"
    expected_std = math.sqrt(2.0 / (512 * 9))  # kaiming, fan_out, ReLU gain
    assert abs(paper.layers[3].weight.std().item() / expected_std - 1) < 0.02
    assert torch.equal(paper.layers[3].bias, torch.zeros(512)) and torch.equal(predictor.deconv.bias, torch.zeros(17))
    with pytest.raises(ValueError, match="num_keypoints"):
        KeypointPredictor(32, 0)


def test_key_maps():
    branch = small_branch()
    key_map = branch.torchvision_key_map()
    assert set(key_map) == set(branch.state_dict())
    assert key_map["head.layers.0.weight"] == "roi_heads.keypoint_head.0.weight"
    assert key_map["head.layers.2.bias"] == "roi_heads.keypoint_head.4.bias"  # conv, ReLU, conv, ReLU, conv
    assert key_map["predictor.deconv.weight"] == "roi_heads.keypoint_predictor.kps_score_lowres.weight"


def test_targets_by_hand():
    # a 56 x 28 box: a heatmap pixel is 1 image pixel wide and 0.5 pixel tall
    boxes = torch.tensor([[10.0, 20.0, 66.0, 48.0]])
    keypoints = torch.tensor([[[10.0, 20.0, 2], [10.9, 20.6, 1], [65.99, 47.99, 2], [66.0, 48.0, 2],
                               [9.99, 25.0, 2], [30.0, 25.0, 0], [30.0, 48.5, 2]]])  # fmt: skip
    targets, valid = keypoint_targets(keypoints, boxes, 56)
    assert valid.tolist() == [[True, True, True, True, False, False, False]]
    # (i, j) = (0, 0), (0, 1), (55, 55), the corner (66, 48) clamped to (55, 55); t = 56 j + i
    assert targets[0, :4].tolist() == [0, 56, 56 * 55 + 55, 56 * 55 + 55]
    assert targets[0, 4:].tolist() == [0, 0, 0]  # not valid: zero
    with pytest.raises(ValueError, match="keypoints"):
        keypoint_targets(keypoints[0], boxes, 56)


def random_boxes_and_keypoints(generator, count=40, num_keypoints=7, sizes=(4.0, 154.0)):
    x1y1 = torch.rand(count, 2, generator=generator) * 100
    wh = sizes[0] + torch.rand(count, 2, generator=generator) * (sizes[1] - sizes[0])
    boxes = torch.cat([x1y1, x1y1 + wh], dim=1)  # [R, 4]
    inside = x1y1[:, None] + torch.rand(count, num_keypoints, 2, generator=generator) * wh[:, None]  # [R, J, 2]
    visibility = torch.randint(0, 3, (count, num_keypoints, 1), generator=generator).float()
    return boxes, torch.cat([inside, visibility], dim=2)  # [R, J, 3]


def one_hot_logits(targets: torch.Tensor, size: int, peak: float = 10.0) -> torch.Tensor:
    logits = torch.zeros(*targets.shape, size * size)
    return logits.scatter_(2, targets[..., None], peak).reshape(*targets.shape, size, size)  # [R, J, M, M]


def test_target_and_decoding_round_trip_within_the_quantization_error():
    """In a box of at least M x M pixels, a keypoint encoded to its one-hot pixel and decoded from
    that heatmap lands within half a heatmap pixel plus half an image pixel,
    |error| <= w / (2 M) + w / (2 ceil(w)); plus another half image pixel in the first and last
    heatmap column (row), where bicubic interpolation repeats the edge value outwards."""
    generator = torch.Generator().manual_seed(0)
    size = 56
    boxes, keypoints = random_boxes_and_keypoints(generator, count=100, sizes=(size, 200.0))
    keypoints[..., 2] = 2
    targets, valid = keypoint_targets(keypoints, boxes, size)
    assert bool(valid.all())
    decoded, scores = heatmaps_to_keypoints(one_hot_logits(targets, size), boxes)
    for axis, cell in ((0, targets % size), (1, targets // size)):
        extent = (boxes[:, axis + 2] - boxes[:, axis])[:, None]  # [R, 1]: w or h
        edge = ((cell == 0) | (cell == size - 1)).float()  # [R, J]
        bound = extent / (2 * size) + (1 + edge) * extent / (2 * extent.ceil()) + 1e-4  # [R, J]
        error = (decoded[..., axis] - keypoints[..., axis]).abs()  # [R, J]
        assert bool((error <= bound).all()), error.max()
    assert bool((decoded[..., 2] == 1).all()) and bool((scores > 5).all())  # the peak's (interpolated) logit
    # and re-encoding the decoded point gives back the same heatmap pixel
    assert torch.equal(keypoint_targets(decoded, boxes, size)[0], targets)


def test_decoding_in_boxes_smaller_than_the_heatmap_needs_a_smooth_peak():
    """Resizing 56 -> ceil(w) < 56 samples the heatmap every 56 / ceil(w) pixels (no anti-aliasing,
    as torchvision): a one-hot peak can fall between the samples and be lost, while a peak a few
    heatmap pixels wide, as a trained head predicts, still decodes within one image pixel."""
    generator = torch.Generator().manual_seed(0)
    size = 56
    boxes, keypoints = random_boxes_and_keypoints(generator, count=100, sizes=(4.0, 20.0))
    keypoints[..., 2] = 2
    targets, _ = keypoint_targets(keypoints, boxes, size)
    one_hot, _ = heatmaps_to_keypoints(one_hot_logits(targets, size), boxes)
    assert (one_hot[..., :2] - keypoints[..., :2]).abs().max() > 2  # lost peaks land anywhere in the box
    columns, rows = (targets % size).float(), (targets // size).float()  # [R, J]
    grid = torch.arange(size, dtype=torch.float32)
    smooth = -((grid - columns[..., None, None]) ** 2 + (grid[:, None] - rows[..., None, None]) ** 2) / 2  # sigma 1 pixel
    decoded, _ = heatmaps_to_keypoints(smooth, boxes)
    assert (decoded[..., :2] - keypoints[..., :2]).abs().max() < 1.0


def test_loss_on_hand_made_heatmaps():
    targets = torch.tensor([[0, 5, 3135], [17, 0, 0]])  # [R, J] = [2, 3]
    valid = torch.tensor([[True, True, True], [True, False, False]])
    uniform = torch.zeros(2, 3, 56, 56, requires_grad=True)
    loss = keypoint_loss(uniform, targets, valid)
    assert loss.item() == pytest.approx(math.log(56 * 56), rel=1e-6) == uniform_loss(56)
    loss.backward()
    assert uniform.grad[1, 1].abs().sum() == 0  # no gradient from keypoints that are not valid
    # one sharp peak at the target: -log softmax, by hand
    peaked = torch.zeros(2, 3, 56, 56)
    peaked.view(2, 3, -1).scatter_(2, targets[..., None], 5.0)
    expected = math.log(math.exp(5.0) + 56 * 56 - 1) - 5.0  # -log(e^5 / (e^5 + M^2 - 1))
    assert keypoint_loss(peaked, targets, valid).item() == pytest.approx(expected, rel=1e-4)
    # no valid keypoint: a zero that still backpropagates
    empty = keypoint_loss(uniform, targets, torch.zeros_like(valid))
    assert empty.item() == 0 and empty.requires_grad
    with pytest.raises(ValueError, match="targets and valid"):
        keypoint_loss(uniform, targets[:, :2], valid[:, :2])


def test_branch_trains_on_positive_rois_and_predicts_on_detections():
    branch = small_branch(num_keypoints=3)
    features = [torch.randn(2, 8, 64 // s, 96 // s) for s in STRIDES]
    keypoints = [torch.tensor([[[20.0, 20.0, 2], [30.0, 25.0, 1], [0.0, 0.0, 0]]]),
                 torch.tensor([[[50.0, 30.0, 2], [60.0, 40.0, 2], [70.0, 50.0, 2]], [[5.0, 5, 2], [6, 6, 2], [7, 7, 2]]])]
    targets = [{"keypoints": k} for k in keypoints]
    rois = TrainingRoIs(
        boxes=[torch.tensor([[10.0, 10.0, 40.0, 40.0], [0.0, 0.0, 5.0, 5.0]]), torch.tensor([[40.0, 20.0, 80.0, 60.0]])],
        labels=[torch.tensor([1, 0]), torch.tensor([1])],
        regression_targets=[torch.zeros(2, 4), torch.zeros(1, 4)],
        matched_gt_index=[torch.tensor([0, 0]), torch.tensor([0])],
    )
    losses = branch.loss(features, rois, targets)
    positive_boxes = torch.tensor([[10.0, 10.0, 40.0, 40.0], [40.0, 20.0, 80.0, 60.0]])
    logits = branch.keypoint_logits(features, [positive_boxes[:1], positive_boxes[1:]])
    expected_targets, valid = keypoint_targets(torch.cat([keypoints[0], keypoints[1][:1]]), positive_boxes, 56)
    assert valid.sum() == 5  # v = 0 and the keypoint on the box's corner... (70, 50) is inside; (0, 0) is not
    torch.testing.assert_close(losses["loss_keypoint"], keypoint_loss(logits, expected_targets, valid))
    detections = [{"boxes": positive_boxes, "labels": torch.tensor([1, 1]), "scores": torch.tensor([0.9, 0.8])},
                  {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}]
    branch.eval()
    with torch.no_grad():
        results = branch.predict(features, detections)
    assert results[0]["keypoints"].shape == (2, 3, 3) and results[1]["keypoints"].shape == (0, 3, 3)
    assert results[0]["keypoints_scores"].shape == (2, 3)
    inside = (results[0]["keypoints"][..., :2] >= positive_boxes[:, None, :2]) & (results[0]["keypoints"][..., :2] <= positive_boxes[:, None, 2:])
    assert bool(inside.all())


# --- torchvision, function by function and layer by layer ---------------------------------------


@pytest.mark.torchvision
def test_targets_loss_and_decoding_match_torchvision():
    pytest.importorskip("torchvision")
    from torchvision.models.detection import roi_heads

    generator = torch.Generator().manual_seed(1)
    boxes, keypoints = random_boxes_and_keypoints(generator, count=30, num_keypoints=5)
    keypoints[:5, :, :2] -= 20  # some outside their box
    keypoints[5, 0, 0], keypoints[6, 1, 1] = boxes[5, 2], boxes[6, 3]  # exactly on the far edges
    heatmaps, valid = roi_heads.keypoints_to_heatmap(keypoints, boxes, 56)
    ours, our_valid = keypoint_targets(keypoints, boxes, 56)
    assert torch.equal(ours, heatmaps) and torch.equal(our_valid, valid.bool())

    logits = torch.randn(30, 5, 56, 56, generator=generator)
    split = [boxes[:12], boxes[12:]]
    matched = [torch.arange(12), torch.arange(18)]
    expected = roi_heads.keypointrcnn_loss(logits, split, [keypoints[:12], keypoints[12:]], matched)
    torch.testing.assert_close(keypoint_loss(logits, ours, our_valid), expected)

    boxes[0] = torch.tensor([3.0, 4.0, 3.5, 4.2])  # thinner than a pixel: widened to one
    theirs, their_scores = roi_heads.heatmaps_to_keypoints(logits, boxes)
    decoded, scores = heatmaps_to_keypoints(logits, boxes)
    assert torch.equal(decoded, theirs) and torch.equal(scores, their_scores)


@pytest.mark.torchvision
def test_head_and_predictor_match_torchvision_with_the_same_weights():
    pytest.importorskip("torchvision")
    from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor

    branch = small_branch(channels=16, num_keypoints=6)
    their_head, their_predictor = KeypointRCNNHeads(16, (16,) * 3), KeypointRCNNPredictor(16, 6)
    state = {f"roi_heads.keypoint_head.{k}": v for k, v in their_head.state_dict().items()}
    state.update({f"roi_heads.keypoint_predictor.{k}": v for k, v in their_predictor.state_dict().items()})
    branch.load_state_dict({ours: state[theirs] for ours, theirs in branch.torchvision_key_map().items()})
    roi_features = torch.randn(4, 16, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(branch.predictor(branch.head(roi_features)), their_predictor(their_head(roi_features)))


# --- learning: a small keypoint model overfits a few figures -------------------------------------


class TinyFeatures(torch.nn.Module):
    """Three random convolutions to stride 4: features that say where the figures' pixels are."""

    def __init__(self, channels: int = 32):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Conv2d(3, channels, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(channels, channels, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.ReLU(),
        )  # fmt: skip

    def forward(self, images):
        return [self.layers(images)]  # one level, stride 4




@pytest.mark.slow
def test_a_small_keypoint_model_overfits_a_few_figures(one_thread):
    """The branch alone, on fixed random features and the ground-truth boxes, learns four images'
    keypoints from the uniform loss log(56^2) to within a pixel or two (about 10 s).

    Trained much longer, the logits far from the keypoints sink to -100s in the deconvolution's
    checkerboard, and bicubic decoding rings there: some decoded keypoints then jump away even
    though every heatmap's argmax is right. 150 steps stop before that."""
    from mrcnn.data.keypoints import FiguresDataset

    torch.manual_seed(0)
    dataset = FiguresDataset(4, seed=3, max_figures=2)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])  # [4, 3, 128, 128]
    targets = [dataset[i][1] for i in range(len(dataset))]
    boxes = [t["boxes"] for t in targets]
    rois = TrainingRoIs(boxes, [torch.ones(len(b), dtype=torch.int64) for b in boxes], [torch.zeros(len(b), 4) for b in boxes],
                        [torch.arange(len(b)) for b in boxes])  # the ground-truth boxes are the RoIs  # fmt: skip
    with torch.no_grad():
        features = TinyFeatures()(images)
    branch = KeypointBranch(MultiLevelRoIAlign(14, (4,)), KeypointHead(32, (32,) * 4), KeypointPredictor(32, 11))
    optimizer = torch.optim.Adam(branch.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = branch.loss(features, rois, targets)["loss_keypoint"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(uniform_loss(56), abs=0.3)  # it starts knowing nothing
    branch.eval()
    with torch.no_grad():
        detections = branch.predict(features, [{"boxes": b} for b in boxes])
    errors = []
    for detection, target in zip(detections, targets):
        labelled = target["keypoints"][..., 2] > 0
        distance = (detection["keypoints"][..., :2] - target["keypoints"][..., :2]).norm(dim=-1)  # [G, J]
        errors.append(distance[labelled])
    errors = torch.cat(errors)
    print(f"loss {losses[0]:.2f} -> {losses[-1]:.2f}; keypoint error median {errors.median():.2f} px, "
          f"{(errors < 3).float().mean():.0%} within 3 px")  # fmt: skip
    assert losses[-1] < 2.0
    assert errors.median() < 1.5 and (errors < 3.0).float().mean() > 0.75


# --- the whole Keypoint R-CNN against torchvision's, on the same weights -------------------------


@pytest.mark.torchvision
@pytest.mark.slow
def test_torchvision_keypoint_rcnn_weights_give_the_same_keypoints(tmp_path):
    pytest.importorskip("torchvision")
    from torchvision.models import resnet50
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.keypoint_rcnn import KeypointRCNN
    from torchvision.ops.misc import FrozenBatchNorm2d

    from mrcnn.weights import from_torchvision_keypoint_rcnn

    # keypointrcnn_resnet50_fpn as built for pretrained weights (frozen batch norm, 3 trainable stages)
    torch.manual_seed(0)
    reference = KeypointRCNN(_resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3), num_classes=2).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, buffer in reference.backbone.body.named_buffers():  # a frozen batch norm that is not the identity
            if name.endswith(("running_mean", "bias")):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
            elif name.endswith(("running_var", "weight")) and buffer.dim() == 1:
                buffer.copy_(torch.rand(buffer.shape, generator=generator) * 0.5 + 0.75)
        # untrained features are large: soften the classifier so that boxes score above 0.05
        reference.roi_heads.box_predictor.cls_score.weight.mul_(1e-3)
        reference.roi_heads.box_predictor.cls_score.bias.copy_(torch.tensor([0.0, 0.5]))
    path = tmp_path / "keypointrcnn_resnet50_fpn.pth"
    torch.save(reference.state_dict(), path)
    from mrcnn.config import torchvision_keypointrcnn_resnet50_fpn

    # torchvision's bits need its plain convolutions; the default folds the frozen batch norm (mrcnn/fuse.py)
    model = from_torchvision_keypoint_rcnn(path, torchvision_keypointrcnn_resnet50_fpn().replace(fast_convolutions=False))
    assert model.config.num_keypoints == 17 and model.mask_branch is None

    images = [torch.rand(3, 200, 240, generator=generator)]
    with torch.no_grad():
        detections, expected = model(images), reference(images)
    for ours, theirs in zip(detections, expected):
        assert ours["boxes"].shape[0] > 10  # the comparison means something
        torch.testing.assert_close(ours["boxes"], theirs["boxes"], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(ours["scores"], theirs["scores"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours["keypoints_scores"], theirs["keypoints_scores"], atol=1e-3, rtol=1e-3)
        # an argmax may move where two heatmap values tie to float rounding: all but a few agree
        agree = ((ours["keypoints"] - theirs["keypoints"]).abs() < 1e-2).all(dim=-1)  # [D, J]
        print(f"{ours['boxes'].shape[0]} detections; keypoints that agree: {agree.float().mean():.4f}")
        assert agree.float().mean() > 0.99, agree.float().mean()
