"""KV-cache decode attention for TPU in Pallas (Mosaic lowering), flash-decoding style.

One new query position per row attends to the cache k/v (B, S, H, D) whose valid length is
``kv_len`` (B,): the entry point's ``mask="decode"`` with Lq = 1 (query sees entries
j < kv_len). Splash attention has no mask with a per-row dynamic length, so this kernel serves
the AR model's token-by-token generation on TPU.

Grid (B, splits, blocks per split): the cache length is cut into ``num_splits`` chunks of
``block_k``-entry blocks. Each (row, split) program keeps a running max / sum / unnormalised
output over its blocks (resident in the output block across the sequential last grid axis);
XLA combines the splits. The valid length is scalar-prefetched: the key/value index maps
clamp the block index to the row's last valid block (a block past ``kv_len`` is never
fetched) and the body is skipped there, so the cost follows the valid length, not the cache.

A block is (block_k, H, D) of the cache as it lies in HBM (no transpose of the cache); all H
heads of a row are processed together on the vector units (the scores of one query are a
reduction over D): decoding is bound by reading the cache, not by FLOPs. Forward only;
differentiating it falls back to the XLA reference's gradient.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dar_jax.kernels.decode_vjp import checked_decode_args, with_xla_backward

NEG = -1e30  # finite: an all-masked block keeps exp(m - m_new) defined


@dataclasses.dataclass(frozen=True)
class TPUDecodeBlocks:
    """``block_k`` cache entries per grid step (a multiple of 8); ``num_splits`` cache-length
    chunks run as independent (parallel) programs (None: :func:`default_splits`)."""
    block_k: int = 128
    num_splits: int | None = None

    def __post_init__(self):
        if self.block_k < 8 or self.block_k % 8:
            raise ValueError(f"TPUDecodeBlocks.block_k={self.block_k} must be a multiple of 8")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"TPUDecodeBlocks.num_splits={self.num_splits} must be >= 1")


def default_splits(batch: int, num_blocks: int, target_programs: int = 8) -> int:
    """Split the cache only when there are few rows (both TensorCores of a megacore chip and
    the DMA pipeline want several independent programs)."""
    return int(max(1, min(num_blocks, target_programs // max(batch, 1))))


def unsupported_reason(q, k, v, mask, prefix_len, kv_len) -> str | None:
    if mask != "decode":
        return "the TPU decode kernel serves mask='decode' only"
    if q.shape[1] != 1:
        return f"the TPU decode kernel takes one query position per row (Lq = {q.shape[1]})"
    if q.shape[2] != k.shape[2]:
        return f"the TPU decode kernel takes as many kv heads as query heads ({k.shape[2]} vs {q.shape[2]})"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.dtype(x.dtype).name not in ("float32", "bfloat16"):
            return f"{name} dtype {x.dtype} not in (float32, bfloat16)"
    return None


def _kernel(lens_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, bk: int, bps: int,
            scale: float):
    b, split, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        m_ref[...] = jnp.full_like(m_ref, NEG)
        l_ref[...] = jnp.zeros_like(l_ref)

    start = (split * bps + j) * bk
    kv_len = lens_ref[b]

    @pl.when(start < kv_len)
    def _block():
        q = q_ref[...].astype(jnp.float32) * scale                    # (H, D)
        k = k_ref[...].astype(jnp.float32)                            # (bk, H, D)
        s = jnp.sum(k * q[None], axis=-1, keepdims=True)              # (bk, H, 1)
        pos = start + lax.broadcasted_iota(jnp.int32, s.shape, 0)
        valid = pos < kv_len
        s = jnp.where(valid, s, NEG)
        m_prev = m_ref[...]                                           # (H, 1)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=0))
        p = jnp.where(valid, jnp.exp(s - m_new[None]), 0.0)           # (bk, H, 1)
        alpha = jnp.exp(m_prev - m_new)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=0)
        vals = jnp.where(valid, v_ref[...].astype(jnp.float32), 0.0)  # padding may be garbage
        acc_ref[...] = alpha * acc_ref[...] + jnp.sum(p * vals, axis=0)
        m_ref[...] = m_new


def _decode_forward(q, k, v, kv_len, scale: float, blocks: TPUDecodeBlocks, interpret: bool):
    b, _, h, d = q.shape
    s_len = k.shape[1]
    bk = min(blocks.block_k, -(-s_len // 8) * 8)
    n_blocks = pl.cdiv(s_len, bk)
    splits = blocks.num_splits or default_splits(b, n_blocks)
    bps = pl.cdiv(n_blocks, min(splits, n_blocks))
    splits = pl.cdiv(n_blocks, bps)
    lens = jnp.clip(kv_len, 0, s_len)

    def kv_index(b_, s_, j_, lens_ref):
        # lax.div: a non-negative quotient needs no sign fix-up (Mosaic's sign rule queries
        # the local TPU, which a cross-compiling host does not have)
        last = lax.div(jnp.maximum(lens_ref[b_] - 1, 0), jnp.int32(bk))
        return b_, jnp.minimum(s_ * bps + j_, last), 0, 0

    part = lambda b_, s_, j_, lens_ref: (b_, s_, 0, 0)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, splits, bps),
        in_specs=[pl.BlockSpec((None, h, d), lambda b_, s_, j_, lens_ref: (b_, 0, 0)),
                  pl.BlockSpec((None, bk, h, d), kv_index),
                  pl.BlockSpec((None, bk, h, d), kv_index)],
        out_specs=[pl.BlockSpec((None, None, h, d), part),
                   pl.BlockSpec((None, None, h, 1), part),
                   pl.BlockSpec((None, None, h, 1), part)])
    acc, m, l = pl.pallas_call(
        functools.partial(_kernel, bk=bk, bps=bps, scale=scale),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, splits, h, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, splits, h, 1), jnp.float32),
                   jax.ShapeDtypeStruct((b, splits, h, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="dar_decode_tpu",
    )(lens, q[:, 0], k, v)
    # combine the splits: rescale each partial to the global max (empty splits have m = NEG)
    m_all = jnp.max(m, axis=1, keepdims=True)
    w = jnp.exp(m - m_all)
    l_all = jnp.sum(l * w, axis=1)
    o = jnp.sum(acc * w, axis=1) / jnp.where(l_all > 0, l_all, 1.0)
    return o[:, None].astype(q.dtype)


_decode = with_xla_backward(_decode_forward, platform="tpu")


def decode_attention_tpu(q, k, v, kv_len, *, scale: float | None = None,
                         blocks: TPUDecodeBlocks | None = None, interpret: bool = False):
    """Decode attention against a KV cache on TPU (``interpret=True``: any platform, for tests).

    q: (B, 1, H, D) the new position; k, v: (B, S, H, D) cache; kv_len: (B,) valid entries
    (the new position included). Returns (B, 1, H, D) in q.dtype.
    """
    scale, kv_len = checked_decode_args("decode_attention_tpu", unsupported_reason, q, k, v, kv_len, scale)
    return _decode(q, k, v, kv_len, scale, blocks or TPUDecodeBlocks(), bool(interpret))
