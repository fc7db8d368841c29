"""The mask branch (mrcnn/mask_head.py): shapes, initialization, training and inference rules, torchvision."""

import math

import pytest
import torch

from mrcnn.box_head import BoxBranch, BoxHead, BoxPredictor, TrainingRoIs, boxes_to_rois
from mrcnn.mask_head import MaskBranch, MaskHead, MaskPredictor, MLPMaskHead, MLPMaskPredictor, softmax_decision
from mrcnn.mask_loss import mask_loss, mask_targets, multinomial_mask_loss
from mrcnn.poolers import MultiLevelRoIAlign

STRIDES = (4, 8, 16, 32)


def small_branch(channels: int = 8, num_classes: int = 5) -> MaskBranch:
    return MaskBranch(MultiLevelRoIAlign(14, STRIDES), MaskHead(channels, (channels,) * 4), MaskPredictor(channels, channels, num_classes))


def pyramid(channels: int = 8, height: int = 64, width: int = 96, images: int = 2) -> list[torch.Tensor]:
    return [torch.randn(images, channels, height // s, width // s) for s in STRIDES]


def test_shapes_fcn_and_mlp():
    roi_features = torch.randn(3, 8, 14, 14)
    fcn = MaskPredictor(8, 6, 5)(MaskHead(8, (8, 8, 8, 8))(roi_features))
    mlp = MLPMaskPredictor(32, 5, 28)(MLPMaskHead(8, 14, (32, 32))(roi_features))
    assert fcn.shape == mlp.shape == (3, 5, 28, 28)
    assert MaskHead(8, (8, 8, 8, 8), dilation=2)(roi_features).shape == (3, 8, 14, 14)


def test_initialization_is_kaiming_fan_out_with_zero_bias():
    head = MaskHead(256, (256, 256, 256, 256))
    expected_std = math.sqrt(2.0 / (256 * 3 * 3))  # gain sqrt(2) for ReLU, fan_out = out channels x 3 x 3
    for conv in head.layers:
        assert torch.equal(conv.bias, torch.zeros(256))
        assert abs(conv.weight.std().item() / expected_std - 1) < 0.02
    predictor = MaskPredictor(256, 256, 91)
    assert abs(predictor.mask_logits.weight.std().item() / math.sqrt(2.0 / 91) - 1) < 0.05


def test_key_maps():
    branch = MaskBranch(MultiLevelRoIAlign(14), MaskHead(8, (8, 8, 8, 8)), MaskPredictor(8, 8, 5))
    key_map = branch.torchvision_key_map()
    assert set(key_map) == set(branch.state_dict())
    assert key_map["head.layers.3.bias"] == "roi_heads.mask_head.3.0.bias"
    assert key_map["predictor.deconv.weight"] == "roi_heads.mask_predictor.conv5_mask.weight"
    assert key_map["predictor.mask_logits.bias"] == "roi_heads.mask_predictor.mask_fcn_logits.bias"
    assert branch.torchvision_key_map(legacy=True)["head.layers.0.weight"] == "roi_heads.mask_head.mask_fcn1.weight"
    mlp = MaskBranch(MultiLevelRoIAlign(14), MLPMaskHead(8, 14, (16,)), MLPMaskPredictor(16, 5))
    with pytest.raises(ValueError, match="ablation"):
        mlp.torchvision_key_map()


def constant_class_predictor(num_classes: int) -> MaskPredictor:
    """A predictor whose mask for class k is the constant logit 0.1 k."""
    predictor = MaskPredictor(8, 8, num_classes)
    with torch.no_grad():
        predictor.mask_logits.weight.zero_()
        predictor.mask_logits.bias.copy_(torch.arange(num_classes) * 0.1)
    return predictor


def test_inference_returns_the_predicted_class_probabilities():
    branch = MaskBranch(MultiLevelRoIAlign(14), MaskHead(8, (8, 8, 8, 8)), constant_class_predictor(5)).eval()
    detections = [
        {"boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0], [10.0, 12.0, 20.0, 50.0]]), "labels": torch.tensor([3, 1]),
         "scores": torch.tensor([0.9, 0.8])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)},
    ]
    features = pyramid()
    with torch.no_grad():
        results = branch.predict(features, detections)
    assert results[0]["masks"].shape == (2, 1, 28, 28) and results[1]["masks"].shape == (0, 1, 28, 28)
    assert torch.allclose(results[0]["masks"][0], torch.full((1, 28, 28), torch.sigmoid(torch.tensor(0.3)).item()))
    assert torch.allclose(results[0]["masks"][1], torch.full((1, 28, 28), torch.sigmoid(torch.tensor(0.1)).item()))
    assert results[0]["scores"] is detections[0]["scores"]


def training_batch():
    """Two images: image 0 with two objects, image 1 with none; sampled RoIs as the box branch gives them."""
    masks = torch.zeros(2, 64, 96, dtype=torch.uint8)
    masks[0, 10:40, 8:50] = 1
    masks[1, 30:60, 60:90] = 1
    targets = [
        {"boxes": torch.tensor([[8.0, 10.0, 50.0, 40.0], [60.0, 30.0, 90.0, 60.0]]), "labels": torch.tensor([2, 4]), "masks": masks},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 60, 80, dtype=torch.uint8)},
    ]
    rois = TrainingRoIs(
        boxes=[torch.tensor([[6.0, 9.0, 48.0, 41.0], [0.0, 0.0, 20.0, 20.0], [58.0, 31.0, 92.0, 58.0]]), torch.tensor([[1.0, 2.0, 30.0, 40.0]])],
        labels=[torch.tensor([2, 0, 4]), torch.tensor([0])],
        regression_targets=[torch.zeros(3, 4), torch.zeros(1, 4)],
        matched_gt_index=[torch.tensor([0, 0, 1]), torch.tensor([0])],
    )
    return rois, targets


