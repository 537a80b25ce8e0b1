"""The tokenizer's functions over (cfg, params): parameters, input checks, encoder and quantizer,
decoder layers, one evaluation of the diffusion network. Images NHWC float32 in [-1, 1]; the
sequential decode is in :mod:`dar_jax.tokenizer.sequential`."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dar_jax.parallel.host import host_local_values
from dar_jax.tokenizer import quantizer
from dar_jax.tokenizer.config import TokenizerConfig, TokenizerInputError
from dar_jax.tokenizer.model import PURE_TOKENIZER, bind
from dar_jax.tokenizer.quantizer import Quantized


class ImageRangeError(TokenizerInputError):
    """Image values outside [-1, 1] where checking was asked for."""


class CodeRangeError(TokenizerInputError):
    """Codes outside the codebook."""


# ----------------------------------------------------------------------------------------------
# parameters
# ----------------------------------------------------------------------------------------------
init_params = PURE_TOKENIZER.init_params          # (cfg, key) -> params (pure dict, float32)
abstract_params = PURE_TOKENIZER.abstract_params  # (cfg) -> ShapeDtypeStruct pytree
logical_axes = PURE_TOKENIZER.logical_axes        # (cfg) -> logical axis names, like the params


def num_params(cfg: TokenizerConfig) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg))))


# ----------------------------------------------------------------------------------------------
# input checks (host side; shapes are checked also under jit, values only on concrete arrays)
# ----------------------------------------------------------------------------------------------
def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_images(cfg: TokenizerConfig, images, *, check_range: bool = False) -> None:
    """images: (B, H, W, 3), H and W multiples of both patch sizes; values in [-1, 1] if asked."""
    shape = tuple(np.shape(images))
    if len(shape) != 4:
        raise TokenizerInputError(f"images must be (B, H, W, 3) NHWC, got shape {shape}")
    if shape[-1] != 3:
        raise TokenizerInputError(f"images must have 3 channels (NHWC, RGB), got {shape[-1]} "
                                  f"(shape {shape}; NCHW input must be transposed)")
    cfg.check_image_size(shape[1], shape[2])
    if check_range and _concrete(images):
        arr = host_local_values(images)   # a global array: the rows this process holds
        lo, hi = float(arr.min()), float(arr.max())
        if not np.isfinite([lo, hi]).all() or lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
            raise ImageRangeError(f"image values must lie in [-1, 1], got [{lo:.4g}, {hi:.4g}]")


def check_codes(cfg: TokenizerConfig, codes) -> None:
    """codes: (B, N') integers in [0, vq_codebook_size), N' <= num_all_queries."""
    shape = tuple(np.shape(codes))
    if len(shape) != 2:
        raise TokenizerInputError(f"codes must be (B, N), got shape {shape}")
    if shape[1] > cfg.num_all_queries:
        raise TokenizerInputError(f"{shape[1]} codes per image, the tokenizer has "
                                  f"{cfg.num_all_queries} queries")
    if not jnp.issubdtype(jnp.asarray(codes).dtype if _concrete(codes) else codes.dtype, jnp.integer):
        raise TokenizerInputError(f"codes must be integers, got {codes.dtype}")
    if _concrete(codes) and np.size(codes):
        arr = host_local_values(codes)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= cfg.vq_codebook_size:
            raise CodeRangeError(f"codes must lie in [0, {cfg.vq_codebook_size}), got [{lo}, {hi}]")


# ----------------------------------------------------------------------------------------------
# encoder and quantizer
# ----------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg", "remat", "target"))
def _latents(cfg, params, images, remat="none", target=None):
    return bind(cfg, params).encode(images, remat=remat, target=target)


@functools.partial(jax.jit, static_argnames=("cfg", "target"))
def _encode(cfg, params, images, target=None):
    model = bind(cfg, params)
    return quantizer.quantize(model.encode(images, target=target), model.codebook[...]).codes


def encode(cfg: TokenizerConfig, params, images, *, check_range: bool = False,
           target=None) -> jax.Array:
    """images (B, H, W, 3) in [-1, 1] -> codes (B, num_all_queries) int32. ``target``: the
    ``dar_jax.parallel.Target`` of the program (default: the first device)."""
    check_images(cfg, images, check_range=check_range)
    return _encode(cfg, params, jnp.asarray(images), target)


def _remat(cfg: TokenizerConfig, remat: str | bool | None) -> str:
    from dar_jax.nn.remat import canonical
    return cfg.remat_policy if remat is None else canonical(remat)


def encode_latents(cfg: TokenizerConfig, params, images, *, check_range: bool = False,
                   remat: str | bool | None = None, target=None) -> Quantized:
    """Training-facing encode: Quantized(quant (straight-through), codes, z_norm, z_q), each
    (B, N, vq_dim) except codes; differentiable w.r.t. params. ``remat`` (default: the config's
    ``remat_policy``) rematerialises the blocks in the backward pass (``dar_jax.nn.remat``)."""
    check_images(cfg, images, check_range=check_range)
    z = _latents(cfg, params, jnp.asarray(images), _remat(cfg, remat), target)
    return quantizer.quantize(z, params["codebook"])


# ----------------------------------------------------------------------------------------------
# decoder layers
# ----------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg", "remat", "target"))
def _quant_to_cond(cfg, params, quant, remat="none", target=None):
    return bind(cfg, params).decoder_layers_forward(quant, remat=remat, target=target)


def quant_to_cond(cfg: TokenizerConfig, params, quant: jax.Array, *,
                  remat: str | bool | None = None, target=None) -> jax.Array:
    """Causal decoder layers: quant (B, N', vq_dim) -> cond (B, N', decoder_dim), N' <= N.
    Causal, so cond[:, :k] depends only on quant[:, :k] (streaming, layout control)."""
    if quant.ndim != 3 or quant.shape[-1] != cfg.vq_dim or quant.shape[1] > cfg.num_all_queries:
        raise TokenizerInputError(f"quant must be (B, N <= {cfg.num_all_queries}, {cfg.vq_dim}), "
                                  f"got {quant.shape}")
    return _quant_to_cond(cfg, params, quant, _remat(cfg, remat), target)


def codes_to_quant(cfg: TokenizerConfig, params, codes, *, check: bool = True) -> jax.Array:
    """Normalised code vectors (B, N', vq_dim) of codes (B, N')."""
    if check:
        check_codes(cfg, codes)
    return quantizer.lookup(jnp.asarray(codes, jnp.int32), params["codebook"])


@functools.partial(jax.jit, static_argnames=("cfg", "target"))
def _codes_to_cond(cfg, params, codes, target=None):
    model = bind(cfg, params)
    return model.decoder_layers_forward(quantizer.lookup(codes, model.codebook[...]), target=target)


def codes_to_cond(cfg: TokenizerConfig, params, codes, *, check: bool = True,
                  target=None) -> jax.Array:
    """codes (B, N') int -> cond (B, N', decoder_dim) float32 (N' <= num_all_queries)."""
    if check:
        check_codes(cfg, codes)
    return _codes_to_cond(cfg, params, jnp.asarray(codes, jnp.int32), target)


# ----------------------------------------------------------------------------------------------
# diffusion network
# ----------------------------------------------------------------------------------------------
def velocity(cfg: TokenizerConfig, params, x_t: jax.Array, t: jax.Array, cond_group: jax.Array, *,
             return_repa: bool = False, remat: str | bool | None = None, target=None):
    """One evaluation of the diffusion network (pure; jit it, or call inside a jitted step).

    x_t: (B, H, W, 3) (flow space: data x std); t: (B,) shifted time in [0, 1];
    cond_group: (B, Lc, decoder_dim) condition window. Returns v (B, H, W, 3) float32, and with
    ``return_repa`` also the REPA projection (B, L', 768) of the hidden state entering block
    ``repa_layer`` (pooled by rows // 16, at least 1; needs ``cfg.repa_projector``). ``remat``
    (default: the config's ``remat_policy``) rematerialises blocks in the backward pass.
    """
    net = bind(cfg, params).diff
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x_t.shape[0],))
    return net(x_t, t, net.prepare_cond(cond_group, target), return_repa=return_repa,
               remat=_remat(cfg, remat), target=target)
