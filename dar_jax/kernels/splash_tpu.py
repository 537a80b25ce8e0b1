"""TPU attention through jax's splash attention, with masks built for the entry point's kinds.

Splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``) takes (H, L, D) per
example, arbitrary static block-sparse masks, GQA (H a multiple of Hkv), and has its own
forward and backward kernels. This module only adapts to it:

* lengths are padded to a multiple of 128 (the TPU lane width splash tiles keys by); padded
  keys are hidden by the mask, padded query rows see at least key 0 and are cut off after;
* ``none``/cross -> ``FullMask`` (or a key-padding ``NumpyMask``), ``causal`` -> ``CausalMask``
  (padding needs no extra masking: real rows never reach padded keys), ``prefix_causal`` ->
  ``NumpyMask`` of (j < prefix_len) | (j <= i), restricted to real keys;
* the logit scale is folded into q; the batch is vmapped.

``mask="decode"`` (per-row dynamic cache length) has no splash mask: decoding on TPU runs this
project's kernel (``dar_jax.kernels.decode_tpu``). Nothing here can run on a TPU from this repository's CI: the kernel runs on CPU with
``interpret=True`` and its Mosaic lowering is checked with ``lowering_platforms=("tpu",)``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as sa

LANES = 128


def padded_length(n: int) -> int:
    return -(-n // LANES) * LANES


def _block(n_padded: int, cap: int = 512) -> int:
    for b in (cap, 256, LANES):
        if b <= n_padded and n_padded % b == 0:
            return b
    return LANES


def visibility(mask: str, lq: int, lk: int, prefix_len: int = 0,
               lq_pad: int | None = None, lk_pad: int | None = None) -> np.ndarray:
    """(lq_pad, lk_pad) bool visibility that the splash mask encodes (for tests and NumpyMask)."""
    lq_pad = lq if lq_pad is None else lq_pad
    lk_pad = lk if lk_pad is None else lk_pad
    i = np.arange(lq_pad)[:, None]
    j = np.arange(lk_pad)[None, :]
    if mask == "none":
        vis = np.ones((lq_pad, lk_pad), bool)
    elif mask == "causal":
        vis = j <= i
    elif mask == "prefix_causal":
        vis = (j < prefix_len) | (j <= i)
    else:
        raise ValueError(f"no splash mask for mask kind {mask!r}")
    return np.asarray(vis & (j < lk))


def splash_mask(mask: str, lq: int, lk: int, prefix_len: int = 0) -> sa.Mask:
    """The splash ``Mask`` for one head over the padded (lq, lk) grid."""
    lq_pad, lk_pad = padded_length(lq), padded_length(lk)
    shape = (lq_pad, lk_pad)
    if mask == "none" and lk_pad == lk:
        return sa.FullMask(shape)
    if mask == "causal":
        return sa.CausalMask(shape)
    return sa.NumpyMask(visibility(mask, lq, lk, prefix_len, lq_pad, lk_pad))


def block_sizes(lq_pad: int, lk_pad: int) -> sa.BlockSizes:
    bq, bk = _block(lq_pad), _block(lk_pad)
    return sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk,
                         block_q_dkv=bq, block_kv_dkv=bk, block_kv_dkv_compute=bk,
                         block_q_dq=bq, block_kv_dq=bk)


def unsupported_reason(q, k, v, mask, prefix_len, kv_len) -> str | None:
    if mask == "decode":
        return "splash attention has no per-row cache length (decode runs kernels.decode_tpu)"
    if mask == "prefix_causal":
        try:
            int(prefix_len)
        except (TypeError, jax.errors.ConcretizationTypeError):
            return "prefix_len must be a static Python int for the splash mask"
    if jnp.dtype(q.dtype).name not in ("float32", "bfloat16"):
        return f"dtype {q.dtype} not in (float32, bfloat16)"
    return None


def _kernel(mask: str, lq: int, lk: int, prefix_len: int, heads: int, interpret: bool):
    lq_pad, lk_pad = padded_length(lq), padded_length(lk)
    head_mask = splash_mask(mask, lq, lk, prefix_len)
    return sa.make_splash_mha_single_device(
        sa.MultiHeadMask([head_mask] * heads), block_sizes=block_sizes(lq_pad, lk_pad),
        interpret=interpret)


def splash_attention(q, k, v, *, mask: str = "none", prefix_len: int = 0, kv_len=None,
                     scale: float | None = None, interpret: bool = False):
    """q: (B, Lq, H, D); k, v: (B, Lk, Hkv, D) -> (B, Lq, H, D) in q.dtype.
    ``interpret=True`` runs the kernel on any platform (tests)."""
    reason = unsupported_reason(q, k, v, mask, prefix_len, kv_len)
    if reason:
        raise ValueError(f"splash_attention: {reason}")
    b, lq, h, d = q.shape
    lk = k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    prefix_len = int(prefix_len) if mask == "prefix_causal" else 0
    kernel = _kernel(mask, lq, lk, prefix_len, h, bool(interpret))
    lq_pad, lk_pad = padded_length(lq), padded_length(lk)
    # (B, L, H, D) -> (B, H, L_pad, D)
    qt = jnp.pad((q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3),
                 ((0, 0), (0, 0), (0, lq_pad - lq), (0, 0)))
    kt, vt = (jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, lk_pad - lk), (0, 0)))
              for x in (k, v))
    out = jax.vmap(kernel)(qt, kt, vt)
    return out[:, :, :lq].transpose(0, 2, 1, 3).astype(q.dtype)
