"""The FID Inception network (TF 2015-12-05 graph as ported by pytorch-fid) in Flax NNX.

torchvision's Inception3 with pytorch-fid's FID variants of the Mixed blocks (average pools that
exclude padding, a max pool in the last block) and a 1008-way ``fc``. Weights come from
pytorch-fid's released file (``pt_inception-2015-12-05-*.pth``) through the project's safe
loader; attribute names follow its keys one to one.

    cfg = inception.InceptionConfig()                     # protocol "pytorch_fid" or "adm"
    params = inception.load_params("pt_inception-2015-12-05-6726825d.pth")
    pool3, logits = inception.forward(cfg, params, images)    # images (B, H, W, 3) in [0, 1]
    extract = inception.feature_extractor(cfg, params)        # batched, sharded over devices
    feats = extract(uint8_images)                             # Features(pool3, logits), NumPy

Protocols (what happens before the network and which logits come out):
  ``pytorch_fid``: bilinear resize to 299 with half-pixel centres and no antialias (torch's
      ``F.interpolate(mode="bilinear", align_corners=False)``), then ``2 x - 1``;
      logits = ``fc(pool3)`` with its bias.
  ``adm``: what the TF graph of the ADM evaluator does to the [0, 255] pixels it is fed:
      TF1 ``ResizeBilinear`` (no half-pixel centres) to 299, then ``(v - 128) / 128``;
      logits = ``pool3 @ fc.weight.T`` without the bias (the ADM suite rebuilds the softmax
      from the MatMul weight alone).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dar_jax.errors import DarError
from dar_jax.checkpoint import mapping
from dar_jax.checkpoint.torch_pickle import find_state_dict, load_torch_file
from dar_jax.config import ConfigError
from dar_jax.nn import layers
from dar_jax.nn.functional import PureModule

POOL3_DIM = 2048
NUM_LOGITS = 1008
MIN_SIZE = 75                  # the smallest input the network's strides and pools accept
PROTOCOLS = ("pytorch_fid", "adm")
BN_EPS = 1e-3
HIGHEST = jax.lax.Precision.HIGHEST


class ImageInputError(DarError, ValueError):
    """Images with the wrong layout, dtype or value range for the Inception network."""


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
    """How images reach the network (see the module docstring for the two protocols)."""
    protocol: str = "pytorch_fid"
    image_size: int = 299            # inputs are resized to (image_size, image_size)

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"Inception protocol {self.protocol!r} not in {list(PROTOCOLS)}")
        if self.image_size < MIN_SIZE:
            raise ConfigError(f"Inception image_size must be >= {MIN_SIZE}, got {self.image_size}")


class Features(NamedTuple):
    """pool3: (N, 2048) features for FID and precision/recall; logits: (N, 1008) for IS."""
    pool3: np.ndarray
    logits: np.ndarray


# ----------------------------------------------------------------------------- preprocessing

def resize_bilinear_torch(x: jax.Array, size: int) -> jax.Array:
    """(B, H, W, C) -> (B, size, size, C) as torch's bilinear ``align_corners=False``, no antialias."""
    b, _, _, c = x.shape
    return jax.image.resize(x, (b, size, size, c), "bilinear", antialias=False, precision=HIGHEST)


def tf1_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) weights of TF1 ``ResizeBilinear(align_corners=False)`` along one axis.

    The legacy op samples source position ``i * in / out`` (no half-pixel offset) and clamps the
    upper neighbour to the last pixel.
    """
    src = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    w = np.zeros((out_size, in_size), np.float64)
    np.add.at(w, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(w, (np.arange(out_size), hi), frac)
    return w.astype(np.float32)


def resize_bilinear_tf1(x: jax.Array, size: int) -> jax.Array:
    """(B, H, W, C) -> (B, size, size, C) as TF1 ``ResizeBilinear`` (the ADM evaluator's graph)."""
    wh = jnp.asarray(tf1_bilinear_matrix(x.shape[1], size))
    ww = jnp.asarray(tf1_bilinear_matrix(x.shape[2], size))
    x = jnp.einsum("oh,bhwc->bowc", wh, x, precision=HIGHEST)
    return jnp.einsum("pw,bowc->bopc", ww, x, precision=HIGHEST)


def preprocess(cfg: InceptionConfig, images: jax.Array) -> jax.Array:
    """images (B, H, W, 3) float in [0, 1] -> network input (B, S, S, 3) roughly in [-1, 1]."""
    x = images.astype(jnp.float32)
    if cfg.protocol == "adm":
        return (resize_bilinear_tf1(x * 255.0, cfg.image_size) - 128.0) / 128.0
    return 2.0 * resize_bilinear_torch(x, cfg.image_size) - 1.0


# ----------------------------------------------------------------------------- network

def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def max_pool(x: jax.Array, window: int, stride: int, pad: int = 0) -> jax.Array:
    """Max pool over H, W of (B, H, W, C); padding (if any) never wins."""
    p = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                                 (1, stride, stride, 1), p)


def avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
    """3x3, stride 1, padding 1 average that counts only real pixels (count_include_pad=False)."""
    p = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), p)
    ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), p)
    return total / count


class FrozenBatchNorm(nnx.Module):
    """Inference batch norm with the running statistics as (frozen) parameters."""

    def __init__(self, dim: int):
        self.scale = layers.param(jnp.ones((dim,)), (None,))
        self.bias = layers.param(jnp.zeros((dim,)), (None,))
        self.mean = layers.param(jnp.zeros((dim,)), (None,))
        self.var = layers.param(jnp.ones((dim,)), (None,))

    def __call__(self, x: jax.Array) -> jax.Array:
        mul = self.scale[...] * jax.lax.rsqrt(self.var[...] + BN_EPS)
        return (x - self.mean[...]) * mul + self.bias[...]


class BasicConv2d(nnx.Module):
    """Conv (no bias) -> batch norm (eps 1e-3) -> ReLU. x: (B, H, W, cin) -> (B, H', W', cout)."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0, *, rngs: nnx.Rngs):
        ph, pw = _pair(padding)
        self.conv = nnx.Conv(cin, cout, _pair(kernel), _pair(stride), padding=((ph, ph), (pw, pw)),
                             use_bias=False, precision=HIGHEST,
                             kernel_init=layers.with_axes(nnx.initializers.lecun_normal(),
                                                     (None, None, None, None)),
                             rngs=rngs)
        self.bn = FrozenBatchNorm(cout)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


class FIDInceptionA(nnx.Module):
    """Mixed_5b/5c/5d: 1x1 | 5x5 | double 3x3 | avg pool (padding excluded) -> 1x1."""

    def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

    def __call__(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([self.branch1x1(x), b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a (grid reduction): strided 3x3 | double 3x3 | max pool."""

    def __init__(self, cin: int, *, rngs: nnx.Rngs):
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, max_pool(x, 3, 2)], axis=-1)


