"""Pictures as the model's input: an image file, or its RGB array, -> a float32 `[3, H, W]` tensor in [0, 1].

Every data set here (the COCO reader, the shapes, the stick figures) and the prediction of image
files hands the model its pixels through `image_to_tensor`: channels first, each value divided
by the largest value of its bit depth (255 for 8 bits, 65535 for 16). The model's transform
normalizes them with the ImageNet mean and standard deviation afterwards (mrcnn/transform.py).

Files are read by `load_rgb` (the COCO reader) and `read_image` (`mrcnn predict`). Both decode
the whole file, so a truncated or corrupt one fails there, with the reason, and never hands the
model half a picture. Any picture Pillow opens (PNG, JPEG, BMP, TIFF, ...) is brought to RGB by
the bit depth of its values, never by clipping them to 8 bits (which turns 16-bit grey white):

    Pillow mode              the picture                                   RGB array [H, W, 3]
    RGB                      8-bit colour (16-bit colour PNGs too:         uint8, as it is
                             Pillow keeps the high byte of each value)
    L, 1, P, LA, RGBA, CMYK  grey, black and white, palette, with alpha,   uint8, Pillow's convert("RGB")
                             print colours, ...                            (the alpha channel dropped)
    I;16, I;16B, I;16L       16-bit grey (PNG, TIFF)                       uint16, grey in each channel
    I                        32-bit integer grey (16-bit PGM, TIFF)        uint16 if in [0, 65535], else refused
    F                        32-bit float grey (TIFF)                      float32 if in [0, 1], else refused
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # what `read_image` takes


class ImageReadError(ValueError):
    """An image file that cannot be read (truncated, corrupt, not an image, values out of range)."""


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """RGB [H, W, 3] -> float32 [3, H, W] in [0, 1]: uint8 / 255, uint16 / 65535, float32 as it is.

    In numpy: one thread, no pool start-up.
    """
    if image.dtype.kind not in "uf":
        raise TypeError(f"expected an unsigned integer or float image, got {image.dtype}")
    largest = np.iinfo(image.dtype).max if image.dtype.kind == "u" else 1  # 255, 65535 (, 1.0)
    channels_first = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)  # [3, H, W]
    return torch.from_numpy(np.divide(channels_first, largest, out=channels_first))


def picture_to_rgb(picture: Image.Image) -> np.ndarray:
    """A Pillow picture (loaded) as RGB [H, W, 3], uint8, uint16 or float32 (the module's table).

    An `ImageReadError` for 32-bit grey whose values do not fit the table's range.
    """
    mode = picture.mode
    if mode == "RGB":
        return np.asarray(picture)
    if not (mode.startswith("I;16") or mode in ("I", "F")):
        return np.asarray(picture.convert("RGB"))
    grey = np.asarray(picture)  # [H, W]: uint16 (either byte order), int32 or float32
    if mode in ("I", "F"):  # 32 bits: the values must say which scale they use
        low, high = (grey.min(), grey.max()) if grey.size else (0, 0)
        if mode == "I" and (low < 0 or high > 65535):
            raise ImageReadError(f"32-bit integer grey from {low} to {high}, not 16-bit values (0 to 65535)")
        if mode == "F" and not (0 <= low and high <= 1):  # NaN fails both comparisons
            raise ImageReadError(f"32-bit float grey from {low} to {high}, not brightness values in [0, 1]")
        grey = grey.astype(np.uint16) if mode == "I" else grey
    return np.repeat(grey[..., None], 3, axis=2)  # [H, W, 3]


def load_rgb(path: str | os.PathLike) -> tuple[np.ndarray, str]:
    """Decode the whole image file at `path`: its RGB array (`picture_to_rgb`) and its Pillow mode.

    An `ImageReadError` with a one-line reason if the file cannot be opened or decoded to the end.
    """
    try:
        with Image.open(path) as picture:
            picture.load()  # every byte of the file, not only its header: a truncated file fails here
            return picture_to_rgb(picture), picture.mode
    except ImageReadError:
        raise
    except Exception as error:  # Pillow raises several kinds (OSError, SyntaxError, ValueError, ...) for a broken file
        lines = str(error).strip().splitlines()
        raise ImageReadError(lines[0] if lines else type(error).__name__) from error


def read_image(path: str | os.PathLike) -> tuple[torch.Tensor, str | None]:
    """An image file as float32 `[3, H, W]` in [0, 1], and a note if it had to be converted to RGB.

    Raises `FileNotFoundError` for a missing file and `ValueError` for one that is not a readable
    image of a known kind (`IMAGE_SUFFIXES`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"image {path}: expected an image file ({', '.join(IMAGE_SUFFIXES)})")
    try:
        rgb, mode = load_rgb(path)
    except ImageReadError as error:
        raise ValueError(f"image {path} cannot be read: {error}") from None
    note = None
    if mode != "RGB":
        how = " (alpha channel dropped)" if "A" in mode else " (16-bit grey, values / 65535)" if mode[0] == "I" else ""
        note = f"{path.name}: converted from {mode} to RGB{how}"
    return image_to_tensor(rgb), note
