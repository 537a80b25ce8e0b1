"""Resampling on image and token grids with torch's semantics (used by the decoder's output
resize, DINOv2 preprocessing and position-grid interpolation, and REPA pooling)."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def torch_bicubic_matrix(in_size: int, out_size: int, scale_factor: float | None = None) -> np.ndarray:
    """(out_size, in_size) float32 matrix of ``F.interpolate(mode="bicubic", align_corners=False,
    antialias=False)`` along one axis, as torch's CPU kernel computes it.

    Source coordinate ``(dst + 0.5) * s - 0.5`` with ``s = 1 / scale_factor`` when a scale factor
    is given (torch does not use the size ratio then) and ``in_size / out_size`` otherwise; index
    ``min(floor(src), in - 1)``, fraction clamped to [0, 1]; Keys' cubic with a = -0.75 over the
    4 neighbours, indices clamped to the border.
    """
    f32 = np.float32
    scale = f32(1.0 / scale_factor) if scale_factor else f32(in_size) / f32(out_size)
    src = (np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(f32)
    idx = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    t = np.clip(src - idx.astype(f32), 0, 1).astype(np.float64)
    a = -0.75

    def near(x):   # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):    # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1).astype(f32)
    mat = np.zeros((out_size, in_size), f32)
    rows = np.arange(out_size)
    for j in range(4):
        np.add.at(mat, (rows, np.clip(idx - 1 + j, 0, in_size - 1)), weights[:, j])
    mat.flags.writeable = False
    return mat


def torch_bicubic_size(in_size: int, scale_factor: float) -> int:
    """Output size torch derives from a scale factor: floor(in * scale) in double precision."""
    return int(math.floor(float(in_size) * float(scale_factor)))


def resize_bicubic(x: jax.Array, size: tuple[int, int],
                   scale_factors: tuple[float, float] | None = None) -> jax.Array:
    """torch ``F.interpolate(x, size, mode="bicubic")`` (align_corners False, no antialias) on
    NHWC ``x: (B, H, W, C) -> (B, h, w, C)``, float32. With ``scale_factors`` (rows, cols) the
    source coordinates come from them, as torch's scale-factor path does."""
    (h_in, w_in), (h_out, w_out) = x.shape[1:3], size
    sf = scale_factors or (None, None)
    mh = jnp.asarray(torch_bicubic_matrix(h_in, h_out, sf[0]))
    mw = jnp.asarray(torch_bicubic_matrix(w_in, w_out, sf[1]))
    return jnp.einsum("oh,bhwc,pw->bopc", mh, x.astype(jnp.float32), mw,
                      precision=jax.lax.Precision.HIGHEST)


def avg_pool_tokens(tokens: jax.Array, rows: int, cols: int, stride: int) -> jax.Array:
    """Average pools tokens (B, rows * cols, C) on their grid with a square stride (floor mode,
    as torch ``avg_pool2d(x, stride, stride)``) -> (B, rows // stride * cols // stride, C)."""
    b, n, c = tokens.shape
    if n != rows * cols:
        raise ValueError(f"{n} tokens are not a {rows}x{cols} grid")
    r, s = rows // stride, cols // stride
    grid = tokens.reshape(b, rows, cols, c)[:, :r * stride, :s * stride]
    return grid.reshape(b, r, stride, s, stride, c).mean(axis=(2, 4)).reshape(b, r * s, c)
