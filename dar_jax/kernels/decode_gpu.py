"""KV-cache decode attention for GPU in Pallas (Triton lowering), flash-decoding style.

A few new query positions (Lq, usually 1) attend to a cache k/v (B, S, Hkv, D) whose valid
length is ``kv_len`` (B,): query i sees cache entries j <= kv_len - Lq + i (the entry point's
``mask="decode"``). GQA/MQA: the G = H // Hkv query heads that share a kv head are processed
together, so each cache block is read once per kv head: for one (batch row, kv head) the
``M = Lq * G`` query rows (row r = query r // G, head r % G of the group) form one tile.

The key length is split into ``num_splits`` chunks run by separate programs (grid
(B, Hkv, splits)); each writes an unnormalised partial output with its running max and sum
(base 2), and XLA combines the partials. Chunks past a row's kv_len exit at once, so the cost
follows the valid length, not the cache size. Tiles of 1 < M < 16 rows (Triton dots need 16)
pad to 16 rows (masked); a single row (MHA, one position) uses broadcast-multiply-reduce
instead of a dot: decoding is bound by reading the cache anyway.

Forward only; differentiating it falls back to the XLA reference's gradient.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dar_jax.kernels.decode_vjp import checked_decode_args, with_xla_backward
from dar_jax.kernels.flash_gpu import LOG2E, MIN_BLOCK, NEG, _dot, _matmul_precision

MAX_ROWS = 64  # larger Lq * G tiles go to the flash kernel (it handles mask="decode" too)


@dataclasses.dataclass(frozen=True)
class DecodeBlocks:
    """``block_k`` cache entries per loop step (power of two >= 16); ``num_splits`` key-length
    chunks (None: enough programs to fill the GPU, see ``default_splits``)."""
    block_k: int = 64
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if self.block_k < MIN_BLOCK or self.block_k & (self.block_k - 1):
            raise ValueError(f"DecodeBlocks.block_k={self.block_k} must be a power of two >= 16")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"DecodeBlocks.num_splits={self.num_splits} must be >= 1")


def default_splits(batch: int, kv_heads: int, cache_len: int, block_k: int,
                   target_programs: int = 512) -> int:
    """Split the cache only when batch x kv heads leaves the GPU idle (~4 programs per SM of
    an H100): GPT-XL CFG decoding (64 rows x 20 heads) already has 1280 programs -> 1 split."""
    want = max(1, target_programs // max(batch * kv_heads, 1))
    return int(min(want, pl.cdiv(cache_len, block_k)))


def unsupported_reason(q, k, v, mask, prefix_len, kv_len) -> str | None:
    if mask != "decode":
        return "the decode kernel serves mask='decode' only"
    rows = q.shape[1] * (q.shape[2] // k.shape[2])
    if rows > MAX_ROWS:
        return f"Lq * (H // Hkv) = {rows} query rows per kv head > {MAX_ROWS}"
    return None


def _scores(q, k, precision, use_dot: bool):
    """(M, D) x (N, D) -> (M, N) float32."""
    if use_dot:
        return _dot(q, k, trans_b=True, precision=precision)
    return jnp.sum(q.astype(jnp.float32)[:, None, :] * k.astype(jnp.float32)[None, :, :], axis=2)


def _weighted(p, v, precision, use_dot: bool):
    """(M, N) x (N, D) -> (M, D) float32."""
    if use_dot:
        return _dot(p.astype(v.dtype), v, precision=precision)
    return jnp.sum(p[:, :, None] * v.astype(jnp.float32)[None, :, :], axis=1)


def _decode_kernel(q_ref, k_ref, v_ref, kvl_ref, acc_ref, m_ref, l_ref, *, lq: int, groups: int,
                   rows: int, mp: int, s_len: int, chunk: int, bk: int, scale_log2: float,
                   precision, use_dot: bool):
    split = pl.program_id(2)
    r = jnp.arange(mp)
    row_ok = r < rows
    if mp == rows:
        q = q_ref[...]
    else:
        q = plgpu.load(q_ref.at[pl.ds(0, mp), :], mask=row_ok[:, None], other=0.0)
    kv_len = kvl_ref[()]
    last = kv_len - lq + lax.div(r, jnp.int32(groups))  # last visible key of each row
    start = split * chunk
    stop = jnp.minimum(jnp.minimum(start + chunk, kv_len), s_len)
    n_blocks = lax.div(jnp.maximum(stop - start, 0) + (bk - 1), jnp.int32(bk))

    def body(j, carry):
        acc, m, l = carry
        col0 = start + j * bk
        cols = col0 + jnp.arange(bk)
        in_range = cols < stop
        k = plgpu.load(k_ref.at[pl.ds(col0, bk), :], mask=in_range[:, None], other=0.0)
        v = plgpu.load(v_ref.at[pl.ds(col0, bk), :], mask=in_range[:, None], other=0.0)
        s = _scores(q, k, precision, use_dot) * scale_log2
        s = jnp.where((cols[None, :] <= last[:, None]) & in_range[None, :], s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _weighted(p, v, precision, use_dot)
        return acc, m_new, l

    d = q.shape[-1]
    init = (jnp.zeros((mp, d), jnp.float32), jnp.full((mp,), NEG, jnp.float32),
            jnp.zeros((mp,), jnp.float32))
    acc, m, l = lax.fori_loop(0, n_blocks, body, init)
    if mp == rows:
        acc_ref[...] = acc
        m_ref[...] = m
        l_ref[...] = l
    else:
        plgpu.store(acc_ref.at[pl.ds(0, mp), :], acc, mask=row_ok[:, None])
        plgpu.store(m_ref.at[pl.ds(0, mp)], m, mask=row_ok)
        plgpu.store(l_ref.at[pl.ds(0, mp)], l, mask=row_ok)


def _decode_forward(q, k, v, kv_len, scale: float, blocks: DecodeBlocks, interpret: bool):
    b, lq, h, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    rows = lq * g
    # one row: broadcast-multiply-reduce; more: a tensor-core tile of >= 16 rows (padding rows
    # are masked; a (rows, block_k, D) float32 product would spill registers)
    mp = 1 if rows == 1 else max(MIN_BLOCK, pl.next_power_of_2(rows))
    bk = max(MIN_BLOCK, min(blocks.block_k, pl.next_power_of_2(s_len)))
    splits = blocks.num_splits or default_splits(b, hkv, s_len, bk)
    chunk = pl.cdiv(pl.cdiv(s_len, splits), bk) * bk
    splits = pl.cdiv(s_len, chunk)
    # (B, Lq, Hkv, G, D) -> (B, Hkv, Lq * G, D): the group's rows are contiguous
    qr = q.reshape(b, lq, hkv, g, d).transpose(0, 2, 1, 3, 4).reshape(b, hkv, rows, d)
    kernel = functools.partial(
        _decode_kernel, lq=lq, groups=g, rows=rows, mp=mp, s_len=s_len, chunk=chunk, bk=bk,
        scale_log2=scale * LOG2E, precision=_matmul_precision(q.dtype), use_dot=mp > 1)
    kv_spec = pl.BlockSpec((None, s_len, None, d), lambda b_, h_, s_: (b_, 0, h_, 0))
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(b, hkv, splits),
        in_specs=[pl.BlockSpec((None, None, rows, d), lambda b_, h_, s_: (b_, h_, 0, 0)),
                  kv_spec, kv_spec,
                  pl.BlockSpec((None,), lambda b_, h_, s_: (b_,))],
        out_specs=[pl.BlockSpec((None, None, None, rows, d), lambda b_, h_, s_: (b_, h_, s_, 0, 0)),
                   pl.BlockSpec((None, None, None, rows), lambda b_, h_, s_: (b_, h_, s_, 0)),
                   pl.BlockSpec((None, None, None, rows), lambda b_, h_, s_: (b_, h_, s_, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, hkv, splits, rows, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, splits, rows), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, splits, rows), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                             num_stages=blocks.num_stages),
        interpret=interpret,
        name="dar_flash_decode",
    )(qr, k, v, kv_len)
    # combine the splits: rescale each partial to the global max (empty splits have m = NEG)
    m_all = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp2(m - m_all)
    l_all = jnp.sum(l * w, axis=2)
    o = jnp.sum(acc * w[..., None], axis=2) / jnp.where(l_all > 0, l_all, 1.0)[..., None]
    o = o.reshape(b, hkv, lq, g, d).transpose(0, 2, 1, 3, 4).reshape(b, lq, h, d)
    return o.astype(q.dtype)


_decode = with_xla_backward(_decode_forward)


def decode_attention(q, k, v, kv_len, *, scale: float | None = None,
                     blocks: DecodeBlocks | None = None, interpret: bool = False):
    """Decode attention against a KV cache.

    q: (B, Lq, H, D) new positions; k, v: (B, S, Hkv, D) cache; kv_len: (B,) valid entries
    (the Lq new positions included). Returns (B, Lq, H, D) in q.dtype. ``interpret=True``
    runs the kernel on any platform (tests).
    """
    scale, kv_len = checked_decode_args("decode_attention", unsupported_reason, q, k, v, kv_len, scale)
    return _decode(q, k, v, kv_len, scale, blocks or DecodeBlocks(), bool(interpret))
