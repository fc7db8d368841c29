"""Export for deployment (mrcnn/export.py, mrcnn/export_runtime.py): ONNX graphs plus numpy, checked against eager.

The pieces first, each against the library's own function (fast): the gather RoIAlign of the
graphs against the model's pooler, and every numpy step of the runtime against the step it
copies. Then the whole: a small model trained on a few pictures is exported, and onnxruntime's
detections on pictures of other sizes than the export's example are the model's (slow).
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mrcnn import cli, export_runtime
from mrcnn.boxes import batched_nms, box_iou, clip_boxes
from mrcnn.checkpoint import save_checkpoint
from mrcnn.config import shapes_small
from mrcnn.data.coco import CocoDataset
from mrcnn.data.shapes import generate_shapes
from mrcnn.export import OUTPUT_FILES, RUNTIME_NAME, GatherRoIAlign, check_exportable
from mrcnn.inference import paste_masks
from mrcnn.model import MaskRCNN
from mrcnn.poolers import MultiLevelRoIAlign
from mrcnn.transform import ImageTransform, resize_boxes

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def random_boxes(count: int, size: float, generator: torch.Generator) -> torch.Tensor:
    corner = torch.rand(count, 2, generator=generator) * size
    return torch.cat([corner, corner + 1 + torch.rand(count, 2, generator=generator) * size / 2], dim=1)  # [B, 4]


# --- the graphs' RoIAlign ----------------------------------------------------------------------


@pytest.mark.parametrize("aligned", [False, True])
def test_gather_roi_align_equals_the_models_pooler(aligned):
    generator = torch.Generator().manual_seed(0)
    pooler = MultiLevelRoIAlign(7, strides=(4, 8, 16, 32), sampling_ratio=2, aligned=aligned)
    features = [torch.randn(2, 5, 72 // s, 104 // s, generator=generator) for s in (2, 4, 8, 16)]  # odd sizes, 2 images
    boxes = torch.cat([random_boxes(30, 160, generator), torch.tensor([[-20.0, -9.0, 400.0, 300.0], [3.0, 3.0, 3.2, 3.1]])])
    rois = torch.cat([torch.randint(0, 2, (32, 1), generator=generator).float(), boxes], dim=1)  # every level, past the border
    expected = pooler(features, rois)
    assert torch.allclose(GatherRoIAlign(pooler)(features, rois), expected, atol=1e-5, rtol=1e-5)
    one_map = MultiLevelRoIAlign(14, strides=(16,), sampling_ratio=2, aligned=aligned)  # C4: one map
    assert torch.allclose(GatherRoIAlign(one_map)(features[2:3], rois), one_map(features[2:3], rois), atol=1e-5, rtol=1e-5)


def test_what_does_not_export_is_named():
    with pytest.raises(ValueError, match="keypoint"):
        check_exportable(MaskRCNN(shapes_small().replace(num_keypoints=5, keypoint_head_channels=(8,))))
    with pytest.raises(ValueError, match="sampling_ratio"):
        check_exportable(MaskRCNN(shapes_small().replace(roi_sampling_ratio=0)))
    with pytest.raises(ValueError, match="RoIAlign"):
        check_exportable(MaskRCNN(shapes_small().replace(roi_pooler="pool")))


# --- the numpy steps, each against the library's ------------------------------------------------


def test_runtime_preprocess_is_the_image_transform():
    transform = ImageTransform(128, 160).eval()
    config = {"min_size": 128, "max_size": 160, "size_divisible": 32, "image_mean": list(transform.image_mean),
              "image_std": list(transform.image_std)}  # fmt: skip
    for size in [(100, 150), (300, 90), (128, 128), (61, 77)]:  # up, down, unchanged, odd
        image = torch.rand(3, *size)
        batch, image_sizes, _ = transform([image])
        ours, resized = export_runtime.preprocess(image.numpy(), config)
        assert resized == image_sizes[0] and ours.shape == tuple(batch.shape)
        np.testing.assert_allclose(ours, batch.numpy(), atol=2e-5)


def test_runtime_nms_keeps_the_boxes_the_library_keeps():
    generator = torch.Generator().manual_seed(1)
    for count, categories in [(300, 1), (300, 4), (1500, 3)]:  # one NMS over shifted categories, and one per category
        boxes = random_boxes(count, 100, generator)
        scores = torch.rand(count, generator=generator)
        idxs = torch.randint(0, categories, (count,), generator=generator)
        for threshold in (0.3, 0.5, 0.7):
            expected = batched_nms(boxes, scores, idxs, threshold)
            ours = export_runtime.batched_nms(boxes.numpy(), scores.numpy(), idxs.numpy(), threshold)
            np.testing.assert_array_equal(ours, expected.numpy())


def test_runtime_iou_threshold_is_compared_in_float64():
    # IoU 1/2 exactly against a threshold just below 1/2 in float64, which rounds to 1/2 in float32
    boxes = np.array([[0, 0, 2, 1], [0, 0, 1, 1]], dtype=np.float32)  # IoU 0.5
    threshold = 0.5 - 1e-12
    assert export_runtime.nms(boxes, np.array([0.9, 0.8], np.float32), threshold).tolist() == [0]
    assert batched_nms(torch.from_numpy(boxes), torch.tensor([0.9, 0.8]), torch.zeros(2, dtype=torch.int64), threshold).tolist() == [0]


def test_runtime_pasting_and_resizing_are_the_librarys():
    generator = torch.Generator().manual_seed(2)
    masks = torch.rand(7, 1, 28, 28, generator=generator)
    boxes = clip_boxes(random_boxes(7, 60, generator) - 10, (50, 70))
    np.testing.assert_allclose(export_runtime.paste_masks(masks.numpy(), boxes.numpy(), (50, 70)),
                               paste_masks(masks, boxes, (50, 70)).numpy(), atol=1e-6)  # fmt: skip
    assert export_runtime.paste_masks(np.zeros((0, 1, 28, 28), np.float32), np.zeros((0, 4), np.float32), (5, 6)).shape == (0, 1, 5, 6)
    np.testing.assert_array_equal(export_runtime.resize_boxes(boxes.numpy(), (85, 128), (100, 150)),
                                  resize_boxes(boxes, (85, 128), (100, 150)).numpy())  # fmt: skip


def test_runtime_reads_pictures_as_the_library_does(tmp_path, capsys):
    from PIL import Image

    from mrcnn.data.images import read_image

    generator = np.random.default_rng(0)
    pictures = {
        "colour.png": Image.fromarray(generator.integers(0, 256, (9, 11, 3), dtype=np.uint8)),
        "grey16.png": Image.fromarray(generator.integers(0, 65536, (9, 11), dtype=np.uint16)),  # I;16: white if cast to RGB
        "rgba.png": Image.fromarray(generator.integers(0, 256, (9, 11, 4), dtype=np.uint8)),
        "grey.png": Image.fromarray(generator.integers(0, 256, (9, 11), dtype=np.uint8)),
    }
    for name, picture in pictures.items():
        picture.save(tmp_path / name)
        library, _ = read_image(tmp_path / name)
        np.testing.assert_allclose(export_runtime.read_picture(tmp_path / name), library.numpy(), atol=1e-6, err_msg=name)
    assert export_runtime.read_picture(tmp_path / "grey16.png").max() < 1  # not saturated
    (tmp_path / "broken.png").write_bytes((tmp_path / "colour.png").read_bytes()[:60])
    assert export_runtime.main([str(tmp_path / "colour.png"), str(tmp_path / "broken.png"), "--model", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "broken.png" in error  # before any model is loaded: tmp_path holds none


def test_runtime_imports_neither_torch_nor_mrcnn(tmp_path):
    runtime = tmp_path / RUNTIME_NAME
    runtime.write_text(open(export_runtime.__file__).read())
    script = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import detector; "
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mrcnn')))")  # fmt: skip
    found = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert found.stdout.strip() == "[]"


# --- the command --------------------------------------------------------------------------------


def test_export_command_refuses_what_is_not_a_checkpoint_in_one_line(tmp_path, capsys):
    noise, state = tmp_path / "noise.pt", tmp_path / "state.pt"
    noise.write_bytes(b"these bytes are no PyTorch file")
    torch.save({"some": torch.zeros(3)}, state)  # a readable PyTorch file, but neither ours nor torchvision's
    for weights in (noise, state, tmp_path / "missing.pt"):
        assert cli.main(["export", "--weights", str(weights), "--output", str(tmp_path / "out")]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and error.startswith("mrcnn: error: ") and weights.name in error
    assert not any((tmp_path / "out" / name).exists() for name in OUTPUT_FILES)


def test_export_command_replaces_an_earlier_export_only_when_told(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    assert cli.main(["export", "--weights", str(tmp_path / "any.pt"), "--output", str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err


# --- the whole model --------------------------------------------------------------------------------


def train(model: MaskRCNN, dataset, steps: int, lr: float = 0.01) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for step in range(steps):
        image, target = dataset[step % len(dataset)]
        loss = sum(model([image], [target]).values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
    model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """shapes_small trained for 150 steps on 6 pictures (a minute or two), and its pictures."""
    root = tmp_path_factory.mktemp("export")
    paths = generate_shapes(root / "shapes", num_train=6, num_val=0, object_size=(40, 64), workers=0)
    dataset = CocoDataset(paths.train_images, paths.train_annotations)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a module fixture runs before the tests' one_thread: the same model on every machine
    torch.manual_seed(0)
    model = MaskRCNN(shapes_small())
    train(model, dataset, 150)
    torch.set_num_threads(threads)
    return model, dataset, root


def other_sizes(dataset) -> list[torch.Tensor]:
    """Pictures of other sizes than the export's example: crops, and enlarged or shrunk copies."""
    a, b, c = (dataset[i][0] for i in range(3))
    return [a[:, :100, :], b[:, 10:, 24:], F.interpolate(c[None], size=(200, 150), mode="bilinear")[0],
            F.interpolate(a[None], size=(90, 120), mode="bilinear")[0]]  # fmt: skip


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a >= 0.5, b >= 0.5
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.mark.slow
def test_exported_model_detects_what_the_model_detects_on_other_sizes(trained):
    """`mrcnn export` traces the graphs on a 160 x 224 example (export_onnx's default); the pictures
    here are other sizes, and smaller or larger than the preset's 128 (resized)."""
    model, dataset, root = trained
    save_checkpoint(root / "checkpoint.pt", model, model.config, step=150)
    directory = root / "exported"
    assert cli.main(["export", "--weights", str(root / "checkpoint.pt"), "--output", str(directory)]) == 0
    assert {p.name for p in directory.iterdir()} >= {"features.onnx", "box_head.onnx", "mask_head.onnx", "config.json", RUNTIME_NAME}
    detector = export_runtime.Detector(directory)
    compared = 0
    for image in other_sizes(dataset):
        with torch.no_grad():
            expected = model([image])[0]
        found = detector(image.numpy())
        assert found["masks"].shape[2:] == tuple(image.shape[1:])
        confident = (expected["scores"] >= 0.3).numpy()
        if not confident.any():  # a crop can cut every object: the count below makes sure something is compared
            continue
        iou = box_iou(expected["boxes"][confident], torch.from_numpy(found["boxes"])).numpy()  # [D_eager, D_onnx]
        best = iou.argmax(axis=1)  # the exported detection each confident eager detection matches
        np.testing.assert_array_equal(found["labels"][best], expected["labels"][confident].numpy())
        assert np.abs(found["boxes"][best] - expected["boxes"][confident].numpy()).max() <= 1.0
        assert np.abs(found["scores"][best] - expected["scores"][confident].numpy()).max() <= 1e-3
        for index, match in zip(np.nonzero(confident)[0], best):
            assert mask_iou(found["masks"][match, 0], expected["masks"][index, 0].numpy()) >= 0.95
        compared += int(confident.sum())
    print(f"{compared} confident detections compared")
    assert compared >= 4  # trained: there is something to compare

    # the folder runs on its own: numpy and onnxruntime, no torch, no mrcnn
    image = other_sizes(dataset)[0]
    np.save(root / "image.npy", image.numpy())
    script = (f"import sys, json, numpy as np; sys.path.insert(0, {str(directory)!r}); import detector; "
              f"found = detector.Detector({str(directory)!r})(np.load({str(root / 'image.npy')!r})); "
              "assert not any(m.split('.')[0] in ('torch', 'mrcnn') for m in sys.modules); "
              "print(json.dumps({k: v.tolist() for k, v in found.items() if k != 'masks'}))")  # fmt: skip
    alone = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=root).stdout)
    here = detector(image.numpy())
    assert alone["labels"] == here["labels"].tolist()
    np.testing.assert_allclose(np.array(alone["boxes"]).reshape(-1, 4), here["boxes"], atol=1e-4)
