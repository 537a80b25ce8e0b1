"""The plain-XLA attention: every mask kind on every platform (the reference the kernels are
tested against, and the decode kernels' backward). Shapes as ``dar_jax.nn.attention.attention``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dar_jax.parallel.target import default_target


def mask_array(mask: str, lq: int, lk: int, *, prefix_len: int = 0,
               kv_len: jax.Array | None = None) -> jax.Array | None:
    """Boolean visibility (B or 1, 1, Lq, Lk) for a mask kind; None for full attention."""
    if mask == "none":
        return None
    qi = jnp.arange(lq)[:, None]
    kj = jnp.arange(lk)[None, :]
    if mask == "causal":
        m = kj <= qi
    elif mask == "prefix_causal":
        m = (kj < prefix_len) | (kj <= qi)
    else:  # decode
        kv_len = jnp.asarray(kv_len, jnp.int32).reshape(-1)
        last = kv_len[:, None, None] - lq + qi[None]
        return (kj[None] <= last)[:, None]
    return m[None, None]


def _softmax_attention(qh, kh, vh, m, scale):
    """Attention of one (or a batch of) heads: qh (..., Lq, D), kh/vh (..., Lk, D), m (..., Lq, Lk).

    Float32 logits and exp; the softmax normalisation is applied after the value product (one
    pass less over the Lq x Lk scores). ``scale`` None: already folded into qh.
    """
    logits = jnp.einsum("...qd,...kd->...qk", qh, kh, preferred_element_type=jnp.float32)
    if scale is not None:
        logits = logits * scale
    if m is not None:
        logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    out = jnp.einsum("...qk,...kd->...qd", e.astype(vh.dtype), vh, preferred_element_type=jnp.float32)
    return out / jnp.sum(e, axis=-1, keepdims=True)


# On CPU, heads whose score matrix has at least this many entries are computed one (batch, kv head)
# at a time (a lax.map), so that the scores stay in cache instead of streaming the whole
# (B, H, Lq, Lk) tensor through memory several times (4-9x faster at the tokenizer's sizes).
# Each head is rematerialised (jax.checkpoint): the gradient recomputes its scores in cache
# instead of keeping every head's (B * Hkv, G * Lq, Lk) scores and probabilities as residuals
# (96 MiB per attention for tokenizer v1's decoder at batch 2; #18 item 4).
CPU_PER_HEAD_MIN_SCORES = 2 ** 16


def xla_attention(q, k, v, *, mask: str = "none", prefix_len: int = 0,
                  kv_len: jax.Array | None = None, scale: float | None = None,
                  platform: str | None = None, kv_layout: str = "bshd") -> jax.Array:
    """Plain-JAX attention: float32 logits and softmax, output in q.dtype. Shapes as attention()
    (k, v (B, Lk, Hkv, D), or (B, Hkv, Lk, D) with ``kv_layout="bhsd"``: used in place).

    ``platform`` (default: the first device's) selects the CPU path for large score matrices."""
    b, lq, h, d = q.shape
    bshd = kv_layout == "bshd"
    lk, hkv = (k.shape[1], k.shape[2]) if bshd else (k.shape[2], k.shape[1])
    g = h // hkv
    scale = d ** -0.5 if scale is None else scale
    if math.frexp(scale)[0] == 0.5:          # a power of two: folding it into q is exact
        q, scale = q * jnp.asarray(scale, q.dtype), None
    # (B, Hkv, G * Lq, D): the G query heads sharing a kv head form one matrix product
    qh = q.reshape(b, lq, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * lq, d)
    kh, vh = (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)) if bshd else (k, v)
    m = mask_array(mask, lq, lk, prefix_len=prefix_len, kv_len=kv_len)
    if m is not None:
        m = jnp.broadcast_to(m[:, :, None], (m.shape[0], 1, g, lq, lk)).reshape(m.shape[0], 1, g * lq, lk)
    platform = platform or default_target().platform
    if platform == "cpu" and g * lq * lk >= CPU_PER_HEAD_MIN_SCORES:
        n = b * hkv

        @jax.checkpoint
        def one_head(args):
            i, qi, ki, vi = args
            mi = None if m is None else m[i // hkv if m.shape[0] > 1 else 0, 0]
            return _softmax_attention(qi, ki, vi, mi, scale)

        out = jax.lax.map(one_head, (jnp.arange(n), qh.reshape(n, g * lq, d), kh.reshape(n, lk, d),
                                     vh.reshape(n, lk, d)))
        out = out.reshape(b, hkv, g * lq, d)
    else:
        out = _softmax_attention(qh, kh, vh, m, scale)
    return out.reshape(b, hkv, g, lq, d).transpose(0, 3, 1, 2, 4).reshape(b, lq, h, d).astype(q.dtype)
