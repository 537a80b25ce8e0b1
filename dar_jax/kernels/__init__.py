"""Pallas attention kernels registered behind ``dar_jax.nn.attention``.

Importing this package registers two implementations of the entry point:

``"pallas"``
    GPU: this project's Triton flash attention (forward + backward, every mask kind) and its
    flash-decoding kernel (``mask="decode"`` with few query rows); TPU: jax's splash attention
    with masks built for the kinds (decode falls back to XLA there); CPU: the GPU kernels in
    interpret mode, only when asked for explicitly (tests) -- "auto" never picks it on CPU.
``"cudnn"``
    GPU only, through ``jax.nn.dot_product_attention(implementation="cudnn")`` for the masks
    cuDNN has; explicit only.

``"auto"`` thus means pallas on GPU and TPU, xla on CPU.
"""
from __future__ import annotations

import jax

from dar_jax.kernels import cudnn as _cudnn
from dar_jax.kernels import decode_gpu, flash_gpu, splash_tpu
from dar_jax.kernels.cudnn import cudnn_attention
from dar_jax.kernels.decode_gpu import DecodeBlocks, decode_attention
from dar_jax.kernels.flash_gpu import FlashBlocks, default_blocks, flash_attention
from dar_jax.kernels.sharding import sharded_attention
from dar_jax.kernels.splash_tpu import splash_attention
from dar_jax.nn.attention import register_implementation

__all__ = ["FlashBlocks", "DecodeBlocks", "default_blocks", "flash_attention", "decode_attention",
           "splash_attention", "cudnn_attention", "pallas_attention", "pallas_unsupported_reason",
           "sharded_attention"]


def _use_decode_kernel(q, k, v, mask, kv_len) -> bool:
    return decode_gpu.unsupported_reason(q, k, v, mask, 0, kv_len) is None


def pallas_unsupported_reason(q, k, v, *, mask="none", prefix_len=0, kv_len=None,
                              scale=None) -> str | None:
    """Why "pallas" cannot serve a call on the current backend (None if it can)."""
    if jax.default_backend() == "tpu":
        return splash_tpu.unsupported_reason(q, k, v, mask, prefix_len, kv_len)
    return flash_gpu.unsupported_reason(q, k, v, mask, prefix_len, kv_len)


def pallas_attention(q, k, v, *, mask="none", prefix_len=0, kv_len=None, scale=None):
    """The "pallas" implementation: splash on TPU, Triton kernels on GPU (interpreted on CPU)."""
    backend = jax.default_backend()
    if backend == "tpu":
        return splash_attention(q, k, v, mask=mask, prefix_len=prefix_len, scale=scale,
                                interpret=False)
    interpret = backend != "gpu"
    if mask == "decode" and _use_decode_kernel(q, k, v, mask, kv_len):
        return decode_attention(q, k, v, kv_len, scale=scale, interpret=interpret)
    return flash_attention(q, k, v, mask=mask, prefix_len=prefix_len, kv_len=kv_len, scale=scale,
                           interpret=interpret)


def _cudnn_supports(q, k, v, *, mask="none", prefix_len=0, kv_len=None, scale=None):
    return _cudnn.unsupported_reason(q, k, v, mask, prefix_len, kv_len)


register_implementation("pallas", pallas_attention, pallas_unsupported_reason,
                        auto_backends=("gpu", "tpu"))
register_implementation("cudnn", cudnn_attention, _cudnn_supports)
