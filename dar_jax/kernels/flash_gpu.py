"""Flash attention for GPU in Pallas (Triton lowering): forward + backward (custom VJP).

Layout is the entry point's: q (B, Lq, H, D), k/v (B, Lk, Hkv, D), H a multiple of Hkv (GQA:
query head h reads kv head h // (H // Hkv)). Every mask kind of ``dar_jax.nn.attention`` is
handled inside the kernels:

* ``none``           every key (also cross-attention, Lq != Lk)
* ``causal``         key j visible to query i if j <= i; key blocks above the diagonal are skipped
* ``prefix_causal``  j < prefix_len or j <= i (prefix_len static)
* ``decode``         j <= kv_len[b] - Lq + i, kv_len (B,) int32 read inside the kernel

Lengths need not be multiples of the block sizes: each block of rows/keys is loaded with a
bounds mask (out-of-range rows/keys read as 0 and are masked out of the softmax; stores are
masked). Softmax is online (FlashAttention-2) in float32, in base 2 (logits pre-multiplied by
scale * log2(e)); the forward saves the base-2 logsumexp ``lse`` (B, H, Lq) for the backward.
Each loop runs in two phases: tiles every row of which sees every key skip the mask
arithmetic, tiles on the diagonal / prefix edge / ragged end apply it, tiles with no visible
key are not visited.

Backward: delta = rowsum(o * do) in XLA, then one kernel over key blocks (dK, dV; loops over
query blocks) and one over query blocks (dQ; loops over key blocks), both recomputing
p = exp2(s - lse). With GQA the dK/dV kernel writes per query head (float32) and XLA sums the
groups.

On a CPU (tests) the same kernels run with ``interpret=True``; the Triton lowering itself can be
exercised without a GPU through ``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))``.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# finite "minus infinity": exp2(NEG - m) == 0 for any real m, and NEG - NEG == 0 (no NaN)
NEG = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)
MIN_BLOCK = 16  # Triton dots need every tile dimension >= 16
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class FlashBlocks:
    """Tile sizes and launch parameters (powers of two >= 16).

    Forward: ``block_q`` query rows per program, looping over ``block_k`` keys. Backward:
    dK/dV kernel holds ``block_k_dkv`` keys and loops over ``block_q_dkv`` query rows; dQ kernel
    holds ``block_q_dq`` rows and loops over ``block_k_dq`` keys. Blocks larger than the
    (power-of-two rounded) sequence are shrunk to it.
    """
    block_q: int = 64
    block_k: int = 64
    block_q_dkv: int = 32
    block_k_dkv: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 32
    num_warps: int = 4
    num_stages: int = 3
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.startswith("block") and (v < MIN_BLOCK or v & (v - 1)):
                raise ValueError(f"FlashBlocks.{f.name}={v} must be a power of two >= {MIN_BLOCK}")
            if f.name.startswith("num") and v < 1:
                raise ValueError(f"FlashBlocks.{f.name}={v} must be >= 1")


def default_blocks(lq: int, lk: int, head_dim: int, dtype=jnp.bfloat16) -> FlashBlocks:
    """Tiles for the D-AR shapes: head dim 64 for GPT-B/L/XL (257 tokens) and tokenizer v1 (1024
    tokens, 32-key cross-attention); head dim 128 and float32 get smaller backward key tiles.

    Long query sequences get 128-row tiles (fewer K/V re-reads); at ~257 tokens 64-row tiles
    waste less on the ragged last block. Warp counts are chosen so that no kernel spills
    registers on sm_90 (checked by compiling the lowered Triton modules for an H100 with
    ptxas, see BENCHMARKS.md); the speed of each choice still needs a GPU to tune.
    """
    big = lq >= 512
    wide = head_dim > 64
    f32 = jnp.dtype(dtype) == jnp.float32
    block_q = 128 if big and not (wide and f32) else 64
    block_k_dkv = 128 if not wide and not f32 and lk >= 512 else (32 if wide and f32 else 64)
    return FlashBlocks(
        block_q=block_q,
        block_k=64,
        block_q_dkv=32,
        block_k_dkv=block_k_dkv,
        block_q_dq=128 if big and not wide else 64,
        block_k_dq=32,
        num_warps=8 if block_q == 128 or wide else 4,
        num_stages=3,
        num_warps_bwd=8 if block_k_dkv * head_dim >= 128 * 64 or f32 else 4,
        num_stages_bwd=2,
    )


def _fit(block: int, length: int) -> int:
    """Shrinks a tile to the power of two covering ``length`` (>= MIN_BLOCK)."""
    return max(MIN_BLOCK, min(block, pl.next_power_of_2(max(length, 1))))


def unsupported_reason(q, k, v, mask, prefix_len, kv_len) -> str | None:
    """Why these kernels cannot serve a call (None if they can)."""
    d = q.shape[-1]
    if d < MIN_BLOCK or d > 256 or d & (d - 1):
        return f"head dim {d} is not a power of two in [16, 256] (Triton tiles)"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.dtype(x.dtype).name not in SUPPORTED_DTYPES:
            return f"{name} dtype {jnp.dtype(x.dtype).name} not in {SUPPORTED_DTYPES}"
    if not (q.dtype == k.dtype == v.dtype):
        return f"mixed dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}"
    if mask == "prefix_causal" and not _is_static_int(prefix_len):
        return "prefix_len must be a static Python int for the kernel"
    return None


def _is_static_int(x) -> bool:
    try:
        int(x)  # raises for tracers
        return True
    except (TypeError, jax.errors.ConcretizationTypeError):
        return False


def _matmul_precision(dtype):
    """float32 inputs: IEEE fp32 when the global matmul precision asks for it, else TF32 (as
    XLA's GPU dots do); 16-bit inputs: plain tensor-core dots with float32 accumulation."""
    if jnp.dtype(dtype) != jnp.float32:
        return None
    p = jax.config.jax_default_matmul_precision
    if p in ("highest", "float32", "HIGHEST", "F32_F32_F32"):
        return lax.Precision.HIGHEST
    return None


def _dot(a, b, *, trans_a=False, trans_b=False, precision=None):
    """a @ b (optionally transposed operands) with float32 accumulation: (M, K) x (K, N)."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    prec = None if precision is None else (precision, precision)
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


# ---------------------------------------------------------------- masks and block ranges
@dataclasses.dataclass(frozen=True)
class _StaticOptions:
    """Everything static about one call (hashable: custom_vjp nondiff argument)."""
    mask: str
    prefix_len: int
    scale: float
    lq: int
    lk: int
    groups: int          # H // Hkv
    blocks: FlashBlocks
    precision: object    # lax.Precision or None
    interpret: bool

    @property
    def scale_log2(self) -> float:
        return self.scale * LOG2E


def _row_offset(st: _StaticOptions, kvl_ref):
    """Key-space position of query row 0: kv_len - Lq for decode, else 0 (int32 scalar)."""
    if st.mask == "decode":
        return kvl_ref[()] - st.lq
    return jnp.int32(0)


def _visible(st: _StaticOptions, rows, cols, off, bk):
    """(bq, bk) bool visibility, or None when every loaded key is visible."""
    vis = None
    if st.mask == "causal":
        vis = cols[None, :] <= rows[:, None]
    elif st.mask == "prefix_causal":
        vis = (cols[None, :] < st.prefix_len) | (cols[None, :] <= rows[:, None])
    elif st.mask == "decode":
        vis = cols[None, :] <= rows[:, None] + off
    if st.lk % bk:  # ragged last key block
        in_range = (cols < st.lk)[None, :]
        vis = in_range if vis is None else vis & in_range
    return vis


def _cdiv_nonneg(x, n: int):
    """ceil(x / n) for an int32 scalar x, clamped at 0 (x may be negative for decode)."""
    x = jnp.maximum(x, 0)
    return lax.div(x + (n - 1), jnp.int32(n))


def _key_blocks(st: _StaticOptions, row0, bq: int, bk: int, off):
    """Key blocks for query rows [row0, row0 + bq): (n_full, hi).

    Blocks [0, n_full) are visible to every row of the tile and in range (no mask needed);
    blocks [n_full, hi) need the mask; blocks from hi on hold no visible key (skipped).
    """
    nk = pl.cdiv(st.lk, bk)
    whole = st.lk // bk  # blocks without out-of-range keys
    if st.mask == "none":
        return jnp.int32(whole), jnp.int32(nk)
    # key j is visible to all rows of the tile iff it is visible to the first row, row0
    first_row_sees = row0 + off + 1  # keys [0, first_row_sees) (causal part)
    last_row_sees = row0 + bq + off  # keys [0, last_row_sees) reach some row of the tile
    full = lax.div(jnp.maximum(first_row_sees, 0), jnp.int32(bk))
    hi = _cdiv_nonneg(last_row_sees, bk)
    if st.mask == "prefix_causal":
        full = jnp.maximum(full, st.prefix_len // bk)
        hi = jnp.maximum(hi, pl.cdiv(st.prefix_len, bk))
    hi = jnp.minimum(hi, nk)
    return jnp.minimum(full, jnp.minimum(whole, hi)), hi


def _query_blocks(st: _StaticOptions, col0, bq: int, bk: int, off):
    """Query blocks for keys [col0, col0 + bk): (lo, n_masked_end).

    Blocks [lo, n_masked_end) need the mask, blocks [n_masked_end, nq) see every key of the
    tile, blocks before lo see none. Rows and keys out of range need no mask here: padded rows
    load q = do = 0 and add nothing, padded keys are never stored.
    """
    nq = pl.cdiv(st.lq, bq)
    if st.mask == "none":
        return jnp.int32(0), jnp.int32(0)
    # row r sees key c iff c <= r + off (causal part): first row that sees col0 / the last key
    lo = lax.div(jnp.maximum(col0 - off, 0), jnp.int32(bq))
    full = _cdiv_nonneg(col0 + bk - 1 - off, bq)
    if st.mask == "prefix_causal":
        in_prefix = col0 + bk <= st.prefix_len  # every key of the tile is in the prefix
        lo = jnp.where(col0 < st.prefix_len, 0, lo)
        full = jnp.where(in_prefix, 0, full)
    lo = jnp.minimum(lo, nq)
    return lo, jnp.clip(full, lo, nq)


def _load_rows(ref, start, size: int, length: int):
    """Rows [start, start + size) of a (L, D) ref; rows >= length read as 0."""
    if length % size == 0:
        return ref[pl.ds(start, size), :]
    ok = (start + jnp.arange(size) < length)[:, None]
    return plgpu.load(ref.at[pl.ds(start, size), :], mask=ok, other=0.0)


def _store_rows(ref, start, value, length: int):
    size = value.shape[0]
    if length % size == 0:
        ref[pl.ds(start, size), :] = value.astype(ref.dtype)
        return
    ok = (start + jnp.arange(size) < length)[:, None]
    plgpu.store(ref.at[pl.ds(start, size), :], value.astype(ref.dtype), mask=ok)


def _load_vec(ref, start, size: int, length: int):
    if length % size == 0:
        return ref[pl.ds(start, size)]
    ok = start + jnp.arange(size) < length
    return plgpu.load(ref.at[pl.ds(start, size)], mask=ok, other=0.0)


def _query_rows(st, q_ref, do_ref, lse_ref, delta_ref, row0, bq: int):
    """q, dO (bq, D) and lse, delta (bq,) of the query rows [row0, row0 + bq) (both backward
    kernels read them alike)."""
    return (_load_rows(q_ref, row0, bq, st.lq), _load_rows(do_ref, row0, bq, st.lq),
            _load_vec(lse_ref, row0, bq, st.lq), _load_vec(delta_ref, row0, bq, st.lq))


def _store_vec(ref, start, value, length: int):
    size = value.shape[0]
    if length % size == 0:
        ref[pl.ds(start, size)] = value.astype(ref.dtype)
        return
    ok = start + jnp.arange(size) < length
    plgpu.store(ref.at[pl.ds(start, size)], value.astype(ref.dtype), mask=ok)


def _split_refs(st: _StaticOptions, refs, n_in: int):
    """Kernel refs -> (inputs without kv_len, kv_len ref or None, outputs)."""
    ins, outs = list(refs[:n_in]), list(refs[n_in:])
    kvl = ins.pop() if st.mask == "decode" else None
    return ins, kvl, outs


# ---------------------------------------------------------------- forward
def _fwd_kernel(*refs, st: _StaticOptions, bq: int, bk: int):
    n_in = 3 + (st.mask == "decode")
    (q_ref, k_ref, v_ref), kvl_ref, (o_ref, lse_ref) = _split_refs(st, refs, n_in)
    row0 = pl.program_id(0) * bq
    rows = row0 + jnp.arange(bq)
    off = _row_offset(st, kvl_ref)
    q = _load_rows(q_ref, row0, bq, st.lq)
    d = q.shape[-1]

    def body(j, carry, masked: bool):
        acc, m, l = carry
        col0 = j * bk
        cols = col0 + jnp.arange(bk)
        k = _load_rows(k_ref, col0, bk, st.lk)
        v = _load_rows(v_ref, col0, bk, st.lk)
        s = _dot(q, k, trans_b=True, precision=st.precision) * st.scale_log2
        vis = _visible(st, rows, cols, off, bk) if masked else None
        if vis is not None:
            s = jnp.where(vis, s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, precision=st.precision)
        return acc, m_new, l

    init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), NEG, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    full, hi = _key_blocks(st, row0, bq, bk, off)
    carry = lax.fori_loop(0, full, functools.partial(body, masked=False), init)
    acc, m, l = lax.fori_loop(full, hi, functools.partial(body, masked=True), carry)
    l_safe = jnp.where(l > 0.0, l, 1.0)  # rows that saw no key (only invalid decode rows)
    _store_rows(o_ref, row0, acc / l_safe[:, None], st.lq)
    _store_vec(lse_ref, row0, m + jnp.log2(l_safe), st.lq)


def _kv_index(groups: int):
    return lambda i, b, h: (b, 0, h // groups, 0)


def _forward(st: _StaticOptions, q, k, v, kv_len):
    b, lq, h, d = q.shape
    lk = k.shape[1]
    bq, bk = _fit(st.blocks.block_q, lq), _fit(st.blocks.block_k, lk)
    seq_spec = lambda n: pl.BlockSpec((None, n, None, d), lambda i, b_, h_: (b_, 0, h_, 0))
    kv_spec = pl.BlockSpec((None, lk, None, d), _kv_index(st.groups))
    in_specs = [seq_spec(lq), kv_spec, kv_spec]
    args = [q, k, v]
    if st.mask == "decode":
        in_specs.append(pl.BlockSpec((None,), lambda i, b_, h_: (b_,)))
        args.append(kv_len)
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, bq=bq, bk=bk),
        grid=(pl.cdiv(lq, bq), b, h),
        in_specs=in_specs,
        out_specs=[seq_spec(lq), pl.BlockSpec((None, None, lq), lambda i, b_, h_: (b_, h_, 0))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, lq), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=st.blocks.num_warps,
                                             num_stages=st.blocks.num_stages),
        interpret=st.interpret,
        name="dar_flash_fwd",
    )(*args)
    return o, lse


# ---------------------------------------------------------------- backward
def _block_grads(st: _StaticOptions, q, k, v, do, lse, delta, rows, cols, off, bk: int,
                 masked: bool):
    """One (query block, key block) of the backward: the recomputed probabilities p (bq, bk)
    (zero where masked) and the score gradients ds = p (dO V^T - delta)."""
    s = _dot(q, k, trans_b=True, precision=st.precision) * st.scale_log2
    p = jnp.exp2(s - lse[:, None])
    vis = _visible(st, rows, cols, off, bk) if masked else None
    if vis is not None:
        p = jnp.where(vis, p, 0.0)
    dp = _dot(do, v, trans_b=True, precision=st.precision)
    return p, p * (dp - delta[:, None])


def _dkv_kernel(*refs, st: _StaticOptions, bq: int, bk: int):
    """One program per (key block, batch, query head): dK, dV of that block."""
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), kvl_ref, (dk_ref, dv_ref) = _split_refs(
        st, refs, 6 + (st.mask == "decode"))
    col0 = pl.program_id(0) * bk
    cols = col0 + jnp.arange(bk)
    off = _row_offset(st, kvl_ref)
    k = _load_rows(k_ref, col0, bk, st.lk)
    v = _load_rows(v_ref, col0, bk, st.lk)
    d = k.shape[-1]

    def body(i, carry, masked: bool):
        dk, dv = carry
        row0 = i * bq
        rows = row0 + jnp.arange(bq)
        q, do, lse, delta = _query_rows(st, q_ref, do_ref, lse_ref, delta_ref, row0, bq)
        p, ds = _block_grads(st, q, k, v, do, lse, delta, rows, cols, off, bk, masked)
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True, precision=st.precision)
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True, precision=st.precision)
        return dk, dv

    zeros = jnp.zeros((bk, d), jnp.float32)
    lo, masked_end = _query_blocks(st, col0, bq, bk, off)
    carry = lax.fori_loop(lo, masked_end, functools.partial(body, masked=True), (zeros, zeros))
    dk, dv = lax.fori_loop(masked_end, pl.cdiv(st.lq, bq), functools.partial(body, masked=False),
                           carry)
    _store_rows(dk_ref, col0, dk * st.scale, st.lk)
    _store_rows(dv_ref, col0, dv, st.lk)


def _dq_kernel(*refs, st: _StaticOptions, bq: int, bk: int):
    """One program per (query block, batch, query head): dQ of that block."""
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), kvl_ref, (dq_ref,) = _split_refs(
        st, refs, 6 + (st.mask == "decode"))
    row0 = pl.program_id(0) * bq
    rows = row0 + jnp.arange(bq)
    off = _row_offset(st, kvl_ref)
    q, do, lse, delta = _query_rows(st, q_ref, do_ref, lse_ref, delta_ref, row0, bq)

    def body(j, dq, masked: bool):
        col0 = j * bk
        cols = col0 + jnp.arange(bk)
        k = _load_rows(k_ref, col0, bk, st.lk)
        v = _load_rows(v_ref, col0, bk, st.lk)
        _, ds = _block_grads(st, q, k, v, do, lse, delta, rows, cols, off, bk, masked)
        return dq + _dot(ds.astype(k.dtype), k, precision=st.precision)

    full, hi = _key_blocks(st, row0, bq, bk, off)
    dq = lax.fori_loop(0, full, functools.partial(body, masked=False),
                       jnp.zeros(q.shape, jnp.float32))
    dq = lax.fori_loop(full, hi, functools.partial(body, masked=True), dq)
    _store_rows(dq_ref, row0, dq * st.scale, st.lq)


def _backward(st: _StaticOptions, res, do):
    q, k, v, kv_len, o, lse = res
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    blocks = st.blocks
    delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(jnp.float32), do.astype(jnp.float32))
    do = do.astype(q.dtype)

    seq = lambda n: pl.BlockSpec((None, n, None, d), lambda i, b_, h_: (b_, 0, h_, 0))
    kv = pl.BlockSpec((None, lk, None, d), _kv_index(st.groups))
    vec = pl.BlockSpec((None, None, lq), lambda i, b_, h_: (b_, h_, 0))
    in_specs = [seq(lq), kv, kv, seq(lq), vec, vec]
    args = [q, k, v, do, lse, delta]
    if st.mask == "decode":
        in_specs.append(pl.BlockSpec((None,), lambda i, b_, h_: (b_,)))
        args.append(kv_len)
    params = plgpu.CompilerParams(num_warps=blocks.num_warps_bwd, num_stages=blocks.num_stages_bwd)

    bq1, bk1 = _fit(blocks.block_q_dkv, lq), _fit(blocks.block_k_dkv, lk)
    # per query head; GQA groups are summed below (in float32 to round once)
    dkv_dtype = k.dtype if st.groups == 1 else jnp.float32
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, bq=bq1, bk=bk1),
        grid=(pl.cdiv(lk, bk1), b, h),
        in_specs=in_specs,
        out_specs=[seq(lk), seq(lk)],
        out_shape=[jax.ShapeDtypeStruct((b, lk, h, d), dkv_dtype)] * 2,
        compiler_params=params, interpret=st.interpret, name="dar_flash_bwd_dkv",
    )(*args)
    if st.groups > 1:
        dk = dk.reshape(b, lk, hkv, st.groups, d).sum(3).astype(k.dtype)
        dv = dv.reshape(b, lk, hkv, st.groups, d).sum(3).astype(v.dtype)

    bq2, bk2 = _fit(blocks.block_q_dq, lq), _fit(blocks.block_k_dq, lk)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st, bq=bq2, bk=bk2),
        grid=(pl.cdiv(lq, bq2), b, h),
        in_specs=in_specs,
        out_specs=seq(lq),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params, interpret=st.interpret, name="dar_flash_bwd_dq",
    )(*args)
    return dq, dk, dv, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _StaticOptions, q, k, v, kv_len):
    return _forward(st, q, k, v, kv_len)[0]


def _flash_fwd(st, q, k, v, kv_len):
    o, lse = _forward(st, q, k, v, kv_len)
    return o, (q, k, v, kv_len, o, lse)


_flash.defvjp(_flash_fwd, _backward)


def flash_attention(q, k, v, *, mask: str = "none", prefix_len: int = 0,
                    kv_len: jax.Array | None = None, scale: float | None = None,
                    blocks: FlashBlocks | None = None, interpret: bool = False):
    """Flash attention (Pallas/Triton), differentiable in q, k, v.

    q: (B, Lq, H, D); k, v: (B, Lk, Hkv, D); kv_len: (B,) int for ``mask="decode"``.
    Returns (B, Lq, H, D) in q.dtype. ``interpret=True`` runs the kernel on any platform (tests).
    """
    reason = unsupported_reason(q, k, v, mask, prefix_len, kv_len)
    if reason:
        raise ValueError(f"flash_attention: {reason}")
    b, lq, h, d = q.shape
    st = _StaticOptions(
        mask=mask, prefix_len=int(prefix_len) if mask == "prefix_causal" else 0,
        scale=float(d ** -0.5 if scale is None else scale), lq=lq, lk=k.shape[1],
        groups=h // k.shape[2], blocks=blocks or default_blocks(lq, k.shape[1], d, q.dtype),
        precision=_matmul_precision(q.dtype), interpret=bool(interpret))
    if mask == "decode":
        kv_len = jnp.broadcast_to(jnp.asarray(kv_len, jnp.int32).reshape(-1), (b,))
    else:
        kv_len = None
    return _flash(st, q, k, v, kv_len)
