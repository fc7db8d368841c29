r"""Anchors: the reference boxes the RPN scores and refines (Faster R-CNN section 3.1.1, FPN section 4.1).

At every position of a feature map with stride `s`, the RPN looks at `A` reference boxes, the
*anchors*, all centred on that position. With FPN each level has one size (32, 64, 128, 256, 512
pixels for P2..P6) and three aspect ratios `r = h / w` in {1:2, 1:1, 2:1}, so `A = 3`.

An anchor of size `S` and ratio `r` keeps the area `S^2`:

    h = S sqrt(r)        w = S / sqrt(r)

and its zero-centred *cell anchor* is `round((-w/2, -h/2, w/2, h/2))` (rounded, as the reference
implementations do, so anchors have whole-pixel corners; `round` halves to even). The anchor at
grid cell `(i, j)` of a level is the cell anchor shifted by `(j s_x, i s_y, j s_x, i s_y)`, with
strides `s_y = H // H_l`, `s_x = W // W_l` from the padded image size `H x W`.

Order (as torchvision, whose RPN weights assume it): location-major, row by row, then the `A`
anchors of a location, ratio-major then size: `anchors[(i W_l + j) A + a]`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn


def cell_anchors(sizes: tuple[float, ...], aspect_ratios: tuple[float, ...]) -> Tensor:
    """The zero-centred anchors of one location: `[len(aspect_ratios) * len(sizes), 4]` float32.

    Ratio-major: all sizes of the first ratio come first.
    """
    sizes_t = torch.as_tensor(sizes, dtype=torch.float32)  # [S]
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)  # [R]
    height_factor = torch.sqrt(ratios)  # sqrt(r) [R]
    width_factor = 1 / height_factor  # 1 / sqrt(r) [R]
    # h = S sqrt(r), w = S / sqrt(r)
    widths = (width_factor[:, None] * sizes_t[None, :]).reshape(-1)  # [R * S]
    heights = (height_factor[:, None] * sizes_t[None, :]).reshape(-1)  # [R * S]
    return (torch.stack([-widths, -heights, widths, heights], dim=1) / 2).round()  # [A, 4]


class AnchorGenerator(nn.Module):
    """The anchors of every FPN level for one padded image size.

    Args:
        sizes: one tuple of anchor sizes (pixels) per level.
        aspect_ratios: one tuple of ratios `h / w` per level.

    The anchors depend only on the padded image size and the feature map sizes, so the result
    is cached per (sizes, device, dtype); the returned tensors are shared: do not modify them.
    Traced code (`torch.compile`, `torch.export`) computes them in the graph instead.
    """

    def __init__(
        self,
        sizes: tuple[tuple[float, ...], ...] = ((32,), (64,), (128,), (256,), (512,)),
        aspect_ratios: tuple[tuple[float, ...], ...] = ((0.5, 1.0, 2.0),) * 5,
        cache_size: int = 16,
    ):
        super().__init__()
        if len(sizes) != len(aspect_ratios):
            raise ValueError(f"one tuple of sizes and one of aspect ratios per level; got {len(sizes)} and {len(aspect_ratios)}")
        self.sizes = tuple(tuple(s) for s in sizes)
        self.aspect_ratios = tuple(tuple(r) for r in aspect_ratios)
        self.cell_anchors = [cell_anchors(s, r) for s, r in zip(self.sizes, self.aspect_ratios)]  # per level [A, 4]
        self.cache_size = cache_size
        self._cache: OrderedDict = OrderedDict()

    def num_anchors_per_location(self) -> list[int]:
        """`A` for each level."""
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def forward(
        self,
        image_size_padded: tuple[int, int],
        feature_sizes: list[tuple[int, int]],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> list[Tensor]:
        """Anchors for every level: one `[H_l * W_l * A, 4]` tensor per `(H_l, W_l)` in `feature_sizes`.

        image_size_padded: `(H, W)` of the padded batch tensor; the strides are `H // H_l`, `W // W_l`.
        """
        if len(feature_sizes) != len(self.cell_anchors):
            raise ValueError(f"{len(self.cell_anchors)} levels of anchors but {len(feature_sizes)} feature maps")
        if torch.compiler.is_compiling():  # traced (torch.compile, export): the anchors are part of the graph
            return self.grid_anchors(image_size_padded, feature_sizes, device, dtype)
        height, width = int(image_size_padded[0]), int(image_size_padded[1])
        feature_sizes = [(int(h), int(w)) for h, w in feature_sizes]
        key = (height, width, tuple(feature_sizes), torch.device(device), dtype)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        anchors = self.grid_anchors((height, width), feature_sizes, device, dtype)
        self._cache[key] = anchors
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)  # forget the least recently used image size
        return anchors

    def grid_anchors(
        self, image_size_padded: tuple[int, int], feature_sizes: list[tuple[int, int]], device: torch.device | str, dtype: torch.dtype
    ) -> list[Tensor]:
        """The anchors of `forward`, computed: the cell anchors shifted to every grid cell of every level.

        The sizes may be symbolic (traced with dynamic shapes): they are only divided and counted.
        """
        height, width = image_size_padded
        anchors = []
        for (grid_h, grid_w), base in zip(feature_sizes, self.cell_anchors):
            stride_y, stride_x = height // grid_h, width // grid_w
            shift_x = torch.arange(grid_w, dtype=torch.int64, device=device) * stride_x  # [W_l]
            shift_y = torch.arange(grid_h, dtype=torch.int64, device=device) * stride_y  # [H_l]
            shift_y, shift_x = torch.meshgrid(shift_y, shift_x, indexing="ij")  # [H_l, W_l] each
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).reshape(-1, 1, 4)  # [H_l W_l, 1, 4]
            base = base.to(device=device, dtype=dtype)  # [A, 4]
            anchors.append((shifts + base[None]).reshape(-1, 4))  # [H_l W_l A, 4]
        return anchors
