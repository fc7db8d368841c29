"""The `mrcnn` command end to end on a tiny data set, and its answers to the user's mistakes."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

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
    assert all((output / f"{name}.pred.png").read_bytes()[:4] == b"\x89PNG" for name in ("rgb", "gray", "rgba"))
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


# --- nothing lost: the commands never write over what they did not make ----------------------------


def _files(root) -> dict:
    """Every file under root -> its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools under numpy 2
def test_predict_never_draws_over_an_input_and_keeps_same_named_inputs_apart(shapes, trained, tmp_path, capsys):
    picture = Image.open(sorted((shapes / "val").glob("*.png"))[0])
    (tmp_path / "sub").mkdir()
    inputs = [tmp_path / "a.png", tmp_path / "sub" / "a.png", tmp_path / "a.jpg", tmp_path / "A.png"]
    for path in inputs:
        picture.save(path)
    before = _files(tmp_path)
    weights = ["--weights", str(trained / "checkpoint.pt"), "--device", "cpu"]
    assert main(["predict", *map(str, inputs), "--output-dir", str(tmp_path), *weights]) == 0
    after = _files(tmp_path)
    assert {name: after[name] for name in before} == before, "an input was written over"
    records = json.loads((tmp_path / "detections.json").read_text())
    pictures = [tmp_path / name for name in ("a.pred.png", "a-2.pred.png", "a-3.pred.png", "A-4.pred.png")]
    assert [r["file"] for r in records] == list(map(str, inputs)) and [r["picture"] for r in records] == list(map(str, pictures))
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pictures)
    capsys.readouterr()

    drawn = tmp_path / "a.pred.png"  # a picture of the last run, given again: its own picture would replace it
    error = _one_line_error(["predict", str(tmp_path / "a.png"), str(drawn), "--output-dir", str(tmp_path), *weights], capsys)
    assert "would be written over the input" in error and drawn.read_bytes() == after["a.pred.png"]


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


class FullDisk:
    """A file that takes `room` bytes and then fails as a full disk does."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


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
