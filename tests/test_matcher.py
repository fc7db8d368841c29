"""Matcher rules (thresholds, ties, low-quality matches) and the balanced sampler, by hand and vs torchvision."""

import pytest
import torch

from mrcnn.matcher import BalancedSampler, Matcher

NEG, BETWEEN = Matcher.BELOW_LOW_THRESHOLD, Matcher.BETWEEN_THRESHOLDS


def test_codes_are_torchvisions():
    assert (NEG, BETWEEN) == (-1, -2)


def test_thresholds_by_hand():
    iou = torch.tensor(
        [
            # predictions: 0     1     2     3     4     5
            [0.80, 0.70, 0.69, 0.30, 0.29, 0.10],  # gt 0
            [0.10, 0.20, 0.50, 0.10, 0.00, 0.90],  # gt 1
        ]
    )
    matched = Matcher(0.7, 0.3)(iou)
    assert matched.dtype == torch.int64
    # >= 0.7 matched (0.7 itself included); [0.3, 0.7) between (0.3 included); < 0.3 below
    assert matched.tolist() == [0, 0, BETWEEN, BETWEEN, NEG, 1]


def test_equal_thresholds_leave_nothing_between():
    iou = torch.tensor([[0.5, 0.49, 0.51]])
    assert Matcher(0.5, 0.5)(iou).tolist() == [0, NEG, 0]


def test_a_prediction_tied_between_two_gt_takes_the_first():
    iou = torch.tensor([[0.8, 0.1], [0.8, 0.9]])
    assert Matcher(0.7, 0.3)(iou).tolist() == [0, 1]


def test_low_quality_matches_give_each_gt_its_best_predictions_with_ties():
    iou = torch.tensor(
        [
            [0.40, 0.40, 0.10, 0.00, 0.20],  # gt 0: best is 0.4, tied between predictions 0 and 1
            [0.10, 0.50, 0.60, 0.20, 0.00],  # gt 1: best is 0.6 at prediction 2
        ]
    )
    assert Matcher(0.7, 0.3)(iou).tolist() == [BETWEEN, BETWEEN, BETWEEN, NEG, NEG]
    # Prediction 1 is among gt 0's best, but its own best gt is 1 (0.5): it is matched to 1.
    assert Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou).tolist() == [0, 1, 1, NEG, NEG]


def test_low_quality_quirk_for_a_gt_that_overlaps_nothing():
    # gt 1 overlaps no prediction: its best IoU is 0, so every prediction (all at IoU 0 with it)
    # is "among its best" and is set back to its own argmax, gt 0, as in torchvision: even
    # predictions 1 and 2, with IoU 0 and 0.1, become positives.
    iou = torch.tensor([[0.9, 0.0, 0.1], [0.0, 0.0, 0.0]])
    assert Matcher(0.7, 0.3)(iou).tolist() == [0, NEG, NEG]
    assert Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou).tolist() == [0, 0, 0]


def test_empty_inputs_and_bad_thresholds_raise():
    with pytest.raises(ValueError, match="ground-truth"):
        Matcher(0.7, 0.3)(torch.zeros(0, 5))
    with pytest.raises(ValueError, match="predictions"):
        Matcher(0.7, 0.3)(torch.zeros(2, 0))
    with pytest.raises(ValueError, match="low_threshold"):
        Matcher(0.3, 0.7)
    with pytest.raises(ValueError, match=r"\[G, B\]"):
        Matcher(0.7, 0.3)(torch.zeros(5))


@pytest.mark.torchvision
@pytest.mark.parametrize("allow_low_quality_matches", [False, True])
def test_matcher_matches_torchvision(allow_low_quality_matches):
    pytest.importorskip("torchvision")
    from torchvision.models.detection._utils import Matcher as TorchvisionMatcher

    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        num_gt = 1 + seed % 5
        iou = (torch.rand(num_gt, 200, generator=generator) * 10).round() / 10  # many ties, values at thresholds
        iou[:, :50] = 0.0  # predictions that overlap nothing
        ours = Matcher(0.7, 0.3, allow_low_quality_matches)(iou)
        theirs = TorchvisionMatcher(0.7, 0.3, allow_low_quality_matches)(iou)
        assert torch.equal(ours, theirs)


# --- sampler -------------------------------------------------------------------------------------


def labels_with(num_positive: int, num_negative: int, num_ignored: int, generator: torch.Generator) -> torch.Tensor:
    labels = torch.cat([torch.ones(num_positive), torch.zeros(num_negative), -torch.ones(num_ignored)]).long()
    return labels[torch.randperm(labels.numel(), generator=generator)]


@pytest.mark.parametrize(
    "num_positive, num_negative, expected_positive, expected_negative",
    [
        (100, 100, 10, 10),  # enough of both: the quota
        (3, 100, 3, 17),  # too few positives: negatives fill the rest
        (100, 4, 10, 4),  # too few negatives: the batch is smaller
        (0, 0, 0, 0),
    ],
)
def test_sampler_counts(num_positive, num_negative, expected_positive, expected_negative):
    generator = torch.Generator().manual_seed(0)
    labels = labels_with(num_positive, num_negative, 30, generator)
    positive, negative = BalancedSampler(20, 0.5)([labels])
    assert positive[0].dtype == torch.bool and positive[0].shape == labels.shape
    assert positive[0].sum().item() == expected_positive
    assert negative[0].sum().item() == expected_negative
    assert bool((labels[positive[0]] >= 1).all()) and bool((labels[negative[0]] == 0).all())  # never an ignored one


def test_sampler_positive_labels_are_any_value_at_least_one():
    labels = torch.tensor([3, 1, 0, -1, 2, 0])  # class labels of the box head
    positive, negative = BalancedSampler(10, 0.5)([labels])
    assert positive[0].tolist() == [True, True, False, False, True, False]
    assert negative[0].tolist() == [False, False, True, False, False, True]


def test_sampler_same_seed_same_sample_and_every_image_its_own():
    generator = torch.Generator().manual_seed(1)
    labels = [labels_with(50, 200, 10, generator), labels_with(5, 80, 0, generator)]
    sampler = BalancedSampler(32, 0.25)
    torch.manual_seed(7)
    first = sampler(labels)
    torch.manual_seed(7)
    second = sampler(labels)
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)
    assert [m.sum().item() for m in first[0]] == [8, 5]
    assert [m.sum().item() for m in first[1]] == [24, 27]


@pytest.mark.torchvision
def test_sampler_matches_torchvision_for_the_same_seed():
    pytest.importorskip("torchvision")
    from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

    generator = torch.Generator().manual_seed(2)
    labels = [labels_with(40, 500, 20, generator).float(), labels_with(3, 300, 0, generator).float()]
    torch.manual_seed(11)
    ours = BalancedSampler(256, 0.5)(labels)
    torch.manual_seed(11)
    theirs = BalancedPositiveNegativeSampler(256, 0.5)(labels)
    for a, b in zip(ours[0] + ours[1], theirs[0] + theirs[1]):
        assert torch.equal(a, b.bool())
