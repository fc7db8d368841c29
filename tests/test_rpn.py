"""The RPN: head shapes and init, proposals and losses in both modes, and torchvision's exact numbers."""

import math
from collections import OrderedDict

import pytest
import torch

from mrcnn.anchors import AnchorGenerator
from mrcnn.rpn import RegionProposalNetwork, RPNHead, flatten_predictions

STRIDES = (4, 8, 16, 32, 64)
CHANNELS = 8


def make_features(num_images: int, padded_size: tuple[int, int], generator: torch.Generator) -> list[torch.Tensor]:
    """FPN-like features: P2..P6 of a padded batch, with torchvision's rounding up of odd sizes."""
    return [
        torch.randn(num_images, CHANNELS, math.ceil(padded_size[0] / s), math.ceil(padded_size[1] / s), generator=generator)
        for s in STRIDES
    ]


def make_rpn(**kwargs) -> RegionProposalNetwork:
    head = RPNHead(CHANNELS, 3)
    with torch.no_grad():  # larger weights than the init, so proposals spread out
        for parameter in head.parameters():
            parameter.normal_(0, 0.3)
    return RegionProposalNetwork(AnchorGenerator(), head, **kwargs)


TARGETS = [
    {"boxes": torch.tensor([[10.0, 20.0, 100.0, 200.0], [150.0, 30.0, 300.0, 120.0], [40.0, 40.0, 56.0, 60.0]])},
    {"boxes": torch.tensor([[0.0, 0.0, 250.0, 180.0]])},
]


def test_head_shapes_and_init():
    head = RPNHead(64, 3)
    assert head.conv.weight.shape == (64, 64, 3, 3)
    assert head.objectness.weight.shape == (3, 64, 1, 1) and head.box_deltas.weight.shape == (12, 64, 1, 1)
    for layer in (head.conv, head.objectness, head.box_deltas):
        assert layer.weight.std().item() == pytest.approx(0.01, rel=0.25)
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    features = [torch.randn(2, 64, 10, 12), torch.randn(2, 64, 5, 6)]
    objectness, deltas = head(features)
    assert [o.shape for o in objectness] == [(2, 3, 10, 12), (2, 3, 5, 6)]
    assert [d.shape for d in deltas] == [(2, 12, 10, 12), (2, 12, 5, 6)]


def test_flatten_puts_predictions_in_anchor_order():
    # objectness[n, a, i, j] must land at ((i W + j) A + a), the anchor generator's order
    n, a, h, w = 2, 3, 4, 5
    objectness = torch.arange(n * a * h * w, dtype=torch.float32).view(n, a, h, w)
    deltas = torch.arange(n * a * 4 * h * w, dtype=torch.float32).view(n, a * 4, h, w)
    flat_objectness, flat_deltas = flatten_predictions([objectness], [deltas])
    assert flat_objectness.shape == (n, h * w * a) and flat_deltas.shape == (n, h * w * a, 4)
    assert flat_objectness[1, (2 * w + 3) * a + 1].item() == objectness[1, 1, 2, 3].item()
    assert flat_deltas[1, (2 * w + 3) * a + 1].tolist() == deltas[1, 4:8, 2, 3].tolist()


def test_eval_shapes_bounds_and_no_losses():
    generator = torch.Generator().manual_seed(0)
    padded_size, image_sizes = (128, 160), [(120, 160), (128, 100)]
    rpn = make_rpn(pre_nms_top_n=dict(training=300, testing=50), post_nms_top_n=dict(training=200, testing=40)).eval()
    proposals, losses = rpn(make_features(2, padded_size, generator), image_sizes, padded_size)
    assert losses == {}
    assert len(proposals) == 2
    for boxes, (height, width) in zip(proposals, image_sizes):
        assert boxes.dim() == 2 and boxes.shape[1] == 4 and 0 < boxes.shape[0] <= 40
        assert not boxes.requires_grad
        assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all())
        assert bool((boxes[:, 2] - boxes[:, 0] >= 1e-3).all() and (boxes[:, 3] - boxes[:, 1] >= 1e-3).all())


def test_train_losses_are_finite_and_train_the_head():
    generator = torch.Generator().manual_seed(1)
    padded_size, image_sizes = (256, 320), [(256, 300), (240, 320)]
    rpn = make_rpn().train()
    proposals, losses = rpn(make_features(2, padded_size, generator), image_sizes, padded_size, TARGETS)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg"}
    assert all(loss.dim() == 0 and torch.isfinite(loss) for loss in losses.values())
    assert all(0 < boxes.shape[0] <= 2000 for boxes in proposals)
    sum(losses.values()).backward()
    for parameter in rpn.head.parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_zero_logits_give_an_objectness_loss_of_log_two():
    generator = torch.Generator().manual_seed(2)
    padded_size = (128, 128)
    rpn = make_rpn().train()
    with torch.no_grad():
        rpn.head.objectness.weight.zero_()
        rpn.head.objectness.bias.zero_()
    _, losses = rpn(make_features(2, padded_size, generator), [padded_size] * 2, padded_size, TARGETS)
    # sigmoid(0) = 1/2 for every sampled anchor, positive or negative: BCE = log 2
    assert losses["loss_objectness"].item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_an_image_without_boxes_is_all_background():
    generator = torch.Generator().manual_seed(3)
    padded_size = (128, 128)
    rpn = make_rpn().train()
    empty = [{"boxes": torch.zeros(0, 4)}]
    features = make_features(1, padded_size, generator)
    _, losses = rpn(features, [padded_size], padded_size, empty)
    assert losses["loss_rpn_box_reg"].item() == 0.0  # no positives
    labels, matched = rpn.assign_targets(torch.cat(rpn.anchor_generator(padded_size, [f.shape[-2:] for f in features])), empty)
    assert bool((labels[0] == 0).all()) and bool((matched[0] == 0).all())
    assert torch.isfinite(losses["loss_objectness"]) and losses["loss_objectness"].item() > 0


