"""Attention kernels (dar_jax.kernels) against the plain-JAX reference, on CPU.

The GPU (Triton) kernels and the TPU splash glue run here in Pallas interpret mode; their real
lowerings are checked by lowering for the "cuda" / "tpu" platforms without a device (the Triton
module is verified by MLIR; the Mosaic kernels are serialised). Shapes are tiny but use 16-wide
tiles so that every test crosses several blocks and a ragged last block.

Tolerances, as max |kernel - reference| / max |reference| with the reference in float32 on the
same (rounded) inputs: float32 1e-5 (outputs and gradients); bfloat16 outputs 1e-2 and
gradients 2e-2 (p and ds are rounded to bfloat16 before the second dots, as in XLA's bf16 path).
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dar_jax.kernels as K
from dar_jax.kernels import decode_gpu, decode_tpu, flash_gpu, splash_tpu

A = importlib.import_module("dar_jax.nn.attention")  # the module (dar_jax.nn exports the function)

SMALL = K.FlashBlocks(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16, block_q_dq=16,
                      block_k_dq=16)
TOL = {jnp.float32: (1e-5, 1e-5), jnp.bfloat16: (1e-2, 2e-2)}  # (output, gradients)


def _inputs(b, lq, lk, h, hkv, d, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, lq, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, lk, hkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, lk, hkv, d), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (b, lq, h, d), jnp.float32).astype(dtype)
    return q, k, v, do


def _rel(x, ref):
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(x).all()
    return float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-6))


def _check_against_reference(fn, q, k, v, do, dtype, **kw):
    """fn's output and VJP vs xla_attention in float32 on the same inputs."""
    f32 = lambda x: x.astype(jnp.float32)
    out, vjp = jax.vjp(fn, q, k, v)
    ref, ref_vjp = jax.vjp(lambda *a: A.xla_attention(*a, **kw), f32(q), f32(k), f32(v))
    assert out.dtype == q.dtype and out.shape == q.shape
    tol_o, tol_g = TOL[dtype]
    assert _rel(out, ref) < tol_o, ("out", _rel(out, ref))
    for name, g, gr in zip("qkv", vjp(do), ref_vjp(f32(do))):
        assert g.dtype == dtype
        assert _rel(g, gr) < tol_g, (f"d{name}", _rel(g, gr))


