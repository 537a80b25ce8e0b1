"""A working time-conditioned PatchGAN for tokenizer training (optional, off by default).

The reference's discriminator (PatchGAN whose normalisations are modulated by the flow time t)
is called with the wrong arguments and never ran; this one follows its design: 4x4 convs with
stride 2, GroupNorm without affine parameters modulated per channel by an embedding of t
(gamma = 1 + a(t), beta = b(t)), LeakyReLU(0.2), and a 1-channel patch map of logits.
Losses are non-saturating; the discriminator loss may be weighted by t as the reference intends
(one-step predictions at small t are blurry by nature).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dar_jax.nn import layers
from dar_jax.nn.functional import PureModule
from dar_jax.tokenizer.model import timestep_embedding


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    ndf: int = 64
    n_layers: int = 3
    groups: int = 16
    time_freq_dim: int = 256
    dtype: str = "float32"


class _Conv(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs, dtype):
        self.conv = nnx.Conv(cin, cout, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                             dtype=dtype, param_dtype=jnp.float32,
                             kernel_init=layers.with_axes(layers.normal(0.02), (None, None, None, None)),
                             bias_init=layers.with_axes(layers.zeros, (None,)), rngs=rngs)

    def __call__(self, x):
        return self.conv(x)


class _TimeNorm(nnx.Module):
    """GroupNorm (no affine) modulated by the time embedding."""

    def __init__(self, channels: int, groups: int, freq_dim: int, *, rngs: nnx.Rngs):
        self.groups = min(groups, channels)
        self.freq_dim = freq_dim
        self.embed = layers.linear(freq_dim, 2 * channels, (None, None), rngs=rngs,
                              kernel_init=layers.trunc_normal(0.01))

    def __call__(self, x, t):
        b, h, w, c = x.shape
        g = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = g.mean(axis=(1, 2, 4), keepdims=True)
        var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
        normed = ((g - mean) * jax.lax.rsqrt(var + 1e-5)).reshape(b, h, w, c)
        gamma, beta = jnp.split(self.embed(timestep_embedding(t * 1000.0, self.freq_dim)), 2, axis=-1)
        return (normed * (1.0 + gamma[:, None, None]) + beta[:, None, None]).astype(x.dtype)


class PatchDiscriminator(nnx.Module):
    """images (B, H, W, 3) in [-1, 1], t (B,) -> patch logits (B, H', W', 1) float32."""

    def __init__(self, cfg: DiscriminatorConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.first = _Conv(3, cfg.ndf, 2, rngs=rngs, dtype=dtype)
        convs, norms = [], []
        cin = cfg.ndf
        for n in range(1, cfg.n_layers + 1):
            cout = cfg.ndf * min(2 ** n, 8)
            convs.append(_Conv(cin, cout, 2 if n < cfg.n_layers else 1, rngs=rngs, dtype=dtype))
            norms.append(_TimeNorm(cout, cfg.groups, cfg.time_freq_dim, rngs=rngs))
            cin = cout
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        self.last = _Conv(cin, 1, 1, rngs=rngs, dtype=dtype)

    def __call__(self, x, t):
        h = jax.nn.leaky_relu(self.first(x), 0.2)
        for conv, norm in zip(self.convs, self.norms):
            h = jax.nn.leaky_relu(norm(conv(h), t), 0.2)
        return self.last(h).astype(jnp.float32)


PURE_DISCRIMINATOR = PureModule(PatchDiscriminator)
init_params = PURE_DISCRIMINATOR.init_params


def apply(cfg: DiscriminatorConfig, params, images, t):
    return PURE_DISCRIMINATOR.bind(cfg, params)(images, t)


def d_loss(logits_real, logits_fake, weight=None):
    """Non-saturating discriminator loss: 0.5 (softplus(-real) + softplus(fake)), optionally
    weighted per example (weight: (B,))."""
    def per_example(x):
        return x.reshape(x.shape[0], -1).mean(axis=1)
    real = per_example(jax.nn.softplus(-logits_real))
    fake = per_example(jax.nn.softplus(logits_fake))
    w = jnp.ones_like(real) if weight is None else weight
    return 0.5 * (jnp.mean(w * real) + jnp.mean(w * fake))


def g_loss(logits_fake):
    """Non-saturating generator loss: softplus(-D(fake))."""
    return jnp.mean(jax.nn.softplus(-logits_fake))
