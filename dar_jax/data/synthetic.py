"""A built-in synthetic dataset: one coloured shape on a plain background, N classes.

Class ``c`` is the pair (``SHAPES[c % 5]``, ``COLOURS[c % 8]``), so up to 40 classes, each a
distinct (shape, colour) pair; the first 8 classes also have distinct colours. Per image, drawn
from a generator seeded by (dataset seed, split, index): shape size (radius 18-32% of the side),
position (fully inside, with a margin), rotation (square, triangle, plus), colour jitter, and a
dark-to-mid grey background with a slight tint and a linear gradient, so that the class is
unambiguous at 32 px yet no two images are alike. Drawing is vectorised NumPy with a one-pixel
anti-aliased edge; any resolution; no download.
"""
from __future__ import annotations

import functools

import numpy as np

from dar_jax.data.sources import DataError

SHAPES = ("circle", "square", "triangle", "plus", "ring")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (40, 70, 235),
    "yellow": (240, 220, 30),
    "magenta": (215, 40, 215),
    "cyan": (30, 210, 220),
    "orange": (250, 130, 20),
    "white": (235, 235, 235),
}
MAX_CLASSES = len(SHAPES) * len(COLOURS)  # 40: (c % 5, c % 8) is unique for c < lcm(5, 8)
SPLITS = ("train", "validation", "test")


def class_name(label: int) -> str:
    """E.g. ``class_name(0) == "red circle"``."""
    colour = list(COLOURS)[label % len(COLOURS)]
    return f"{colour} {SHAPES[label % len(SHAPES)]}"


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[:size, :size].astype(np.float32) + np.float32(0.5)
    return y, x


def _signed_distance(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Approximate signed distance (pixels, < 0 inside) to ``shape`` of radius ``r`` at (u, v)."""
    if shape == "circle":
        return np.hypot(u, v) - r
    if shape == "ring":
        return np.abs(np.hypot(u, v) - 0.72 * r) - 0.28 * r
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.8 * r
    if shape == "triangle":  # equilateral, circumradius r: three half-planes at distance r / 2
        angles = np.pi / 2 + np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3])
        return np.max([np.cos(a) * u + np.sin(a) * v for a in angles], axis=0) - 0.5 * r
    if shape == "plus":
        w = 0.3 * r
        bar_h = np.maximum(np.abs(u) - r, np.abs(v) - w)
        bar_v = np.maximum(np.abs(u) - w, np.abs(v) - r)
        return np.minimum(bar_h, bar_v)
    raise ValueError(f"unknown shape {shape!r}")


def render(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One image of class ``label``: (size, size, 3) uint8."""
    shape = SHAPES[label % len(SHAPES)]
    colour = np.array(COLOURS[list(COLOURS)[label % len(COLOURS)]], np.float32)
    y, x = _grid(size)
    # Background: grey 10-100, tint +-12 per channel, linear gradient of amplitude up to 25.
    grey = rng.uniform(10, 100)
    tint = rng.uniform(-12, 12, size=3)
    direction = rng.uniform(0, 2 * np.pi)
    amplitude = rng.uniform(-25, 25)
    ramp = (np.cos(direction) * x + np.sin(direction) * y) / size - 0.5
    background = grey + tint[None, None, :] + (amplitude * ramp)[..., None]
    # Shape: radius, centre (inside with an 8% margin), rotation, colour jitter.
    r = rng.uniform(0.18, 0.32) * size
    margin = 0.08 * size
    cy, cx = rng.uniform(r + margin, size - r - margin, size=2)
    theta = rng.uniform(0, 2 * np.pi)
    fill = colour * rng.uniform(0.85, 1.0) + rng.uniform(-12, 12, size=3)
    dy, dx = y - cy, x - cx
    u = np.cos(theta) * dx + np.sin(theta) * dy
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    alpha = np.clip(0.5 - _signed_distance(shape, u, v, r), 0.0, 1.0)[..., None]
    image = alpha * fill[None, None, :] + (1.0 - alpha) * background
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


class SyntheticShapes:
    """Random-access source of synthetic shapes: ``ds[i] == {"image": (S, S, 3) uint8,
    "label": i % num_classes}``, deterministic in (seed, split, i).

    Splits "train", "validation" and "test" draw from independent streams (held-out images).
    """

    def __init__(self, *, num_classes: int = 10, image_size: int = 32, split: str = "train",
                 num_examples: int = 50_000, seed: int = 0):
        if not 1 <= num_classes <= MAX_CLASSES:
            raise DataError(f"synthetic shapes: num_classes must be in [1, {MAX_CLASSES}], "
                            f"got {num_classes}")
        if image_size < 8:
            raise DataError(f"synthetic shapes: image_size must be >= 8, got {image_size}")
        if split not in SPLITS:
            raise DataError(f"synthetic shapes: unknown split {split!r}; splits: {list(SPLITS)}")
        if num_examples < 1:
            raise DataError(f"synthetic shapes: num_examples must be >= 1, got {num_examples}")
        if seed < 0:
            raise DataError(f"synthetic shapes: seed must be >= 0, got {seed}")
        self.num_classes = num_classes
        self.image_size = image_size
        self.split = split
        self.num_examples = num_examples
        self.seed = seed
        self.classes = [class_name(c) for c in range(num_classes)]

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        label = index % self.num_classes
        return {"image": render(label, self.image_size, rng), "label": label}

    def __repr__(self) -> str:
        return (f"SyntheticShapes(num_classes={self.num_classes}, image_size={self.image_size}, "
                f"split={self.split!r}, num_examples={self.num_examples}, seed={self.seed})")