# ------------------------------------------------------------------ flash (GPU kernel, interpreted)
FLASH_CASES = [  # (mask, b, lq, lk, h, hkv, d, prefix_len, kv_len)
    ("none", 2, 37, 21, 2, 2, 32, 0, None),          # cross-attention, ragged both ways
    ("causal", 2, 37, 37, 4, 2, 32, 0, None),        # GQA
    ("prefix_causal", 2, 37, 37, 2, 1, 32, 19, None),  # MQA, prefix ends mid-block
    ("decode", 2, 21, 40, 2, 2, 32, 0, (26, 40)),    # multi-position decode through flash
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", FLASH_CASES, ids=[c[0] for c in FLASH_CASES])
def test_flash_matches_reference(case, dtype):
    mask, b, lq, lk, h, hkv, d, prefix_len, kv_len = case
    q, k, v, do = _inputs(b, lq, lk, h, hkv, d, dtype)
    kv_len = None if kv_len is None else jnp.array(kv_len, jnp.int32)
    kw = dict(mask=mask, prefix_len=prefix_len, kv_len=kv_len)
    fn = lambda q, k, v: K.flash_attention(q, k, v, blocks=SMALL, interpret=True, **kw)
    _check_against_reference(fn, q, k, v, do, dtype, **kw)


MIXED = K.FlashBlocks(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=32,
                      block_k_dq=16)


@pytest.mark.parametrize("mask,lq,lk,prefix,kv_len", [
    ("causal", 70, 70, 0, None), ("prefix_causal", 70, 70, 41, None),
    ("decode", 45, 70, 0, 50)], ids=["causal", "prefix_causal", "decode"])
def test_flash_unequal_tiles(mask, lq, lk, prefix, kv_len):
    """Query and key tiles of different sizes (as the defaults use): the skipped / mask-free /
    masked tile ranges must line up across the tile grid."""
    q, k, v, do = _inputs(1, lq, lk, 2, 2, 16, jnp.float32, seed=11)
    kw = dict(mask=mask, prefix_len=prefix,
              kv_len=None if kv_len is None else jnp.array([kv_len], jnp.int32))
    fn = lambda q, k, v: K.flash_attention(q, k, v, blocks=MIXED, interpret=True, **kw)
    _check_against_reference(fn, q, k, v, do, jnp.float32, **kw)


@pytest.mark.parametrize("d", [64, 128])
def test_flash_head_dims(d):
    q, k, v, do = _inputs(1, 40, 40, 2, 2, d, jnp.float32, seed=d)
    fn = lambda q, k, v: K.flash_attention(q, k, v, mask="causal", blocks=SMALL, interpret=True)
    _check_against_reference(fn, q, k, v, do, jnp.float32, mask="causal")


def test_flash_custom_scale_and_default_blocks_under_jit():
    q, k, v, do = _inputs(2, 50, 50, 2, 2, 32, jnp.float32, seed=3)
    kw = dict(mask="prefix_causal", prefix_len=7, scale=0.3)
    fn = jax.jit(lambda q, k, v: K.flash_attention(q, k, v, interpret=True, **kw))
    _check_against_reference(fn, q, k, v, do, jnp.float32, **kw)


def test_block_sizes_validated_and_defaults_fit_shapes():
    with pytest.raises(ValueError, match="power of two"):
        K.FlashBlocks(block_q=48)
    with pytest.raises(ValueError, match="power of two"):
        K.DecodeBlocks(block_k=8)
    # tokenizer v1 (1024 tokens) gets 128-row forward tiles, GPT (257 tokens) 64-row tiles
    assert K.default_blocks(1024, 1024, 64).block_q == 128
    assert K.default_blocks(257, 257, 64).block_q == 64
    assert flash_gpu._fit(128, 33) == 64 and flash_gpu._fit(64, 5) == 16


# ------------------------------------------------------------------ decode kernel
DECODE_CASES = [  # (lq, s, h, hkv, kv_len per row, splits, dtype)
    (1, 70, 4, 4, (1, 17, 48, 70), 3, jnp.float32),    # MHA (1 row: reduce path), empty splits
    (1, 70, 8, 2, (5, 33, 64, 70), None, jnp.float32),  # GQA (rows padded to 16), auto splits
    (2, 70, 4, 1, (2, 40, 41, 70), 2, jnp.float32),    # MQA, two new positions
    (1, 70, 16, 1, (3, 16, 50, 69), 4, jnp.bfloat16),  # 16 rows per kv head
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=["mha", "gqa", "mqa_lq2", "mqa16_bf16"])
def test_decode_kernel_matches_full_attention_over_prefix(case):
    lq, s, h, hkv, kv_len, splits, dtype = case
    q, k, v, _ = _inputs(len(kv_len), lq, s, h, hkv, 32, dtype, seed=5)
    lens = jnp.array(kv_len, jnp.int32)
    out = K.decode_attention(q, k, v, lens, blocks=K.DecodeBlocks(block_k=16, num_splits=splits),
                             interpret=True)
    assert out.dtype == dtype and out.shape == q.shape
    tol = TOL[dtype][0]
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    g = h // hkv
    for row, n in enumerate(kv_len):
        for i in range(lq):  # query i is cache position n - lq + i: full attention over [0, it]
            end = n - lq + i + 1
            for head in range(h):
                logits = kn[row, :end, head // g] @ qn[row, i, head] / np.sqrt(32)
                p = np.exp(logits - logits.max())
                ref = (p / p.sum()) @ vn[row, :end, head // g]
                assert _rel(out[row, i, head], ref) < tol, (row, n, i, head)


def test_decode_gradient_falls_back_to_reference():
    q, k, v, do = _inputs(2, 1, 40, 2, 2, 16, jnp.float32, seed=9)
    lens = jnp.array([9, 40], jnp.int32)
    fn = lambda q, k, v: K.decode_attention(q, k, v, lens, interpret=True)
    _check_against_reference(fn, q, k, v, do, jnp.float32, mask="decode", kv_len=lens)


# ------------------------------------------------------------------ entry point and dispatch
MODEL_CALLS = [  # the shapes and masks the tiny GPT and tokenizer use
    ("causal", (2, 33, 4, 32), (2, 33, 4, 32), {}),
    ("prefix_causal", (2, 64, 2, 64), (2, 64, 2, 64), {"prefix_len": 48}),
    ("none", (2, 64, 2, 64), (2, 64, 2, 64), {}),
    ("none", (2, 64, 2, 64), (2, 8, 2, 64), {}),                 # cross to a condition group
    ("decode", (2, 1, 4, 32), (2, 40, 4, 32), {"kv_len": (1, 33)}),
    ("decode", (2, 33, 4, 32), (2, 40, 4, 32), {"kv_len": (33, 35)}),  # prefill into the cache
]


@pytest.mark.parametrize("mask,qs,ks,extra", MODEL_CALLS,
                         ids=["gpt", "tok_prefix", "tok_self", "tok_cross", "decode", "prefill"])
def test_entry_point_pallas_on_cpu(mask, qs, ks, extra):
    q = jax.random.normal(jax.random.key(1), qs)
    k = jax.random.normal(jax.random.key(2), ks)
    v = jax.random.normal(jax.random.key(3), ks)
    extra = {n: (jnp.array(x, jnp.int32) if n == "kv_len" else x) for n, x in extra.items()}
    got = jax.jit(lambda q, k, v: A.attention(q, k, v, mask=mask, implementation="pallas",
                                              **extra))(q, k, v)
    ref = A.attention(q, k, v, mask=mask, implementation="xla", **extra)
    assert _rel(got, ref) < 1e-5


@pytest.mark.parametrize("mask", ["none", "prefix_causal"])
def test_cpu_per_head_attention_gradient_keeps_no_stacked_scores(mask):
    """The CPU path (one (batch, kv head) at a time) gives the batched path's outputs and
    gradients, and its gradient program keeps no (B * H, Lq, Lk) stack of scores: each head is
    recomputed in the backward pass, so the temporaries stay below one such tensor."""
    from dar_jax.kernels import xla as X
    b, l, h, hkv, d = 2, 512, 4, 2, 32
    q, k, v, ct = _inputs(b, l, l, h, hkv, d, jnp.float32, seed=3)
    assert h // hkv * l * l >= X.CPU_PER_HEAD_MIN_SCORES           # the per-head path serves it

    def loss(platform):
        return lambda q, k, v: jnp.sum(X.xla_attention(q, k, v, mask=mask, prefix_len=40,
                                                       platform=platform) * ct)

    per_head = jax.jit(jax.grad(loss("cpu"), argnums=(0, 1, 2))).lower(q, k, v).compile()
    batched = jax.jit(jax.grad(loss("tpu"), argnums=(0, 1, 2)))   # plain batched products
    out = functools.partial(X.xla_attention, q, k, v, mask=mask, prefix_len=40)
    assert _rel(out(platform="cpu"), out(platform="tpu")) < 1e-5
    for a, r in zip(per_head(q, k, v), batched(q, k, v)):
        assert _rel(a, r) < 1e-5
    stacked_scores = b * h * l * l * 4
    assert per_head.memory_analysis().temp_size_in_bytes < stacked_scores


def test_auto_is_xla_on_cpu_and_lists_kernels():
    assert {"xla", "pallas", "cudnn", "auto"} <= set(A.available_implementations())
    assert "pallas" not in A.AUTO_ORDER.get("cpu", ())
    assert A.AUTO_ORDER["gpu"][0] == "pallas" and A.AUTO_ORDER["tpu"][0] == "pallas"


def test_unsupported_falls_back_under_auto_and_raises_when_explicit(monkeypatch, caplog):
    # pretend this backend auto-selects pallas (it is the GPU/TPU behaviour)
    monkeypatch.setitem(A.AUTO_ORDER, jax.default_backend(), ("pallas",))
    monkeypatch.setattr(A, "_warned", set())
    q = jax.random.normal(jax.random.key(0), (1, 20, 2, 48))  # head dim 48 cannot be tiled
    with caplog.at_level(logging.INFO, logger=A.__name__):
        out1 = A.attention(q, q, q, mask="causal", implementation="auto")
        out2 = A.attention(q, q, q, mask="causal", implementation="auto")
    lines = [r for r in caplog.records if "does not support" in r.getMessage()]
    assert len(lines) == 1 and "head dim 48" in lines[0].getMessage()
    np.testing.assert_allclose(out1, A.xla_attention(q, q, q, mask="causal"), atol=1e-6)
    np.testing.assert_array_equal(out1, out2)
    with pytest.raises(A.AttentionError, match="'pallas' cannot serve.*head dim 48"):
        A.attention(q, q, q, mask="causal", implementation="pallas")
    # a supported call under auto takes the kernel (interpreted here) and logs nothing
    caplog.clear()
    q = jax.random.normal(jax.random.key(0), (1, 20, 2, 16))
    with caplog.at_level(logging.INFO, logger=A.__name__):
        out = A.attention(q, q, q, mask="causal", implementation="auto")
    assert not caplog.records
    np.testing.assert_allclose(out, A.xla_attention(q, q, q, mask="causal"), atol=1e-6)


def test_unsupported_reasons():
    f16 = jnp.zeros((1, 8, 2, 16), jnp.float16)
    i32 = jnp.zeros((1, 8, 2, 16), jnp.int32)
    assert "dtype int32" in flash_gpu.unsupported_reason(i32, i32, i32, "none", 0, None)
    assert "mixed dtypes" in flash_gpu.unsupported_reason(f16, f16.astype(jnp.float32), f16,
                                                          "none", 0, None)
    assert "decode" in splash_tpu.unsupported_reason(f16, f16, f16, "decode", 0, None)
    rows = jnp.zeros((1, 5, 16, 16))
    assert "> 64" in decode_gpu.unsupported_reason(rows, rows[:, :, :1], rows[:, :, :1],
                                                   "decode", 0, None)
    with pytest.raises(A.AttentionError, match="cudnn needs a GPU"):
        A.attention(f16, f16, f16, implementation="cudnn")
    reasons = []
    jax.jit(lambda q, p: reasons.append(
        flash_gpu.unsupported_reason(q, q, q, "prefix_causal", p, None)))(f16, 3)
    assert "prefix_len must be a static" in reasons[0]


# ------------------------------------------------------------------ TPU splash glue
@pytest.mark.parametrize("mask,lq,lk,prefix", [("none", 150, 40, 0), ("none", 128, 256, 0),
                                               ("causal", 150, 150, 0),
                                               ("prefix_causal", 257, 257, 100)])
def test_splash_masks_encode_the_mask_kinds(mask, lq, lk, prefix):
    m = splash_tpu.splash_mask(mask, lq, lk, prefix)
    lq_pad, lk_pad = splash_tpu.padded_length(lq), splash_tpu.padded_length(lk)
    assert m.shape == (lq_pad, lk_pad) and lq_pad % 128 == 0 and lk_pad % 128 == 0
    dense = np.asarray(m[:, :])
    ref = np.asarray(A.mask_array(mask, lq, lk, prefix_len=prefix)
                     if mask != "none" else np.ones((lq, lk), bool)).reshape(lq, lk)
    np.testing.assert_array_equal(dense[:lq, :lk], ref)   # real rows see exactly the reference
    assert not dense[:lq, lk:].any()                       # and never a padded key
    assert dense.any(axis=1).all()                         # no empty row (no undefined softmax)
    bs = splash_tpu.block_sizes(lq_pad, lk_pad)
    assert lq_pad % bs.block_q == 0 and lk_pad % bs.block_kv == 0


@pytest.mark.parametrize("mask,lq,lk,hkv,prefix", [("prefix_causal", 150, 150, 1, 70),
                                                   ("none", 150, 40, 2, 0)])
def test_splash_kernel_interpret(mask, lq, lk, hkv, prefix):
    q, k, v, do = _inputs(1, lq, lk, 2, hkv, 32, jnp.float32, seed=2)
    kw = dict(mask=mask, prefix_len=prefix)
    fn = lambda q, k, v: K.splash_attention(q, k, v, interpret=True, **kw)
    _check_against_reference(fn, q, k, v, do, jnp.float32, **kw)


# ------------------------------------------------------------------ TPU decode kernel (interpreted)
TPU_DECODE_CASES = [  # (b, s, h, d, block_k, splits, lens)
    (3, 41, 4, 32, 8, 1, (1, 41, 17)),         # ragged last block, a row with one entry
    (3, 41, 4, 32, 8, 3, (1, 41, 17)),         # split over the length: some splits empty
    (2, 257, 2, 64, 128, None, (129, 256)),    # GPT cache length, default splits
    (2, 24, 3, 16, 8, 2, (24, 0)),             # a full row and an empty one
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", TPU_DECODE_CASES, ids=lambda c: f"s{c[1]}-bk{c[4]}-sp{c[5]}")
def test_tpu_decode_kernel_interpret(case, dtype):
    b, s, h, d, bk, splits, lens = case
    q, k, v, _ = _inputs(b, 1, s, h, h, d, dtype, seed=3)
    lens = jnp.array(lens, jnp.int32)
    blocks = K.TPUDecodeBlocks(block_k=bk, num_splits=splits)
    out = K.decode_attention_tpu(q, k, v, lens, blocks=blocks, interpret=True)
    f32 = lambda x: x.astype(jnp.float32)
    ref = A.xla_attention(f32(q), f32(k), f32(v), mask="decode", kv_len=lens)
    ref = jnp.where((lens > 0)[:, None, None, None], ref, 0.0)   # no visible key: zeros
    assert out.dtype == dtype and out.shape == q.shape
    assert _rel(out, ref) < TOL[dtype][0]
    # differentiable (through the XLA reference's gradient)
    g = jax.grad(lambda q: K.decode_attention_tpu(q, k, v, lens, blocks=blocks, interpret=True)
                 .astype(jnp.float32).sum())(q)
    assert g.shape == q.shape and np.isfinite(np.asarray(g, np.float32)).all()


def test_tpu_decode_reasons_and_auto_choice():
    one = jnp.zeros((2, 1, 4, 16), jnp.bfloat16)
    cache = jnp.zeros((2, 40, 4, 16), jnp.bfloat16)
    assert K.pallas_unsupported_reason(one, cache, cache, mask="decode", kv_len=3,
                                       platform="tpu") is None
    assert "one query position" in decode_tpu.unsupported_reason(
        jnp.zeros((2, 3, 4, 16)), cache, cache, "decode", 0, 3)
    assert "kv heads" in decode_tpu.unsupported_reason(one, cache[:, :, :2], cache[:, :, :2],
                                                       "decode", 0, 3)
    # the platform comes from the target, not from the host: "auto" on a TPU target picks the
    # kernel, on this CPU host's target it is XLA
    tpu = A.choose_implementation(one, cache, cache, mask="decode", kv_len=3, platform="tpu")
    cpu = A.choose_implementation(one, cache, cache, mask="decode", kv_len=3, platform="cpu")
    assert (tpu, cpu) == ("pallas", "xla")


def test_heads_major_cache_is_read_in_place_and_matches():
    """A "bhsd" KV cache (what cache_layout gives the xla path) gives the same attention as the
    "bshd" one, on the xla path and through a kernel (which gets it transposed), and the compiled
    xla decode has no transpose of the cache."""
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((2, 1, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 40, 2, 16)), jnp.float32)   # GQA: 2 kv heads
    v = jnp.asarray(rng.standard_normal((2, 40, 2, 16)), jnp.float32)
    kv_len = jnp.array([7, 40])
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    want = A.attention(q, k, v, mask="decode", kv_len=kv_len, implementation="xla")
    for impl in ("xla", "pallas"):
        got = A.attention(q, kh, vh, mask="decode", kv_len=kv_len, implementation=impl, kv_layout="bhsd")
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5, err_msg=impl)
    assert (A.cache_layout("auto", "cpu"), A.cache_layout("xla", "tpu"), A.cache_layout("auto", "tpu"),
            A.cache_layout("auto", "gpu"), A.cache_layout("pallas", "cpu")) == ("bhsd", "bhsd", "bshd", "bshd", "bshd")
    hlo = jax.jit(lambda q, k, v: A.attention(q, k, v, mask="decode", kv_len=kv_len, kv_layout="bhsd")
                  ).lower(q, kh, vh).compile().as_text()
    moved = [l for l in hlo.splitlines() if ("transpose" in l or "copy" in l)
             and "f32[2,2,40,16]" in l.split("=", 1)[-1][:20]]
    assert not moved, moved  # the bshd layout shows two such copies per call (k and v)
    with pytest.raises(A.AttentionError, match="kv_layout"):
        A.attention(q, k, v, kv_layout="hsbd")


# ------------------------------------------------------------------ real lowerings, no device
@pytest.fixture
def verified_triton_modules(monkeypatch):
    """Runs the MLIR verifier on every Triton module the Pallas GPU lowering builds."""
    from jax._src.pallas.triton import lowering
    built = []
    original = lowering.lower_jaxpr_to_triton_module

    def checked(*args, **kwargs):
        res = original(*args, **kwargs)
        assert res.module.operation.verify()
        built.append(res)
        return res

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", checked)
    return built


LOWER_CASES = [  # (mask, b, lq, lk, h, d, dtype, prefix) at the model shapes
    ("causal", 4, 257, 257, 16, 64, jnp.bfloat16, 0),           # GPT
    ("prefix_causal", 2, 1024, 1024, 12, 64, jnp.bfloat16, 512),  # tokenizer encoder
    ("none", 2, 1024, 32, 12, 64, jnp.bfloat16, 0),              # decoder cross-attention
    ("none", 2, 1024, 1024, 8, 128, jnp.float32, 0),
    ("decode", 2, 33, 257, 8, 64, jnp.bfloat16, 0),
]


@pytest.mark.parametrize("case", LOWER_CASES, ids=lambda c: f"{c[0]}-{c[2]}x{c[3]}-d{c[5]}")
def test_flash_lowers_to_triton(case, verified_triton_modules):
    mask, b, lq, lk, h, d, dtype, prefix = case
    q = jax.ShapeDtypeStruct((b, lq, h, d), dtype)
    k = jax.ShapeDtypeStruct((b, lk, h, d), dtype)
    lens = jax.ShapeDtypeStruct((b,), jnp.int32)

    def loss(q, k, v, lens):
        out = K.flash_attention(q, k, v, mask=mask, prefix_len=prefix, interpret=False,
                                kv_len=lens if mask == "decode" else None)
        return out.astype(jnp.float32).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    text = grad.trace(q, k, k, lens).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3  # forward, dK/dV, dQ
    assert len(verified_triton_modules) == 3


@pytest.mark.parametrize("lq,h,hkv", [(1, 20, 20), (1, 16, 1), (2, 8, 2)])
def test_decode_lowers_to_triton(lq, h, hkv, verified_triton_modules):
    q = jax.ShapeDtypeStruct((64, lq, h, 64), jnp.bfloat16)   # GPT-XL CFG decode: 64 rows
    k = jax.ShapeDtypeStruct((64, 257, hkv, 64), jnp.bfloat16)
    lens = jax.ShapeDtypeStruct((64,), jnp.int32)
    fn = jax.jit(lambda q, k, v, n: K.decode_attention(q, k, v, n, interpret=False))
    text = fn.trace(q, k, k, lens).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1 and len(verified_triton_modules) == 1


@pytest.mark.parametrize("mask,lq,lk,prefix", [("causal", 257, 257, 0),
                                               ("prefix_causal", 1024, 1024, 512),
                                               ("none", 1024, 32, 0)])
def test_splash_lowers_to_mosaic(mask, lq, lk, prefix):
    q = jax.ShapeDtypeStruct((2, lq, 12, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, lk, 12, 64), jnp.bfloat16)
    loss = lambda q, k, v: K.splash_attention(q, k, v, mask=mask, prefix_len=prefix,
                                              interpret=False).astype(jnp.float32).sum()
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    text = grad.trace(q, k, k).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 3  # forward, dQ, dK/dV


@pytest.mark.parametrize("b,h,dtype", [(64, 20, jnp.bfloat16), (4, 24, jnp.float32)])
def test_tpu_decode_lowers_to_mosaic(b, h, dtype):
    """Through the entry point with a TPU target (built on this CPU host): the kernel is chosen
    and lowers to one Mosaic call inside the attention[gpt.decode] scope."""
    from dar_jax.parallel import Target
    q = jax.ShapeDtypeStruct((b, 1, h, 64), dtype)
    k = jax.ShapeDtypeStruct((b, 257, h, 64), dtype)
    lens = jax.ShapeDtypeStruct((b,), jnp.int32)
    fn = jax.jit(lambda q, k, v, n: A.attention(q, k, v, mask="decode", kv_len=n,
                                                target=Target("tpu"), site="gpt.decode"))
    text = fn.trace(q, k, k, lens).lower(lowering_platforms=("tpu",)).as_text(debug_info=True)
    assert text.count("tpu_custom_call") == 1 and "dar_decode_tpu" in text
    assert "attention[gpt.decode]" in text


# ------------------------------------------------------------------ sharding (8 fake CPU devices)
SHARDED_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from jax.sharding import AxisType
    from dar_jax.nn.attention import sharded_attention
    from dar_jax.nn.attention import AttentionError, xla_attention
    from dar_jax.parallel import target_for
    assert jax.device_count() == 8
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (4, 19, 4, 16))
    k = jax.random.normal(ks[1], (4, 19, 2, 16))
    v = jax.random.normal(ks[2], (4, 19, 2, 16))
    for kind in (AxisType.Explicit, AxisType.Auto):
        mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(kind,) * 3)
        run = lambda q, k, v: sharded_attention(q, k, v, target_for(mesh), mask="causal",
                                                implementation="pallas")
        out = jax.jit(run)(q, k, v)
        assert tuple(out.sharding.spec)[:3] == (("data", "fsdp"), None, "tensor"), out.sharding
        np.testing.assert_allclose(out, xla_attention(q, k, v, mask="causal"), atol=1e-5)
        loss = lambda f: lambda q, k, v: (f(q, k, v) ** 2).sum()
        grads = jax.jit(jax.grad(loss(run), argnums=(0, 1, 2)))(q, k, v)
        ref_fn = lambda *a: xla_attention(*a, mask="causal")
        ref = jax.grad(loss(ref_fn), argnums=(0, 1, 2))(q, k, v)
        for g, r in zip(grads, ref):
            np.testing.assert_allclose(g, r, atol=1e-4)
    lens = jnp.array([3, 19, 7, 12], jnp.int32)
    step = lambda q, k, v, n: sharded_attention(q, k, v, target_for(mesh), mask="decode", kv_len=n,
                                                implementation="pallas")
    out = jax.jit(step)(q[:, :1], k, v, lens)
    np.testing.assert_allclose(out, xla_attention(q[:, :1], k, v, mask="decode", kv_len=lens),
                               atol=1e-5)
    small = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Explicit,) * 2)
    try:
        sharded_attention(q, k, v, target_for(small), mask="causal")
    except AttentionError as e:
        assert "not divisible" in str(e)
    else:
        raise AssertionError("2 kv heads over a 4-way tensor axis must be refused")
    print("SHARDED OK")
""")


def test_sharded_attention_on_8_cpu_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0 and "SHARDED OK" in res.stdout, res.stderr[-3000:]


def test_cudnn_for_a_gpu_program_names_why_it_cannot_serve():
    """The registry's cuDNN check for a program built for GPU (from any host) gives a reason."""
    from dar_jax.nn.attention import AttentionError, choose_implementation
    q = jnp.zeros((1, 8, 2, 64), jnp.float32)
    with pytest.raises(AttentionError, match="cudnn flash attention takes bfloat16"):
        choose_implementation(q, q, q, mask="causal", implementation="cudnn", platform="gpu")
    with pytest.raises(AttentionError, match="prefix-visible"):
        choose_implementation(q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), q.astype(jnp.bfloat16),
                              mask="prefix_causal", prefix_len=2, implementation="cudnn", platform="gpu")
