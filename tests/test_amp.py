"""Mixed precision keeps the geometry exact (issue: the practitioner's fast path).

Under `torch.autocast` the convolutions and linear layers run in 16 bits, and so would anything
computed from their outputs. A box coordinate of 1330 is 1328 in bfloat16: four pixels. So every
box quantity stays float32 (anchors, proposals, decoding, NMS, the RoIs handed to RoIAlign,
pasting) and only features and head activations are 16 bits. On a CPU, autocast runs bfloat16,
which is what these tests use; the same code serves CUDA's float16 and bfloat16.
"""

import pytest
import torch

from mrcnn.boxes import box_iou
from mrcnn.config import shapes_small
from mrcnn.data.coco import CocoDataset
from mrcnn.data.shapes import generate_shapes
from mrcnn.evaluate import evaluate
from mrcnn.model import MaskRCNN

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def record_dtypes(model: MaskRCNN) -> tuple[dict[str, set], list]:
    """Hooks that note the dtype of every box tensor and of the features the poolers read."""
    seen: dict[str, set] = {}

    def note(name: str, tensors) -> None:  # a hook that returns None changes nothing
        seen.setdefault(name, set()).update(t.dtype for t in tensors)

    def pooler_inputs(prefix: str):
        return lambda module, args: note(f"{prefix} rois", [args[1]]) or note("features", args[0])

    handles = [
        model.rpn.anchor_generator.register_forward_hook(lambda m, a, out: note("anchors", out)),
        model.rpn.register_forward_hook(lambda m, a, out: note("proposals", out[0])),
        model.box_branch.pooler.register_forward_pre_hook(pooler_inputs("box")),
        model.mask_branch.pooler.register_forward_pre_hook(pooler_inputs("mask")),
    ]
    return seen, handles


def draw(tmp_path, count: int):
    paths = generate_shapes(tmp_path / "shapes", num_train=count, num_val=0, object_size=(40, 64), workers=0)
    return CocoDataset(paths.train_images, paths.train_annotations)


def test_box_tensors_stay_float32_under_bfloat16_autocast(tmp_path):
    torch.manual_seed(0)
    model = MaskRCNN(shapes_small())
    image, target = draw(tmp_path, 1)[0]
    seen, handles = record_dtypes(model)
    with torch.autocast(**BF16):
        losses = model.train()([image], [target])
        with torch.no_grad():
            detections = model.eval()([image])[0]
    for handle in handles:
        handle.remove()
    assert seen.pop("features") == {torch.bfloat16}  # autocast is on: the features are 16 bits
    assert seen == {name: {torch.float32} for name in ("anchors", "proposals", "box rois", "mask rois")}
    assert all(loss.dtype == torch.float32 for loss in losses.values())
    assert {name: t.dtype for name, t in detections.items()} == {
        "boxes": torch.float32, "scores": torch.float32, "labels": torch.int64, "masks": torch.float32}


def train(model: MaskRCNN, dataset, steps: int, lr: float, autocast: bool) -> list[float]:
    """SGD over `dataset` one image a step; the total loss of each step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    totals = []
    model.train()
    for step in range(steps):
        image, target = dataset[step % len(dataset)]
        with torch.autocast(**BF16, enabled=autocast):
            loss = sum(model([image], [target]).values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        totals.append(loss.item())
    return totals


@pytest.mark.slow
def test_a_trained_model_gives_the_same_detections_under_bfloat16(tmp_path):
    """A small model trained on 12 pictures (fp32), then run in fp32 and under bf16 autocast on them:
    matched boxes within 1 px, the same labels, COCO mask and box AP within 1 point. (With random
    weights, detections of near-equal scores trade places under bf16: judge AMP on a trained model.)"""
    dataset = draw(tmp_path, 12)  # about 30 objects: one mask crossing an IoU threshold moves the AP by less than a point
    torch.manual_seed(0)
    model = MaskRCNN(shapes_small())
    train(model, dataset, 480, 0.01, autocast=False)
    model.eval()
    fp32 = evaluate(model, dataset, "cpu", output_dir=tmp_path / "fp32", progress=False)
    with torch.autocast(**BF16):
        bf16 = evaluate(model, dataset, "cpu", output_dir=tmp_path / "bf16", progress=False)
    print(f"mask AP fp32 {fp32['segm']['AP']:.3f} bf16 {bf16['segm']['AP']:.3f}; "
          f"box AP fp32 {fp32['bbox']['AP']:.3f} bf16 {bf16['bbox']['AP']:.3f}")  # fmt: skip
    assert fp32["segm"]["AP"] > 0.3  # trained: the comparison means something
    assert abs(bf16["segm"]["AP"] - fp32["segm"]["AP"]) <= 0.01
    assert abs(bf16["bbox"]["AP"] - fp32["bbox"]["AP"]) <= 0.01
    compared = 0
    with torch.no_grad():
        for index in range(len(dataset)):
            image = dataset[index][0]
            full = model([image])[0]
            with torch.autocast(**BF16):
                half = model([image])[0]
            confident = full["scores"] >= 0.3
            if not confident.any():
                continue
            iou = box_iou(full["boxes"][confident], half["boxes"])  # [D_fp32, D_bf16]
            best = iou.argmax(dim=1)  # the bf16 detection each confident fp32 detection matches
            assert torch.equal(half["labels"][best], full["labels"][confident])
            assert (half["boxes"][best] - full["boxes"][confident]).abs().max() <= 1.0
            compared += int(confident.sum())
    assert compared >= len(dataset)


@pytest.mark.slow
def test_a_short_bfloat16_training_lowers_the_loss_like_float32(tmp_path):
    dataset = draw(tmp_path, 4)
    curves = {}
    for autocast in (False, True):
        torch.manual_seed(0)
        curves[autocast] = train(MaskRCNN(shapes_small()), dataset, 40, 0.01, autocast)
    start = {k: sum(c[:4]) / 4 for k, c in curves.items()}  # one pass over the 4 pictures
    end = {k: sum(c[-4:]) / 4 for k, c in curves.items()}
    print({k: (round(start[k], 3), round(end[k], 3)) for k in curves})
    assert start[True] == pytest.approx(start[False], rel=0.05)  # the same model, the same first losses
    assert end[False] < 0.8 * start[False] and end[True] < 0.8 * start[True]  # both learn ...
    assert end[True] == pytest.approx(end[False], rel=0.25)  # ... about as fast
