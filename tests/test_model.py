"""The whole model (paper section 3): `mrcnn.model.MaskRCNN` assembled from the small preset.

The components have their own tests; these check what only the assembled model can show, on
the synthetic shapes of mrcnn/data/shapes.py and `shapes_small` (images of 128 pixels):

- in training it returns the five losses of section 3.1 (the RPN's two, `L_cls`, `L_box`,
  `L_mask`), finite, and their sum reaches every trainable parameter;
- in evaluation it returns, per image, boxes, labels, scores and masks of the original size,
  empty tensors of the right shapes when nothing is detected;
- a batch may mix image sizes and images without any object;
- the same seed gives the same losses to the bit;
- it learns: overfitting one image gives every object a mask of IoU >= 0.9;
- bad input raises a `ValueError` naming the image and the field, before any work is done.
"""

import pytest
import torch

from mrcnn.config import shapes_small
from mrcnn.data.shapes import ShapesDataset
from mrcnn.model import MaskRCNN

LOSS_NAMES = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
GROUPS = ("backbone", "fpn", "rpn", "box_branch", "mask_branch")  # the model's trainable parts, in data-flow order


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def small_model(seed: int = 0) -> MaskRCNN:
    torch.manual_seed(seed)
    return MaskRCNN(shapes_small())


def sample(index: int = 1, **draw) -> tuple[torch.Tensor, dict]:
    """Image `index` of the shapes (seed 0): image 1 is 128 x 128 with three shapes."""
    return ShapesDataset(index + 1, seed=0, **draw)[index]


def tall_and_wide() -> list[tuple[torch.Tensor, dict]]:
    """Two images of other sizes than 128 x 128: 186 x 129 with four shapes, 104 x 199 with four."""
    data = ShapesDataset(5, seed=0, image_size=(72, 200))
    return [data[1], data[4]]


def empty_target(height: int, width: int) -> dict:
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, height, width, dtype=torch.uint8)}  # fmt: skip


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """IoU of two boolean masks `[H, W]`."""
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


# --- training: the losses and their gradients ------------------------------------------------


def test_training_returns_the_five_losses_and_they_reach_every_parameter():
    model = small_model().train()
    image, target = sample()
    losses = model([image], [target])
    assert set(losses) == LOSS_NAMES
    for name, loss in losses.items():
        assert loss.dim() == 0 and loss.dtype == torch.float32 and torch.isfinite(loss), (name, loss)
        assert loss.requires_grad, name
    assert losses["loss_objectness"] > 0 and losses["loss_classifier"] > 0 and losses["loss_mask"] > 0
    sum(losses.values()).backward()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert trainable, "the small preset trains every stage"
    for name, parameter in trainable:
        assert parameter.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, f"{name}'s gradient is zero"
    assert {name.split(".")[0] for name, _ in trainable} == set(GROUPS)


def test_each_loss_trains_its_own_part_of_the_model():
    """The RPN's losses reach the backbone, FPN and RPN but not the heads; the heads' losses reach
    their own branch and the shared features, never the RPN (its proposals are not differentiated)."""
    image, target = sample()
    reaches = {}
    for name in sorted(LOSS_NAMES):
        model = small_model().train()
        model([image], [target])[name].backward()
        reaches[name] = {
            group for group in GROUPS
            if any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(model, group).parameters())
        }  # fmt: skip
    assert reaches["loss_objectness"] == reaches["loss_rpn_box_reg"] == {"backbone", "fpn", "rpn"}
    assert reaches["loss_classifier"] == reaches["loss_box_reg"] == {"backbone", "fpn", "box_branch"}
    assert reaches["loss_mask"] == {"backbone", "fpn", "mask_branch"}


def test_training_needs_targets():
    model = small_model().train()
    image, _ = sample()
    with pytest.raises(ValueError, match="training mode needs targets"):
        model([image])


# --- evaluation: detections in the original images --------------------------------------------


