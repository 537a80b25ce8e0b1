"""Attention under a device mesh: batch over data axes, heads over a tensor axis.

Kernels (pallas_call, custom calls) are opaque to the SPMD partitioner, so under a mesh they run
inside ``jax.shard_map``: every device gets a (B / data, L, H / tensor, D) block. Attention is
independent per example and per head, so no collective is needed; the sequence is not split.
GQA keeps working when Hkv is divisible by the tensor axis (head shard t holds query heads
[t H/T, (t+1) H/T) and exactly their kv heads [t Hkv/T, (t+1) Hkv/T)).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dar_jax.nn.attention import AttentionError, attention


def _present(mesh: Mesh, axes) -> tuple[str, ...]:
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return tuple(a for a in axes if a in mesh.shape)


def sharded_attention(q, k, v, mesh: Mesh, *, batch_axes: Sequence[str] | str = ("data", "fsdp"),
                      head_axis: str | None = "tensor", mask: str = "none", prefix_len: int = 0,
                      kv_len=None, scale: float | None = None,
                      implementation: str | None = "auto"):
    """``attention`` run per shard: q (B, Lq, H, D), k/v (B, Lk, Hkv, D), kv_len (B,).

    Axes named in ``batch_axes``/``head_axis`` but absent from ``mesh`` are ignored; the
    output is sharded like q. Works with Explicit and Auto mesh axes.
    """
    b_axes = _present(mesh, batch_axes)
    h_axes = _present(mesh, head_axis)
    n_b = math.prod(mesh.shape[a] for a in b_axes)
    n_h = math.prod(mesh.shape[a] for a in h_axes)
    if q.shape[0] % n_b:
        raise AttentionError(f"batch {q.shape[0]} is not divisible by mesh axes {b_axes} ({n_b})")
    if q.shape[2] % n_h or k.shape[2] % n_h:
        raise AttentionError(f"heads (q {q.shape[2]}, kv {k.shape[2]}) are not divisible by mesh "
                             f"axis {h_axes} ({n_h})")
    b_spec = b_axes if len(b_axes) > 1 else (b_axes[0] if b_axes else None)
    h_spec = h_axes[0] if h_axes else None
    seq = P(b_spec, None, h_spec, None)

    def local(q, k, v, kv_len):
        return attention(q, k, v, mask=mask, prefix_len=prefix_len, kv_len=kv_len, scale=scale,
                         implementation=implementation)

    args, specs = [q, k, v], [seq, seq, seq]
    if kv_len is not None:
        args.append(jnp.broadcast_to(jnp.asarray(kv_len, jnp.int32).reshape(-1), (q.shape[0],)))
        specs.append(P(b_spec))
        fn = local
    else:
        fn = lambda q, k, v: local(q, k, v, None)
    if any(t == AxisType.Explicit for t in mesh.axis_types):
        # explicit-sharding types must match in_specs: move the operands there first
        args = [jax.reshard(x, NamedSharding(mesh, s)) for x, s in zip(args, specs)]
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(specs), out_specs=seq,
                         check_vma=False)(*args)
