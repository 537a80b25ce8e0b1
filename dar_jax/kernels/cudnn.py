"""cuDNN flash attention through ``jax.nn.dot_product_attention(implementation="cudnn")``.

Covers the masks cuDNN has: ``none`` (also cross-attention), ``causal`` (Lq == Lk) and
one-position ``decode`` (key j < kv_len, cuDNN's padding mask). The prefix-visible mask and
multi-position decode (a bottom-right-aligned causal band with a per-row offset) have no cuDNN
mask type: use "pallas" for them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _cudnn_version() -> int | None:
    try:
        from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version
        return int(check_cudnn_version())
    except Exception:  # no CUDA plugin / cuDNN on this machine
        return None


def unsupported_reason(q, k, v, mask, prefix_len, kv_len) -> str | None:
    """Why cuDNN cannot serve a call on a GPU (the platform is checked by the registration)."""
    if jnp.dtype(q.dtype).name not in ("bfloat16", "float16"):
        return f"cudnn flash attention takes bfloat16/float16, not {q.dtype}"
    if not (q.dtype == k.dtype == v.dtype):
        return "cudnn needs one dtype for q, k, v"
    d = q.shape[-1]
    if d % 8 or d > 128:
        return f"head dim {d} is not a multiple of 8 <= 128"
    if mask == "prefix_causal":
        return "cudnn has no prefix-visible + causal mask"
    if mask == "decode" and q.shape[1] != 1:
        return "cudnn decode serves one query position (Lq == 1) only"
    if _cudnn_version() is None:
        return "cuDNN is not available"
    return None


def cudnn_attention(q, k, v, *, mask: str = "none", prefix_len: int = 0, kv_len=None,
                    scale: float | None = None):
    """q: (B, Lq, H, D); k, v: (B, Lk, Hkv, D) -> (B, Lq, H, D)."""
    del prefix_len
    kw = {}
    if mask == "causal":
        kw["is_causal"] = True
    elif mask == "decode":
        kw["key_value_seq_lengths"] = jnp.broadcast_to(
            jnp.asarray(kv_len, jnp.int32).reshape(-1), (q.shape[0],))
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn", **kw)
