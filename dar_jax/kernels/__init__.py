"""The attention implementations behind ``dar_jax.nn.attention``: a leaf (it imports nothing
from ``nn``) exporting their table.

``IMPLEMENTATIONS`` maps a name to ``(function, unsupported_reason)``, both called as
``(q, k, v, *, mask, prefix_len, kv_len, scale, platform)``; ``unsupported_reason`` returns None
or why the implementation cannot serve the call. Each dispatches on the platform of the
program's target (``dar_jax.parallel.Target``), not on the host's backend:

``"xla"``
    plain JAX (``kernels.xla``), every platform and mask: the reference.

``"pallas"``
    TPU: jax's splash attention with masks built for the kinds, and this project's decode
    kernel (``decode_tpu``: one query position against the KV cache, split over its length,
    per-row valid length); GPU: this project's Triton flash attention (forward + backward,
    every mask kind) and its flash-decoding kernel (``mask="decode"`` with few query rows);
    CPU: the GPU kernels in interpret mode, only when asked for explicitly (tests) -- "auto"
    never picks it on CPU.
``"cudnn"``
    GPU only, through ``jax.nn.dot_product_attention(implementation="cudnn")`` for the masks
    cuDNN has; explicit only.

``AUTO_ORDER`` lists, per platform, what ``"auto"`` tries before ``"xla"``: pallas on GPU and
TPU, nothing on CPU.
"""
from __future__ import annotations

from typing import Callable

from dar_jax.kernels import decode_gpu, decode_tpu, flash_gpu, splash_tpu
from dar_jax.kernels.cudnn import cudnn_attention
from dar_jax.kernels.cudnn import unsupported_reason as _cudnn_unsupported_reason
from dar_jax.kernels.decode_gpu import DecodeBlocks, decode_attention
from dar_jax.kernels.decode_tpu import TPUDecodeBlocks, decode_attention_tpu
from dar_jax.kernels.flash_gpu import FlashBlocks, default_blocks, flash_attention
from dar_jax.kernels.splash_tpu import splash_attention
from dar_jax.kernels.xla import xla_attention

__all__ = ["FlashBlocks", "DecodeBlocks", "TPUDecodeBlocks", "default_blocks", "flash_attention",
           "decode_attention", "decode_attention_tpu", "splash_attention", "cudnn_attention",
           "pallas_attention", "pallas_unsupported_reason", "xla_attention", "IMPLEMENTATIONS",
           "AUTO_ORDER"]


def pallas_unsupported_reason(q, k, v, *, mask="none", prefix_len=0, kv_len=None, scale=None,
                              platform: str) -> str | None:
    """Why "pallas" cannot serve a call on ``platform`` (None if it can)."""
    if platform == "tpu":
        if mask == "decode":
            return decode_tpu.unsupported_reason(q, k, v, mask, prefix_len, kv_len)
        return splash_tpu.unsupported_reason(q, k, v, mask, prefix_len, kv_len)
    return flash_gpu.unsupported_reason(q, k, v, mask, prefix_len, kv_len)


def pallas_attention(q, k, v, *, mask="none", prefix_len=0, kv_len=None, scale=None,
                     platform: str):
    """The "pallas" implementation: splash and the decode kernel on TPU, Triton kernels on GPU
    (interpreted on CPU)."""
    if platform == "tpu":
        if mask == "decode":
            return decode_attention_tpu(q, k, v, kv_len, scale=scale)
        return splash_attention(q, k, v, mask=mask, prefix_len=prefix_len, scale=scale,
                                interpret=False)
    interpret = platform != "gpu"
    if mask == "decode" and decode_gpu.unsupported_reason(q, k, v, mask, 0, kv_len) is None:
        return decode_attention(q, k, v, kv_len, scale=scale, interpret=interpret)
    return flash_attention(q, k, v, mask=mask, prefix_len=prefix_len, kv_len=kv_len, scale=scale,
                           interpret=interpret)


def _cudnn_supports(q, k, v, *, mask="none", prefix_len=0, kv_len=None, scale=None, platform: str):
    if platform != "gpu":
        return f"cudnn needs a GPU platform (this program is for {platform})"
    return _cudnn_unsupported_reason(q, k, v, mask, prefix_len, kv_len)


def _cudnn(q, k, v, *, platform: str, **kwargs):
    return cudnn_attention(q, k, v, **kwargs)


def _always(q, k, v, **kwargs) -> None:
    return None


IMPLEMENTATIONS: dict[str, tuple[Callable, Callable]] = {
    "xla": (xla_attention, _always),
    "pallas": (pallas_attention, pallas_unsupported_reason),
    "cudnn": (_cudnn, _cudnn_supports),
}
AUTO_ORDER: dict[str, tuple[str, ...]] = {"gpu": ("pallas",), "tpu": ("pallas",)}