def test_training_scores_the_positive_rois_only():
    torch.manual_seed(0)
    branch = small_branch().train()
    features = pyramid()
    rois, targets = training_batch()
    losses = branch.loss(features, rois, targets)
    assert set(losses) == {"loss_mask"}
    assert torch.equal(branch.loss(features, rois, targets)["loss_mask"], losses["loss_mask"])  # repeatable

    # by hand: the two positive RoIs of image 0, their objects' masks and classes
    positive_boxes = rois.boxes[0][[0, 2]]
    logits = branch.mask_logits(features, [positive_boxes, torch.zeros(0, 4)])
    target = mask_targets(targets[0]["masks"], positive_boxes, torch.tensor([0, 1]), 28).clamp(0, 1)
    expected = mask_loss(logits, torch.tensor([2, 4]), target)
    assert torch.allclose(losses["loss_mask"], expected)

    # training computes only the channel of each RoI's class: the same loss and gradients as the K channels
    parameters = list(branch.parameters())
    gathered_grads = torch.autograd.grad(losses["loss_mask"], parameters, retain_graph=True)
    for gathered, full in zip(gathered_grads, torch.autograd.grad(expected, parameters, retain_graph=True)):
        torch.testing.assert_close(gathered, full, rtol=1e-4, atol=1e-6)
    logits_k = branch.predictor.class_mask_logits(branch.head(branch.pooler(features, boxes_to_rois([positive_boxes]))),
                                                  torch.tensor([2, 4]))  # fmt: skip
    torch.testing.assert_close(logits_k, logits[[0, 1], [2, 4]][:, None], rtol=1e-5, atol=1e-5)

    # background RoIs do not matter: move them anywhere, the loss stays
    rois.boxes[0][1] = torch.tensor([30.0, 30.0, 60.0, 50.0])
    assert torch.allclose(branch.loss(features, rois, targets)["loss_mask"], expected)

    losses["loss_mask"].backward()
    assert branch.predictor.mask_logits.weight.grad.abs().sum() > 0


def test_training_without_positives_gives_a_zero_that_backpropagates():
    branch = small_branch().train()
    rois, targets = training_batch()
    rois = rois._replace(labels=[torch.zeros(3, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)])
    losses = branch.loss(pyramid(), rois, targets)
    assert losses["loss_mask"].item() == 0
    losses["loss_mask"].backward()


def test_mlp_variant_trains():
    branch = MaskBranch(MultiLevelRoIAlign(14), MLPMaskHead(8, 14, (32, 32)), MLPMaskPredictor(32, 5, 28)).train()
    rois, targets = training_batch()
    losses = branch.loss(pyramid(), rois, targets)
    losses["loss_mask"].backward()
    assert torch.isfinite(losses["loss_mask"]) and branch.head.layers[0].weight.grad.abs().sum() > 0


# --- the ablations of Table 2b: softmax over classes, class-agnostic masks -------------------


def positive_logits_and_targets(branch, features, rois, targets):
    """The mask logits of the positive RoIs, their classes and their 28 x 28 targets, by hand."""
    positive_boxes = rois.boxes[0][[0, 2]]
    logits = branch.mask_logits(features, [positive_boxes, torch.zeros(0, 4)])
    target = mask_targets(targets[0]["masks"], positive_boxes, torch.tensor([0, 1]), 28).clamp(0, 1)
    return logits, torch.tensor([2, 4]), target


