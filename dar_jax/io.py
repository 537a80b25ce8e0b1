"""Writing without losing what was there: atomic files and directories, output path checks, and
the image sheets the tools write (grids of samples, rows of previews) as atomic PNGs.

Every writer of dar-jax goes through here. A file or directory is written to a temporary sibling
(``<path>.tmp-<random>``, created with the user's umask) and renamed into place, so a crash never
leaves a half-written file where a good one was, and a failed write removes its temporary.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from typing import Any, BinaryIO, Callable

import numpy as np

from dar_jax.errors import DarError


class PathError(DarError, ValueError):
    """An output path that cannot be written (a file where a folder should be, no permission)."""


def temp_sibling(path: str | os.PathLike, tag: str = "tmp") -> str:
    """A fresh name next to ``path``: ``<path>.<tag>-<random hex>`` (unique across hosts)."""
    return f"{os.fspath(path)}.{tag}-{uuid.uuid4().hex[:12]}"


def write_file(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> str:
    """Atomically writes ``path`` with ``write(binary file)``: temporary sibling, then rename.

    On any failure the temporary is removed and ``path`` is as it was. Raises :class:`PathError`
    when ``path`` is a directory or its folder cannot be written."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise PathError(f"cannot write {path}: it is a directory")
    tmp = temp_sibling(path)
    try:
        try:
            f = open(tmp, "xb")
        except OSError as e:
            raise PathError(f"cannot write {path}: {e.strerror or e}") from None
        with f:
            write(f)
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise PathError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
    return path


def write_dir(path: str | os.PathLike, fill: Callable[[str], None], *, replace: bool = False) -> str:
    """Atomically creates directory ``path``: ``fill(tmp)`` writes its contents into a temporary
    sibling, which is then renamed to ``path``.

    ``path`` must not exist or be an empty directory. With ``replace`` an existing non-empty
    directory is replaced: it is first renamed to a backup sibling created here
    (``<path>.old-<random>``), the new one is renamed into place and the backup removed, so at
    every moment a complete old or new directory is at ``path`` or at that backup. Checking
    *whether* ``path`` may be replaced is the caller's job.
    """
    path = os.path.abspath(os.fspath(path))
    check_output_dir(path)
    makedirs(os.path.dirname(path))
    tmp = temp_sibling(path)
    try:
        os.mkdir(tmp)  # mode 0o777 & ~umask, like every other file of the user
    except OSError as e:
        raise PathError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        fill(tmp)
        if replace and os.path.isdir(path) and os.listdir(path):
            backup = temp_sibling(path, "old")
            os.rename(path, backup)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(backup, path)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, path)  # onto nothing or an empty directory; refuses anything else
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def makedirs(path: str | os.PathLike, what: str = "folder") -> str:
    """``os.makedirs(path, exist_ok=True)`` with a :class:`PathError` naming the path."""
    path = check_output_dir(path, what)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise PathError(f"cannot create {what} {path}: {e.strerror or e}") from None
    return path


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> str:
    """Raises :class:`PathError` unless ``path`` is, or can be created as, a writable directory
    (not a file, not under a file, in a writable folder). Creates nothing."""
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not os.path.isdir(path):
        raise PathError(f"{what} {path} is a file, not a folder")
    probe = path
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise PathError(f"cannot create {what} {path}: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PathError(f"cannot write {what} {path}: {probe} is not writable")
    return path


def check_output_file(path: str | os.PathLike, what: str = "output file") -> str:
    """Raises :class:`PathError` unless ``path`` can be (re)written as a file. Creates nothing."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise PathError(f"cannot write {what} {path}: it is a directory")
    check_output_dir(os.path.dirname(path), "folder")
    return path


def move_aside(path: str | os.PathLike, tag: str) -> str:
    """Renames ``path`` (ours, found unusable) to ``<path>.<tag>`` or, if taken,
    ``<path>.<tag>-2``, ``-3``, ...: kept for the user to inspect, never deleted. Returns the new
    name."""
    path = os.fspath(path)
    dst, n = f"{path}.{tag}", 1
    while os.path.lexists(dst):
        n += 1
        dst = f"{path}.{tag}-{n}"
    os.rename(path, dst)
    return dst


def write_json(path: str | os.PathLike, obj: Any, **dump_kwargs) -> str:
    """Atomically writes ``obj`` as JSON (indent 1 unless given)."""
    dump_kwargs.setdefault("indent", 1)
    text = json.dumps(obj, **dump_kwargs).encode()
    return write_file(path, lambda f: f.write(text))


# ----------------------------------------------------------------------------------------------
# image sheets (uint8 NHWC)
# ----------------------------------------------------------------------------------------------
def grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """(N, H, W, C) -> one image, ``cols`` per row (default: ceil(sqrt(N)); empty cells black)."""
    n, h, w, c = images.shape
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    out = np.zeros((rows * h, cols * w, c), images.dtype)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        out[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    return out


def sheet(rows: np.ndarray) -> np.ndarray:
    """(R, C, H, W, ch) -> (R H, C W, ch): row r holds rows[r]'s C images side by side (a strip
    of previews per image, or originals above reconstructions)."""
    rows = np.asarray(rows)
    r, c, h, w, ch = rows.shape
    return rows.transpose(0, 2, 1, 3, 4).reshape(r * h, c * w, ch)


def save_png(path: str | os.PathLike, image: np.ndarray) -> str:
    """Atomically writes a uint8 (H, W, 3) image as a lossless PNG."""
    from PIL import Image
    return write_file(path, lambda f: Image.fromarray(np.asarray(image)).save(f, format="PNG"))
