r"""From the network's outputs to detections in the original image (paper section 3.1, "Inference").

At test time the box branch keeps at most 100 detections per image, the mask branch predicts
one `M x M` mask (M = 28) per detection, for the predicted class only, and "the m x m
floating-number mask output is then resized to the RoI size, and binarized at a threshold of
0.5". This module does the resizing: once the boxes are mapped back to the original image
(`ImageTransform.postprocess` in mrcnn/transform.py), it pastes every mask probability map
into a full-image canvas, with the exact arithmetic of torchvision's `paste_masks_in_image`,
so that the two agree to float rounding:

1. Pad the mask with `p` pixels of zeros on every side (`M -> S = M + 2p`) and enlarge the
   box about its centre by `S / M`, so that the mask's border fades out across the box's edge
   instead of ending abruptly at it.
2. Cut the enlarged box to whole pixels: `x_0 = trunc(x_1)`, `x_1' = trunc(x_2)`; it covers the
   `w = x_1' - x_0 + 1` pixels `x_0 .. x_1'` (and likewise `h` rows).
3. Resize the padded mask to `h x w` with bilinear interpolation (`align_corners=False`). Along
   one axis, the output pixel `i` of the box samples the padded mask at

        s(i) = max((S / w) (i + 1/2) - 1/2, 0),

   between its neighbours `floor(s)` and `floor(s) + 1` (clamped to `S - 1`), with weights
   `1 - (s - floor(s))` and `s - floor(s)`.
4. Place the resized mask at `(y_0, x_0)`; what falls outside the image is dropped.

Bilinear resizing is separable, so steps 3 and 4 for detection `d` are two matrix products:

    pasted_d = A_y(d) · mask_d · A_x(d)^T                      [H, S] · [S, S] · [S, W] = [H, W]

where row `y` of `A_y(d)` holds the two interpolation weights of box row `y - y_0` when the
image row `y` lies in the box, and zeros otherwise (likewise `A_x`). All detections are pasted
at once by a batched matrix product, with no Python loop over them.

Shapes (the book's legend): D detections, M mask size, H x W the original image.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_paste_inputs(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], padding: int, values: bool = True) -> None:
    """Raise a `ValueError` naming the problem if the masks cannot be pasted into the image.

    Shapes, dtypes and sizes always; the boxes' values (finite, `x2 >= x1`, `y2 >= y1`) when `values`
    is true: reading them is a host synchronisation, which the model's own boxes do not need.
    """
    if not isinstance(masks, Tensor) or masks.dim() != 4 or masks.shape[1] != 1 or masks.shape[2] != masks.shape[3]:
        raise ValueError(f"masks must be a [D, 1, M, M] tensor, got shape {tuple(getattr(masks, 'shape', ()))}")
    if not masks.is_floating_point():
        raise ValueError(f"masks must be floating point probabilities, got {masks.dtype}")
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be a [D, 4] tensor of (x1, y1, x2, y2), got shape {tuple(getattr(boxes, 'shape', ()))}")
    if boxes.shape[0] != masks.shape[0]:
        raise ValueError(f"got {masks.shape[0]} masks but {boxes.shape[0]} boxes")
    if len(image_size) != 2 or any(int(s) != s or s <= 0 for s in image_size):
        raise ValueError(f"image_size must be two positive integers (height, width), got {image_size}")
    if int(padding) != padding or padding < 0:
        raise ValueError(f"padding must be a non-negative integer, got {padding}")
    if not values:
        return
    if boxes.numel() and not bool(torch.isfinite(boxes).all()):
        raise ValueError("boxes must be finite")
    if boxes.numel() and bool(((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any()):
        bad = int(((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).nonzero()[0, 0])
        raise ValueError(f"boxes must have x2 >= x1 and y2 >= y1; box {bad} is {boxes[bad].tolist()}")


def expand_boxes(boxes: Tensor, scale: float) -> Tensor:
    """Scale every box about its centre by `scale` (step 1). boxes `[D, 4]` -> `[D, 4]`, same dtype.

    The operations and their order are torchvision's, so the whole-pixel boxes of step 2 agree.
    """
    half_width = (boxes[:, 2] - boxes[:, 0]) * 0.5  # [D]
    half_height = (boxes[:, 3] - boxes[:, 1]) * 0.5  # [D]
    centre_x = (boxes[:, 2] + boxes[:, 0]) * 0.5  # [D]
    centre_y = (boxes[:, 3] + boxes[:, 1]) * 0.5  # [D]
    half_width = half_width * scale
    half_height = half_height * scale
    return torch.stack(
        (centre_x - half_width, centre_y - half_height, centre_x + half_width, centre_y + half_height), dim=1
    )  # [D, 4]


def paste_matrix(start: Tensor, length: Tensor, image_length: int, source_length: int, dtype: torch.dtype) -> Tensor:
    """The matrix `A` that resizes a length-`S` signal to each box and places it in the image (step 3).

    start `[D]` int64 (the box's first pixel, possibly negative), length `[D]` int64 (its number
    of pixels, >= 1) -> `[D, image_length, S]` of `dtype`. Row `i` of detection `d` holds the
    bilinear weights of image pixel `i`, or zeros when that pixel is outside the box. Computed
    in `dtype` in the order PyTorch's `upsample_bilinear2d` uses, so the sample positions agree.
    """
    pixel = torch.arange(image_length, device=start.device)  # [L]
    local = pixel[None, :] - start[:, None]  # [D, L]: the pixel's index inside the resized mask
    inside = (local >= 0) & (local < length[:, None])  # [D, L]
    # s(i) = max((S / w) (i + 1/2) - 1/2, 0)
    scale = torch.full_like(length, source_length, dtype=dtype) / length.to(dtype)  # [D]
    source = (scale[:, None] * (local.to(dtype) + 0.5) - 0.5).clamp(min=0)  # [D, L]
    low = source.floor().to(torch.int64).clamp(max=source_length - 1)  # [D, L]
    high = torch.where(low < source_length - 1, low + 1, low)  # [D, L]
    weight_high = (source - low.to(dtype)).clamp(0, 1)  # [D, L]
    weight_low = 1 - weight_high  # [D, L]
    matrix = torch.zeros(start.shape[0], image_length, source_length, dtype=dtype, device=start.device)
    matrix.scatter_add_(2, low[:, :, None], (weight_low * inside)[:, :, None])
    matrix.scatter_add_(2, high[:, :, None], (weight_high * inside)[:, :, None])
    return matrix  # [D, L, S]


def paste_masks(
    masks: Tensor, boxes: Tensor, image_size: tuple[int, int], padding: int = 1, validate: bool = True
) -> Tensor:
    """Paste each detection's mask probabilities into an image-sized canvas (steps 1-4 above).

    masks: `[D, 1, M, M]` float probabilities; boxes: `[D, 4]` (x1, y1, x2, y2) float, in the
    coordinates of the image of size `image_size = (H, W)`; returns `[D, 1, H, W]` of the masks'
    dtype, zero outside each (enlarged) box. Equal, to float rounding, to torchvision's
    `paste_masks_in_image(masks, boxes, image_size, padding)`: the same pixels and weights,
    summed in another order (a few units of machine epsilon apart). `validate=False` skips the
    checks of the boxes' values (the model's boxes are valid by construction), so that nothing
    is read back to the host.
    """
    check_paste_inputs(masks, boxes, image_size, padding, values=validate)
    height, width = int(image_size[0]), int(image_size[1])
    num_detections, mask_size = masks.shape[0], masks.shape[-1]
    if num_detections == 0:
        return masks.new_zeros(0, 1, height, width)

    # step 1: pad the mask with zeros, enlarge the box by S / M
    source_size = mask_size + 2 * padding  # S
    padded = torch.nn.functional.pad(masks[:, 0], (padding,) * 4)  # [D, S, S]
    boxes = expand_boxes(boxes, float(source_size) / mask_size)
    # step 2: whole pixels, truncated toward zero; the box covers pixels x0 .. x1 inclusive
    boxes = boxes.to(torch.int64)  # [D, 4]
    box_width = (boxes[:, 2] - boxes[:, 0] + 1).clamp(min=1)  # [D]
    box_height = (boxes[:, 3] - boxes[:, 1] + 1).clamp(min=1)  # [D]

    # steps 3 and 4: pasted_d = A_y(d) · mask_d · A_x(d)^T
    rows = paste_matrix(boxes[:, 1], box_height, height, source_size, masks.dtype)  # [D, H, S]
    columns = paste_matrix(boxes[:, 0], box_width, width, source_size, masks.dtype)  # [D, W, S]
    resized_columns = torch.bmm(padded, columns.transpose(1, 2))  # [D, S, W]: columns first, as PyTorch does
    pasted = torch.bmm(rows, resized_columns)  # [D, H, W]
    return pasted[:, None]  # [D, 1, H, W]


def paste_detection_masks(
    detections: list[dict[str, Tensor]], image_sizes: list[tuple[int, int]], validate: bool = True
) -> list[dict[str, Tensor]]:
    """Paste the masks of every image's detections into that image (the last step of inference).

    detections: one dict per image with "boxes" `[D, 4]` already in the coordinates of the
    original image (`ImageTransform.postprocess` maps them back from the resized image), and
    "masks" `[D, 1, M, M]` probabilities; image_sizes: the original `(H, W)` of each image.
    Returns new dicts whose "masks" are `[D, 1, H, W]` probabilities; the other fields are the
    same tensors. Binarize at 0.5 to get the paper's masks. `validate` as in `paste_masks`.
    """
    if len(detections) != len(image_sizes):
        raise ValueError(f"got detections for {len(detections)} images but {len(image_sizes)} image sizes")
    results = []
    for detection, image_size in zip(detections, image_sizes):
        if "masks" not in detection or "boxes" not in detection:
            raise ValueError(f"each detection needs 'boxes' and 'masks', got keys {sorted(detection)}")
        results.append({**detection, "masks": paste_masks(detection["masks"], detection["boxes"], image_size, validate=validate)})
    return results
