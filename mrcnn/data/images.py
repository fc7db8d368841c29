"""Pictures as the model's input: a uint8 `[H, W, 3]` RGB array -> a float32 `[3, H, W]` tensor in [0, 1].

Every data set here (the COCO reader, the shapes, the stick figures) and the prediction of
image files hands the model its pixels through `image_to_tensor`: channels first, each value
divided by 255. The model's transform normalizes them with the ImageNet mean and standard
deviation afterwards (mrcnn/transform.py).
"""

from __future__ import annotations

import numpy as np
import torch


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [0, 1] (in numpy: one thread, no pool start-up)."""
    channels_first = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)  # [3, H, W]
    return torch.from_numpy(np.divide(channels_first, 255, out=channels_first))