def check_detections(detections: dict, height: int, width: int, config) -> None:
    assert set(detections) == {"boxes", "labels", "scores", "masks"}
    boxes, labels, scores, masks = (detections[k] for k in ("boxes", "labels", "scores", "masks"))
    count = boxes.shape[0]
    assert 0 < count <= config.detections_per_image
    assert boxes.shape == (count, 4) and boxes.dtype == torch.float32
    assert labels.shape == (count,) and labels.dtype == torch.int64
    assert scores.shape == (count,) and masks.shape == (count, 1, height, width)
    assert ((labels >= 1) & (labels < config.num_classes)).all(), "0 is the background, never detected"
    assert (scores > config.box_score_thresh).all() and (scores <= 1).all()
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert (masks >= 0).all() and (masks <= 1).all(), "masks are probabilities"


def test_evaluation_returns_detections_for_each_image_at_its_original_size():
    model = small_model().eval()
    images = [image for image, _ in tall_and_wide()]
    sizes = [tuple(image.shape[-2:]) for image in images]
    assert sizes == [(186, 129), (104, 199)]
    with torch.no_grad():
        detections = model(images)
    assert isinstance(detections, list) and len(detections) == 2
    for detection, (height, width) in zip(detections, sizes):
        check_detections(detection, height, width, model.config)


def test_evaluation_scales_the_boxes_back_to_the_original_image():
    """The same picture at twice the size gives (nearly) the same detections, scaled by two:
    the transform resizes both to 128 pixels, and the boxes are mapped back."""
    model = small_model().eval()
    image, _ = sample()
    double = torch.nn.functional.interpolate(image[None], scale_factor=2.0, mode="nearest")[0]  # [3, 256, 256]
    with torch.no_grad():
        small, large = model([image])[0], model([double])[0]
    assert large["masks"].shape[-2:] == (256, 256)
    assert torch.equal(small["labels"][:5], large["labels"][:5])
    torch.testing.assert_close(large["boxes"][:5], 2 * small["boxes"][:5], atol=0.5, rtol=0.0)


@pytest.mark.parametrize("nothing", ["proposed", "scored"])
def test_evaluation_without_any_detection_returns_empty_tensors_of_the_right_shapes(nothing):
    """No proposal passes the RPN's score threshold, or no class score passes the box branch's:
    every image still gets its dict, with D = 0 (and masks `[0, 1, H, W]` of its own size)."""
    threshold = {"proposed": {"rpn_score_thresh": 1.0}, "scored": {"box_score_thresh": 1.0}}[nothing]
    torch.manual_seed(0)
    model = MaskRCNN(shapes_small().replace(**threshold)).eval()
    images = [image for image, _ in tall_and_wide()]
    with torch.no_grad():
        detections = model(images)
    for detection, image in zip(detections, images):
        assert detection["boxes"].shape == (0, 4) and detection["scores"].shape == (0,)
        assert detection["labels"].shape == (0,) and detection["labels"].dtype == torch.int64
        assert detection["masks"].shape == (0, 1, *image.shape[-2:])


# --- batches: sizes, empty images -------------------------------------------------------------


def test_a_batch_mixes_image_sizes_in_training_and_evaluation():
    model = small_model()
    (tall, tall_target), (wide, wide_target) = tall_and_wide()
    batch, image_sizes, _ = model.transform([tall, wide])
    assert batch.shape[0] == 2 and batch.shape[2] % 32 == 0 and batch.shape[3] % 32 == 0
    assert max(image_sizes[0]) == max(image_sizes[1]) == 128 and image_sizes[0][0] > image_sizes[0][1]
    model.train()
    losses = model([tall, wide], [tall_target, wide_target])
    assert set(losses) == LOSS_NAMES and all(torch.isfinite(loss) for loss in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        detections = model([tall, wide])
    for detection, image in zip(detections, (tall, wide)):
        check_detections(detection, *image.shape[-2:], model.config)


def test_an_image_without_objects_gives_only_background_losses():
    model = small_model().train()
    image, _ = sample()
    losses = model([image], [empty_target(128, 128)])
    assert set(losses) == LOSS_NAMES
    assert losses["loss_objectness"] > 0 and losses["loss_classifier"] > 0, "every anchor and RoI is background"
    assert losses["loss_rpn_box_reg"] == 0 and losses["loss_box_reg"] == 0, "no positive: nothing to regress"
    assert losses["loss_mask"] == 0 and losses["loss_mask"].requires_grad, "a zero that backpropagates"
    sum(losses.values()).backward()
    mask_gradients = [p.grad for p in model.mask_branch.parameters()]
    assert all(g is not None and (g == 0).all() for g in mask_gradients), "the mask branch gets a zero gradient"
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.backbone.parameters())


