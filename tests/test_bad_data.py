"""Bad input at the doors: pictures of every bit depth and mode read right, broken files refused in one
line before any work (or, when not checked up front, stopping training with its steps saved)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mrcnn.checkpoint import load_checkpoint, save_checkpoint
from mrcnn.cli import main
from mrcnn.config import shapes_small
from mrcnn.data import CocoDataset, DatasetError, KeypointCocoDataset, generate_figures, generate_shapes
from mrcnn.data.images import image_to_tensor, read_image
from mrcnn.data.keypoints import KEYPOINT_NAMES
from mrcnn.model import MaskRCNN

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools, numpy 2

H, W = 20, 30
GREY16 = (np.arange(H * W).reshape(H, W) * 109).astype(np.uint16)  # 0 .. 65291: most of the 16-bit range
TINY_TRAINING = ["--iterations", "3", "--batch-size", "2", "--threads", "1", "--device", "cpu", "--checkpoint-every", "100"]


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# --------------------------------------------------------------- every picture becomes RGB in [0, 1]


def test_16_bit_grey_is_scaled_by_its_bit_depth_not_clipped(tmp_path):
    """Pillow's convert("RGB") clips 16-bit values to 255: the picture would be white everywhere but at 0."""
    expected = torch.from_numpy(GREY16 / 65535).float().expand(3, H, W)
    for name in ("grey16.png", "grey16.tif"):
        Image.fromarray(GREY16).save(tmp_path / name)
        image, note = read_image(tmp_path / name)
        torch.testing.assert_close(image, expected, rtol=0, atol=1e-7)
        assert note == f"{name}: converted from I;16 to RGB (16-bit grey, values / 65535)"
    Image.fromarray(GREY16.astype(np.int32)).save(tmp_path / "grey32.tif")  # Pillow's mode I
    torch.testing.assert_close(read_image(tmp_path / "grey32.tif")[0], expected, rtol=0, atol=1e-7)
    Image.fromarray((GREY16 / 65535).astype(np.float32)).save(tmp_path / "float.tif")  # mode F, in [0, 1]
    torch.testing.assert_close(read_image(tmp_path / "float.tif")[0], expected, rtol=0, atol=1e-7)


