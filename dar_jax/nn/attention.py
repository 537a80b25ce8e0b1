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

A KV cache may also be laid out heads-major, k/v (B, Hkv, Lk, D) with ``kv_layout="bhsd"``
(default ``"bshd"``: (B, Lk, Hkv, D)); :func:`cache_layout` says which layout a decoding program
should keep its cache in, so that no layer copies its cache at a token step.

Implementations are chosen by name from the table of ``dar_jax.kernels`` (``"xla"``: plain JAX,
every platform; ``"pallas"``, ``"cudnn"``), or ``"auto"`` (the best for the platform, falling
back to ``"xla"`` with one logged line where a kernel does not support a call).

The platform and, for sharded programs, the mesh and logical-axis rules come from the
``target`` argument (:class:`dar_jax.parallel.Target`); without one, the program is for the
first device. Each call runs in a named scope ``attention[<site>]`` (``site``: model part and
mask, e.g. ``gpt.causal``), so compiled programs can be searched for the kernel of every site.
"""
from __future__ import annotations

import logging
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from dar_jax.errors import DarError
from dar_jax.kernels import AUTO_ORDER, IMPLEMENTATIONS
from dar_jax.kernels.xla import mask_array, xla_attention
from dar_jax.parallel.target import Target, default_target

__all__ = ["AttentionError", "KV_LAYOUTS", "MASK_KINDS", "attention", "attention_specs", "cache_layout",
           "available_implementations", "choose_implementation", "mask_array", "sharded_attention",
           "xla_attention"]

MaskKind = Literal["none", "causal", "prefix_causal", "decode"]
MASK_KINDS = ("none", "causal", "prefix_causal", "decode")
KV_LAYOUTS = ("bshd", "bhsd")

log = logging.getLogger(__name__)


class AttentionError(DarError, ValueError):
    """An attention call that cannot be served as asked."""


def _check(q, k, v, mask, prefix_len, kv_len, kv_layout):
    if kv_layout not in KV_LAYOUTS:
        raise AttentionError(f"unknown kv_layout {kv_layout!r}; expected one of {KV_LAYOUTS}")
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


_warned: set[tuple] = set()


def available_implementations() -> tuple[str, ...]:
    return ("auto",) + tuple(IMPLEMENTATIONS)


def cache_layout(implementation: str | None, platform: str) -> str:
    """The layout a KV cache for ``mask="decode"`` calls of ``implementation`` on ``platform``
    should have: ``"bshd"`` where a kernel serves decoding (the kernels read their blocks of the
    cache in place), ``"bhsd"`` for the xla path, whose batched products need (B, Hkv) in front
    (a ``"bshd"`` cache would be transposed, a copy of every layer's cache at every token: 9x
    slower per decode step on CPU at GPT-B's sizes)."""
    name = implementation or "auto"
    if name == "xla" or (name == "auto" and not AUTO_ORDER.get(platform)):
        return "bhsd"
    return "bshd"


def choose_implementation(q, k, v, *, mask: MaskKind = "none", prefix_len: int = 0,
                          kv_len=None, scale: float | None = None,
                          implementation: str | None = "auto", platform: str) -> str:
    """The implementation that serves a call on ``platform`` (``auto``: the first kernel of the
    platform that supports it, else ``xla``; a named kernel that cannot serve it raises)."""
    name = implementation or "auto"
    kwargs = dict(mask=mask, prefix_len=prefix_len, kv_len=kv_len, scale=scale, platform=platform)
    if name == "auto":
        for cand in AUTO_ORDER.get(platform, ()):
            reason = IMPLEMENTATIONS[cand][1](q, k, v, **kwargs)
            if reason is None:
                return cand
            key = (cand, platform, mask, q.shape[1:], k.shape[1:], str(q.dtype))
            if key not in _warned:
                _warned.add(key)
                log.info("attention: %s does not support this call on %s (%s); using xla", cand,
                         platform, reason)
        return "xla"
    if name not in IMPLEMENTATIONS:
        raise AttentionError(
            f"unknown attention implementation {name!r}; available: {available_implementations()}")
    reason = IMPLEMENTATIONS[name][1](q, k, v, **kwargs)
    if reason is not None:
        raise AttentionError(f"attention implementation {name!r} cannot serve this call on "
                             f"{platform}: {reason}")
    return name


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: MaskKind = "none",
              prefix_len: int = 0, kv_len: jax.Array | None = None, scale: float | None = None,
              implementation: str | None = "auto", target: Target | None = None,
              site: str | None = None, kv_layout: str = "bshd") -> jax.Array:
    """Scaled dot-product attention.

    q: (B, Lq, H, D); k, v: (B, Lk, Hkv, D) with H a multiple of Hkv (``kv_layout="bhsd"``:
    (B, Hkv, Lk, D)); kv_len: (B,) int for ``mask="decode"``. Returns (B, Lq, H, D) in q.dtype.
    The kernels read "bshd" (a "bhsd" k/v is transposed for them; see :func:`cache_layout`).
    ``target``: platform, mesh and rules of the program (default: the first device, unsharded); under a sharded target kernels run
    per shard (``shard_map``, specs from the target's rules). ``site`` names the call in the
    compiled program (default: the mask kind).
    """
    if kv_layout == "bhsd" and k.ndim == 4 and v.ndim == 4:
        kb, vb = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # "bshd" views (kernels, checks)
    else:
        kb, vb = k, v
    _check(q, kb, vb, mask, prefix_len, kv_len, kv_layout)
    target = target or default_target()
    kwargs = dict(mask=mask, prefix_len=prefix_len, kv_len=kv_len, scale=scale)
    with jax.named_scope(f"attention[{site or mask}]"):
        name = choose_implementation(q, kb, vb, implementation=implementation,
                                     platform=target.platform, **kwargs)
        if name == "xla":
            return xla_attention(q, k, v, platform=target.platform, kv_layout=kv_layout, **kwargs)
        k, v = kb, vb
        if target.sharded:  # kernels are opaque to the SPMD partitioner: run them per shard
            return sharded_attention(q, k, v, target, implementation=name, site=site, **kwargs)
        return IMPLEMENTATIONS[name][0](q, k, v, platform=target.platform, **kwargs)


