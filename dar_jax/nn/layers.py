"""Norms, linear layers and MLPs: the one place for each.

Parameters are float32 and carry logical axis names (``nnx.with_partitioning``) that
``dar_jax.parallel`` maps to mesh axes by the rules of a config. Computation runs in the module's
``dtype`` (float32 or bfloat16); norms always compute their statistics in float32.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

Dtype = Any
Axes = tuple[str | None, ...]

# Logical axis names used by every model of the project.
EMBED, MLP, HEADS, HEAD_DIM, VOCAB, NORM, CLASSES, QUERIES = (
    "embed", "mlp", "heads", "head_dim", "vocab", "norm", "classes", "queries")

# compute dtypes a config may name (parameters stay float32)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def with_axes(init: Callable, axes: Axes) -> Callable:
    """An initializer whose parameter carries logical ``axes`` (one name or None per dim).

    Placement is not eager: shardings are applied by ``dar_jax.parallel`` (jit out_shardings).
    """
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def param(value: jax.Array, axes: Axes) -> nnx.Param:
    """A float32 parameter holding ``value`` with logical ``axes``."""
    return nnx.Param(jnp.asarray(value, jnp.float32), out_sharding=tuple(axes), eager_sharding=False)


def normal(std: float) -> Callable:
    return jax.nn.initializers.normal(stddev=std)


def trunc_normal(std: float) -> Callable:
    return jax.nn.initializers.truncated_normal(stddev=std)


zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones


def layer_norm(x: jax.Array, eps: float = 1e-6, scale: jax.Array | None = None,
               bias: jax.Array | None = None) -> jax.Array:
    """LayerNorm over the last axis, statistics in float32 (torch semantics: biased variance)."""
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centered = x32 - mean
    var = jnp.mean(centered * centered, axis=-1, keepdims=True)
    y = centered * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float = 1e-5) -> jax.Array:
    """LlamaGen RMSNorm: x * rsqrt(mean(x^2) + eps) in float32, cast back, times weight."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * weight.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with optional affine parameters (``scale``/``bias``)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, affine: bool = True, rngs: nnx.Rngs | None = None):
        del rngs
        self.eps = eps
        self.affine = affine
        if affine:
            self.scale = param(jnp.ones((dim,)), (NORM,))
            self.bias = param(jnp.zeros((dim,)), (NORM,))

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.affine:
            return layer_norm(x, self.eps, self.scale[...], self.bias[...])
        return layer_norm(x, self.eps)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-5, rngs: nnx.Rngs | None = None):
        del rngs
        self.eps = eps
        self.weight = param(jnp.ones((dim,)), (NORM,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


def linear(in_features: int, out_features: int, axes: Axes, *, rngs: nnx.Rngs,
           use_bias: bool = True, dtype: Dtype = jnp.float32,
           kernel_init: Callable = trunc_normal(0.02), bias_init: Callable = zeros) -> nnx.Linear:
    """``nnx.Linear`` with float32 parameters, compute ``dtype`` and logical ``axes`` (in, out)."""
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=with_axes(kernel_init, axes), bias_init=with_axes(bias_init, (axes[1],)),
        rngs=rngs)


class Mlp(nnx.Module):
    """timm ``Mlp``: fc1 -> SiLU -> fc2, both with bias. x: (..., dim) -> (..., out_dim)."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, *, rngs: nnx.Rngs,
                 dtype: Dtype = jnp.float32, activation: Callable = jax.nn.silu):
        self.fc1 = linear(dim, hidden, (EMBED, MLP), rngs=rngs, dtype=dtype)
        self.fc2 = linear(hidden, out_dim or dim, (MLP, EMBED), rngs=rngs, dtype=dtype)
        self.activation = activation

    def __call__(self, x: jax.Array, target=None) -> jax.Array:
        h = self.fc1(x)
        if target is not None:
            h = target.constrain(h, ("batch", "length", "mlp")[-h.ndim:])
        return checkpoint_name(self.fc2(self.activation(checkpoint_name(h, "mlp_hidden"))), "mlp_out")


def swiglu_hidden(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """LlamaGen's SwiGLU hidden size: 2/3 * 4 * dim, optionally scaled, rounded up to a multiple."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return -(-hidden // multiple_of) * multiple_of


class SwiGLU(nnx.Module):
    """w2(silu(w1 x) * w3 x), no biases unless ``use_bias`` (DINOv2 ViT-g). x: (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 init_std: float = 0.02, use_bias: bool = False):
        self.w1 = linear(dim, hidden, (EMBED, MLP), rngs=rngs, use_bias=use_bias, dtype=dtype,
                         kernel_init=normal(init_std))
        self.w3 = linear(dim, hidden, (EMBED, MLP), rngs=rngs, use_bias=use_bias, dtype=dtype,
                         kernel_init=normal(init_std))
        self.w2 = linear(hidden, dim, (MLP, EMBED), rngs=rngs, use_bias=use_bias, dtype=dtype,
                         kernel_init=normal(init_std))

    def __call__(self, x: jax.Array, target=None) -> jax.Array:
        """``target`` (a ``dar_jax.parallel.Target``): shard the hidden (B, L, F) activations."""
        gate, up = self.w1(x), self.w3(x)
        if target is not None:
            gate, up = (target.constrain(a, ("batch", "length", "mlp")[-a.ndim:]) for a in (gate, up))
        gate, up = checkpoint_name(gate, "mlp_hidden"), checkpoint_name(up, "mlp_hidden")
        return checkpoint_name(self.w2(jax.nn.silu(gate) * up), "mlp_out")


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when ``key`` is None or ``rate`` is 0."""
    if key is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class KeySplitter:
    """Hands out fresh PRNG keys from one key (None stays None: no randomness, e.g. eval)."""

    def __init__(self, key: jax.Array | None):
        self._key = key

    def __call__(self) -> jax.Array | None:
        if self._key is None:
            return None
        self._key, sub = jax.random.split(self._key)
        return sub
