"""`mrcnn predict` on folders, globs and files: COCO results, streaming in flat memory, batches, and refusals.

The model is a fresh `shapes_small` saved as a checkpoint of ours (predict does not care whether
it learned anything), whose metadata maps the labels 1..4 to the category ids 10, 20, 30, 40.
"""

import json
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from mrcnn.checkpoint import save_checkpoint
from mrcnn.cli import main
from mrcnn.config import shapes_small
from mrcnn.model import MaskRCNN
from test_cli import _files, _one_line_error

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]  # pycocotools, numpy 2
NAMES = ["__background__", "circle", "square", "triangle", "star"]
CATEGORY_IDS = {1: 10, 2: 20, 3: 30, 4: 40}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = MaskRCNN(shapes_small())
    path = tmp_path_factory.mktemp("weights") / "checkpoint.pt"
    save_checkpoint(path, model, model.config, step=0,
                    metadata={"category_names": NAMES, "label_to_category_id": {str(k): v for k, v in CATEGORY_IDS.items()}})  # fmt: skip
    return ["--weights", str(path), "--device", "cpu"]


def picture(height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """A textured RGB picture with a bright disk: uint8 [H, W, 3]."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 90, size=(height, width, 3), dtype=np.uint8)
    rows, columns = np.ogrid[:height, :width]
    image[(rows - height / 2) ** 2 + (columns - width / 2) ** 2 < (min(height, width) / 4) ** 2] = (230, 200, 40)
    return image


@pytest.fixture
def photos(tmp_path):
    """A folder of five pictures in five formats and modes, one in a subfolder, and a text file."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(picture(seed=1)).save(folder / "a.png")
    Image.fromarray(picture(seed=2)).convert("L").save(folder / "b.jpg")
    Image.fromarray(picture(seed=3)).save(folder / "c.bmp")
    Image.fromarray(picture(seed=4)).convert("RGBA").save(folder / "d.tiff")
    Image.fromarray(picture(seed=5)).save(folder / "sub" / "e.png")
    (folder / "notes.txt").write_text("not a picture")
    return folder


def test_a_folder_gives_its_images_and_coco_results_with_their_files(photos, weights, tmp_path, capsys):
    output = tmp_path / "out"
    assert main(["predict", str(photos), "--output-dir", str(output), "--score-threshold", "0", *weights]) == 0
    out = capsys.readouterr().out
    assert "b.jpg: converted from L to RGB" in out and "d.tiff: converted from RGBA to RGB (alpha channel dropped)" in out
    assert "4 images" in out, "the folder's own images, sorted; not sub/, not the text file"
    catalogue = json.loads((output / "images.json").read_text())
    files = [image["file_name"] for image in catalogue["images"]]
    assert files == [str(photos / name) for name in ("a.png", "b.jpg", "c.bmp", "d.tiff")]
    assert [image["id"] for image in catalogue["images"]] == [1, 2, 3, 4]
    assert all((image["height"], image["width"]) == (96, 128) for image in catalogue["images"])
    assert catalogue["categories"] == [{"id": CATEGORY_IDS[k], "name": NAMES[k]} for k in range(1, 5)]
    assert all((output / f"{name}.pred.png").read_bytes()[:4] == b"\x89PNG" for name in "abcd")
    results = json.loads((output / "detections.json").read_text())
    assert results, "a threshold of 0 keeps the untrained model's detections"
    by_id = {image["id"]: image for image in catalogue["images"]}
    for result in results:  # COCO's results format, and each result's file
        assert set(result) == {"image_id", "category_id", "bbox", "score", "segmentation", "file_name"}
        assert result["category_id"] in CATEGORY_IDS.values() and 0 <= result["score"] <= 1 and len(result["bbox"]) == 4
        assert result["file_name"] == by_id[result["image_id"]]["file_name"]
        assert mask_utils.decode(result["segmentation"]).shape == (96, 128)

    again = tmp_path / "again"
    assert main(["predict", str(photos), "--recursive", "--output-dir", str(again), *weights]) == 0
    files = [image["file_name"] for image in json.loads((again / "images.json").read_text())["images"]]
    assert files == [str(photos / name) for name in ("a.png", "b.jpg", "c.bmp", "d.tiff", "sub/e.png")]


def test_globs_files_and_folders_mix_and_earlier_pictures_are_not_inputs(photos, weights, tmp_path, capsys):
    pattern = str(photos / "**" / "*.png")  # quoted on a command line: the command expands it
    assert main(["predict", pattern, str(photos / "c.bmp"), "--output-dir", str(photos), *weights]) == 0
    files = [image["file_name"] for image in json.loads((photos / "images.json").read_text())["images"]]
    assert files == [str(photos / "a.png"), str(photos / "sub" / "e.png"), str(photos / "c.bmp")]
    assert (photos / "a.pred.png").is_file()
    capsys.readouterr()
    assert main(["predict", str(photos), "--output-dir", str(photos), *weights]) == 0  # a.pred.png is no input now
    assert "4 images" in capsys.readouterr().out


def test_no_images_and_bad_images_are_one_line_before_any_work(photos, weights, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("nothing to see")
    output = tmp_path / "out"
    argv = ["--output-dir", str(output), *weights]
    error = _one_line_error(["predict", str(photos), str(empty), *argv], capsys)
    assert f"folder {empty} holds no images" in error and "--recursive looks in its subfolders too" in error
    assert "no images match" in _one_line_error(["predict", str(tmp_path / "*.jpg"), *argv], capsys)
    assert "expected an image file" in _one_line_error(["predict", str(photos / "notes.txt"), *argv], capsys)
    assert "missing.png does not exist" in _one_line_error(["predict", str(tmp_path / "missing.png"), *argv], capsys)
    broken = photos / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    assert "broken.png cannot be read" in _one_line_error(["predict", str(photos), *argv], capsys)
    assert not output.exists() or not any(output.iterdir()), "nothing was drawn"


def test_a_strip_too_thin_for_the_model_is_refused_and_a_thin_one_runs(weights, tmp_path, capsys):
    """shapes_small scales the longer side to 128: 2000 pixels by 0.064, so 3 rows become 0.19 of a row
    (torch's interpolate then stops with "Input and output sizes should be greater than 0"), 16 rows one."""
    strip, thin = tmp_path / "strip.png", tmp_path / "thin.png"
    Image.fromarray(picture(3, 2000)).save(strip)
    Image.fromarray(picture(16, 2000)).save(thin)
    output = tmp_path / "out"
    error = _one_line_error(["predict", str(thin), str(strip), "--output-dir", str(output), *weights], capsys)
    assert "strip.png is 2000 x 3 pixels" in error and "less than a pixel" in error
    assert not (output / "thin.pred.png").exists(), "refused before the first image ran"
    assert main(["predict", str(thin), "--output-dir", str(output), *weights]) == 0
    assert json.loads((output / "images.json").read_text())["images"][0]["height"] == 16


def test_batches_of_several_images_go_through_the_model_together(photos, weights, tmp_path, monkeypatch, capsys):
    sizes, forward = [], MaskRCNN.forward

    def counting(self, images, targets=None):
        sizes.append(len(images))
        return forward(self, images, targets)

    monkeypatch.setattr(MaskRCNN, "forward", counting)
    output = tmp_path / "out"
    assert main(["predict", str(photos), "--recursive", "--batch-size", "2", "--output-dir", str(output), *weights]) == 0
    assert sizes == [2, 2, 1]
    assert len(json.loads((output / "images.json").read_text())["images"]) == 5
    sizes.clear()
    assert main(["predict", str(photos), "--output-dir", str(tmp_path / "one"), *weights]) == 0
    assert sizes == [1, 1, 1, 1], "one image at a time on a CPU by default"


def test_bf16_runs_on_a_cpu_and_fp16_is_refused_there(photos, weights, tmp_path, capsys):
    output = tmp_path / "out"
    assert main(["predict", str(photos / "a.png"), "--amp", "bf16", "--score-threshold", "0", "--output-dir", str(output),
                 *weights]) == 0  # fmt: skip
    results = json.loads((output / "detections.json").read_text())
    assert results and all(np.isfinite(r["bbox"]).all() for r in results)
    capsys.readouterr()
    error = _one_line_error(["predict", str(photos / "a.png"), "--amp", "fp16", "--output-dir", str(tmp_path / "x"), *weights], capsys)
    assert "--amp fp16 needs a CUDA device" in error and "--amp bf16" in error


@pytest.mark.slow
def test_memory_stays_flat_over_many_images(weights, tmp_path, capsys):
    """60 pictures of 640 x 480: held at once as the model's float32 input they would take 60 x 3.5 MB =
    211 MB. tracemalloc follows numpy's buffers, where every image is decoded and converted, and
    matplotlib's, where each picture is drawn (about 40 MB at the peak of one 640 x 480 drawing,
    its float64 copies). The peak over the run must stay under 16 images' worth (56 MB): one image
    in flight and its drawing. Measured: a peak of 42 MB whether 3, 20 or 60 images; 25 to 40 s here
    (matplotlib under tracemalloc), and 142 MB before each drawn figure was cleared at once."""
    folder = tmp_path / "many"
    folder.mkdir()
    for index in range(60):
        Image.fromarray(picture(480, 640, seed=index)).save(folder / f"{index:03d}.jpg", quality=80)
    one_image = 3 * 480 * 640 * 4  # bytes of one float32 [3, H, W] input
    tracemalloc.start()
    try:
        status = main(["predict", str(folder), "--output-dir", str(tmp_path / "out"), "--score-threshold", "0.9", *weights])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 0 and len(list((tmp_path / "out").glob("*.pred.png"))) == 60
    assert peak < 16 * one_image, f"peak {peak / 2**20:.0f} MB for 60 images of {one_image / 2**20:.1f} MB"


def test_pictures_never_replace_an_input_and_same_names_stay_apart(weights, tmp_path, capsys):
    image = Image.fromarray(picture())
    (tmp_path / "sub").mkdir()
    inputs = [tmp_path / "a.png", tmp_path / "sub" / "a.png", tmp_path / "a.jpg", tmp_path / "A.png"]
    for path in inputs:
        image.save(path)
    before = _files(tmp_path)
    assert main(["predict", *map(str, inputs), "--output-dir", str(tmp_path), *weights]) == 0
    after = _files(tmp_path)
    assert {name: after[name] for name in before} == before, "an input was written over"
    catalogue = json.loads((tmp_path / "images.json").read_text())["images"]
    pictures = [tmp_path / name for name in ("a.pred.png", "a-2.pred.png", "a-3.pred.png", "A-4.pred.png")]
    assert [r["file_name"] for r in catalogue] == list(map(str, inputs)) and [r["picture"] for r in catalogue] == list(map(str, pictures))
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pictures)
    capsys.readouterr()

    drawn = tmp_path / "a.pred.png"  # a picture of the last run, named as an input: its own picture would replace it
    error = _one_line_error(["predict", str(tmp_path / "a.png"), str(drawn), "--output-dir", str(tmp_path), *weights], capsys)
    assert "would be written over the input" in error and drawn.read_bytes() == after["a.pred.png"]
