"""Attention kernels under a sharded target: per-shard blocks from the logical-axis rules.

Kernels (pallas_call, custom calls) are opaque to the SPMD partitioner, so under a sharded
target they run inside ``jax.shard_map``. The specs come from the target's rules, like the
parameters' and the activations': q, k and v are ``("batch", "length", "heads", "head_dim")``
with the sequence and head dimensions kept whole (a kernel needs every key of its query), and
``kv_len`` is ``("batch",)``. Attention is independent per example and per head, so no
collective is needed. GQA keeps working when Hkv is divisible by the head axes (head shard t
holds query heads [t H/T, (t+1) H/T) and exactly their kv heads [t Hkv/T, (t+1) Hkv/T)); a
dimension the mesh axes do not divide stays whole (computed redundantly, still correct).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from dar_jax.nn.attention import AttentionError, attention
from dar_jax.parallel.target import Target

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
                      implementation: str | None = "auto"):
    """``attention`` run per shard: q (B, Lq, H, D), k/v (B, Lk, Hkv, D), kv_len (B,).

    The output is sharded like q. Works with Explicit and Auto mesh axes.
    """
    mesh = target.mesh
    q_spec, kv_spec = attention_specs(q, k, target)
    local_target = target.local()

    def local(q, k, v, kv_len):
        return attention(q, k, v, mask=mask, prefix_len=prefix_len, kv_len=kv_len, scale=scale,
                         implementation=implementation, target=local_target)

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
