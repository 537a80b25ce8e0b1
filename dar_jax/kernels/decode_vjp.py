"""What the decode kernels share: argument checks of their entry points, and their gradient (a
kernel forward, the backward of the XLA reference).

Decoding never needs a gradient, but ``jax.grad`` through a program that decodes must still be
defined; it goes through ``kernels.xla.xla_attention`` with the same mask and scale.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dar_jax.kernels.xla import xla_attention


def with_xla_backward(forward, platform: str | None = None):
    """``forward(q, k, v, kv_len, scale, blocks, interpret)`` -> the same function with a
    custom VJP whose backward is XLA decode attention's (``platform``: its code path)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
    def decode(q, k, v, kv_len, scale, blocks, interpret):
        return forward(q, k, v, kv_len, scale, blocks, interpret)

    def decode_fwd(q, k, v, kv_len, scale, blocks, interpret):
        return forward(q, k, v, kv_len, scale, blocks, interpret), (q, k, v, kv_len)

    def decode_bwd(scale, blocks, interpret, res, do):
        q, k, v, kv_len = res
        f = lambda q_, k_, v_: xla_attention(q_, k_, v_, mask="decode", kv_len=kv_len, scale=scale,
                                             platform=platform)
        return (*jax.vjp(f, q, k, v)[1](do), None)

    decode.defvjp(decode_fwd, decode_bwd)
    return decode


def checked_decode_args(name: str, unsupported_reason, q, k, v, kv_len, scale):
    """(scale as a float, kv_len as (B,) int32) for a decode kernel's entry point ``name``;
    raises ValueError with ``unsupported_reason``'s answer when the kernel cannot serve it."""
    reason = unsupported_reason(q, k, v, "decode", 0, kv_len)
    if reason:
        raise ValueError(f"{name}: {reason}")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return scale, jnp.broadcast_to(jnp.asarray(kv_len, jnp.int32).reshape(-1), (q.shape[0],))
