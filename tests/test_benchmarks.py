"""The benchmarks (benchmarks/): their helpers, and every script's --quick mode end to end.

The --quick runs use tiny images, so they prove that a script works and writes its results,
not how fast anything is. Where torchvision is installed the model benchmarks also time and
compare torchvision's Mask R-CNN; where it is not, they say so in their results.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common, determinism, inference, stages, train_step  # noqa: E402
from mrcnn.config import shapes_small  # noqa: E402
from mrcnn.model import MaskRCNN  # noqa: E402

HAS_TORCHVISION = common.torchvision_available()


# --- helpers ----------------------------------------------------------------------------------


def test_interleaved_alternates_the_order_and_reports_medians():
    calls = []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    result = common.interleaved(steps, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-ups, then A B, B A, A B
    for timing in result.values():
        assert len(timing["times_s"]) == 3 and timing["best_s"] <= timing["median_s"]
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        common.interleaved(steps, repeats=0)


def test_calibrated_frozen_norms_normalize_their_input():
    from mrcnn.backbone import FrozenBatchNorm2d

    norm = FrozenBatchNorm2d(3)
    x = torch.randn(2, 3, 8, 8) * torch.tensor([5.0, 0.5, 2.0])[:, None, None] + 7
    assert common.calibrate_frozen_batchnorm(norm, lambda: norm(x)) == 1
    y = norm(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.var(dim=(0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)
    trainable = torch.nn.BatchNorm2d(3)  # trainable norms keep their statistics
    assert common.calibrate_frozen_batchnorm(trainable, lambda: trainable.eval()(x)) == 0


def test_detecting_classifier_scores_five_classes_above_the_threshold():
    bias = torch.randn(91)
    common.detecting_classifier(bias)
    scores = torch.softmax(bias, dim=0)
    assert (scores[1:6] > 0.05).all() and (scores[6:] < 0.05).all() and scores[0] < 0.05


def test_benchmark_images_have_objects_inside_the_image():
    images, targets = common.benchmark_images(2, 80, 120)
    for image, target in zip(images, targets):
        assert image.shape == (3, 80, 120) and 0 <= image.min() and image.max() <= 1
        assert target["masks"].shape[1:] == (80, 120) and len(target["boxes"]) == len(target["labels"]) >= 1
        assert (target["boxes"][:, 2:] <= torch.tensor([120, 80])).all() and (target["labels"] >= 1).all()


def test_own_times_subtract_nested_ranges_and_innermost_finds_the_deepest():
    ranges = [(0, 10, "outer"), (2, 5, "inner"), (3, 4, "outer"), (6, 9, "inner")]
    own, ordered = stages.own_times(ranges)
    assert own == {"outer": 10 - 3 - 3 + 1, "inner": 3 - 1 + 3}
    assert stages.innermost(ordered, 3.5) == "outer" and stages.innermost(ordered, 2.5) == "inner"
    assert stages.innermost(ordered, 5.5) == "outer" and stages.innermost(ordered, 11) == "other"


def test_stage_ranges_leave_the_model_as_it_was():
    import mrcnn.model

    model = MaskRCNN(shapes_small()).eval()
    paste = mrcnn.model.paste_detection_masks
    with stages.stage_ranges(model, "cpu"):
        assert "select_proposals" in model.rpn.__dict__ and mrcnn.model.paste_detection_masks is not paste
    assert "select_proposals" not in model.rpn.__dict__ and "loss" not in model.mask_branch.__dict__
    assert mrcnn.model.paste_detection_masks is paste
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# --- the scripts, --quick ----------------------------------------------------------------------


@pytest.mark.torchvision
@pytest.mark.slow
def test_inference_quick(tmp_path, one_thread):
    report = inference.main(["--quick", "--threads", "1", "--output-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "inference_cpu_quick.json").read_text())
    page = (tmp_path / "inference_cpu_quick.md").read_text()
    assert saved["results"]["ours"]["median_s"] > 0 and saved["threads"] == 1 and len(saved["load_before"]) == 3
    assert report["detections_per_image"] == [10]  # the random model detects, so the mask branch ran
    if HAS_TORCHVISION:
        assert set(saved["results"]) == {"ours", "torchvision"} and "ratio_ours_over_torchvision" in saved
        for agreement in saved["agreement_with_torchvision"].values():
            assert agreement["found_in_torchvision"] == agreement["of"] == 10
        exact = saved["agreement_with_torchvision"].get("fast_convolutions=False")
        if exact is not None:  # torchvision's arithmetic: the same detections to float rounding
            assert exact["max_abs_difference_boxes"] < 1e-3 and exact["max_abs_difference_scores"] < 1e-5
    else:
        assert set(saved["results"]) == {"ours"} and saved["torchvision"] == "not installed"
        assert "torchvision is not installed here" in page


@pytest.mark.torchvision
@pytest.mark.slow
def test_train_step_quick(tmp_path, one_thread):
    report = train_step.main(["--quick", "--threads", "1", "--output-dir", str(tmp_path)])
    assert (tmp_path / "train_step_cpu_quick.md").is_file()
    assert {"ours", "ours, one image at a time"} <= set(report["results"])
    losses = report["losses"]["ours"]
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    assert all(0 < value < float("inf") for value in losses.values())
    if HAS_TORCHVISION:
        assert report["max_abs_difference_losses"] < 1e-2 * max(losses.values())
    else:
        assert "torchvision" not in report["results"]


@pytest.mark.slow
def test_stages_quick(tmp_path, one_thread):
    report = stages.main(["--quick", "--threads", "1", "--models", "shapes_small", "--output-dir", str(tmp_path)])
    assert (tmp_path / "stages_cpu_quick.json").is_file()
    (run,) = report["runs"].values()
    inference_stages = run["inference (1 image)"]["stages_s"]
    training_stages = run["training step (2 images)"]["stages_s"]
    for name in ("backbone", "FPN", "RPN head", "RPN proposals", "box RoIAlign", "box head", "box NMS", "mask head", "mask paste"):
        assert inference_stages[name]["forward"] > 0, name
    for name in ("backbone", "box RoIAlign", "mask RoIAlign", "box head", "mask head"):
        assert training_stages[name]["forward"] > 0 and training_stages[name]["backward"] > 0, name
    assert training_stages["RPN loss"]["forward"] > 0 and training_stages["SGD step"]["update"] > 0
    for mode in run.values():  # the stages account for the call: the profiler adds a little, never half
        assert 0.5 < mode["profiled_total_s"] / mode["plain_s"] < 2.0


@pytest.mark.slow
def test_determinism_quick(tmp_path, one_thread):
    report = determinism.main(["--quick", "--threads", "2", "--output-dir", str(tmp_path)])
    assert (tmp_path / "determinism_cpu_quick.md").is_file()
    for result in report["results"].values():
        assert result["deterministic"]["two_runs_same_bits"] and result["default"]["two_runs_same_bits"]
        assert result["deterministic"]["median_s"] > 0 and result["cost_deterministic_over_default"] > 0
    assert report["results"]["RoIAlign backward"]["modes_same_bits"]  # the CPU path sums in a fixed order in both


def test_scripts_refuse_bad_arguments(capsys):
    for script in (inference, train_step, stages, determinism):
        with pytest.raises(SystemExit):
            script.main(["--repeats", "0"])
        assert "must be at least 1" in capsys.readouterr().err
