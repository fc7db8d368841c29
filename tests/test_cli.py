"""The `mrcnn` command end to end on a tiny data set, and its answers to the user's mistakes."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from mrcnn.checkpoint import load_checkpoint
from mrcnn.cli import main

TINY_TRAINING = ["--iterations", "2", "--batch-size", "2", "--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A data set of 6 training and 3 held-out images, drawn by the command."""
    root = tmp_path_factory.mktemp("data") / "shapes"
    assert main(["shapes", "--output-dir", str(root), "--num-train", "6", "--num-val", "3", "--max-objects", "3"]) == 0
    return root


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    """A checkpoint after two steps of `mrcnn train`."""
    output = tmp_path_factory.mktemp("train")
    assert main(["train", "--data", str(shapes), "--output-dir", str(output), *TINY_TRAINING]) == 0
    return output


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_shapes_writes_a_coco_data_set(shapes):
    annotations = json.loads((shapes / "annotations" / "instances_train.json").read_text())
    assert len(annotations["images"]) == 6 and len(list((shapes / "val").glob("*.png"))) == 3


def test_train_writes_checkpoint_log_and_loss_curve(trained, capsys):
    checkpoint = load_checkpoint(trained / "checkpoint.pt")
    assert checkpoint["step"] == 2 and checkpoint["config"]["num_classes"] == 5
    assert checkpoint["metadata"]["category_names"] == ["__background__", "circle", "square", "triangle", "star"]
    assert len((trained / "log.jsonl").read_text().splitlines()) == 2
    assert (trained / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_train_resumes_a_finished_run_without_training_again(shapes, trained, capsys):
    before = (trained / "checkpoint.pt").read_bytes()
    assert main(["train", "--data", str(shapes), "--output-dir", str(trained), "--resume", *TINY_TRAINING]) == 0
    assert (trained / "checkpoint.pt").read_bytes() == before
    assert len((trained / "log.jsonl").read_text().splitlines()) == 2


def test_evaluate_writes_the_coco_metrics(shapes, trained, tmp_path, capsys):
    argv = ["evaluate", "--data", str(shapes), "--weights", str(trained / "checkpoint.pt"), "--output-dir", str(tmp_path)]
    assert main([*argv, "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"bbox", "segm"} and 0 <= metrics["segm"]["AP"] <= 1
    out = capsys.readouterr().out
    assert "mask" in out and "box" in out and str(tmp_path / "metrics.json") in out


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools under numpy 2
def test_predict_draws_and_writes_json_and_converts_grayscale_and_rgba(shapes, trained, tmp_path, capsys):
    picture = np.asarray(Image.open(sorted((shapes / "val").glob("*.png"))[0]))
    rgb, gray, rgba = tmp_path / "rgb.png", tmp_path / "gray.jpg", tmp_path / "rgba.png"
    Image.fromarray(picture).save(rgb)
    Image.fromarray(picture).convert("L").save(gray)
    Image.fromarray(picture).convert("RGBA").save(rgba)
    output = tmp_path / "out"
    argv = ["predict", str(rgb), str(gray), str(rgba), "--weights", str(trained / "checkpoint.pt"), "--output-dir", str(output)]
    assert main([*argv, "--score-threshold", "0.0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "gray.jpg: converted from L to RGB" in out and "rgba.png: converted from RGBA to RGB (alpha channel dropped)" in out
    records = json.loads((output / "detections.json").read_text())
    assert [r["file"] for r in records] == [str(rgb), str(gray), str(rgba)]
    assert all((output / f"{name}.png").read_bytes()[:4] == b"\x89PNG" for name in ("rgb", "gray", "rgba"))
    for detection in (d for r in records for d in r["detections"]):
        assert detection["category"] in ("circle", "square", "triangle", "star") and 0 <= detection["score"] <= 1
        mask = mask_utils.decode(detection["mask"])
        assert mask.shape == picture.shape[:2]


def test_demo_runs_end_to_end_and_says_where_it_wrote(tmp_path, capsys):
    argv = ["demo", "--output-dir", str(tmp_path), "--num-train", "4", "--num-val", "2", *TINY_TRAINING]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("metrics.json", "loss_curve.png", "predictions.png", "roi_align.png", "demo.json", "train/checkpoint.pt"):
        assert (tmp_path / name).exists() and str(tmp_path / name) in out, name
    report = json.loads((tmp_path / "demo.json").read_text())
    assert report["steps"] == 2 and set(report["seconds"]) == {"data", "train", "evaluate", "figures", "total"}
    assert report["mask_AP"] == json.loads((tmp_path / "metrics.json").read_text())["segm"]["AP"]


@pytest.mark.parametrize("command", ["shapes", "train", "evaluate", "predict", "demo"])
def test_every_command_has_help(command, capsys):
    assert main([command, "--help"]) == 0
    assert "usage: mrcnn " in capsys.readouterr().out


def _one_line_error(argv, capsys, status=2):
    assert main(argv) == status
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    return captured.err


def test_user_mistakes_are_one_line_and_status_2(shapes, trained, tmp_path, capsys):
    missing = str(tmp_path / "missing.pt")
    assert "missing.pt does not exist" in _one_line_error(["evaluate", "--data", str(shapes), "--weights", missing], capsys)
    assert "invalid choice: 'nope'" in _one_line_error(["train", "--config", "nope"], capsys)
    assert "no annotation file" in _one_line_error(["train", "--data", str(tmp_path)], capsys)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    error = _one_line_error(["predict", str(garbage), "--weights", str(garbage), "--output-dir", str(tmp_path)], capsys)
    assert "not a readable PyTorch file" in error
    other = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(1)}, other)  # a state dict, but not of Mask R-CNN
    assert "not a torchvision Mask R-CNN" in _one_line_error(["evaluate", "--weights", str(other), "--data", str(shapes)], capsys)
    image = tmp_path / "nothing.png"
    assert "nothing.png does not exist" in _one_line_error(["predict", str(image), "--weights", str(trained / "checkpoint.pt")], capsys)
    not_an_image = tmp_path / "text.png"
    not_an_image.write_text("hello")
    weights = str(trained / "checkpoint.pt")
    assert "cannot be read" in _one_line_error(["predict", str(not_an_image), "--weights", weights, "--output-dir", str(tmp_path)], capsys)
    assert "is not a device" in _one_line_error(["evaluate", "--weights", weights, "--device", "toaster"], capsys)
    mismatch = ["train", "--data", str(shapes), "--weights", weights, "--output-dir", str(tmp_path / "t"), "--batch-size", "20"]
    assert "fewer than one batch" in _one_line_error(mismatch, capsys)


def test_python_dash_m_and_the_console_script_are_the_same_command():
    result = subprocess.run([sys.executable, "-m", "mrcnn", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "shapes" in result.stdout and "demo" in result.stdout
    result = subprocess.run([sys.executable, "-m", "mrcnn", "evaluate", "--weights"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("mrcnn: error:") and result.stderr.count("\n") == 1


def _as_torchvision_resnet(backbone_state: dict) -> dict:
    """Our backbone's state dict under torchvision's ResNet names (the inverse of the import's map)."""
    from mrcnn.backbone import torchvision_resnet_key

    names = {}
    for stage in range(1, 5):
        for block in range(8):
            for a in ("conv1", "conv2", "conv3", "bn1", "bn2", "bn3", "downsample.0", "downsample.1"):
                names[torchvision_resnet_key(f"layer{stage}.{block}.{a}.weight")[: -len(".weight")]] = f"layer{stage}.{block}.{a}"
    names.update({"stem.conv": "conv1", "stem.norm": "bn1"})
    tv = {}
    for key, value in backbone_state.items():
        module, leaf = key.rsplit(".", 1)
        tv[f"{names[module]}.{leaf}"] = value
    return tv


def test_train_starts_from_an_imagenet_backbone_file(shapes, tmp_path, capsys):
    """--backbone-weights loads a torchvision ResNet state dict into the backbone before training."""
    from mrcnn.config import shapes_small
    from mrcnn.model import MaskRCNN

    generator = torch.Generator().manual_seed(3)
    donor = MaskRCNN(shapes_small()).backbone.state_dict()
    donor = {k: (torch.randn(v.shape, generator=generator) if v.is_floating_point() and "running_var" not in k else v)
             for k, v in donor.items()}  # fmt: skip
    path = tmp_path / "resnet_small.pth"
    torch.save({**_as_torchvision_resnet(donor), "fc.weight": torch.zeros(10, 8), "fc.bias": torch.zeros(10)}, path)
    output = tmp_path / "run"
    argv = ["train", "--data", str(shapes), "--output-dir", str(output), "--backbone-weights", str(path),
            "--lr", "1e-12", *TINY_TRAINING]  # fmt: skip
    assert main(argv) == 0
    trained = load_checkpoint(output / "checkpoint.pt")["model"]
    torch.testing.assert_close(trained["backbone.stem.conv.weight"], donor["stem.conv.weight"])
    capsys.readouterr()  # the progress bars of that run

    other = ["train", "--data", str(shapes), "--output-dir", str(tmp_path / "other"), *TINY_TRAINING]
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, wrong)
    error = _one_line_error([*other, "--backbone-weights", str(wrong)], capsys)
    assert "--backbone-weights" in error and "does not fit the model" in error
    error = _one_line_error([*other, "--backbone-weights", str(tmp_path / "nope.pth")], capsys)
    assert "nope.pth does not exist" in error
