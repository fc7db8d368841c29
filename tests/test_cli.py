"""The `mrcnn` command end to end on a tiny data set, and its answers to the user's mistakes."""

import argparse
import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from mrcnn.backbone import torchvision_resnet_key
from mrcnn.checkpoint import load_checkpoint
from mrcnn.cli import build_parser, main
from mrcnn.config import shapes_small, torchvision_maskrcnn_resnet50_fpn
from mrcnn.data.keypoints import KEYPOINT_NAMES, generate_figures
from mrcnn.jobs import training_config
from mrcnn.model import MaskRCNN
from mrcnn.weights import CLASS_SPECIFIC
from test_checkpoint import FullDisk
from test_weights import torchvision_named_state_dict

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


def test_demo_runs_end_to_end_and_says_where_it_wrote(tmp_path, capsys):
    argv = ["demo", "--output-dir", str(tmp_path), "--num-train", "4", "--num-val", "2", *TINY_TRAINING]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("metrics.json", "loss_curve.png", "predictions.png", "roi_align.png", "demo.json", "train/checkpoint.pt"):
        assert (tmp_path / name).exists() and str(tmp_path / name) in out, name
    report = json.loads((tmp_path / "demo.json").read_text())
    assert report["steps"] == 2 and set(report["seconds"]) == {"data", "train", "evaluate", "figures", "total"}
    assert report["mask_AP"] == json.loads((tmp_path / "metrics.json").read_text())["segm"]["AP"]


@pytest.mark.parametrize("command", ["shapes", "train", "evaluate", "predict", "demo", "export"])
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
    a_picture = sorted((shapes / "val").glob("*.png"))[0]
    error = _one_line_error(["predict", str(a_picture), "--weights", str(garbage), "--output-dir", str(tmp_path)], capsys)
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

    as_weights = tmp_path / "as_weights"  # --weights takes it too, through load_pretrained
    assert main([*argv[:4], str(as_weights), "--config", "shapes_small", "--weights", str(path), *argv[7:]]) == 0
    weights = [k for k in donor if not k.endswith("num_batches_tracked")]  # a step counter, no weight
    assert f"{path} (ImageNet ResNet): {len(weights)} tensors loaded" in capsys.readouterr().out
    torch.testing.assert_close(load_checkpoint(as_weights / "checkpoint.pt")["model"]["backbone.stem.conv.weight"],
                               donor["stem.conv.weight"])  # fmt: skip

    other = ["train", "--data", str(shapes), "--output-dir", str(tmp_path / "other"), *TINY_TRAINING]
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, wrong)
    error = _one_line_error([*other, "--backbone-weights", str(wrong)], capsys)
    assert "--backbone-weights" in error and "does not fit the model" in error
    error = _one_line_error([*other, "--backbone-weights", str(tmp_path / "nope.pth")], capsys)
    assert "nope.pth does not exist" in error


# --- nothing lost: the commands never write over what they did not make ----------------------------


