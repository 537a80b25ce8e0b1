"""Rotary position embeddings: the one RoPE of the project (1D for the AR model, 2D for the tokenizer).

Tables are (cos, sin) pairs of shape (L, head_dim // 2); rotation acts on interleaved pairs
(x[2i], x[2i+1]) as LlamaGen and Flux do. Tables are built with NumPy at trace time (constants).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rope_1d_table(num_positions: int, head_dim: int, base: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """LlamaGen's 1D table (computed in float32 as the reference): positions 0..num_positions-1."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32)[: head_dim // 2] / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(base) ** exponent)).astype(np.float32)
    angles = np.outer(np.arange(num_positions, dtype=np.float32), inv_freq).astype(np.float32)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _flux_axis(pos: np.ndarray, dim: int, theta: float) -> np.ndarray:
    scale = np.arange(0, dim, 2, dtype=np.float64) / dim
    omega = 1.0 / (theta ** scale)
    return np.einsum("n,d->nd", pos.astype(np.float64), omega)


def rope_2d_table(height: int, width: int, head_dim: int = 64, theta: float = 10000.0,
                  axes_dim: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Flux-style 2D table for a (height, width) grid in row-major order: (H*W, head_dim // 2).

    The first ``axes_dim[0] // 2`` pairs rotate with the row index, the rest with the column.
    Computed in float64 and rounded to float32, as the reference.
    """
    axes_dim = axes_dim or (head_dim // 2, head_dim // 2)
    if sum(axes_dim) != head_dim:
        raise ValueError(f"rope axes {axes_dim} do not sum to head_dim {head_dim}")
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    angles = np.concatenate([_flux_axis(rows.reshape(-1), axes_dim[0], theta),
                             _flux_axis(cols.reshape(-1), axes_dim[1], theta)], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def identity_table(length: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """No rotation (used for the tokenizer's query tokens)."""
    return (np.ones((length, head_dim // 2), np.float32), np.zeros((length, head_dim // 2), np.float32))


def concat_tables(*tables: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return (np.concatenate([t[0] for t in tables]), np.concatenate([t[1] for t in tables]))


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates interleaved pairs of ``x``.

    x: (B, L, H, D); cos, sin: (L, D/2) or (B, L, D/2). Computed in float32, returned in x.dtype.
    """
    cos = jnp.asarray(cos, jnp.float32)
    sin = jnp.asarray(sin, jnp.float32)
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