def test_grey_beyond_its_range_is_refused(tmp_path):
    Image.fromarray(GREY16.astype(np.int32) * 2).save(tmp_path / "wide.tif")
    with pytest.raises(ValueError, match=r"wide.tif cannot be read: 32-bit integer grey from 0 to 130582, not 16-bit"):
        read_image(tmp_path / "wide.tif")
    Image.fromarray(GREY16.astype(np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match=r"float.tif cannot be read: 32-bit float grey from 0.0 to 65291.0, not .* \[0, 1\]"):
        read_image(tmp_path / "float.tif")


@pytest.mark.parametrize("mode, name", [("L", "grey.png"), ("P", "palette.png"), ("1", "bilevel.png"), ("LA", "la.png"),
                                        ("RGBA", "rgba.tif"), ("CMYK", "cmyk.jpg"), ("RGB", "rgb.bmp"), ("RGB", "rgb.tif")])  # fmt: skip
def test_8_bit_modes_and_formats_become_rgb_as_pillow_converts_them(tmp_path, mode, name):
    rgb = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    picture = Image.fromarray(rgb).convert(mode)
    if mode == "P":
        picture.info["transparency"] = 0  # a palette with a transparent colour
    picture.save(tmp_path / name)
    image, note = read_image(tmp_path / name)
    with Image.open(tmp_path / name) as saved:
        expected = np.asarray(saved.convert("RGB"))
    assert image.shape == (3, H, W) and torch.equal(image, torch.from_numpy(expected.transpose(2, 0, 1) / 255).float())
    assert (note is None) == (mode == "RGB")


def test_image_to_tensor_divides_by_the_largest_value_of_the_type():
    for dtype, largest in ((np.uint8, 255), (np.uint16, 65535)):
        image = np.full((2, 3, 3), largest, dtype=dtype)
        image[0, 0] = 0
        tensor = image_to_tensor(image)
        assert tensor.shape == (3, 2, 3) and tensor.max() == 1 and tensor[:, 0, 0].tolist() == [0, 0, 0]
    with pytest.raises(TypeError, match="int32"):
        image_to_tensor(np.zeros((2, 2, 3), dtype=np.int32))


def test_truncated_files_fail_when_read_not_half_way_through_training(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a.png", "a.jpg"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / name)
        truncate(tmp_path / name)
        with Image.open(tmp_path / name) as header_only:
            assert header_only.size == (64, 64)  # what a header-only check sees: nothing wrong
        with pytest.raises(ValueError, match=rf"image .*{name} cannot be read: image file is truncated"):
            read_image(tmp_path / name)


# ------------------------------------------------------------------ the COCO reader


@pytest.fixture
def shapes(tmp_path):
    """Six 64 x 64 shapes images in COCO's layout; the reader's image i is 00000i.png (id i + 1)."""
    generate_shapes(tmp_path / "shapes", num_train=6, num_val=0, image_size=64, object_size=(16, 40), max_objects=2,
                    workers=1)  # fmt: skip
    return tmp_path / "shapes"


def open_train(root, **options):
    return CocoDataset(root / "train", root / "annotations" / "instances_train.json", **options)


def test_coco_reader_scales_16_bit_images(shapes):
    path = shapes / "train" / "000002.png"
    grey16 = (np.asarray(Image.open(path).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(path)
    image, _ = open_train(shapes)[2]
    assert 0 < image.min() < image.max() < 1  # not white
    torch.testing.assert_close(image, torch.from_numpy(grey16 / 65535).float().expand(3, 64, 64), rtol=0, atol=1e-7)


def test_truncated_image_is_named_at_start_up_unless_asked_not_to_decode(shapes):
    truncate(shapes / "train" / "000004.png")
    with pytest.raises(DatasetError, match=r"image file .*000004.png \(image id 5\) cannot be read: image file is truncated"):
        open_train(shapes)
    dataset = open_train(shapes, verify_images=False)  # for huge data sets: found when read
    dataset[3]
    with pytest.raises(DatasetError, match=r"000004.png \(image id 5\) cannot be read: image file is truncated"):
        dataset[4]


def test_start_up_decodes_only_the_images_training_reads_and_checks_the_file_first(shapes):
    annotation_file = shapes / "annotations" / "instances_train.json"
    data = json.loads(annotation_file.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 6]  # image 6: nothing to train on
    annotation_file.write_text(json.dumps(data))
    truncate(shapes / "train" / "000005.png")
    assert len(open_train(shapes, remove_images_without_annotations=True)) == 5  # never read in training
    with pytest.raises(DatasetError, match=r"000005.png \(image id 6\)"):
        open_train(shapes)  # evaluation reads it
    data["annotations"][-1]["bbox"] = "x"
    annotation_file.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"annotation id \d+ has bbox 'x'"):  # the file, before the slow decoding
        open_train(shapes)


# ------------------------------------------------------------------ the command: one line, status 2


def one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "Caught" not in err, err
    return err


def test_train_refuses_a_truncated_image_before_any_work(shapes, tmp_path, capsys):
    truncate(shapes / "train" / "000003.png")
    output = tmp_path / "run"
    err = one_line_error(["train", "--data", str(shapes), "--output-dir", str(output), *TINY_TRAINING], capsys)
    assert "000003.png (image id 4) cannot be read: image file is truncated" in err
    assert not any(output.iterdir())


@pytest.mark.parametrize("workers", ["0", "2"])
def test_train_stopped_by_an_unreadable_image_saves_its_steps_in_one_line(shapes, tmp_path, capsys, workers):
    order = np.random.default_rng((0, 0)).permutation(6)  # the images of epoch 0 (seed 0), two a step
    index = int(order[4])  # read in step 3
    truncate(shapes / "train" / f"{index:06d}.png")
    output = tmp_path / "run"
    argv = ["train", "--data", str(shapes), "--output-dir", str(output), "--no-verify-images", "--workers", workers]
    err = one_line_error([*argv, *TINY_TRAINING], capsys)
    assert f"step 3: image file {shapes / 'train' / f'{index:06d}.png'} (image id {index + 1}) cannot be read" in err
    assert f"the checkpoint of the 2 steps done is {output / 'checkpoint.pt'}" in err and "--resume" in err
    assert load_checkpoint(output / "checkpoint.pt")["step"] == 2
    assert len((output / "log.jsonl").read_text().splitlines()) == 2


def test_train_refuses_a_file_without_categories(shapes, tmp_path, capsys):
    annotation_file = shapes / "annotations" / "instances_train.json"
    annotation_file.write_text(json.dumps({**json.loads(annotation_file.read_text()), "categories": [], "annotations": []}))
    err = one_line_error(["train", "--data", str(shapes), "--output-dir", str(tmp_path / "run"), *TINY_TRAINING], capsys)
    assert f"annotation file {annotation_file}: 'categories' is empty" in err


@pytest.mark.filterwarnings("ignore::UserWarning")  # the network's warnings on a 20 x 30 picture
def test_predict_reads_16_bit_and_refuses_a_truncated_picture(tmp_path, capsys):
    torch.manual_seed(0)
    model = MaskRCNN(shapes_small())
    save_checkpoint(tmp_path / "model.pt", model, model.config, 0)
    Image.fromarray(GREY16).save(tmp_path / "grey16.png")
    argv = ["predict", "--weights", str(tmp_path / "model.pt"), "--output-dir", str(tmp_path / "out"), "--device", "cpu"]
    assert main([*argv, str(tmp_path / "grey16.png")]) == 0
    assert "grey16.png: converted from I;16 to RGB (16-bit grey, values / 65535)" in capsys.readouterr().out
    Image.fromarray(GREY16).save(tmp_path / "cut.png")
    truncate(tmp_path / "cut.png")
    assert main([*argv, str(tmp_path / "cut.png")]) == 2
    err = capsys.readouterr().err  # after the progress bar, if any: one line
    assert "cut.png cannot be read: image file is truncated" in err.splitlines()[-1] and "Traceback" not in err, err


@pytest.mark.parametrize("keypoints", [["x"] * 3 * len(KEYPOINT_NAMES), [1.0] * 5, None, [float("nan")] * 3 * len(KEYPOINT_NAMES)])
def test_keypoints_that_are_not_numbers_are_named(tmp_path, keypoints):
    root = generate_figures(tmp_path / "figures", num_train=0, num_val=2)
    annotation_file = root / "annotations" / "person_keypoints_val.json"
    data = json.loads(annotation_file.read_text())
    data["annotations"][0]["keypoints"] = keypoints
    annotation_file.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"person_keypoints_val.json: annotation id 1 needs 'keypoints' of \d+ finite"):
        KeypointCocoDataset(root / "val", annotation_file)
