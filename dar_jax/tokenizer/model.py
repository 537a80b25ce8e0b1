"""The D-AR sequential diffusion tokenizer as Flax NNX modules (definitions only).

Layout follows the reference (showlab/D-AR ``VQModel``) so its checkpoints map one to one:

* encoder: conv patchify (kernel = stride = ``encoder_patch_size``), non-affine LayerNorm,
  learnable queries appended, gated pre-LN blocks with q/k LayerNorm and Flux 2D RoPE (queries
  unrotated) under the mask "all patches visible, causal among queries", norm, 1x1 projection to
  ``vq_dim``;
* quantizer codebook (l2-normalised at use);
* decoder layers: 1x1 projection back, learned position table, causal gated blocks, norm -> cond;
* diffusion network: pixel patches (channel order (c, p1, p2)), SiT blocks whose per-token adaLN
  modulation is driven by a cross-attention to the condition group, conv or DiT-style output.

Images are NHWC. Patch kernels are stored as (p, p, 3, D) / (D, p, p, 3) so pixels never need a
channel-first transpose. The public API is functional (``dar_jax.tokenizer``); see there.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dar_jax.nn import layers
from dar_jax.nn import remat as remat_policy
from dar_jax.nn.functional import PureModule
from dar_jax.nn.attention import attention
from dar_jax.parallel.target import Target, default_target
from dar_jax.nn.resize import avg_pool_tokens
from dar_jax.nn.rope import apply_rope, concat_tables, identity_table, rope_2d_table
from dar_jax.tokenizer.config import (HEAD_DIM, LOW_RANK, QUERY_TABLE, REPA_HIDDEN, REPA_OUT,
                                      ROPE_AXES, TokenizerConfig)

# logical axes of activations (mapped to mesh axes by the same rules as the parameters)
ACT = ("batch", "length", "embed")
ACT_HEADS = ("batch", "length", "heads", "head_dim")


def uniform_init(bound: float):
    """An initializer drawing U(-bound, bound)."""
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_default(fan_in: int):
    """torch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return uniform_init(1.0 / math.sqrt(fan_in))


def norm(x: jax.Array) -> jax.Array:
    """The reference's non-affine LayerNorm (eps 1e-6), statistics in float32."""
    return layers.layer_norm(x, 1e-6)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [cos | sin] of ``t`` (already x 1000). t: (B,) -> (B, dim) float32."""
    half = dim // 2
    freqs = np.exp((-math.log(max_period) * np.arange(half, dtype=np.float32)) / half).astype(np.float32)
    args = t.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


# --------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------
class Attention(nnx.Module):
    """Separate q/k/v Linear (bias), per-head LayerNorm on q and k, output projection."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype, impl: str):
        self.heads = dim // HEAD_DIM
        self.impl = impl
        init = layers.trunc_normal(0.02)
        self.q = layers.linear(dim, dim, (layers.EMBED, layers.HEADS), rngs=rngs, dtype=dtype, kernel_init=init)
        self.k = layers.linear(dim, dim, (layers.EMBED, layers.HEADS), rngs=rngs, dtype=dtype, kernel_init=init)
        self.v = layers.linear(dim, dim, (layers.EMBED, layers.HEADS), rngs=rngs, dtype=dtype, kernel_init=init)
        self.q_norm = layers.LayerNorm(HEAD_DIM, eps=1e-6)
        self.k_norm = layers.LayerNorm(HEAD_DIM, eps=1e-6)
        self.proj = layers.linear(dim, dim, (layers.HEADS, layers.EMBED), rngs=rngs, dtype=dtype, kernel_init=init)

    def _heads(self, x, target: Target):
        x = x.reshape(*x.shape[:-1], self.heads, HEAD_DIM)
        return remat_policy.name(target.constrain(x, ACT_HEADS), "qkv")

    def queries(self, x, target: Target):
        """x: (B, L, D) -> normalised queries (B, L, H, 64)."""
        return self.q_norm(self._heads(self.q(x), target))

    def keys_values(self, x, target: Target):
        """x: (B, L, D) -> normalised keys and values, each (B, L, H, 64)."""
        return self.k_norm(self._heads(self.k(x), target)), self._heads(self.v(x), target)

    def output(self, y, target: Target):
        """y: (B, L, H, 64) -> (B, L, D)."""
        y = remat_policy.name(target.constrain(y, ACT_HEADS), "context")
        return remat_policy.name(target.constrain(self.proj(y.reshape(*y.shape[:-2], -1)), ACT), "attn_out")

    def __call__(self, x, target: Target, *, mask="none", prefix_len=0, rope=None, site=None):
        """Self-attention; ``rope`` = (cos, sin) rotates queries and keys."""
        q = self.queries(x, target)
        k, v = self.keys_values(x, target)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = attention(q, k, v, mask=mask, prefix_len=prefix_len, implementation=self.impl,
                      target=target, site=site)
        return self.output(y, target)


