"""Vector quantisation of the tokenizer: l2-normalised codebook, nearest code, straight-through
estimator, the codebook / commitment losses over a prefix of the queries, and usage statistics.

All functions are pure; shapes: z (B, N, K) latents, codebook (C, K), codes (B, N) int32.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

BETA = 0.25            # commitment weight of the reference
USAGE_SAMPLE = 512     # codes pushed into the usage buffer per step (the reference's cur_len)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """torch ``F.normalize(x, dim=-1)``: x / max(||x||, eps), in float32."""
    x = x.astype(jnp.float32)
    n = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(n, eps)


def nearest_codes(z_norm: jax.Array, codebook_norm: jax.Array) -> jax.Array:
    """Index of the nearest codebook row (squared distance as the reference computes it).

    z_norm: (B, N, K); codebook_norm: (C, K). Returns (B, N) int32.
    """
    d = (jnp.sum(z_norm * z_norm, axis=-1, keepdims=True)
         + jnp.sum(codebook_norm * codebook_norm, axis=-1)
         - 2.0 * jnp.einsum("bnk,ck->bnc", z_norm, codebook_norm,
                            precision=jax.lax.Precision.HIGHEST))
    return jnp.argmin(d, axis=-1).astype(jnp.int32)


class Quantized(NamedTuple):
    quant: jax.Array     # (B, N, K) straight-through output: forward value = the code vectors
    codes: jax.Array     # (B, N) int32
    z_norm: jax.Array    # (B, N, K) normalised latents (carry the encoder's gradient)
    z_q: jax.Array       # (B, N, K) normalised code vectors (carry the codebook's gradient)


def quantize(z: jax.Array, codebook: jax.Array) -> Quantized:
    """z: (B, N, K) pre-quantisation latents; codebook: (C, K) raw table."""
    z_norm = l2_normalize(z)
    emb = l2_normalize(codebook)
    codes = nearest_codes(z_norm, emb)
    z_q = jnp.take(emb, codes, axis=0)
    quant = z_norm + jax.lax.stop_gradient(z_q - z_norm)
    return Quantized(quant, codes, z_norm, z_q)


def lookup(codes: jax.Array, codebook: jax.Array) -> jax.Array:
    """Normalised code vectors of ``codes`` (B, N) -> (B, N, K)."""
    return jnp.take(l2_normalize(codebook), codes, axis=0)


def prefix_mask(num_queries: int, query_end: jax.Array) -> jax.Array:
    """(B, N) float mask of queries i <= query_end (the last query of each image's window)."""
    return (jnp.arange(num_queries)[None, :] <= query_end[:, None]).astype(jnp.float32)


def vq_losses(q: Quantized, query_end: jax.Array, beta: float = BETA) -> tuple[jax.Array, jax.Array]:
    """Codebook loss ||z_q - sg(z)||^2 and beta x commitment ||sg(z_q) - z||^2, each averaged
    over channels and over the queries up to ``query_end`` (B,) (inclusive) of each image."""
    mask = prefix_mask(q.z_norm.shape[1], query_end)
    vq = jnp.mean((q.z_q - jax.lax.stop_gradient(q.z_norm)) ** 2, axis=-1)
    commit = beta * jnp.mean((jax.lax.stop_gradient(q.z_q) - q.z_norm) ** 2, axis=-1)
    total = jnp.maximum(jnp.sum(mask), 1.0)
    return jnp.sum(vq * mask) / total, jnp.sum(commit * mask) / total


def update_usage(buffer: jax.Array, codes: jax.Array, key: jax.Array, codebook_size: int,
                 sample: int = USAGE_SAMPLE) -> tuple[jax.Array, jax.Array]:
    """Rolling usage statistics: push up to ``sample`` random codes of this batch into ``buffer``
    (the reference's ``codebook_used``, (U,)) and return (new buffer, fraction of codes seen)."""
    flat = codes.reshape(-1)
    m = min(sample, flat.shape[0])
    picked = flat[jax.random.permutation(key, flat.shape[0])[:m]]
    buffer = jnp.concatenate([buffer[m:], picked.astype(buffer.dtype)])
    return buffer, jnp.sum(codes_seen(buffer, codebook_size)) / codebook_size


def codes_seen(buffer: jax.Array, codebook_size: int) -> jax.Array:
    """(K,) bool: which codes occur in the usage buffer (entries >= K, the fill value, ignored)."""
    return jnp.zeros((codebook_size,), jnp.bool_).at[buffer.astype(jnp.int32)].set(True, mode="drop")


def restart_dead_codes(codebook: jax.Array, usage_buffer: jax.Array, z_norm: jax.Array,
                       key: jax.Array, apply: jax.Array) -> jax.Array:
    """dar-jax's random restart: codebook rows (K, D) absent from the usage buffer are moved onto
    random latents ``z_norm`` (B, N, D) of the batch, where ``apply`` (a traced bool) holds."""
    size = codebook.shape[0]
    flat = z_norm.reshape(-1, z_norm.shape[-1])
    pick = jax.random.randint(key, (size,), 0, flat.shape[0])
    dead = ~codes_seen(usage_buffer, size)
    new = jnp.where(dead[:, None], jax.lax.stop_gradient(flat[pick]).astype(codebook.dtype), codebook)
    return jnp.where(apply, new, codebook)


def dead_code_rate(codes: jax.Array) -> jax.Array:
    """Fraction of query positions whose code is the same for every image of the batch."""
    return jnp.mean((jnp.std(codes.astype(jnp.float32), axis=0) < 1e-5).astype(jnp.float32))
