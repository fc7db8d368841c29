"""mrcnn/visualize.py: the figures' named steps draw what the library computes.

RoIPool's panel: each bin's number is the maximum over the whole pixels shaded for it. RoIAlign's
panel: each bin's number is the average of bilinear samples at the dots drawn, computed here
in float64 from the definition. The training samples: what the samplers draw follows the IoU
rules of section 3.1, with the model's mode and the caller's figure unchanged.
"""

import math

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from mrcnn.boxes import box_iou
from mrcnn.config import shapes_small
from mrcnn.data.shapes import ShapesDataset
from mrcnn.model import MaskRCNN
from mrcnn.visualize import draw_feature_grid, draw_roi_align, draw_roi_pool, smooth_feature_map, training_samples

matplotlib.use("Agg")

BOX = (1.3, 1.6, 6.1, 6.4)


def bin_numbers(axes) -> list[float]:
    """The numbers written in the bins, in drawing order (row by row)."""
    return [float(text.get_text().split("\n")[1]) for text in axes.texts]


def bilinear(features: torch.Tensor, y: float, x: float) -> float:
    """F at (y, x) with pixel centres on integers, zero outside (the paper's bilinear interpolation)."""
    height, width = features.shape
    if y < -1 or y > height or x < -1 or x > width:
        return 0.0
    y, x = min(max(y, 0.0), height - 1), min(max(x, 0.0), width - 1)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
    ly, lx = y - y0, x - x0
    f = features.tolist()
    return (1 - ly) * (1 - lx) * f[y0][x0] + (1 - ly) * lx * f[y0][x1] + ly * (1 - lx) * f[y1][x0] + ly * lx * f[y1][x1]


@pytest.mark.parametrize("output_size", [2, 3])
def test_roipool_panel_writes_the_maximum_of_each_shaded_bin(output_size):
    features = smooth_feature_map((8, 8))
    axes = Figure().subplots()
    pooled = draw_roi_pool(axes, features, BOX, output_size)
    shaded = [patch for patch in axes.patches if isinstance(patch, Rectangle) and patch.get_fill()]
    assert len(shaded) == output_size**2
    for patch, number, value in zip(shaded, bin_numbers(axes), pooled.flatten().tolist()):
        (x, y), width, height = patch.get_xy(), patch.get_width(), patch.get_height()
        pixels = features[round(y) : round(y + height), round(x) : round(x + width)]  # the whole pixels of the bin
        assert number == pytest.approx(float(pixels.max()), abs=0.005) and value == float(pixels.max())


@pytest.mark.parametrize("output_size, sampling_ratio", [(2, 2), (3, 1)])
def test_roialign_panel_writes_the_average_of_the_drawn_samples(output_size, sampling_ratio):
    features = smooth_feature_map((8, 8), seed=5)
    axes = Figure().subplots()
    draw_feature_grid(axes, features, BOX)
    pooled = draw_roi_align(axes, features, BOX, output_size, sampling_ratio)
    bins = axes.collections[: output_size**2]  # one scatter of sample dots per bin, then the 4 pixels of one sample
    x1, y1, x2, y2 = BOX
    for index, (dots, number) in enumerate(zip(bins, bin_numbers(axes))):
        p, q = divmod(index, output_size)
        points = np.asarray(dots.get_offsets())  # [g g, 2] in the drawing's coordinates: pixel centres at i + 1/2
        assert len(points) == sampling_ratio**2
        assert all(x1 + q * (x2 - x1) / output_size <= px <= x1 + (q + 1) * (x2 - x1) / output_size for px, _ in points)
        assert all(y1 + p * (y2 - y1) / output_size <= py <= y1 + (p + 1) * (y2 - y1) / output_size for _, py in points)
        expected = sum(bilinear(features, py - 0.5, px - 0.5) for px, py in points) / len(points)  # pixel i centred on i + 1/2
        assert float(pooled[p, q]) == pytest.approx(expected, abs=1e-12)
        assert number == pytest.approx(expected, abs=0.005)


def test_training_samples_follow_the_samplers_rules():
    torch.manual_seed(0)
    model = MaskRCNN(shapes_small()).eval()
    image, target = ShapesDataset(1, seed=2)[0]
    samples = training_samples(model, image, target, seed=0)
    assert not model.training  # put back as it was
    assert samples.image_size == (128, 128)
    config = model.config
    assert not bool((samples.positive & samples.negative).any())
    assert int(samples.positive.sum()) + int(samples.negative.sum()) <= config.rpn_batch_size_per_image
    best = box_iou(target["boxes"], samples.anchors).max(dim=0).values  # [T]
    assert bool((best[samples.negative] < 0.3).all())
    positive_rois = samples.roi_boxes[samples.roi_labels > 0]
    assert 0 < len(positive_rois) <= config.box_batch_size_per_image * config.box_positive_fraction
    assert bool((box_iou(positive_rois, target["boxes"]).max(dim=1).values >= 0.5).all())
    negative_rois = samples.roi_boxes[samples.roi_labels == 0]
    assert bool((box_iou(negative_rois, target["boxes"]).max(dim=1).values < 0.5).all())
    again = training_samples(model, image, target, seed=0)  # the seed fixes what is drawn
    assert torch.equal(again.positive, samples.positive) and torch.equal(again.roi_boxes, samples.roi_boxes)