class TransformerBlock(nnx.Module):
    """The encoder / decoder-layer block: pre-LN attention and MLP, residuals scaled by gates."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype, impl: str):
        self.norm1 = layers.LayerNorm(dim, eps=1e-6)
        self.attention = Attention(dim, rngs=rngs, dtype=dtype, impl=impl)
        self.norm2 = layers.LayerNorm(dim, eps=1e-6)
        self.mlp = layers.Mlp(dim, 4 * dim, rngs=rngs, dtype=dtype)
        self.gate1 = layers.param(jnp.zeros((dim,)), (layers.EMBED,))
        self.gate2 = layers.param(jnp.zeros((dim,)), (layers.EMBED,))

    def __call__(self, x, target: Target, *, mask, prefix_len=0, rope=None, site=None):
        a = self.attention(self.norm1(x), target, mask=mask, prefix_len=prefix_len, rope=rope,
                           site=site)
        x = x + a * self.gate1[...].astype(a.dtype)
        m = target.constrain(self.mlp(self.norm2(x), target), ACT)
        return target.constrain(x + m * self.gate2[...].astype(m.dtype), ACT)


# --------------------------------------------------------------------------------------------
# diffusion network
# --------------------------------------------------------------------------------------------
class TimestepEmbedder(nnx.Module):
    """t -> sinusoid(t * 1000, dim) -> Linear, SiLU, Linear."""

    def __init__(self, dim: int, *, rngs, dtype):
        self.dim = dim
        self.mlp = layers.Mlp(dim, dim, rngs=rngs, dtype=dtype)

    def __call__(self, t):
        """t: (B,) float -> (B, dim)."""
        return self.mlp(timestep_embedding(t * 1000.0, self.dim))


class SiTBlock(nnx.Module):
    def __init__(self, dim: int, share_time: bool, *, rngs, dtype, impl, adaln_init_std: float = 0.0):
        self.dim = dim
        self.attention = Attention(dim, rngs=rngs, dtype=dtype, impl=impl)
        self.cross_attn = Attention(dim, rngs=rngs, dtype=dtype, impl=impl)
        self.mlp = layers.Mlp(dim, 4 * dim, rngs=rngs, dtype=dtype)
        self.adaLN = layers.linear(dim, 6 * dim, (layers.EMBED, layers.MLP), rngs=rngs, dtype=dtype,
                              kernel_init=layers.normal(adaln_init_std) if adaln_init_std else layers.zeros)
        self.time_embed = None if share_time else TimestepEmbedder(dim, rngs=rngs, dtype=dtype)
        self.cond_embed = layers.Mlp(dim, dim, rngs=rngs, dtype=dtype)
        self.impl = impl

    def cond_kv(self, c, target: Target):
        """Keys and values of the cross-attention for core-level cond c: (B, Lc, D)."""
        c = norm(self.cond_embed(c))
        return self.cross_attn.keys_values(c, target)

    def __call__(self, x, temb, kv, rope, target: Target):
        """x: (B, L, D) residual stream; temb: (B, D); kv: cond_kv(...); rope: (cos, sin)."""
        if self.time_embed is not None:
            temb = self.time_embed(temb)
        xn = norm(x)
        q = apply_rope(self.cross_attn.queries(xn, target), *rope)
        sc = self.cross_attn.output(
            attention(q, kv[0], kv[1], mask="none", implementation=self.impl, target=target,
                      site="decoder.cross"), target)
        mod = self.adaLN(jax.nn.silu(temb[:, None, :].astype(sc.dtype) + sc))
        mod = remat_policy.name(target.constrain(mod, ("batch", "length", "mlp")), "adaln")
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)
        a = self.attention(modulate(xn.astype(mod.dtype), shift_a, scale_a), target, rope=rope,
                           site="decoder.self")
        x = x + gate_a * a
        m = self.mlp(modulate(norm(x).astype(mod.dtype), shift_m, scale_m), target)
        return target.constrain(x + gate_m * m, ACT)


class FinalLayer(nnx.Module):
    """DiT final layer: LayerNorm, adaLN shift/scale from the time embedding, Linear to patches."""

    def __init__(self, dim: int, p: int, *, rngs, dtype):
        self.adaLN = layers.linear(dim, 2 * dim, (layers.EMBED, layers.MLP), rngs=rngs, dtype=dtype,
                              kernel_init=layers.zeros)
        self.kernel = layers.param(jnp.zeros((dim, p, p, 3)), (layers.EMBED, None, None, None))
        self.bias = layers.param(jnp.zeros((p, p, 3)), (None, None, None))


class DiffusionCore(nnx.Module):
    """The pixel flow-matching transformer: v = net(x_t, t, cond group)."""

    def __init__(self, cfg: TokenizerConfig, *, rngs: nnx.Rngs):
        dc = cfg.diff_decoder
        d, p = dc.dim, dc.patch_size
        dtype, impl = cfg.compute_dtype, cfg.attention_impl
        self.cfg = cfg
        self.time_embed = (TimestepEmbedder(d, rngs=rngs, dtype=dtype) if dc.share_time_encoding
                           else None)
        self.cond_mlp = layers.linear(dc.cond_dim, d, (None, layers.EMBED), rngs=rngs, dtype=dtype,
                                 kernel_init=torch_default(dc.cond_dim),
                                 bias_init=torch_default(dc.cond_dim))
        fan = 3 * p * p
        self.conv_in_kernel = layers.param(torch_default(fan)(rngs.params(), (p, p, 3, d)),
                                      (None, None, None, layers.EMBED))
        self.conv_in_bias = layers.param(torch_default(fan)(rngs.params(), (d,)), (layers.EMBED,))
        self.blocks = nnx.List([SiTBlock(d, dc.share_time_encoding, rngs=rngs, dtype=dtype, impl=impl,
                                             adaln_init_std=cfg.adaln_init_std)
                                for _ in range(dc.depth)])
        if dc.mlp_head:
            self.final = FinalLayer(d, p, rngs=rngs, dtype=dtype)
            self.conv_out_kernel = self.conv_out_bias = None
        else:
            self.final = None
            self.conv_out_kernel = layers.param(jnp.zeros((d, p, p, 3)), (layers.EMBED, None, None, None))
            self.conv_out_bias = layers.param(jnp.zeros((p, p, 3)), (None, None, None))
        if cfg.repa_projector:
            self.repa_out = nnx.List([
                layers.linear(d, REPA_HIDDEN, (layers.EMBED, layers.MLP), rngs=rngs, dtype=dtype,
                         kernel_init=torch_default(d), bias_init=torch_default(d)),
                layers.linear(REPA_HIDDEN, REPA_HIDDEN, (layers.MLP, None), rngs=rngs, dtype=dtype,
                         kernel_init=torch_default(REPA_HIDDEN), bias_init=torch_default(REPA_HIDDEN)),
                layers.linear(REPA_HIDDEN, REPA_OUT, (layers.MLP, layers.EMBED), rngs=rngs, dtype=dtype,
                         kernel_init=torch_default(REPA_HIDDEN), bias_init=torch_default(REPA_HIDDEN)),
            ])
        else:
            self.repa_out = None

    # --- pieces ---------------------------------------------------------------------------------
    def rope(self, gh: int, gw: int):
        dc = self.cfg.diff_decoder
        return rope_2d_table(gh, gw, HEAD_DIM, dc.rope_base_len, ROPE_AXES)

    def prepare_cond(self, cond, target: Target | None = None):
        """cond: (B, Lc, cond_dim) -> per block (k, v), each (B, Lc, H, 64).

        Everything the network does to the condition is per token, so this runs once per
        sequence of conditions and decode steps slice their window out of it.
        """
        target = target or default_target()
        c = norm(self.cond_mlp(cond))
        return tuple(block.cond_kv(c, target) for block in self.blocks)

    def time_embedding(self, t):
        """t: (B,) shifted time -> what the blocks take: raw t or the shared embedding (B, D)."""
        if self.time_embed is not None:
            return self.time_embed(t)
        return t

    def patchify(self, x):
        """x: (B, H, W, 3) -> tokens (B, gh * gw, D), grid (gh, gw)."""
        p = self.cfg.diff_decoder.patch_size
        b, h, w, _ = x.shape
        gh, gw = h // p, w // p
        dtype = self.cfg.compute_dtype
        xp = x.astype(dtype).reshape(b, gh, p, gw, p, 3)
        tok = jnp.einsum("bhpwqc,pqcd->bhwd", xp, self.conv_in_kernel[...].astype(dtype))
        tok = tok + self.conv_in_bias[...].astype(dtype)
        return tok.reshape(b, gh * gw, -1).astype(jnp.float32), (gh, gw)

    def unpatchify(self, tok, temb, grid):
        """Final norm + output layer. tok: (B, L, D) -> (B, H, W, 3) float32."""
        gh, gw = grid
        dtype = self.cfg.compute_dtype
        h = norm(tok)
        if self.final is not None:
            shift, scale = jnp.split(self.final.adaLN(jax.nn.silu(temb)), 2, axis=-1)
            h = modulate(norm(h).astype(shift.dtype), shift[:, None], scale[:, None])
            kernel, bias = self.final.kernel, self.final.bias
        else:
            kernel, bias = self.conv_out_kernel, self.conv_out_bias
        b = h.shape[0]
        h = h.reshape(b, gh, gw, -1).astype(dtype)
        out = jnp.einsum("bhwd,dpqc->bhpwqc", h, kernel[...].astype(dtype),
                         preferred_element_type=jnp.float32)
        out = out + bias[...][None, None, :, None]
        p = out.shape[2]
        return out.reshape(b, gh * p, gw * p, 3)

    def repa_features(self, tok, grid):
        """REPA projection of the hidden state tok: (B, L, D), average-pooled by rows // 16
        (at least 1: the reference's stride is 0 below 16 rows). Returns (B, L', 768)."""
        gh, gw = grid
        h = avg_pool_tokens(tok, gh, gw, max(1, gh // 16))
        for i, lin in enumerate(self.repa_out):
            h = lin(h)
            if i < 2:
                h = jax.nn.silu(h)
        return h.astype(jnp.float32)

    def __call__(self, x, t, kv, *, return_repa: bool = False, remat: str = "none",
                 target: Target | None = None):
        """Velocity. x: (B, H, W, 3) x_t (data scaled by std); t: (B,) shifted time;
        kv: prepare_cond(cond group). Returns v (B, H, W, 3) float32 [, REPA (B, L', 768)].
        ``remat``: the policy rematerialising each block in the backward pass (nn.remat)."""
        dc = self.cfg.diff_decoder
        target = target or default_target()
        tok, grid = self.patchify(x)
        tok = target.constrain(tok, ACT)
        rope = self.rope(*grid)
        temb = self.time_embedding(t)
        repa = None
        step = remat_policy.remat(lambda blk, x_, t_, kv_: blk(x_, t_, kv_, rope, target), remat)
        for i, block in enumerate(self.blocks):
            if return_repa and i == dc.repa_layer:
                repa = self.repa_features(tok, grid)
            tok = step(block, tok, temb, kv[i])
        v = self.unpatchify(tok, temb, grid)
        if return_repa:
            if self.repa_out is None:
                raise ValueError("REPA features asked for, but the config has no REPA projector "
                                 "(repa_projector=False)")
            if repa is None:
                raise ValueError(f"repa_layer {dc.repa_layer} is not below depth {dc.depth}")
            return v, repa
        return v


# --------------------------------------------------------------------------------------------
# the tokenizer
# --------------------------------------------------------------------------------------------
class Tokenizer(nnx.Module):
    """Encoder, quantizer codebook, decoder layers and the diffusion network. See the module doc."""

    def __init__(self, cfg: TokenizerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        de, dd, pe = cfg.encoder_dim, cfg.decoder_dim, cfg.encoder_patch_size
        dtype, impl = cfg.compute_dtype, cfg.attention_impl
        fan = 3 * pe * pe
        self.patchify_kernel = layers.param(torch_default(fan)(rngs.params(), (pe, pe, 3, de)),
                                       (None, None, None, layers.EMBED))
        self.patchify_bias = layers.param(torch_default(fan)(rngs.params(), (de,)), (layers.EMBED,))
        if cfg.query_low_rank:
            self.query_embedding = layers.param(
                jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (QUERY_TABLE, LOW_RANK)),
                (layers.QUERIES, None))
            self.query_linear = layers.linear(LOW_RANK, de, (None, layers.EMBED), rngs=rngs, dtype=dtype,
                                         kernel_init=torch_default(LOW_RANK),
                                         bias_init=torch_default(LOW_RANK))
        else:
            self.query_embedding = layers.param(
                layers.trunc_normal(0.02)(rngs.params(), (QUERY_TABLE, de)), (layers.QUERIES, layers.EMBED))
            self.query_linear = None
        self.encoder_layers = nnx.List([TransformerBlock(de, rngs=rngs, dtype=dtype, impl=impl)
                                        for _ in range(cfg.num_encoder_layers)])
        self.quant_in = layers.param(torch_default(de)(rngs.params(), (de, cfg.vq_dim)), (layers.EMBED, None))
        n_e = cfg.vq_codebook_size
        code = uniform_init(1.0 / n_e)(rngs.params(), (n_e, cfg.vq_dim))
        self.codebook = layers.param(code / jnp.linalg.norm(code, axis=-1, keepdims=True), (layers.VOCAB, None))
        self.quant_out = layers.param(torch_default(cfg.vq_dim)(rngs.params(), (cfg.vq_dim, dd)),
                                 (None, layers.EMBED))
        self.decoder_embedding = layers.param(layers.trunc_normal(0.02)(rngs.params(), (QUERY_TABLE, dd)),
                                         (layers.QUERIES, layers.EMBED))
        self.decoder_layers = nnx.List([TransformerBlock(dd, rngs=rngs, dtype=dtype, impl=impl)
                                        for _ in range(cfg.num_decoder_layers)])
        self.diff = DiffusionCore(cfg, rngs=rngs)

    # --- encoder ----------------------------------------------------------------------------------
    def encoder_rope(self, gh: int, gw: int):
        cfg = self.cfg
        grid = rope_2d_table(gh, gw, HEAD_DIM, cfg.rope_base_len, ROPE_AXES)
        return concat_tables(grid, identity_table(cfg.num_all_queries, HEAD_DIM))

    def queries(self):
        n = self.cfg.num_all_queries
        q = self.query_embedding[...][:n]
        if self.query_linear is not None:
            q = self.query_linear(q)
        return q.astype(jnp.float32)

    def encode(self, images, *, remat: str = "none", target: Target | None = None):
        """images: (B, H, W, 3) in [-1, 1] -> pre-quantisation latents (B, N, vq_dim) float32.
        ``remat``: the blocks' remat policy (nn.remat); ``target``: see dar_jax.parallel."""
        cfg = self.cfg
        target = target or default_target()
        dtype = cfg.compute_dtype
        p = cfg.encoder_patch_size
        b, h, w, _ = images.shape
        gh, gw = h // p, w // p
        xp = images.astype(dtype).reshape(b, gh, p, gw, p, 3)
        tok = jnp.einsum("bhpwqc,pqcd->bhwd", xp, self.patchify_kernel[...].astype(dtype),
                         preferred_element_type=jnp.float32)
        tok = tok.reshape(b, gh * gw, -1) + self.patchify_bias[...]
        tok = norm(tok)
        q = jnp.broadcast_to(self.queries()[None], (b,) + (cfg.num_all_queries, tok.shape[-1]))
        x = target.constrain(jnp.concatenate([tok, q], axis=1), ACT)
        rope = self.encoder_rope(gh, gw)
        fn = remat_policy.remat(lambda blk, x_: blk(x_, target, mask="prefix_causal", prefix_len=gh * gw,
                                         rope=rope, site="encoder.prefix_causal"), remat)
        for layer in self.encoder_layers:
            x = fn(layer, x)
        z = norm(x[:, -cfg.num_all_queries:])
        return jnp.einsum("bnd,dk->bnk", z.astype(dtype), self.quant_in[...].astype(dtype),
                          preferred_element_type=jnp.float32)

    # --- decoder layers -----------------------------------------------------------------------------
    def decoder_layers_forward(self, quant, *, remat: str = "none", target: Target | None = None):
        """quant: (B, N', vq_dim) (N' <= num_all_queries) -> cond (B, N', decoder_dim) float32."""
        dtype = self.cfg.compute_dtype
        target = target or default_target()
        n = quant.shape[1]
        x = jnp.einsum("bnk,kd->bnd", quant.astype(dtype), self.quant_out[...].astype(dtype),
                       preferred_element_type=jnp.float32)
        x = target.constrain(x + self.decoder_embedding[...][:n], ACT)
        fn = remat_policy.remat(lambda blk, x_: blk(x_, target, mask="causal", site="decoder_layers.causal"),
                     remat)
        for layer in self.decoder_layers:
            x = fn(layer, x)
        return norm(x).astype(jnp.float32)


PURE_TOKENIZER = PureModule(Tokenizer)
graphdef_and_abstract = PURE_TOKENIZER.graphdef_and_abstract
bind = PURE_TOKENIZER.bind  # bind(cfg, params) -> Tokenizer: the module holding params (cheap inside jit)