def _files(root) -> dict:
    """Every file under root -> its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_shapes_refuses_a_folder_it_did_not_fill_and_says_what_overwrite_replaces(tmp_path, capsys):
    mydata = tmp_path / "mydata"
    (mydata / "train").mkdir(parents=True)
    (mydata / "annotations").mkdir()
    (mydata / "train" / "holiday.png").write_bytes(b"a picture of mine")
    (mydata / "annotations" / "instances_train.json").write_text('{"mine": true}')
    small = ["shapes", "--output-dir", str(mydata), "--num-train", "2", "--num-val", "1"]
    error = _one_line_error(small, capsys)
    assert "did not write" in error and "pass --overwrite to replace" in error
    assert _files(mydata) == {"train/holiday.png": b"a picture of mine", "annotations/instances_train.json": b'{"mine": true}'}

    assert main([*small, "--overwrite"]) == 0
    assert "replaced 2 files" in capsys.readouterr().out
    assert not (mydata / "train" / "holiday.png").exists() and len(list((mydata / "train").glob("*.png"))) == 2

    drawn = _files(mydata)
    assert main(small) == 0  # the same data set, drawn by the command: reused as it is
    assert "nothing redrawn" in capsys.readouterr().out and _files(mydata) == drawn
    assert main([*small[:-1], "2"]) == 0  # its own data set with other settings: redrawn, and said
    assert "other settings" in capsys.readouterr().out and len(list((mydata / "val").glob("*.png"))) == 2


def test_train_continues_or_starts_over_only_when_told(shapes, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--data", str(shapes), "--output-dir", str(run), *TINY_TRAINING]
    assert main(argv) == 0
    checkpoint = (run / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    error = _one_line_error(argv, capsys)
    assert "holds a training run" in error and "use --resume to continue or --overwrite to start over" in error
    assert (run / "checkpoint.pt").read_bytes() == checkpoint

    error = _one_line_error(["train", "--data", str(shapes), "--output-dir", str(tmp_path / "empty"), "--resume", *TINY_TRAINING], capsys)
    assert "no checkpoint" in error and not (tmp_path / "empty" / "log.jsonl").exists()
    assert "not allowed with" in _one_line_error([*argv, "--resume", "--overwrite"], capsys)

    (run / ".checkpoint.pt.x7Gq2.tmp").write_bytes(b"left by a killed run")
    assert main([*argv, "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "--overwrite: starting over in" in out and "checkpoint.pt and log.jsonl, 2 steps logged" in out
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 2 and len((run / "log.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "log.jsonl", "loss_curve.png"]


def test_demo_run_again_replaces_its_own_results_with_the_same_bits_and_refuses_other_folders(tmp_path, capsys):
    demo = tmp_path / "demo"
    argv = ["demo", "--output-dir", str(demo), "--num-train", "4", "--num-val", "2", *TINY_TRAINING]
    assert main(argv) == 0
    first = load_checkpoint(demo / "train" / "checkpoint.pt")["model"]
    first_log = [{k: v for k, v in r.items() if k != "seconds"} for r in map(json.loads, (demo / "train" / "log.jsonl").read_text().splitlines())]
    capsys.readouterr()
    assert main(argv) == 0  # `make demo` twice: the second replaces what the first wrote, and says so
    assert f"in {demo} (the earlier demo's)" in capsys.readouterr().out
    second = load_checkpoint(demo / "train" / "checkpoint.pt")["model"]
    second_log = [{k: v for k, v in r.items() if k != "seconds"} for r in map(json.loads, (demo / "train" / "log.jsonl").read_text().splitlines())]
    assert second_log == first_log and len(second_log) == 2
    assert all(torch.equal(first[name], second[name]) for name in first), "the same command gives the same weights"
    assert json.loads((demo / "demo.json").read_text())["status"] == "finished"

    elsewhere = tmp_path / "mine"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("my notes")
    error = _one_line_error(["demo", "--output-dir", str(elsewhere), *argv[3:]], capsys)
    assert "holds files the demo did not write" in error and _files(elsewhere) == {"notes.txt": b"my notes"}


def test_a_diverging_run_never_writes_non_finite_weights(shapes, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--data", str(shapes), "--output-dir", str(run), "--lr", "3e38", "--warmup", "0", "--checkpoint-every", "1",
            *TINY_TRAINING]  # fmt: skip
    error = _one_line_error(argv, capsys, status=1)
    assert "step 1: the weights are not finite" in error and "no checkpoint was written yet" in error
    assert not (run / "checkpoint.pt").exists()


def test_a_full_disk_or_a_read_only_folder_is_one_line_and_status_2(shapes, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    argv = ["train", "--data", str(shapes), "--output-dir", str(run), *TINY_TRAINING]
    assert main(argv) == 0
    checkpoint = (run / "checkpoint.pt").read_bytes()
    capsys.readouterr()

    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, file: real_save(obj, FullDisk(file, 4096)))
    error = _one_line_error([*argv[:-8], "--iterations", "3", *argv[-6:], "--resume"], capsys)
    assert "no space left on device" in error and "checkpoint.pt" in error
    assert (run / "checkpoint.pt").read_bytes() == checkpoint, "the last checkpoint is kept"
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()

    real_open = Path.open

    def read_only(path, mode="r", *args, **kwargs):  # what a read-only folder answers, even to root
        if any(c in mode for c in "wax+") and path.resolve().is_relative_to(tmp_path / "locked"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", read_only)
    error = _one_line_error(["train", "--data", str(shapes), "--output-dir", str(tmp_path / "locked"), *TINY_TRAINING], capsys)
    assert "read-only file system" in error and "locked" in error


def test_the_same_seed_gives_the_same_run_bit_for_bit(shapes, tmp_path, capsys):
    def run(name: str, seed: str) -> tuple[list, dict]:
        directory = tmp_path / name
        assert main(["train", "--data", str(shapes), "--output-dir", str(directory), "--seed", seed, *TINY_TRAINING]) == 0
        log = [{k: v for k, v in r.items() if k != "seconds"} for r in map(json.loads, (directory / "log.jsonl").read_text().splitlines())]
        return log, load_checkpoint(directory / "checkpoint.pt")["model"]

    first_log, first = run("first", "3")
    torch.manual_seed(1234)  # whatever ran before in this process
    again_log, again = run("again", "3")
    assert again_log == first_log
    assert all(torch.equal(first[name], again[name]) for name in first)
    other_log, _ = run("other", "4")
    assert other_log[0]["loss"] != first_log[0]["loss"], "another seed: other initial weights, another first loss"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--clip-grad-norm", "-1"], "argument --clip-grad-norm: must be a finite number > 0"),
        (["train", "--iterations", "0"], "argument --iterations: must be >= 1, got 0"),
        (["train", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["train", "--lr", "1e45"], "argument --lr: must be at most 3.4e+38"),
        (["train", "--lr", "nan"], "argument --lr: must be a finite number > 0"),
        (["train", "--lr", "0"], "argument --lr: must be a finite number > 0"),
        (["train", "--workers", "-1"], "argument --workers: must be >= 0, got -1"),
        (["train", "--threads", "0"], "argument --threads: must be >= 1, got 0"),
        (["train", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
        (["train", "--epochs", "inf"], "argument --epochs: must be a finite number > 0"),
        (["evaluate", "--max-images", "0"], "argument --max-images: must be >= 1, got 0"),
        (["evaluate", "--max-images", "-1"], "argument --max-images: must be >= 1, got -1"),
        (["predict", "x.png", "--score-threshold", "1.5"], "argument --score-threshold: must be between 0 and 1"),
        (["shapes", "--image-size", "40"], "--image-size 40 is too small: the shapes are up to 56 pixels across"),
        (["demo", "--processes", "0"], "argument --processes: must be >= 1, got 0"),
    ],
)
def test_absurd_option_values_are_refused_up_front(argv, message, shapes, tmp_path, capsys):
    tiny = {"train": ["--data", str(shapes), "--iterations", "1", "--batch-size", "2"],  # what runs if it is not refused
            "demo": ["--num-train", "4", "--num-val", "2", "--iterations", "1", "--batch-size", "2"]}.get(argv[0], [])  # fmt: skip
    error = _one_line_error([argv[0], *tiny, *argv[1:], "--output-dir", str(tmp_path / "out")], capsys)
    assert message in error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "nothing ran"


def test_resume_with_fewer_iterations_than_done_is_refused(shapes, trained, capsys):
    error = _one_line_error(["train", "--data", str(shapes), "--output-dir", str(trained), "--resume", "--iterations", "1",
                             *TINY_TRAINING[2:]], capsys)  # fmt: skip
    assert "has done 2 steps, more than the 1 iterations asked for" in error


# --- fine-tuning: pretrained weights of any class count, for the data set's classes ---------------


def without_category(source: Path, target: Path, name: str) -> Path:
    """A copy of the data set at `source` with category `name` and its objects taken out of both splits."""
    shutil.copytree(source, target)
    for split in ("train", "val"):
        path = target / "annotations" / f"instances_{split}.json"
        data = json.loads(path.read_text())
        (dropped,) = [c["id"] for c in data["categories"] if c["name"] == name]
        data["categories"] = [c for c in data["categories"] if c["id"] != dropped]
        data["annotations"] = [a for a in data["annotations"] if a["category_id"] != dropped]
        path.write_text(json.dumps(data))
    return target


@pytest.fixture(scope="module")
def three_classes(shapes, tmp_path_factory):
    """The shapes without squares: circles, triangles and stars, category ids 1, 3, 4 (not contiguous)."""
    return without_category(shapes, tmp_path_factory.mktemp("three") / "shapes", "square")


def test_train_fine_tunes_our_checkpoint_to_the_data_sets_classes(three_classes, trained, tmp_path, capsys, recwarn):
    output = tmp_path / "run"
    argv = ["train", "--data", str(three_classes), "--weights", str(trained / "checkpoint.pt"), "--output-dir", str(output),
            "--freeze-at", "5", *TINY_TRAINING]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    reinitialised = sorted(k for k in MaskRCNN(shapes_small(4)).state_dict() if k.startswith(CLASS_SPECIFIC))
    assert f"re-initialised for this model's classes: {', '.join(reinitialised)}" in out
    said = [str(w.message) for w in recwarn if "the category ids (1, 3, 4) are not 1..3" in str(w.message)]
    assert len(said) == 1, "the id map, said once"
    checkpoint, before = load_checkpoint(output / "checkpoint.pt"), load_checkpoint(trained / "checkpoint.pt")
    assert checkpoint["config"] == {**before["config"], "num_classes": 4, "trainable_stages": 0}
    metadata = checkpoint["metadata"]
    assert metadata["category_names"] == ["__background__", "circle", "triangle", "star"]
    assert metadata["label_to_category_id"] == {"1": 1, "2": 3, "3": 4}
    assert metadata["initial_weights"] == {"weights": str(trained / "checkpoint.pt"), "kind": "mrcnn checkpoint",
                                           "reinitialised": reinitialised}  # fmt: skip
    backbone = [k for k in checkpoint["model"] if k.startswith("backbone.") and not k.endswith(("running_mean", "running_var",
                                                                                              "num_batches_tracked"))]  # fmt: skip
    assert all(torch.equal(checkpoint["model"][k], before["model"][k]) for k in backbone), "--freeze-at 5: no weight moves"

    assert main(["evaluate", "--data", str(three_classes), "--weights", str(output / "checkpoint.pt"), "--device", "cpu",
                 "--output-dir", str(tmp_path / "scores")]) == 0  # fmt: skip
    assert {r["category_id"] for r in json.loads((tmp_path / "scores" / "detections.json").read_text())} <= {1, 3, 4}
    a_picture = sorted((three_classes / "val").glob("*.png"))[0]
    assert main(["predict", str(a_picture), "--weights", str(output / "checkpoint.pt"), "--device", "cpu", "--score-threshold",
                 "0", "--output-dir", str(tmp_path / "pictures")]) == 0  # fmt: skip
    categories = json.loads((tmp_path / "pictures" / "images.json").read_text())["categories"]
    assert categories == [{"id": 1, "name": "circle"}, {"id": 3, "name": "triangle"}, {"id": 4, "name": "star"}]


def test_evaluate_refuses_a_model_of_other_classes_before_inference(shapes, three_classes, trained, tmp_path, capsys):
    scores = tmp_path / "scores"
    argv = ["--weights", str(trained / "checkpoint.pt"), "--device", "cpu", "--output-dir", str(scores)]
    error = _one_line_error(["evaluate", "--data", str(three_classes), *argv], capsys)
    assert "has 4 classes (circle, square, triangle, star)" in error and "has 3 (circle, triangle, star)" in error
    renumbered = tmp_path / "renumbered"  # circles and squares swap their ids: the same count, other names per label
    shutil.copytree(shapes, renumbered)
    path = renumbered / "annotations" / "instances_val.json"
    data = json.loads(path.read_text())
    swap = {1: 2, 2: 1}
    data["categories"] = [{**c, "id": swap.get(c["id"], c["id"])} for c in data["categories"]]
    data["annotations"] = [{**a, "category_id": swap.get(a["category_id"], a["category_id"])} for a in data["annotations"]]
    path.write_text(json.dumps(data))
    error = _one_line_error(["evaluate", "--data", str(renumbered), *argv], capsys)
    assert "has the classes circle, square, triangle, star" in error and "gives these labels to square, circle" in error
    assert not (scores / "metrics.json").exists(), "refused before any inference"


def test_weights_that_do_not_fit_are_one_line(three_classes, trained, tmp_path, capsys):
    base = ["train", "--data", str(three_classes), "--output-dir", str(tmp_path / "run"), *TINY_TRAINING]
    error = _one_line_error([*base, "--config", "torchvision_maskrcnn_resnet50_fpn", "--weights", str(trained / "checkpoint.pt")], capsys)
    assert "backbone.stem.conv.weight is (16, 3, 7, 7) in the file but (64, 3, 7, 7) in the model" in error and "weights of another architecture" in error
    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, other)
    assert "not a Mask R-CNN or ResNet weights file" in _one_line_error([*base, "--weights", str(other)], capsys)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def _train_args(*options: str) -> argparse.Namespace:
    return build_parser().parse_args(["train", *options])


class _Data:
    """What training_config reads of a data set: its class count and, for keypoints, their names."""

    def __init__(self, num_classes: int, keypoint_names: tuple = ()):
        self.num_classes = num_classes
        if keypoint_names:
            self.keypoint_names = keypoint_names


def test_training_config_picks_the_preset_and_applies_the_options(capsys):
    r50 = training_config(_train_args("--config", "torchvision_maskrcnn_resnet50_fpn"), _Data(4), None, None)
    assert r50 == torchvision_maskrcnn_resnet50_fpn(4).replace(norm="bn", trainable_stages=5), "no weights: from scratch"
    assert capsys.readouterr().out.count("trains from scratch") == 1
    torchvision_file = {"backbone.body.conv1.weight": torch.zeros(1)}
    assert training_config(_train_args(), _Data(4), None, torchvision_file) == torchvision_maskrcnn_resnet50_fpn(4)
    deeper = {**torchvision_file, "backbone.body.layer3.6.conv1.weight": torch.zeros(1)}
    assert training_config(_train_args(), _Data(4), None, deeper).backbone == "resnet101"
    assert capsys.readouterr().out == "", "pretrained: not from scratch, and nothing said"
    options = training_config(_train_args("--freeze-at", "2", "--norm", "gn", "--head-norm", "gn"), _Data(3), None, None)
    assert (options.trainable_stages, options.norm, options.head_norm, options.backbone) == (3, "gn", "gn", "small")
    assert training_config(_train_args("--freeze-at", "0", "--head-norm", "none"), _Data(3), None, None).head_norm is None
    figures = training_config(_train_args(), _Data(2, KEYPOINT_NAMES), None, None)
    assert (figures.num_keypoints, figures.keypoint_head_channels, figures.backbone) == (11, (64,) * 8, "small")
    persons = training_config(_train_args(), _Data(2, tuple(f"joint{j}" for j in range(17))), None, None)
    assert (persons.num_keypoints, persons.mask, persons.backbone, persons.norm) == (17, False, "resnet50", "bn")
    assert "invalid choice: 6" in _one_line_error(["train", "--freeze-at", "6"], capsys)


# --- keypoints from the command line --------------------------------------------------------------


def test_keypoints_train_and_evaluate_from_a_person_keypoints_file(tmp_path, capsys):
    root = generate_figures(tmp_path / "figures", num_train=4, num_val=2, seed=1)
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--output-dir", str(run), *TINY_TRAINING]) == 0
    checkpoint = load_checkpoint(run / "checkpoint.pt")
    assert checkpoint["settings"]["flip"] is True  # the flip swaps left and right keypoints (tests/test_keypoints_data.py)
    assert (checkpoint["config"]["num_keypoints"], checkpoint["config"]["num_classes"]) == (11, 2)
    assert checkpoint["metadata"]["keypoint_names"] == list(KEYPOINT_NAMES)
    scores = tmp_path / "scores"
    argv = ["evaluate", "--data", str(root), "--weights", str(run / "checkpoint.pt"), "--device", "cpu", "--output-dir", str(scores)]
    assert main(argv) == 0
    assert "keypoint" in capsys.readouterr().out
    metrics = json.loads((scores / "metrics.json").read_text())
    assert set(metrics) == {"bbox", "segm", "keypoints"} and 0 <= metrics["keypoints"]["AP"] <= 1
    explicit = ["--annotations", str(root / "annotations" / "person_keypoints_val.json"), "--output-dir", str(tmp_path / "again")]
    assert main([*argv[:-2], *explicit]) == 0
    assert json.loads((tmp_path / "again" / "metrics.json").read_text()) == metrics
    capsys.readouterr()
    missing = _one_line_error([*argv[:-2], "--annotations", str(root / "nope.json")], capsys)
    assert "--annotations" in missing and "nope.json does not exist" in missing


# --- mixed precision ------------------------------------------------------------------------------


def test_amp_bf16_scores_on_a_cpu_and_what_cannot_run_is_refused_up_front(shapes, trained, tmp_path, capsys):
    argv = ["evaluate", "--data", str(shapes), "--weights", str(trained / "checkpoint.pt"), "--device", "cpu"]
    assert main([*argv, "--amp", "bf16", "--output-dir", str(tmp_path / "bf16")]) == 0
    assert json.loads((tmp_path / "bf16" / "metrics.json").read_text())["segm"]["AP"] >= 0
    capsys.readouterr()
    assert "--amp fp16 needs a CUDA device" in _one_line_error([*argv, "--amp", "fp16", "--output-dir", str(tmp_path / "x")], capsys)
    # bfloat16 training runs on a CPU (tests/test_amp.py: it learns as float32 does); float16 training is refused first
    assert main(["train", "--data", str(shapes), "--output-dir", str(tmp_path / "t"), "--amp", "bf16", *TINY_TRAINING]) == 0
    assert load_checkpoint(tmp_path / "t" / "checkpoint.pt")["settings"]["amp"] == "bf16"
    capsys.readouterr()
    error = _one_line_error(["train", "--data", str(shapes), "--output-dir", str(tmp_path / "t16"), "--amp", "fp16", *TINY_TRAINING], capsys)
    assert "--amp fp16 needs a CUDA device" in error and not (tmp_path / "t16" / "log.jsonl").exists()
    demo = tmp_path / "demo"
    error = _one_line_error(["demo", "--output-dir", str(demo), "--num-train", "4", "--num-val", "2", "--amp", "fp16", *TINY_TRAINING],
                            capsys)  # fmt: skip
    assert "--amp fp16 needs a CUDA device" in error and not (demo / "shapes").exists(), "nothing drawn"


# --- the check: torchvision's COCO weights, fine-tuned to three classes ---------------------


@pytest.mark.slow
def test_train_from_torchvision_coco_weights_on_a_three_class_data_set(three_classes, tmp_path, capsys):
    """`mrcnn train --data DIR --weights maskrcnn_resnet50_fpn.pth --iterations 2` on a 3-class COCO-layout
    folder: a checkpoint of 3 classes + background whose backbone is the file's, to the bit
    (--freeze-at 5 freezes all of it; the FPN and heads train), and that evaluate and predict read.
    The file is a random R50-FPN of ours under torchvision's names, with 91 classes, at the preset's
    800-pixel scale. Measured: 45 s on the shared 2-core machine."""
    torch.manual_seed(0)
    donor = MaskRCNN(torchvision_maskrcnn_resnet50_fpn(91))
    path = tmp_path / "maskrcnn_resnet50_fpn_coco.pth"
    torch.save(torchvision_named_state_dict(donor), path)
    output = tmp_path / "run"
    argv = ["train", "--data", str(three_classes), "--weights", str(path), "--output-dir", str(output),
            "--iterations", "2", "--batch-size", "1", "--freeze-at", "5", "--threads", "2", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "(torchvision Mask R-CNN)" in out and "re-initialised for this model's classes: box_branch.predictor.box_deltas.bias" in out
    checkpoint = load_checkpoint(output / "checkpoint.pt")
    assert checkpoint["config"] == dataclasses.asdict(torchvision_maskrcnn_resnet50_fpn(4).replace(trainable_stages=0))
    assert checkpoint["model"]["box_branch.predictor.class_logits.weight"].shape[0] == 4
    assert checkpoint["metadata"]["category_names"] == ["__background__", "circle", "triangle", "star"]
    file = donor.state_dict()
    backbone = [k for k in file if k.startswith("backbone.")]
    assert backbone and all(torch.equal(checkpoint["model"][k], file[k]) for k in backbone)
    assert not torch.equal(checkpoint["model"]["fpn.output_convs.0.weight"], file["fpn.output_convs.0.weight"]), "trained"

    a_picture = sorted((three_classes / "val").glob("*.png"))[0]
    weights = ["--weights", str(output / "checkpoint.pt"), "--device", "cpu", "--threads", "2"]
    assert main(["evaluate", "--data", str(three_classes), "--max-images", "1", "--output-dir", str(tmp_path / "e"), *weights]) == 0
    assert main(["predict", str(a_picture), "--output-dir", str(tmp_path / "p"), *weights]) == 0