def test_softmax_loss_is_the_multinomial_loss_and_differs_from_the_sigmoid():
    torch.manual_seed(0)
    sigmoid = small_branch().train()
    softmax = MaskBranch(sigmoid.pooler, sigmoid.head, sigmoid.predictor, loss="softmax").train()  # the same weights
    features = pyramid()
    rois, targets = training_batch()
    logits, labels, target = positive_logits_and_targets(softmax, features, rois, targets)
    loss = softmax.loss(features, rois, targets)["loss_mask"]
    torch.testing.assert_close(loss, multinomial_mask_loss(logits, labels, target))
    assert not torch.allclose(loss, sigmoid.loss(features, rois, targets)["loss_mask"])


def test_class_agnostic_loss_uses_the_one_channel():
    torch.manual_seed(0)
    branch = MaskBranch(MultiLevelRoIAlign(14, STRIDES), MaskHead(8, (8,) * 4), MaskPredictor(8, 8, 1))  # one channel
    features = pyramid()
    rois, targets = training_batch()
    logits, _, target = positive_logits_and_targets(branch, features, rois, targets)
    assert logits.shape == (2, 1, 28, 28)
    loss = branch.train().loss(features, rois, targets)["loss_mask"]
    torch.testing.assert_close(loss, mask_loss(logits, torch.zeros(2, dtype=torch.int64), target))
    loss.backward()
    assert branch.predictor.mask_logits.weight.grad.abs().sum() > 0


def test_inference_of_the_softmax_and_class_agnostic_variants():
    detections = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0], [10.0, 12.0, 20.0, 50.0], [0.0, 0.0, 9.0, 9.0]]),
                   "labels": torch.tensor([3, 1, 4]), "scores": torch.tensor([0.9, 0.8, 0.7])}]  # fmt: skip
    features = pyramid(images=1)
    softmax = MaskBranch(MultiLevelRoIAlign(14), MaskHead(8, (8,) * 4), constant_class_predictor(5), loss="softmax").eval()
    with torch.no_grad():
        masks = softmax.predict(features, detections)[0]["masks"]  # [D, 1, 28, 28]
    # constant logits 0.1 k: class 4 wins every pixel; the map is sigmoid(m_k - the best other m_j)
    for d, (own, best_other) in enumerate(((0.3, 0.4), (0.1, 0.4), (0.4, 0.3))):
        torch.testing.assert_close(masks[d], torch.full((1, 28, 28), torch.sigmoid(torch.tensor(own - best_other)).item()))
    assert (masks[:2] < 0.5).all() and (masks[2] > 0.5).all()
    agnostic = MaskBranch(MultiLevelRoIAlign(14), MaskHead(8, (8,) * 4), constant_class_predictor(1)).eval()
    with torch.no_grad():
        agnostic.predictor.mask_logits.bias.fill_(0.7)
        masks = agnostic.predict(features, detections)[0]["masks"]
    torch.testing.assert_close(masks, torch.full((3, 1, 28, 28), torch.sigmoid(torch.tensor(0.7)).item()))


def test_mask_branch_bad_variants_are_value_errors():
    parts = (MultiLevelRoIAlign(14), MaskHead(8, (8,) * 4), MaskPredictor(8, 8, 1))
    with pytest.raises(ValueError, match="unknown mask loss 'bce'"):
        MaskBranch(*parts, loss="bce")
    with pytest.raises(ValueError, match="class-agnostic"):
        MaskBranch(*parts, loss="softmax")  # one channel: class-agnostic


# --- against torchvision ------------------------------------------------------------------


class SharedPooler(torch.nn.Module):
    """Our pooler behind torchvision's pooler interface (RoIAlign itself is tested in test_roi_align.py)."""

    def __init__(self, pooler: MultiLevelRoIAlign):
        super().__init__()
        self.pooler = pooler

    def forward(self, features: dict, proposals: list, image_shapes: list) -> torch.Tensor:
        return self.pooler(list(features.values()), boxes_to_rois(proposals))


def torchvision_mask_modules(branch: MaskBranch, legacy: bool):
    """torchvision's MaskRCNNHeads and MaskRCNNPredictor holding our branch's weights."""
    mask_rcnn = pytest.importorskip("torchvision.models.detection.mask_rcnn")
    head = branch.head
    tv_head = mask_rcnn.MaskRCNNHeads(head.layers[0].in_channels, [c.out_channels for c in head.layers], 1)
    tv_predictor = mask_rcnn.MaskRCNNPredictor(
        branch.predictor.deconv.in_channels, branch.predictor.deconv.out_channels, branch.predictor.mask_logits.out_channels
    )
    ours = branch.state_dict()
    state = {v: ours[k] for k, v in branch.torchvision_key_map(legacy=legacy).items()}
    # a plain dict carries no version: torchvision renames legacy `mask_fcn` keys itself, and
    # strict loading proves every key of ours has its counterpart
    tv_head.load_state_dict({k.removeprefix("roi_heads.mask_head."): v for k, v in state.items() if ".mask_head." in k})
    tv_predictor.load_state_dict({k.removeprefix("roi_heads.mask_predictor."): v for k, v in state.items() if ".mask_predictor." in k})
    return tv_head, tv_predictor