def test_assign_targets_labels():
    rpn = make_rpn()
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 8.0], [0.0, 0.0, 10.0, 5.0], [50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 20.0, 20.0]])
    target = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]])}]
    labels, matched = rpn.assign_targets(anchors, target)
    # IoU 1 -> positive; 0.8 -> positive; 0.5 -> ignored; 0 -> negative; 0.25 -> negative
    assert labels[0].tolist() == [1.0, 1.0, -1.0, 0.0, 0.0]
    assert torch.equal(matched[0][0], target[0]["boxes"][0])


def test_training_without_targets_raises():
    generator = torch.Generator().manual_seed(4)
    rpn = make_rpn().train()
    with pytest.raises(ValueError, match="targets"):
        rpn(make_features(1, (64, 64), generator), [(64, 64)], (64, 64))


# --- torchvision ---------------------------------------------------------------------------------


def torchvision_pair(**kwargs):
    """Our RPN and torchvision's with the same head weights (torchvision's names mapped to ours)."""
    pytest.importorskip("torchvision")
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
    from torchvision.models.detection.rpn import RegionProposalNetwork as TorchvisionRPN
    from torchvision.models.detection.rpn import RPNHead as TorchvisionRPNHead

    ours = make_rpn(**kwargs)
    settings = dict(
        fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
        pre_nms_top_n=dict(training=2000, testing=1000), post_nms_top_n=dict(training=2000, testing=1000), nms_thresh=0.7,
    )
    settings.update(kwargs)
    head = TorchvisionRPNHead(CHANNELS, 3)
    key_map = {"conv.0.0.": "conv.", "cls_logits.": "objectness.", "bbox_pred.": "box_deltas."}
    our_state = ours.head.state_dict()
    theirs_state = {}
    for key in head.state_dict():
        prefix = next(p for p in key_map if key.startswith(p))
        theirs_state[key] = our_state[key_map[prefix] + key[len(prefix):]]
    head.load_state_dict(theirs_state)
    anchors = TorchvisionAnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    return ours, TorchvisionRPN(anchors, head, **settings)


def run_both(ours, theirs, features, image_sizes, padded_size, targets=None, seed=0):
    from torchvision.models.detection.image_list import ImageList

    images = ImageList(torch.zeros(features[0].shape[0], 3, *padded_size), image_sizes)
    torch.manual_seed(seed)
    their_result = theirs(images, OrderedDict((str(i), f) for i, f in enumerate(features)), targets)
    torch.manual_seed(seed)
    our_result = ours(features, image_sizes, padded_size, targets)
    return our_result, their_result


@pytest.mark.torchvision
def test_same_seed_same_head_as_torchvision():
    pytest.importorskip("torchvision")
    from torchvision.models.detection.rpn import RPNHead as TorchvisionRPNHead

    torch.manual_seed(5)
    ours = RPNHead(32, 3)
    torch.manual_seed(5)
    theirs = TorchvisionRPNHead(32, 3)
    assert torch.equal(ours.conv.weight, theirs.conv[0][0].weight)
    assert torch.equal(ours.objectness.weight, theirs.cls_logits.weight)
    assert torch.equal(ours.box_deltas.weight, theirs.bbox_pred.weight)


@pytest.mark.torchvision
@pytest.mark.parametrize("training", [False, True])
def test_proposals_and_losses_match_torchvision(training):
    ours, theirs = torchvision_pair()
    ours.train(training)
    theirs.train(training)
    generator = torch.Generator().manual_seed(6)
    padded_size, image_sizes = (320, 416), [(300, 416), (320, 380)]
    features = make_features(2, padded_size, generator)
    targets = [TARGETS[0], {"boxes": torch.zeros(0, 4)}] if training else None  # one image without objects
    (our_boxes, our_losses), (their_boxes, their_losses) = run_both(ours, theirs, features, image_sizes, padded_size, targets)
    for a, b in zip(our_boxes, their_boxes):
        assert a.shape == b.shape and torch.equal(a, b)
    assert set(our_losses) == set(their_losses)
    for name in their_losses:
        assert torch.equal(our_losses[name], their_losses[name]), name


@pytest.mark.torchvision
def test_proposals_match_torchvision_at_coco_size():
    # an 800 x 1088 batch: about 4700 boxes per image reach the per-level NMS, as on COCO
    ours, theirs = torchvision_pair()
    ours.eval()
    theirs.eval()
    generator = torch.Generator().manual_seed(7)
    padded_size, image_sizes = (800, 1088), [(800, 1066)]
    features = make_features(1, padded_size, generator)
    (our_boxes, _), (their_boxes, _) = run_both(ours, theirs, features, image_sizes, padded_size)
    assert our_boxes[0].shape == their_boxes[0].shape == (1000, 4)
    assert torch.equal(our_boxes[0], their_boxes[0])
