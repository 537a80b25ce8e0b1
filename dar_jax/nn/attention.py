"""The one attention entry point of dar-jax.

``attention(q, k, v, mask=...)`` covers every mask the models need:

========================  ==========================================================
``"none"``                full attention; also cross-attention (Lq != Lk)
``"causal"``              query i sees keys j <= i (Lq == Lk)
``"prefix_causal"``       query i sees keys j < prefix_len, and keys j <= i
                          (tokenizer encoder: patches visible to all, causal queries)
``"decode"``              KV-cache decoding: the Lq queries are the last Lq positions of
                          a cache whose valid length is ``kv_len`` (B,); query i sees
                          keys j <= kv_len - Lq + i
========================  ==========================================================

Implementations are chosen by name: ``"xla"`` (plain JAX, every platform), kernels registered by
``dar_jax.kernels`` (``"pallas"``, ``"cudnn"``), or ``"auto"`` (the best for the platform,
falling back to ``"xla"`` with one logged line where a kernel does not support a call).

The platform and, for sharded programs, the mesh and logical-axis rules come from the
``target`` argument (:class:`dar_jax.parallel.Target`); without one, the program is for the
first device. Each call runs in a named scope ``attention[<site>]`` (``site``: model part and
mask, e.g. ``gpt.causal``), so compiled programs can be searched for the kernel of every site.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Literal

import jax
import jax.numpy as jnp

from dar_jax.parallel.target import Target, default_target

MaskKind = Literal["none", "causal", "prefix_causal", "decode"]
MASK_KINDS = ("none", "causal", "prefix_causal", "decode")

log = logging.getLogger(__name__)


class AttentionError(ValueError):
    """An attention call that cannot be served as asked."""


def _check(q, k, v, mask, prefix_len, kv_len):
    if mask not in MASK_KINDS:
        raise AttentionError(f"unknown mask kind {mask!r}; expected one of {MASK_KINDS}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise AttentionError(f"q, k, v must be (B, L, H, D); got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise AttentionError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise AttentionError(f"q {q.shape} and k {k.shape} disagree on batch or head dim")
    if q.shape[2] % k.shape[2]:
        raise AttentionError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
    if mask == "causal" and q.shape[1] != k.shape[1]:
        raise AttentionError(f"causal mask needs Lq == Lk, got {q.shape[1]} and {k.shape[1]}")
    if mask == "prefix_causal" and not 0 <= prefix_len <= k.shape[1]:
        raise AttentionError(f"prefix_len {prefix_len} outside [0, {k.shape[1]}]")
    if mask == "decode" and kv_len is None:
        raise AttentionError("mask='decode' needs kv_len (valid cache length per row)")


def mask_array(mask: MaskKind, lq: int, lk: int, *, prefix_len: int = 0,
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
CPU_PER_HEAD_MIN_SCORES = 2 ** 16


def xla_attention(q, k, v, *, mask: MaskKind = "none", prefix_len: int = 0,
                  kv_len: jax.Array | None = None, scale: float | None = None,
                  platform: str | None = None) -> jax.Array:
    """Plain-JAX attention: float32 logits and softmax, output in q.dtype. Shapes as attention().

    ``platform`` (default: the first device's) selects the CPU path for large score matrices."""
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    scale = d ** -0.5 if scale is None else scale
    if math.frexp(scale)[0] == 0.5:          # a power of two: folding it into q is exact
        q, scale = q * jnp.asarray(scale, q.dtype), None
    # (B, Hkv, G * Lq, D): the G query heads sharing a kv head form one matrix product
    qh = q.reshape(b, lq, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * lq, d)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    m = mask_array(mask, lq, lk, prefix_len=prefix_len, kv_len=kv_len)
    if m is not None:
        m = jnp.broadcast_to(m[:, :, None], (m.shape[0], 1, g, lq, lk)).reshape(m.shape[0], 1, g * lq, lk)
    platform = platform or default_target().platform
    if platform == "cpu" and g * lq * lk >= CPU_PER_HEAD_MIN_SCORES:
        n = b * hkv

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


# name -> (function, supports); both take (q, k, v, *, mask, prefix_len, kv_len, scale, platform)
# and supports returns None or the reason why it cannot serve the call
_IMPLEMENTATIONS: dict[str, tuple[Callable, Callable]] = {
    "xla": (xla_attention, lambda *a, **kw: None),
}
# platform -> implementation names to try in order under "auto"
_AUTO_ORDER: dict[str, tuple[str, ...]] = {}
_warned: set[tuple] = set()


def register_implementation(name: str, fn: Callable, supports: Callable,
                            auto_platforms: tuple[str, ...] = ()) -> None:
    """Adds a kernel behind the entry point (used by ``dar_jax.kernels``)."""
    _IMPLEMENTATIONS[name] = (fn, supports)
    for platform in auto_platforms:
        order = _AUTO_ORDER.get(platform, ())
        if name not in order:
            _AUTO_ORDER[platform] = (name,) + order


def available_implementations() -> tuple[str, ...]:
    _load_kernels()
    return ("auto",) + tuple(_IMPLEMENTATIONS)


def _load_kernels():
    try:  # kernels register themselves on import; optional on platforms without them
        import dar_jax.kernels  # noqa: F401
    except ImportError as e:  # pragma: no cover
        log.debug("attention kernels unavailable: %s", e)


def choose_implementation(q, k, v, *, mask: MaskKind = "none", prefix_len: int = 0,
                          kv_len=None, scale: float | None = None,
                          implementation: str | None = "auto", platform: str) -> str:
    """The implementation that serves a call on ``platform`` (``auto``: the first kernel of the
    platform that supports it, else ``xla``; a named kernel that cannot serve it raises)."""
    _load_kernels()
    name = implementation or "auto"
    kwargs = dict(mask=mask, prefix_len=prefix_len, kv_len=kv_len, scale=scale, platform=platform)
    if name == "auto":
        for cand in _AUTO_ORDER.get(platform, ()):
            reason = _IMPLEMENTATIONS[cand][1](q, k, v, **kwargs)
            if reason is None:
                return cand
            key = (cand, platform, mask, q.shape[1:], k.shape[1:], str(q.dtype))
            if key not in _warned:
                _warned.add(key)
                log.info("attention: %s does not support this call on %s (%s); using xla", cand,
                         platform, reason)
        return "xla"
    if name not in _IMPLEMENTATIONS:
        raise AttentionError(
            f"unknown attention implementation {name!r}; available: {available_implementations()}")
    reason = _IMPLEMENTATIONS[name][1](q, k, v, **kwargs)
    if reason is not None:
        raise AttentionError(f"attention implementation {name!r} cannot serve this call on "
                             f"{platform}: {reason}")
    return name


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: MaskKind = "none",
              prefix_len: int = 0, kv_len: jax.Array | None = None, scale: float | None = None,
              implementation: str | None = "auto", target: Target | None = None,
              site: str | None = None) -> jax.Array:
    """Scaled dot-product attention.

    q: (B, Lq, H, D); k, v: (B, Lk, Hkv, D) with H a multiple of Hkv; kv_len: (B,) int for
    ``mask="decode"``. Returns (B, Lq, H, D) in q.dtype. ``target``: platform, mesh and rules
    of the program (default: the first device, unsharded); under a sharded target kernels run
    per shard (``shard_map``, specs from the target's rules). ``site`` names the call in the
    compiled program (default: the mask kind).
    """
    _check(q, k, v, mask, prefix_len, kv_len)
    target = target or default_target()
    kwargs = dict(mask=mask, prefix_len=prefix_len, kv_len=kv_len, scale=scale)
    with jax.named_scope(f"attention[{site or mask}]"):
        name = choose_implementation(q, k, v, implementation=implementation,
                                     platform=target.platform, **kwargs)
        if name == "xla":
            return xla_attention(q, k, v, platform=target.platform, **kwargs)
        if target.sharded:  # kernels are opaque to the SPMD partitioner: run them per shard
            from dar_jax.kernels.sharding import sharded_attention
            return sharded_attention(q, k, v, target, implementation=name, **kwargs)
        return _IMPLEMENTATIONS[name][0](q, k, v, platform=target.platform, **kwargs)
