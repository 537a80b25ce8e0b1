"""Flow matching of the diffusion decoder, as pure functions (t = 1 is data).

    x1 = image * std,  x0 ~ N(0, I),  x_t = t x1 + (1 - t) x0,  v* = x1 - x0,
    loss = mean((v - v*)^2) / std^2,  time shift t' = t / (t + s (1 - t)).

The condition window of an image comes from its **unshifted** t: g = floor(t G + 0.5) / G,
start = min(N - qps, int(g N)); the shift is applied afterwards for x_t and the time embedding.
Shapes: images / x (B, H, W, 3), t (B,), cond (B, N, D).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dar_jax.tokenizer.config import TokenizerConfig


def time_shift(t: jax.Array, shift: float) -> jax.Array:
    """t / (t + shift (1 - t)) (float32, in the reference's operation order)."""
    t = jnp.asarray(t, jnp.float32)
    return t / (t + shift * (1.0 - t))


def window_start(cfg: TokenizerConfig, t: jax.Array) -> jax.Array:
    """First query of the condition window for unshifted times t: (B,) -> (B,) int32."""
    t = jnp.asarray(t, jnp.float32)
    g = jnp.floor(t * cfg.num_query_groups + 0.5) / cfg.num_query_groups
    start = (g * cfg.num_all_queries).astype(jnp.int32)      # truncation, as torch .long()
    return jnp.clip(start, 0, cfg.num_all_queries - cfg.queries_per_step)


def gather_window(cond: jax.Array, start: jax.Array, length: int) -> jax.Array:
    """cond[b, start[b] : start[b] + length] for each row. cond: (B, N, D) -> (B, length, D)."""
    idx = start[:, None] + jnp.arange(length)[None, :]
    return jnp.take_along_axis(cond, idx[:, :, None], axis=1)


def interpolate(x1: jax.Array, x0: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = t x1 + (1 - t) x0 with t: (B,) broadcast over the image."""
    t = t.reshape(-1, *([1] * (x1.ndim - 1)))
    return t * x1 + (1.0 - t) * x0


def target_velocity(x1: jax.Array, x0: jax.Array) -> jax.Array:
    return x1 - x0


def flow_matching_loss(v_pred: jax.Array, v_target: jax.Array, data_std: float) -> jax.Array:
    """MSE(v_pred, v_target) / std^2 (mean over everything)."""
    return jnp.mean((v_pred.astype(jnp.float32) - v_target) ** 2) / (data_std ** 2)


def predict_data(x_t: jax.Array, v: jax.Array, t: jax.Array, data_std: float) -> jax.Array:
    """One-step prediction of the image (x_t + (1 - t) v) / std, t the shifted time (B,)."""
    t = t.reshape(-1, *([1] * (x_t.ndim - 1)))
    return (x_t + v * (1.0 - t)) / data_std


class FlowBatch(NamedTuple):
    x_t: jax.Array        # (B, H, W, 3) network input
    t: jax.Array          # (B,) shifted time (network time input)
    target: jax.Array     # (B, H, W, 3) velocity target x1 - x0
    start: jax.Array      # (B,) int32 first query of each image's condition window
    query_end: jax.Array  # (B,) int32 last query of the window (VQ-loss prefix, inclusive)


def flow_batch(cfg: TokenizerConfig, images: jax.Array, t: jax.Array, noise: jax.Array) -> FlowBatch:
    """Everything a training step needs from images (B, H, W, 3) in [-1, 1], unshifted t (B,)
    (uniform in [0, 1)) and noise x0 (like images)."""
    start = window_start(cfg, t)
    ts = time_shift(t, cfg.time_shift)
    x1 = images.astype(jnp.float32) * cfg.data_std
    return FlowBatch(interpolate(x1, noise, ts), ts, target_velocity(x1, noise), start,
                     start + cfg.queries_per_step - 1)


def sample_flow_batch(cfg: TokenizerConfig, images: jax.Array, key: jax.Array) -> FlowBatch:
    """flow_batch with t ~ U(0, 1) per image and x0 ~ N(0, I) drawn from ``key``."""
    kt, kn = jax.random.split(key)
    t = jax.random.uniform(kt, (images.shape[0],), jnp.float32)
    noise = jax.random.normal(kn, images.shape, jnp.float32)
    return flow_batch(cfg, images, t, noise)