def test_an_image_without_objects_in_a_batch_with_objects():
    model = small_model().train()
    image, target = sample()
    empty, _ = sample(0, image_size=(72, 200))
    losses = model([empty, image], [empty_target(*empty.shape[-2:]), target])
    assert set(losses) == LOSS_NAMES and all(torch.isfinite(loss) and loss > 0 for loss in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# --- reproducibility --------------------------------------------------------------------------


def three_steps(seed: int) -> list[dict[str, torch.Tensor]]:
    """The losses of three SGD steps on one image from initial weights drawn with `seed`."""
    model = small_model(seed).train()
    image, target = sample()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(3):
        losses = model([image], [target])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        history.append({name: loss.detach() for name, loss in losses.items()})
    return history


def test_the_same_seed_gives_the_same_losses_to_the_bit():
    first, second, other = three_steps(seed=0), three_steps(seed=0), three_steps(seed=1)
    for step, (a, b) in enumerate(zip(first, second)):
        for name in LOSS_NAMES:
            assert torch.equal(a[name], b[name]), f"step {step}: {name} {a[name].item()!r} != {b[name].item()!r}"
    assert any(not torch.equal(a[name], c[name]) for a, c in zip(first, other) for name in LOSS_NAMES)


# --- learning ---------------------------------------------------------------------------------

OVERFIT_DRAW = {"object_size": (56, 80), "min_objects": 3, "max_objects": 3}  # image 4: two squares and a circle
OVERFIT_SCHEDULE = ((100, 0.01), (40, 0.001))  # (steps, learning rate): SGD with momentum 0.9


def representation_ceiling(target: dict) -> list[float]:
    """The mask IoU of each object if the model were perfect: its own ground truth, cropped by its
    own box to M x M = 28 x 28 (the training target), pasted back and binarized at 0.5."""
    from mrcnn.inference import paste_masks
    from mrcnn.mask_loss import mask_targets

    boxes, masks = target["boxes"], target["masks"]
    ideal = mask_targets(masks, boxes, torch.arange(len(boxes)), 28)  # [G, 28, 28]
    pasted = paste_masks(ideal[:, None], boxes, tuple(masks.shape[-2:]))[:, 0] >= 0.5  # [G, H, W]
    return [mask_iou(p, m) for p, m in zip(pasted, masks.bool())]


@pytest.mark.slow
def test_the_small_model_overfits_one_image_to_a_mask_iou_of_0_9_per_object():
    """Trained on one image with three shapes, every object's best detection of its class has a
    mask IoU >= 0.9 with the ground truth (masks binarized at 0.5, as in section 3.1).

    140 SGD steps (about 10 s on an idle core, 25 s on a core shared at load 9). Measured with
    the initial weights of seeds 0..7: every seed passes, the lowest IoU of an object being
    0.916 (seed 0: 0.949, 0.970, 0.963). The shapes are large on purpose: the 28 x 28 mask and
    its pasting alone cap the IoU (a star of 800 pixels at 0.907, a square of 1000 at 0.93; here
    0.955 and more, checked first), and at a constant rate the IoUs still wander by a few
    hundredths from step to step, which the tenfold decay for the last 40 steps settles."""
    model = small_model(seed=0).train()
    image, target = ShapesDataset(5, seed=0, **OVERFIT_DRAW)[4]
    assert target["labels"].tolist() == [2, 2, 1] and min(representation_ceiling(target)) > 0.95
    optimizer = torch.optim.SGD(model.parameters(), lr=OVERFIT_SCHEDULE[0][1], momentum=0.9)
    for steps, lr in OVERFIT_SCHEDULE:
        for group in optimizer.param_groups:
            group["lr"] = lr
        for _ in range(steps):
            losses = model([image], [target])
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        detections = model([image])[0]
    ious = []
    for gt_mask, label in zip(target["masks"].bool(), target["labels"]):
        masks = detections["masks"][detections["labels"] == label, 0] >= 0.5  # [D_k, H, W]
        ious.append(max((mask_iou(mask, gt_mask) for mask in masks), default=0.0))
    print(f"mask IoU per object {[round(iou, 3) for iou in ious]}; last losses "
          f"{ {name: round(loss.item(), 4) for name, loss in losses.items()} }")  # fmt: skip
    assert min(ious) >= 0.9, ious


# --- bad input: a clear error, naming the image and the field, before any work ----------------


def bad_inputs() -> dict:
    """Name -> (images, targets, the message expected). The second image is the bad one."""
    image, target = sample()
    cases = {}

    def case(name, match, image_1=image, **changes):
        cases[name] = ([image, image_1], [target, {**target, **changes}], match)

    case("grey image", r"image 1: expected a \[3, H, W\] floating-point tensor", image_1=image[:1])
    case("H x W x 3 image", r"image 1: expected a \[3, H, W\] floating-point tensor.*\(128, 128, 3\)", image_1=image.permute(1, 2, 0))
    case("uint8 image", r"image 1: expected a \[3, H, W\] floating-point tensor.*uint8", image_1=(image * 255).byte())
    case("batched image", r"image 1: expected a \[3, H, W\]", image_1=image[None])
    outside = target["boxes"].clone()
    outside[0, 2] = 140.0
    case("box outside", r"image 1: boxes\[0\] = .* is outside the 128 x 128 image", boxes=outside)
    flat = target["boxes"].clone()
    flat[1, 3] = flat[1, 1]
    case("degenerate box", r"image 1: boxes\[1\] = .* is degenerate", boxes=flat)
    swapped = target["boxes"][:, [2, 1, 0, 3]]
    case("x2 < x1", r"image 1: boxes\[0\] = .* is degenerate", boxes=swapped)
    nan = target["boxes"].clone()
    nan[2, 0] = float("nan")
    case("non-finite box", r"image 1: boxes\[2\] = .* is not finite", boxes=nan)
    case("masks of another size", r"image 1: masks must be \[G, H, W\] = \[3, 128, 128\]", masks=target["masks"][:, :64])
    case("masks of another count", r"image 1: masks must be \[G, H, W\]", masks=target["masks"][:2])
    case("label 0", r"image 1: labels must be in \[1, 5\)", labels=torch.tensor([1, 0, 2]))
    case("label K", r"image 1: labels must be in \[1, 5\)", labels=torch.tensor([1, 5, 2]))
    case("float labels", r"image 1: labels must be a \[G\] int64", labels=target["labels"].float())
    case("labels of another count", r"image 1: labels must be a \[G\] int64 tensor with G = 3", labels=target["labels"][:2])
    case("boxes [G, 5]", r"image 1: boxes must be a \[G, 4\] floating tensor", boxes=torch.zeros(3, 5))
    without_masks = {key: value for key, value in target.items() if key != "masks"}
    cases["no masks"] = ([image, image], [target, without_masks], r"image 1: training the mask branch needs target\['masks'\]")
    return cases


BAD_INPUTS = bad_inputs()


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_a_clear_error_before_any_work(name, monkeypatch):
    images, targets, match = BAD_INPUTS[name]
    model = small_model().train()

    def no_work(*args, **kwargs):
        raise AssertionError("the backbone ran before the input was checked")

    monkeypatch.setattr(model.backbone, "forward", no_work)
    with pytest.raises(ValueError, match=match):
        model(images, targets)
    if name.endswith("image"):  # the images are checked in evaluation too
        with pytest.raises(ValueError, match=match):
            model.eval()(images)


def test_the_bad_input_cases_are_good_when_repaired():
    """Guards the table above: with the bad image's target restored, each case runs."""
    images, targets, _ = BAD_INPUTS["label K"]
    losses = small_model().train()(images, [targets[0], targets[0]])
    assert set(losses) == LOSS_NAMES
