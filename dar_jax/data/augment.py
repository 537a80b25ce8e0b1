"""Image augmentation of the reference, with Pillow as the reference uses it.

- AR model (``ar_train``): ADM ``center_crop_arr`` to ``int(size * crop_ratio)`` (1.1), then one
  of the ten crops of torchvision's ``TenCrop(size)`` (4 corners + centre of the image, then the
  same five of its horizontal flip), picked at random.
- Tokenizer (``tokenizer_train``): ADM ``random_crop_arr`` (shorter side resized to a random
  length in [ceil(size / max_crop_frac), ceil(size / min_crop_frac)], then a random size x size
  crop), no flip.
- Evaluation (``eval_center``): ``center_crop_arr`` to exactly ``size``.
- Code extraction (``extract_crops``): all ten crops, or the centre crop and its flip.

Images are uint8 arrays ``(H, W, 3)`` in and out; :func:`to_float` maps a batch to float32 in
[-1, 1] exactly as torchvision's ``ToTensor`` + ``Normalize(0.5, 0.5)`` (x / 255, then
(x - 0.5) / 0.5, in float32). Randomness comes from an explicit ``np.random.Generator``.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

NUM_TEN_CROPS = 10


def _as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    return Image.fromarray(np.asarray(image, dtype=np.uint8))


def resize_short_side(image: Image.Image, short_side: int) -> Image.Image:
    """ADM resize: halve with BOX while the short side is >= 2 * short_side, then BICUBIC so that
    the short side becomes ``short_side`` (the long side is ``round(long * scale)``)."""
    image = _as_pil(image)
    while min(*image.size) >= 2 * short_side:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = short_side / min(*image.size)
    return image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)


def center_crop_arr(image, image_size: int) -> np.ndarray:
    """ADM ``center_crop_arr``: image (H, W, 3) -> (image_size, image_size, 3) uint8."""
    arr = np.asarray(resize_short_side(image, image_size))
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def random_crop_arr(image, image_size: int, rng: np.random.Generator,
                    min_crop_frac: float = 0.8, max_crop_frac: float = 1.0) -> np.ndarray:
    """ADM ``random_crop_arr`` with ``rng`` in place of Python's ``random``: same draws (short
    side, then crop row, then crop column), each uniform over the same integer ranges."""
    lo = math.ceil(image_size / max_crop_frac)
    hi = math.ceil(image_size / min_crop_frac)
    short_side = int(rng.integers(lo, hi + 1))
    arr = np.asarray(resize_short_side(image, short_side))
    top = int(rng.integers(arr.shape[0] - image_size + 1))
    left = int(rng.integers(arr.shape[1] - image_size + 1))
    return arr[top:top + image_size, left:left + image_size]


def ten_crop(image, size: int, k: int) -> np.ndarray:
    """Crop ``k`` (0..9) of torchvision ``TenCrop(size)``: 0-4 = top-left, top-right, bottom-left,
    bottom-right, centre of the image; 5-9 = the same crops of its horizontal flip."""
    if not 0 <= k < NUM_TEN_CROPS:
        raise ValueError(f"ten-crop index must be in [0, 10), got {k}")
    arr = np.asarray(image)
    h, w = arr.shape[:2]
    if size > h or size > w:
        raise ValueError(f"crop size {size} is bigger than the image ({h}, {w})")
    if k >= 5:
        arr = arr[:, ::-1]
        k -= 5
    top, left = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size),
                 (int(round((h - size) / 2.0)), int(round((w - size) / 2.0)))][k]
    return np.ascontiguousarray(arr[top:top + size, left:left + size])


def ar_train(image, size: int, rng: np.random.Generator, crop_ratio: float = 1.1) -> np.ndarray:
    """AR-model augmentation: centre crop to ``int(size * crop_ratio)``, then a random one of the
    ten crops. image: (H, W, 3) uint8 -> (size, size, 3) uint8."""
    big = center_crop_arr(image, int(size * crop_ratio))
    return ten_crop(big, size, int(rng.integers(NUM_TEN_CROPS)))


def tokenizer_train(image, size: int, rng: np.random.Generator,
                    min_crop_frac: float = 0.8) -> np.ndarray:
    """Tokenizer augmentation: ``random_crop_arr``, no flip. -> (size, size, 3) uint8."""
    return random_crop_arr(image, size, rng, min_crop_frac=min_crop_frac)


def eval_center(image, size: int) -> np.ndarray:
    """Evaluation: ``center_crop_arr`` to exactly ``size``. -> (size, size, 3) uint8."""
    return center_crop_arr(image, size)


def extract_crops(image, size: int, num_crops: int = 10, crop_ratio: float = 1.1) -> np.ndarray:
    """The crops the reference's code extraction tokenizes per image -> (num_crops, S, S, 3):
    10: all ten crops of ``center_crop_arr(int(size * crop_ratio))`` (``--ten-crop``);
    2: ``center_crop_arr(size)`` and its horizontal flip; 1: ``center_crop_arr(size)``."""
    if num_crops == 10:
        big = center_crop_arr(image, int(size * crop_ratio))
        return np.stack([ten_crop(big, size, k) for k in range(NUM_TEN_CROPS)])
    if num_crops in (1, 2):
        center = center_crop_arr(image, size)
        return np.stack([center, center[:, ::-1]][:num_crops])
    raise ValueError(f"extraction crops must be 10, 2 or 1, got {num_crops}")


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 images (..., H, W, 3) -> float32 in [-1, 1], as ToTensor + Normalize(0.5, 0.5)."""
    x = np.asarray(images, dtype=np.float32) / np.float32(255.0)
    return (x - np.float32(0.5)) / np.float32(0.5)
