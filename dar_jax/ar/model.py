"""LlamaGen's class-conditional GPT (the autoregressive half of D-AR) as a Flax NNX module.

Layout follows the reference so that its checkpoints map one to one: token embedding, class
embedding with an extra null class (CFG), one class-token prefix, pre-RMSNorm blocks with fused
qkv (no bias) + 1D RoPE over class + image positions, SwiGLU FFN, final RMSNorm, output head.
The public API is functional (``dar_jax.ar.forward`` etc. over a params pytree); this module is
the definition.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dar_jax.nn.layers import DTYPES
from dar_jax.config import ConfigError, sized_config
from dar_jax.nn import layers
from dar_jax.nn import remat as remat_policy
from dar_jax.nn.attention import attention, cache_layout
from dar_jax.nn.functional import PureModule
from dar_jax.nn.rope import apply_rope, rope_1d_table
from dar_jax.parallel.target import Target, default_target

# logical axes of activations (mapped to mesh axes by the same rules as the parameters)
ACT = ("batch", "length", "embed")
ACT_HEADS = ("batch", "length", "heads", "head_dim")
CACHE_BHSD = ("batch", "heads", "length", "head_dim")   # a heads-major KV cache

GPT_SIZES = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
    "GPT-XXXL": dict(n_layer=48, n_head=40, dim=2560),
}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Sizes and options of the AR model (one class token, model type class-to-image)."""
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    vocab_size: int = 16384
    block_size: int = 256
    num_classes: int = 1000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    class_dropout_prob: float = 0.1
    dtype: str = "float32"            # compute dtype; parameters are always float32
    attention_impl: str = "auto"      # see dar_jax.nn.attention
    remat: str = "none"               # training remat policy: none | full | dots | names (nn.remat)

    @property
    def remat_policy(self) -> str:
        """The remat policy training uses (``remat``; as ``TokenizerConfig.remat_policy``)."""
        return self.remat

    def __post_init__(self):
        try:
            object.__setattr__(self, "remat", remat_policy.canonical(self.remat))
        except ValueError as e:
            raise ConfigError(f"GPT {e}") from None
        if self.dim % self.n_head:
            raise ConfigError(f"GPT dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"GPT dtype {self.dtype!r} not in {sorted(DTYPES)}")
        for name in ("dim", "n_layer", "n_head", "vocab_size", "block_size", "num_classes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"GPT {name} must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        return layers.swiglu_hidden(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]


def gpt_config(model: str | None = None, **overrides: Any) -> GPTConfig:
    """A named size (``GPT-B``/``GPT-L``/``GPT-XL``/...) with overrides, or a custom one."""
    return sized_config(GPTConfig, GPT_SIZES, model, "GPT", **overrides)


class Attention(nnx.Module):
    """Fused-qkv causal self-attention with 1D RoPE and an explicit KV cache."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        h, d, std = cfg.n_head, cfg.head_dim, cfg.initializer_range
        self.cfg = cfg
        self.wqkv = layers.param(layers.normal(std)(rngs.params(), (cfg.dim, 3, h, d)),
                            (layers.EMBED, None, layers.HEADS, layers.HEAD_DIM))
        self.wo = layers.param(layers.normal(std)(rngs.params(), (h, d, cfg.dim)),
                          (layers.HEADS, layers.HEAD_DIM, layers.EMBED))

    def qkv(self, x, cos, sin, target: Target):
        """x: (B, L, D) -> q, k, v: (B, L, H, Dh), q and k rotated."""
        dtype = self.cfg.compute_dtype
        qkv = jnp.einsum("bld,dthk->blthk", x.astype(dtype), self.wqkv[...].astype(dtype))
        qkv = remat_policy.name(target.constrain(qkv, ("batch", "length", None, "heads", "head_dim")), "qkv")
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, y, target: Target):
        dtype = self.cfg.compute_dtype
        y = remat_policy.name(target.constrain(y, ACT_HEADS), "context")
        out = jnp.einsum("blhk,hkd->bld", y, self.wo[...].astype(dtype))
        return remat_policy.name(target.constrain(out, ACT), "attn_out")

    def __call__(self, x, cos, sin, target: Target):
        """Full causal self-attention. x: (B, L, D)."""
        q, k, v = self.qkv(x, cos, sin, target)
        y = attention(q, k, v, mask="causal", implementation=self.cfg.attention_impl,
                      target=target, site="gpt.causal")
        return self.out(y, target)

    def decode(self, x, cos, sin, cache, pos, target: Target):
        """Attention of Lq new positions [pos, pos+Lq) against the cache.

        x: (B, Lq, D); cache: (k, v) each (B, S, H, Dh), or (B, H, S, Dh) where
        ``cache_layout`` says "bhsd" (see ``GPT.init_cache``); returns (B, Lq, D), new cache.
        """
        q, k, v = self.qkv(x, cos, sin, target)
        layout = cache_layout(self.cfg.attention_impl, target.platform)
        if layout == "bhsd":
            k, v, at, axes = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), (0, 0, pos, 0), CACHE_BHSD
        else:
            at, axes = (0, pos, 0, 0), ACT_HEADS
        ck, cv = cache
        ck = target.constrain(jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), at), axes)
        cv = target.constrain(jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), at), axes)
        kv_len = jnp.full((x.shape[0],), pos + x.shape[1], jnp.int32)
        y = attention(q, ck, cv, mask="decode", kv_len=kv_len, kv_layout=layout,
                      implementation=self.cfg.attention_impl, target=target, site="gpt.decode")
        return self.out(y, target), (ck, cv)


class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attention_norm = layers.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg, rngs=rngs)
        self.ffn_norm = layers.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = layers.SwiGLU(cfg.dim, cfg.ffn_hidden, rngs=rngs, dtype=cfg.compute_dtype,
                                     init_std=cfg.initializer_range)

    def ffn(self, h, target: Target):
        return target.constrain(self.feed_forward(self.ffn_norm(h), target), ACT)

    def __call__(self, x, cos, sin, target: Target, keys=(None, None)):
        cfg = self.cfg
        a = self.attention(self.attention_norm(x), cos, sin, target)
        h = x + layers.dropout(a, cfg.resid_dropout_p, keys[0])
        return target.constrain(h + layers.dropout(self.ffn(h, target), cfg.ffn_dropout_p, keys[1]), ACT)

    def decode(self, x, cos, sin, cache, pos, target: Target):
        a, cache = self.attention.decode(self.attention_norm(x), cos, sin, cache, pos, target)
        h = x + a
        return target.constrain(h + self.ffn(h, target), ACT), cache


class GPT(nnx.Module):
    """Class-conditional GPT. See :class:`GPTConfig`."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        std = cfg.initializer_range
        self.tok_embeddings = layers.param(layers.normal(std)(rngs.params(), (cfg.vocab_size, cfg.dim)),
                                      (layers.VOCAB, layers.EMBED))
        self.cls_embedding = layers.param(layers.normal(std)(rngs.params(), (cfg.num_classes + 1, cfg.dim)),
                                     (layers.CLASSES, layers.EMBED))
        self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
        self.norm = layers.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = layers.param(jnp.zeros((cfg.dim, cfg.vocab_size)), (layers.EMBED, layers.VOCAB))

    # --- pieces -------------------------------------------------------------------------------
    def rope(self):
        return rope_1d_table(self.cfg.block_size + 1, self.cfg.head_dim, self.cfg.rope_base)

    def embed_tokens(self, tokens):
        return jnp.take(self.tok_embeddings[...], tokens, axis=0).astype(self.cfg.compute_dtype)

    def embed_labels(self, labels):
        return jnp.take(self.cls_embedding[...], labels, axis=0).astype(self.cfg.compute_dtype)

    def head(self, h, target: Target):
        """Final norm + output projection -> float32 logits."""
        dtype = self.cfg.compute_dtype
        h = self.norm(h)
        logits = jnp.einsum("bld,dv->blv", h, self.output[...].astype(dtype)).astype(jnp.float32)
        return target.constrain(logits, ("batch", "length", "vocab"))

    # --- training-style forward ----------------------------------------------------------------
    def __call__(self, tokens, labels, *, dropout_key=None, target: Target | None = None):
        """Teacher-forced forward.

        tokens: (B, T) int image tokens (inputs, i.e. targets[:, :-1]); labels: (B,) int.
        Returns float32 logits (B, T + 1, V): position i predicts image token i.
        With ``dropout_key`` the training regularisation is on: labels dropped to the null class
        with ``class_dropout_prob``, token / residual / FFN dropout. ``target``: the platform,
        mesh and rules the program is built for (default: the first device).
        """
        cfg = self.cfg
        target = target or default_target()
        keys = layers.KeySplitter(dropout_key)
        if dropout_key is not None and cfg.class_dropout_prob > 0:
            drop = jax.random.uniform(keys(), labels.shape) < cfg.class_dropout_prob
            labels = jnp.where(drop, cfg.num_classes, labels)
        x = jnp.concatenate([self.embed_labels(labels)[:, None], self.embed_tokens(tokens)], axis=1)
        x = target.constrain(layers.dropout(x, cfg.token_dropout_p, keys()), ACT)
        cos, sin = self.rope()
        cos, sin = cos[: x.shape[1]], sin[: x.shape[1]]
        block = remat_policy.remat(lambda blk, x_, k_: blk(x_, cos, sin, target, k_), cfg.remat)
        for layer in self.layers:
            x = block(layer, x, (keys(), keys()))
        return self.head(x, target)

    # --- KV-cache decoding -----------------------------------------------------------------------
    def init_cache(self, batch: int, dtype=None, target: Target | None = None):
        """Zeroed KV cache: per layer (k, v), each (B, 1 + block_size, H, Dh), or (B, H, 1 +
        block_size, Dh) where the target's decode attention reads it heads-major
        (``nn.attention.cache_layout``)."""
        cfg = self.cfg
        target = target or default_target()
        shape = (batch, cfg.block_size + 1, cfg.n_head, cfg.head_dim)
        if cache_layout(cfg.attention_impl, target.platform) == "bhsd":
            shape = (batch, cfg.n_head, cfg.block_size + 1, cfg.head_dim)
        dtype = dtype or cfg.compute_dtype
        return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.n_layer))

    def decode(self, x, pos, cache, target: Target | None = None):
        """Runs embeddings x: (B, Lq, D) at positions [pos, pos+Lq) through the model with the cache.

        Returns float32 logits (B, Lq, V) and the updated cache.
        """
        target = target or default_target()
        cos, sin = self.rope()
        lq = x.shape[1]
        cos = jax.lax.dynamic_slice_in_dim(jnp.asarray(cos), pos, lq)
        sin = jax.lax.dynamic_slice_in_dim(jnp.asarray(sin), pos, lq)
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache):
            x, layer_cache = layer.decode(x, cos, sin, layer_cache, pos, target)
            new_cache.append(layer_cache)
        return self.head(x, target), tuple(new_cache)


PURE_GPT = PureModule(GPT)
graphdef_and_abstract = PURE_GPT.graphdef_and_abstract
bind = PURE_GPT.bind  # bind(cfg, params) -> GPT: the module holding params (cheap inside jit)
