"""Human-readable class names for a class-conditional model.

ImageNet's 1,000 names come from ``imagenet_classes.txt`` shipped in this package (one name a
line, in class-id order); the built-in synthetic shapes are named by ``synthetic.class_name``
("red circle", ...); any other model can bring a file with one name a line.
"""
from __future__ import annotations

import functools
import importlib.resources
import os

from dar_jax.data import synthetic
from dar_jax.data.sources import DataError

IMAGENET_CLASSES = 1000


@functools.lru_cache(maxsize=1)
def imagenet() -> tuple[str, ...]:
    """ImageNet-1k class names, index = class id (as the ADM/D-AR class labels)."""
    text = importlib.resources.files("dar_jax.data").joinpath("imagenet_classes.txt").read_text("utf-8")
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != IMAGENET_CLASSES:
        raise DataError(f"imagenet_classes.txt holds {len(names)} names, expected {IMAGENET_CLASSES}")
    return names


def from_file(path: str | os.PathLike, num_classes: int) -> tuple[str, ...]:
    """One name a line (blank lines ignored); exactly ``num_classes`` of them."""
    try:
        with open(path, encoding="utf-8") as f:
            names = tuple(line.strip() for line in f if line.strip())
    except FileNotFoundError:
        raise DataError(f"class names file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read class names file {path}: {e}") from None
    if len(names) != num_classes:
        raise DataError(f"class names file {path} holds {len(names)} names, the model has "
                        f"{num_classes} classes")
    return names


def for_model(num_classes: int, path: str | os.PathLike | None = None) -> tuple[str, ...]:
    """Names of classes 0..num_classes-1: from ``path`` when given, else ImageNet's for 1000
    classes, the synthetic shapes' for up to ``synthetic.MAX_CLASSES`` (the built-in dataset the
    shipped default model learnt), else "class i"."""
    if num_classes < 1:
        raise DataError(f"a model needs at least one class, got {num_classes}")
    if path is not None:
        return from_file(path, num_classes)
    if num_classes == IMAGENET_CLASSES:
        return imagenet()
    if num_classes <= synthetic.MAX_CLASSES:
        return tuple(synthetic.class_name(c) for c in range(num_classes))
    return tuple(f"class {c}" for c in range(num_classes))
