"""Horizontal flipping, the one augmentation of Mask R-CNN's training (Detectron's and torchvision's recipes).

An image of width W is mirrored about its vertical centre line: a point at x goes to W - x.
A box (x1, y1, x2, y2) becomes (W - x2, y1, W - x1, y2), so that x1 < x2 still holds; a mask's
columns are reversed. Keypoints mirror the same way, and left and right swap names: the left
elbow of a mirrored person is where the right one was (`flip_index`). Flipping twice gives the
input back.

Shapes: G objects, J keypoints.
"""

from __future__ import annotations

import torch


def horizontal_flip(image: torch.Tensor, target: dict, keypoint_flip_index: list[int] | tuple[int, ...] | None = None
                    ) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """Mirror an image float [3, H, W] and its target: x -> W - x for boxes, columns for masks, and
    keypoints (`flip_keypoints`, left and right swapped by `keypoint_flip_index`, which a target
    with "keypoints" needs)."""
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, 0] = width - target["boxes"][:, 2]  # the right edge becomes the left one
    boxes[:, 2] = width - target["boxes"][:, 0]
    flipped = {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}
    if "keypoints" in target:
        if keypoint_flip_index is None:
            raise ValueError("flipping keypoints needs the flip index of their names (left and right swap)")
        flipped["keypoints"] = flip_keypoints(target["keypoints"], width, keypoint_flip_index)
    return image.flip(-1), flipped


def flip_index(names: tuple[str, ...] | list[str]) -> list[int]:
    """Where each keypoint goes when the image is mirrored: `left_*` <-> `right_*`, the others stay."""
    swapped = [n.replace("left", "\0").replace("right", "left").replace("\0", "right") for n in names]
    return [list(names).index(n) if n in names else i for i, n in enumerate(swapped)]


def flip_keypoints(keypoints: torch.Tensor, width: int, index: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Mirror keypoints float `[G, J, 3]` in an image of `width`: x -> W - x, then left and right swap.

    `horizontal_flip` mirrors boxes and masks; keypoints need this too. Keypoints that are not
    labelled (v = 0, stored at x = y = 0) stay at 0.
    """
    flipped = keypoints[:, list(index)].clone()  # [G, J, 3]
    flipped[..., 0] = torch.where(flipped[..., 2] > 0, width - flipped[..., 0], flipped[..., 0])
    return flipped
