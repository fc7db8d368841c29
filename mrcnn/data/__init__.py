"""Data sets: the synthetic shapes and stick figures (any laptop) and the COCO reader (the paper's data).

Each gives `(image float32 [3, H, W] in [0, 1], target dict)` pairs in the model's input format;
`collate` keeps a batch as lists. One module per concept:

    coco.py       read a COCO-format instance file (checked up front), `collate`
    shapes.py     the synthetic shapes: drawn in memory or written in COCO's layout
    keypoints.py  the synthetic stick figures with keypoints, and COCO keypoint files
    images.py     an image file (any bit depth and mode) or an RGB array as the model's input tensor
    flip.py       horizontal flipping of images, boxes, masks and keypoints (the training augmentation)
"""

from mrcnn.data.coco import CocoDataset, DatasetError, coco2017, collate, segmentation_to_mask
from mrcnn.data.flip import flip_index, flip_keypoints, horizontal_flip
from mrcnn.data.images import image_to_tensor, read_image
from mrcnn.data.keypoints import FiguresDataset, KeypointCocoDataset, generate_figures, render_figures
from mrcnn.data.shapes import CATEGORY_NAMES, ShapesDataset, ShapesPaths, generate_shapes, render_image

__all__ = [
    "CATEGORY_NAMES",
    "CocoDataset",
    "DatasetError",
    "FiguresDataset",
    "KeypointCocoDataset",
    "ShapesDataset",
    "ShapesPaths",
    "coco2017",
    "collate",
    "flip_index",
    "flip_keypoints",
    "generate_figures",
    "generate_shapes",
    "horizontal_flip",
    "image_to_tensor",
    "read_image",
    "render_figures",
    "render_image",
    "segmentation_to_mask",
]