class FIDInceptionC(nnx.Module):
    """Mixed_6b..6e: 1x1 | factorised 7x7 | double factorised 7x7 | avg pool -> 1x1."""

    def __init__(self, cin: int, c7: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

    def __call__(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([self.branch1x1(x), b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
    """Mixed_7a (grid reduction): 1x1 -> strided 3x3 | 1x1 -> 1x7 -> 7x1 -> strided 3x3 | max pool."""

    def __init__(self, cin: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return jnp.concatenate([b3, b7, max_pool(x, 3, 2)], axis=-1)


class FIDInceptionE(nnx.Module):
    """Mixed_7b (avg pool, padding excluded) and Mixed_7c (``max_pool_branch``: 3x3 max pool)."""

    def __init__(self, cin: int, *, max_pool_branch: bool, rngs: nnx.Rngs):
        self.max_pool_branch = max_pool_branch
        self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        pooled = max_pool(x, 3, 1, pad=1) if self.max_pool_branch else avg_pool_3x3_exclude_pad(x)
        return jnp.concatenate([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], axis=-1)


class FIDInception(nnx.Module):
    """Preprocessed input (B, S, S, 3) -> (pool3 (B, 2048), fc logits without bias (B, 1008))."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
        self.Mixed_5b = FIDInceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = FIDInceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = FIDInceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = FIDInceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = FIDInceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = FIDInceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = FIDInceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = FIDInceptionE(1280, max_pool_branch=False, rngs=rngs)
        self.Mixed_7c = FIDInceptionE(2048, max_pool_branch=True, rngs=rngs)
        self.fc = nnx.Linear(POOL3_DIM, NUM_LOGITS, precision=HIGHEST, rngs=rngs,
                             kernel_init=layers.with_axes(nnx.initializers.lecun_normal(), (None, None)),
                             bias_init=layers.with_axes(layers.zeros, (None,)))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool(x, 3, 2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = max_pool(x, 3, 2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        pool3 = jnp.mean(x, axis=(1, 2))
        logits = jnp.dot(pool3, self.fc.kernel[...], precision=HIGHEST)
        return pool3, logits


# ----------------------------------------------------------------------------- functional API

PURE_INCEPTION = PureModule(FIDInception)   # no config: cfg=None


def init_params(key: jax.Array):
    """Random parameters (pure dict pytree, float32) for tests: He-normal kernels, zero fc bias,
    identity batch norms (scale 1, bias 0, mean 0, var 1).

    One normal draw of all kernel entries, sliced on the host: initialising the ~100 modules
    one by one costs tens of seconds of compilation on CPU.
    """
    flat = mapping.flat_paths(abstract_params())
    kernels = [p for p in flat if p[-1] == "kernel"]
    sizes = [int(np.prod(flat[p].shape)) for p in kernels]
    z = np.asarray(jax.random.normal(key, (sum(sizes),), jnp.float32))
    out, offset = {}, 0
    for path, size in zip(kernels, sizes):
        shape = flat[path].shape
        out[path] = z[offset:offset + size].reshape(shape) * np.float32(np.sqrt(2.0 / np.prod(shape[:-1])))
        offset += size
    for path, leaf in flat.items():
        if path[-1] != "kernel":
            fill = 1.0 if path[-1] in ("scale", "var") else 0.0
            out[path] = np.full(leaf.shape, fill, np.float32)
    return jax.tree.map(jnp.asarray, mapping.unflatten(out))


def abstract_params():
    """ShapeDtypeStruct pytree of the parameters (nothing allocated)."""
    return PURE_INCEPTION.abstract_params()


def bind(params) -> FIDInception:
    """The module holding ``params``; cheap inside jit."""
    return PURE_INCEPTION.bind(None, params)


def forward(cfg: InceptionConfig, params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images (B, H, W, 3) float in [0, 1] -> (pool3 (B, 2048), logits (B, 1008)), float32.

    Logits follow ``cfg.protocol``: with the fc bias (pytorch_fid) or without it (adm).
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ImageInputError(f"Inception expects NHWC images (B, H, W, 3), got shape {images.shape}")
    pool3, logits = bind(params)(preprocess(cfg, images))
    if cfg.protocol == "pytorch_fid":
        logits = logits + params["fc"]["bias"]
    return pool3, logits


_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def conv_kernel(w):
    """torch Conv2d (out, in, kh, kw) -> (kh, kw, in, out)."""
    return w.transpose(2, 3, 1, 0)


def torch_key_map() -> mapping.KeyMap:
    """pytorch-fid key -> (param path, transform), derived from the parameter tree."""
    km: mapping.KeyMap = {}
    for path in mapping.flat_paths(abstract_params()):
        *mod, leaf = path
        if mod[-1] == "conv":
            km[".".join(mod) + ".weight"] = (path, conv_kernel)
        elif mod[-1] == "bn":
            km[".".join(mod) + "." + _BN_NAMES[leaf]] = (path, mapping.identity)
        elif mod == ["fc"]:
            km[f"fc.{'weight' if leaf == 'kernel' else 'bias'}"] = (path, mapping.transpose if leaf == "kernel" else mapping.identity)
        else:
            raise AssertionError(f"unmapped Inception parameter {path}")
    return km


def _ignored(key: str) -> bool:
    return key.endswith(".num_batches_tracked")


def params_from_state_dict(state_dict, where: str = "Inception state dict"):
    """Params from a pytorch-fid state dict (float16 or float32 tensors; stored as float32)."""
    sd = mapping.strip_prefixes(state_dict)
    return mapping.convert(sd, torch_key_map(), abstract_params(), where, ignore=_ignored)


def load_params(path: str | os.PathLike):
    """Params from pytorch-fid's ``pt_inception-2015-12-05-*.pth`` (read without unpickling code)."""
    ckpt = load_torch_file(path)
    sd = find_state_dict(ckpt, ("state_dict", "model"), str(path))
    return params_from_state_dict(sd, where=f"Inception weights {path}")


# ----------------------------------------------------------------------------- batched, sharded

def check_images(images: np.ndarray, where: str = "images") -> None:
    """uint8 (N, H, W, 3) in [0, 255], or float (N, H, W, 3) in [0, 1]; else ImageInputError."""
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[-1] != 3:
        hint = " (NCHW? transpose to NHWC)" if len(shape) == 4 and shape[1] == 3 else ""
        raise ImageInputError(f"{where}: expected NHWC (N, H, W, 3), got shape {shape}{hint}")
    if min(shape[1], shape[2]) < 2:
        raise ImageInputError(f"{where}: images of {shape[1]}x{shape[2]} pixels are too small")
    if images.dtype == np.uint8:
        return
    if not np.issubdtype(images.dtype, np.floating):
        raise ImageInputError(f"{where}: dtype {images.dtype} not supported: pass uint8 in [0, 255] "
                              "or float in [0, 1]")
    if images.size:
        lo, hi = float(np.min(images)), float(np.max(images))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ImageInputError(f"{where}: float images contain NaN or inf")
        if lo < 0.0 or hi > 1.0:
            hint = (" (they look like [-1, 1]: use (x + 1) / 2, or protocol.to_uint8)" if lo < 0 and hi <= 1
                    else " (they look like [0, 255]: pass uint8)" if hi > 1 else "")
            raise ImageInputError(f"{where}: float images must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]{hint}")


def feature_extractor(cfg: InceptionConfig, params, *, batch_size: int = 200,
                      devices: Sequence[jax.Device] | None = None
                      ) -> Callable[[np.ndarray], Features]:
    """A host function images (N, H, W, 3) -> Features(pool3, logits) as float32 NumPy arrays.

    Images are uint8 in [0, 255] (sent to the devices as uint8) or float in [0, 1]. They are
    processed in chunks of ``batch_size`` (rounded up to a multiple of the device count), each
    split over a 1-D mesh of ``devices`` (default: all local devices); params are replicated.
    The last chunk is padded, so every distinct image size compiles once.
    """
    from dar_jax.parallel import make_mesh
    # Auto sharding: the only sharded dimension is the batch, which every op of the network
    # keeps, so propagation needs no annotations inside the model
    mesh = make_mesh({"data": -1}, list(devices) if devices is not None else jax.local_devices())
    n_dev = mesh.devices.size
    batch = -(-max(1, batch_size) // n_dev) * n_dev
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = jax.device_put(params, replicated)

    @functools.partial(jax.jit, in_shardings=(replicated, data), out_shardings=(data, data))
    def run(p, x):
        x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
        return forward(cfg, p, x)

    def extract(images: np.ndarray) -> Features:
        images = np.asarray(images)
        check_images(images)
        n = images.shape[0]
        pools, logits = [], []
        for start in range(0, n, batch):
            chunk = images[start:start + batch]
            m = chunk.shape[0]
            if m < batch:
                chunk = np.concatenate([chunk, np.zeros((batch - m,) + chunk.shape[1:], chunk.dtype)])
            if chunk.dtype != np.uint8:
                chunk = chunk.astype(np.float32)
            p3, lg = run(params, jax.device_put(chunk, data))
            pools.append(np.asarray(p3)[:m])
            logits.append(np.asarray(lg)[:m])
        if not pools:
            return Features(np.zeros((0, POOL3_DIM), np.float32), np.zeros((0, NUM_LOGITS), np.float32))
        return Features(np.concatenate(pools), np.concatenate(logits))

    extract.config = cfg
    extract.mesh = mesh
    extract.batch_size = batch
    return extract
