r"""From a list of images of any size to one padded batch, and back (paper section 3.1, "Implementation Details").

The paper resizes images "such that their scale (shorter edge) is 800 pixels" (and caps the
longer edge at 1333 in the public implementations). `ImageTransform` does, per image:

1. normalize with the ImageNet statistics the backbone was trained with:
   `x' = (x - mean_c) / std_c` per channel `c`;
2. resize by one factor for both axes,

       s = min(min_size / min(h, w), max_size / max(h, w)),

   with bilinear interpolation (`align_corners=False`); the new size is `floor(h s) x floor(w s)`
   (`recompute_scale_factor=True`). Boxes (and keypoints) are multiplied by the actual ratios
   `h' / h` and `w' / w`, masks are resized with nearest-neighbour by the same `s` (PyTorch's
   "nearest": new pixel `i` copies old pixel `floor(i h / h')`, so a mask edge can sit up to one
   new pixel off the scaled box);
3. pad all images with zeros at the bottom and right to a common size, a multiple of 32 (the
   stride of C5, so every pyramid level divides evenly), giving `[N, 3, H_pad, W_pad]`.

`image_sizes` (the sizes after step 2, before padding) tell the later stages where each real
image ends: anchors outside it are ignored and boxes are clipped to it. `postprocess` maps
detected boxes back to the original image with `resize_boxes`; the masks are pasted at the
original size by mrcnn/inference.py.

In training, `min_size` may be a tuple: each image draws one of them (multi-scale training),
with torch's random generator in the same way as torchvision.

Every step, down to the order of float operations, is that of torchvision's
`GeneralizedRCNNTransform`, so the two give identical batches, sizes and targets.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# COCO boxes can exceed the image border by rounding; beyond this many pixels it is an error.
BOX_BORDER_TOLERANCE = 1.0


def resize_boxes(boxes: Tensor, original_size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
    """Scale boxes `[G, 4]` (x1, y1, x2, y2) from an image of `original_size` (h, w) to `new_size`.

    The ratios are computed in float32 as `new / original`, as torchvision does.
    """
    ratio_height, ratio_width = (
        torch.tensor(new, dtype=torch.float32, device=boxes.device) / torch.tensor(old, dtype=torch.float32, device=boxes.device)
        for new, old in zip(new_size, original_size)
    )
    x1, y1, x2, y2 = boxes.unbind(1)  # each [G]
    return torch.stack((x1 * ratio_width, y1 * ratio_height, x2 * ratio_width, y2 * ratio_height), dim=1)  # [G, 4]


def resize_keypoints(keypoints: Tensor, original_size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
    """Scale keypoints `[G, J, 3]` (x, y, visibility) like `resize_boxes`; visibility is unchanged."""
    ratio_height, ratio_width = (
        torch.tensor(new, dtype=torch.float32, device=keypoints.device) / torch.tensor(old, dtype=torch.float32, device=keypoints.device)
        for new, old in zip(new_size, original_size)
    )
    resized = keypoints.clone()
    resized[..., 0] *= ratio_width
    resized[..., 1] *= ratio_height
    return resized


def check_inputs(images: list[Tensor], targets: list[dict[str, Tensor]] | None) -> None:
    """Raise a `ValueError` naming the image and the field if the inputs are not what the model takes.

    images: a non-empty list of `[3, H, W]` floating tensors of one dtype and device. targets
    (optional): one dict per image with `boxes` `[G, 4]` floating, finite, `x1 < x2`, `y1 < y2`,
    inside the image (to `BOX_BORDER_TOLERANCE` pixels); `labels` `[G]` int64; optional `masks`
    `[G, H, W]` and `keypoints` `[G, J, 3]`. The range of the labels is checked by the model.
    """
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError(f"images must be a non-empty list of [3, H, W] tensors, got {type(images).__name__}")
    for index, image in enumerate(images):
        if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
            shape, dtype = tuple(getattr(image, "shape", ())), getattr(image, "dtype", type(image).__name__)
            raise ValueError(f"image {index}: expected a [3, H, W] floating-point tensor in [0, 1], got shape {shape} of {dtype}")
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"image {index}: empty image of shape {tuple(image.shape)}")
        if image.dtype != images[0].dtype or image.device != images[0].device:
            raise ValueError(f"image {index}: {image.dtype} on {image.device}, but image 0 is {images[0].dtype} on {images[0].device}")
    if targets is None:
        return
    if len(targets) != len(images):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")
    for index, (image, target) in enumerate(zip(images, targets)):
        height, width = image.shape[-2:]
        boxes, labels = target.get("boxes"), target.get("labels")
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
            raise ValueError(f"image {index}: boxes must be a [G, 4] floating tensor, got {_describe(boxes)}")
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != boxes.shape[:1]:
            raise ValueError(f"image {index}: labels must be a [G] int64 tensor with G = {boxes.shape[0]}, got {_describe(labels)}")
        x1, y1, x2, y2 = boxes.unbind(1)
        tolerance = BOX_BORDER_TOLERANCE
        problems = (
            (~torch.isfinite(boxes).all(dim=1), "is not finite"),
            ((x2 <= x1) | (y2 <= y1), "is degenerate (x2 <= x1 or y2 <= y1)"),
            ((x1 < -tolerance) | (y1 < -tolerance) | (x2 > width + tolerance) | (y2 > height + tolerance),
             f"is outside the {height} x {width} image"),
        )
        for bad, what in problems:
            if bool(bad.any()):
                g = int(bad.nonzero()[0, 0])
                raise ValueError(f"image {index}: boxes[{g}] = {boxes[g].tolist()} {what}")
        masks = target.get("masks")
        if masks is not None and (not isinstance(masks, Tensor) or tuple(masks.shape) != (boxes.shape[0], height, width)):
            raise ValueError(f"image {index}: masks must be [G, H, W] = {[boxes.shape[0], height, width]}, got {_describe(masks)}")
        keypoints = target.get("keypoints")
        if keypoints is not None and (not isinstance(keypoints, Tensor) or keypoints.dim() != 3
                                      or keypoints.shape[0] != boxes.shape[0] or keypoints.shape[2] != 3):
            raise ValueError(f"image {index}: keypoints must be [G, J, 3] with G = {boxes.shape[0]}, got {_describe(keypoints)}")


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"shape {list(value.shape)} of {value.dtype}"
    return "nothing" if value is None else type(value).__name__


def batch_images(images: list[Tensor], size_divisible: int = 32) -> Tensor:
    """Zero-pad `[3, H_i, W_i]` images at the bottom and right into `[N, 3, H_pad, W_pad]`, multiples of
    `size_divisible`."""
    height = int(math.ceil(max(image.shape[1] for image in images) / size_divisible) * size_divisible)
    width = int(math.ceil(max(image.shape[2] for image in images) / size_divisible) * size_divisible)
    batch = images[0].new_zeros(len(images), 3, height, width)  # [N, 3, H_pad, W_pad]
    for index, image in enumerate(images):
        batch[index, :, : image.shape[1], : image.shape[2]].copy_(image)
    return batch


class ImageTransform(nn.Module):
    """Normalize, resize (shorter side to `min_size`, longer at most `max_size`) and batch.

    Args:
        min_size: the target shorter side; a tuple draws one per image in training (the last
            one is used in eval).
        max_size: the cap on the longer side.
        image_mean, image_std: per-channel statistics of the backbone's training images.
        size_divisible: the padded batch's height and width are multiples of it.
    """

    def __init__(
        self,
        min_size: int | tuple[int, ...] = 800,
        max_size: int = 1333,
        image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        image_std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        size_divisible: int = 32,
    ):
        super().__init__()
        self.min_size = tuple(min_size) if isinstance(min_size, (list, tuple)) else (min_size,)
        self.max_size = max_size
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.size_divisible = size_divisible

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[Tensor, list[tuple[int, int]], list[dict[str, Tensor]] | None]:
        """images: N tensors `[3, H_i, W_i]` in [0, 1]; targets: N dicts (model inputs, see the book).

        Returns the batch `[N, 3, H_pad, W_pad]`, `image_sizes` (h, w) after resizing, and new
        target dicts with resized boxes, masks `[G, h, w]` uint8 and keypoints (other fields as given).
        """
        check_inputs(images, targets)
        resized_images, resized_targets = [], []
        for index, image in enumerate(images):
            image = self.normalize(image)
            target = dict(targets[index]) if targets is not None else None
            image, target = self.resize(image, target)
            resized_images.append(image)
            resized_targets.append(target)
        image_sizes = [(int(image.shape[1]), int(image.shape[2])) for image in resized_images]
        batch = batch_images(resized_images, self.size_divisible)
        return batch, image_sizes, (resized_targets if targets is not None else None)

    def normalize(self, image: Tensor) -> Tensor:
        """`(x - mean_c) / std_c` per channel: `[3, H, W]` -> `[3, H, W]`."""
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        return (image - mean[:, None, None]) / std[:, None, None]

    def choose_min_size(self) -> int:
        """A random entry of `min_size` in training (torch's generator, as torchvision), the last in eval."""
        if not self.training:
            return self.min_size[-1]
        index = int(torch.empty(1).uniform_(0.0, float(len(self.min_size))).item())
        return self.min_size[index]

    def resize(self, image: Tensor, target: dict[str, Tensor] | None) -> tuple[Tensor, dict[str, Tensor] | None]:
        """Resize one image `[3, h, w]` -> `[3, floor(h s), floor(w s)]` and its target (module docstring, step 2)."""
        height, width = image.shape[-2:]
        min_size = self.choose_min_size()
        scale = min(min_size / min(height, width), self.max_size / max(height, width))  # s
        image = F.interpolate(
            image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False
        )[0]  # [3, h', w']
        if target is None:
            return image, None
        new_size = tuple(image.shape[-2:])
        target["boxes"] = resize_boxes(target["boxes"], (height, width), new_size)
        if "masks" in target:
            masks = target["masks"][:, None].float()  # [G, 1, h, w]
            masks = F.interpolate(masks, scale_factor=scale, recompute_scale_factor=True)  # [G, 1, h', w']
            target["masks"] = masks[:, 0].byte()  # [G, h', w']
        if "keypoints" in target:
            target["keypoints"] = resize_keypoints(target["keypoints"], (height, width), new_size)
        return image, target

    def postprocess(
        self,
        detections: list[dict[str, Tensor]],
        image_sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Map each image's detected `boxes` (and `keypoints`) from the resized to the original image.

        Returns new dicts; other fields (masks included, pasted later at the original size) are
        passed through.
        """
        results = []
        for detection, size, original_size in zip(detections, image_sizes, original_sizes):
            result = dict(detection)
            result["boxes"] = resize_boxes(detection["boxes"], size, original_size)
            if "keypoints" in detection:
                result["keypoints"] = resize_keypoints(detection["keypoints"], size, original_size)
            results.append(result)
        return results

    def extra_repr(self) -> str:
        return f"min_size={self.min_size}, max_size={self.max_size}, mean={self.image_mean}, std={self.image_std}"