# ----------------------------------------------------------------------------------------------
# kernels under a sharded target
# ----------------------------------------------------------------------------------------------
# Attention kernels under a sharded target: per-shard blocks from the logical-axis rules.
#
# Kernels (pallas_call, custom calls) are opaque to the SPMD partitioner, so under a sharded
# target they run inside ``jax.shard_map``. The specs come from the target's rules, like the
# parameters' and the activations': q, k and v are ``("batch", "length", "heads", "head_dim")``
# with the sequence and head dimensions kept whole (a kernel needs every key of its query), and
# ``kv_len`` is ``("batch",)``. Attention is independent per example and per head, so no
# collective is needed. GQA keeps working when Hkv is divisible by the head axes (head shard t
# holds query heads [t H/T, (t+1) H/T) and exactly their kv heads [t Hkv/T, (t+1) Hkv/T)); a
# dimension the mesh axes do not divide stays whole (computed redundantly, still correct).
QKV_AXES = ("batch", None, "heads", None)


def attention_specs(q, k, target: Target) -> tuple[P, P]:
    """(q spec, k/v spec) under ``target``; raises when q and kv heads would be split apart."""
    qs = target.spec(QKV_AXES, q.shape)
    ks = target.spec(QKV_AXES, k.shape)
    if qs[0] != ks[0]:
        raise AttentionError(f"q batch {q.shape[0]} and kv batch {k.shape[0]} shard differently "
                             f"({qs[0]} vs {ks[0]})")
    if qs[2] != ks[2]:
        raise AttentionError(f"heads (q {q.shape[2]}, kv {k.shape[2]}) are not divisible alike by "
                             f"the head axes of the mesh {dict(target.mesh.shape)}: {qs[2]} vs {ks[2]}")
    return qs, ks


def sharded_attention(q, k, v, target: Target, *, mask: str = "none", prefix_len: int = 0,
                      kv_len=None, scale: float | None = None,
                      implementation: str | None = "auto", site: str | None = None):
    """``attention`` run per shard: q (B, Lq, H, D), k/v (B, Lk, Hkv, D), kv_len (B,).

    The output is sharded like q. Works with Explicit and Auto mesh axes. ``site`` names the
    per-shard call too (so that every op of the kernel, also those the compiler hoists out of
    the outer scope, carries the caller's site).
    """
    mesh = target.mesh
    q_spec, kv_spec = attention_specs(q, k, target)
    local_target = target.local()

    def local(q, k, v, kv_len):
        return attention(q, k, v, mask=mask, prefix_len=prefix_len, kv_len=kv_len, scale=scale,
                         implementation=implementation, target=local_target, site=site)

    args, specs = [q, k, v], [q_spec, kv_spec, kv_spec]
    if kv_len is not None:
        args.append(jnp.broadcast_to(jnp.asarray(kv_len, jnp.int32).reshape(-1), (q.shape[0],)))
        specs.append(P(q_spec[0]))
        fn = local
    else:
        fn = lambda q, k, v: local(q, k, v, None)
    if any(t == AxisType.Explicit for t in mesh.axis_types):
        # explicit-sharding types must match in_specs: move the operands there first
        args = [jax.reshard(x, NamedSharding(mesh, s)) for x, s in zip(args, specs)]
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(specs), out_specs=q_spec,
                         check_vma=False)(*args)