@pytest.mark.torchvision
@pytest.mark.parametrize("legacy", [False, True])
def test_head_and_predictor_match_torchvision_with_copied_weights(legacy):
    branch = small_branch(channels=32, num_classes=91)
    tv_head, tv_predictor = torchvision_mask_modules(branch, legacy)
    x = torch.randn(6, 32, 14, 14)
    assert torch.equal(branch.head(x), tv_head(x))
    assert torch.equal(branch.predictor(branch.head(x)), tv_predictor(tv_head(x)))


@pytest.mark.torchvision
def test_branches_match_torchvision_roi_heads():
    roi_heads = pytest.importorskip("torchvision.models.detection.roi_heads")
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    torch.manual_seed(0)
    box_branch = BoxBranch(MultiLevelRoIAlign(7), BoxHead(8, 7, 64), BoxPredictor(64, 6), batch_size_per_image=64)
    mask_branch = small_branch(channels=8, num_classes=6)
    tv_box_head, tv_box_predictor = TwoMLPHead(8 * 49, 64), FastRCNNPredictor(64, 6)
    tv_box_head.load_state_dict(box_branch.head.state_dict())
    tv_box_predictor.load_state_dict({k.replace("class_logits", "cls_score").replace("box_deltas", "bbox_pred"): v
                                      for k, v in box_branch.predictor.state_dict().items()})
    tv_mask_head, tv_mask_predictor = torchvision_mask_modules(mask_branch, legacy=False)
    reference = roi_heads.RoIHeads(
        SharedPooler(box_branch.pooler), tv_box_head, tv_box_predictor, 0.5, 0.5, 64, 0.25, None, 0.05, 0.5, 100,
        mask_roi_pool=SharedPooler(mask_branch.pooler), mask_head=tv_mask_head, mask_predictor=tv_mask_predictor,
    )
    features = pyramid(channels=8)
    named = dict(zip("0123", features))
    sizes = [(64, 96), (60, 80)]
    generator = torch.Generator().manual_seed(3)
    proposals = []
    for height, width in sizes:
        xy = torch.rand(80, 2, generator=generator) * torch.tensor([width, height]) * 0.8
        proposals.append(torch.cat([xy, xy + torch.rand(80, 2, generator=generator) * 30 + 4], dim=1))
    _, targets = training_batch()
    proposals[0][:10] = targets[0]["boxes"].repeat(5, 1) + torch.rand(10, 4, generator=generator)  # some positives

    for module in (box_branch, mask_branch, reference):
        module.eval()
    with torch.no_grad():
        detections = mask_branch.predict(features, box_branch(features, proposals, sizes)[0])
        expected, _ = reference(named, proposals, sizes)
    for ours, theirs in zip(detections, expected):
        assert ours["masks"].shape[0] > 0
        for key in ("boxes", "scores", "labels", "masks"):
            assert torch.equal(ours[key], theirs[key])

    for module in (box_branch, mask_branch, reference):
        module.train()
    torch.manual_seed(7)
    rois, losses = box_branch(features, proposals, sizes, targets)
    mask_losses = mask_branch.loss(features, rois, targets)
    torch.manual_seed(7)
    _, expected_losses = reference(named, [p.clone() for p in proposals], sizes, targets)
    losses.update(mask_losses)
    assert set(losses) == set(expected_losses)
    for key in ("loss_classifier", "loss_box_reg"):
        assert torch.equal(losses[key], expected_losses[key])
    # the mask targets come from our RoIAlign and the loss is computed as softplus(x) - t x:
    # the same value to float rounding
    assert torch.allclose(losses["loss_mask"], expected_losses["loss_mask"], rtol=1e-5, atol=0)


def test_a_softmax_mask_is_read_by_the_class_that_wins_the_pixel():
    torch.manual_seed(0)
    logits = torch.randn(6, 5, 8, 8) * 3  # [D, K, M, M]
    channel = torch.tensor([1, 2, 3, 4, 1, 2])  # [D]
    before = logits.clone()
    decision = softmax_decision(logits, channel)  # [D, M, M]
    wins = logits.argmax(dim=1) == channel[:, None, None]  # [D, M, M]
    assert wins.any() and (~wins).any()
    assert torch.equal(decision > 0.5, wins)
    assert torch.equal(logits, before)  # the logits are left alone
    p = logits.softmax(dim=1)[torch.arange(6), channel]
    assert ((decision > 0.5) & (p <= 0.5)).any()  # where k wins with p_k <= 1/2: the reading p_k > 1/2 would drop it
