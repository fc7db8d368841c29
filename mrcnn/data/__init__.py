"""Data sets: the synthetic shapes (any laptop) and the COCO reader (the paper's data).

Both give `(image float32 [3, H, W] in [0, 1], target dict)` pairs in the model's input format;
`collate` keeps a batch as lists.
"""

from mrcnn.data.coco import CocoDataset, DatasetError, coco2017, collate, horizontal_flip, segmentation_to_mask
from mrcnn.data.shapes import CATEGORY_NAMES, ShapesDataset, ShapesPaths, generate_shapes, render_image

__all__ = [
    "CATEGORY_NAMES",
    "CocoDataset",
    "DatasetError",
    "ShapesDataset",
    "ShapesPaths",
    "coco2017",
    "collate",
    "generate_shapes",
    "horizontal_flip",
    "render_image",
    "segmentation_to_mask",
]
