"""LPIPS (VGG16), the perceptual loss of tokenizer training, as a frozen Flax network.

D-AR's LPIPS (taming-transformers' copy of richzhang/PerceptualSimilarity): a fixed scaling
layer, torchvision's VGG16 ``features`` tapped after relu1_2, relu2_2, relu3_3, relu4_3 and
relu5_3, each tap normalised over channels, squared differences weighted by a learned 1x1 head
per tap, averaged over space, summed over taps. The weights are the files users already have:

    params = lpips.load_lpips("vgg16-397923af.pth", "vgg.pth")   # torchvision VGG16, LPIPS heads
    d = lpips.lpips(params, x0, x1)          # x0, x1: (B, H, W, 3) in [-1, 1] -> (B,)

``lpips`` is a pure function of the parameters; gradients flow to the images (it is a loss),
the parameters are frozen by the caller (``stop_gradient`` / not in the optimizer).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dar_jax.checkpoint import mapping
from dar_jax.checkpoint.torch_pickle import find_state_dict, load_torch_file
from dar_jax.nn import layers
from dar_jax.nn.functional import PureModule

# torchvision VGG16 ``features``: conv layer indices per stage; a 2x2 max pool precedes stages
# 2..5, every conv is followed by ReLU, and each stage's last ReLU is an LPIPS tap.
VGG16_STAGES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
VGG16_CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)     # LPIPS ScalingLayer
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10


class Conv3x3(nnx.Module):
    """3x3 convolution, stride 1, zero padding 1 (NHWC, kernel HWIO)."""

    def __init__(self, c_in: int, c_out: int, *, rngs: nnx.Rngs):
        std = (2.0 / (9 * c_in)) ** 0.5
        self.kernel = layers.param(layers.normal(std)(rngs.params(), (3, 3, c_in, c_out)), (None, None, None, None))
        self.bias = layers.param(jnp.zeros((c_out,)), (None,))

    def __call__(self, x):
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...].astype(x.dtype), window_strides=(1, 1), padding=((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(x.dtype)


def _max_pool(x):
    """2x2 max pool, stride 2, floor mode (torch ``MaxPool2d(2, 2)``)."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


class LPIPS(nnx.Module):
    """The network. ``__call__(x0, x1, dtype)`` -> (B,) float32 distances."""

    def __init__(self, *, rngs: nnx.Rngs):
        convs, c_in = [], 3
        for stage, c_out in zip(VGG16_STAGES, VGG16_CHANNELS):
            for _ in stage:
                convs.append(Conv3x3(c_in, c_out, rngs=rngs))
                c_in = c_out
        self.convs = nnx.List(convs)
        self.heads = nnx.List([layers.param(jnp.full((c,), 1.0 / c), (None,)) for c in VGG16_CHANNELS])

    def features(self, x):
        """Images (B, H, W, 3) in [-1, 1] -> the five VGG16 taps (relu1_2 .. relu5_3)."""
        x = (x - jnp.asarray(SHIFT, x.dtype)) / jnp.asarray(SCALE, x.dtype)
        taps, j = [], 0
        for s, stage in enumerate(VGG16_STAGES):
            if s:
                x = _max_pool(x)
            for _ in stage:
                x = jax.nn.relu(self.convs[j](x))
                j += 1
            taps.append(x)
        return taps

    def __call__(self, x0, x1, dtype=jnp.float32):
        # one VGG pass per image set: in a loss against real images (x0 constant) the backward
        # pass then runs over x1 alone, where a pass over both stacked would compute and discard
        # x0's half of the cotangents; a batch sharded over devices stays where it is
        total = jnp.zeros((x0.shape[0],), jnp.float32)
        taps = zip(self.features(x0.astype(dtype)), self.features(x1.astype(dtype)), self.heads)
        for t0, t1, head in taps:
            diff = (_unit_channels(t0.astype(jnp.float32)) - _unit_channels(t1.astype(jnp.float32))) ** 2
            total = total + jnp.mean(diff @ head[...], axis=(1, 2))
        return total


def _unit_channels(x):
    """x / (||x||_channels + 1e-10). Where a pixel's features are all 0 the norm's gradient is
    0/0, but the taps are ReLU outputs, whose gradient selects it away (no NaN reaches x)."""
    return x / (jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)) + NORM_EPS)


PURE_LPIPS = PureModule(LPIPS)   # no config: pass cfg=None


def init_params(key: jax.Array):
    """Random parameters (pure dict pytree, float32): for tests and benchmarks without weights."""
    return PURE_LPIPS.init_params(None, key)


def abstract_params():
    return PURE_LPIPS.abstract_params()


def logical_axes():
    """All None: the frozen network is small and replicated."""
    return PURE_LPIPS.logical_axes()


def lpips(params, x0: jax.Array, x1: jax.Array, dtype=jnp.float32) -> jax.Array:
    """LPIPS distance of images x0, x1: (B, H, W, 3) in [-1, 1] -> (B,) float32.

    ``dtype`` is the compute dtype of the VGG convolutions (normalisation and heads in float32).
    """
    if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[-1] != 3:
        raise ValueError(f"LPIPS needs two (B, H, W, 3) images of one shape; got {x0.shape}, {x1.shape}")
    return PURE_LPIPS.bind(None, params)(x0, x1, dtype)


# --- weight files ---------------------------------------------------------------------------------
def vgg16_key_map() -> mapping.KeyMap:
    """torchvision ``vgg16`` ``features.<i>.weight/bias`` -> conv params (OIHW -> HWIO)."""
    km: mapping.KeyMap = {}
    indices = [i for stage in VGG16_STAGES for i in stage]
    for j, i in enumerate(indices):
        km[f"features.{i}.weight"] = (("convs", j, "kernel"), lambda w: w.transpose(2, 3, 1, 0))
        km[f"features.{i}.bias"] = (("convs", j, "bias"), mapping.identity)
    return km


def heads_key_map() -> mapping.KeyMap:
    """LPIPS ``lin<k>.model.1.weight`` (1, C, 1, 1) -> head vectors (C,)."""
    return {f"lin{k}.model.1.weight": (("heads", k), lambda w: w.reshape(-1))
            for k in range(len(VGG16_CHANNELS))}


def _is_classifier(key: str) -> bool:
    return key.startswith("classifier.")   # torchvision's fully connected layers: unused


def params_from_state_dicts(vgg_state_dict, heads_state_dict, where_vgg: str = "VGG16 weights",
                            where_heads: str = "LPIPS heads"):
    abstract = abstract_params()
    vgg = mapping.convert(mapping.strip_prefixes(vgg_state_dict), vgg16_key_map(), {"convs": abstract["convs"]},
                    where_vgg, ignore=_is_classifier)
    heads = mapping.convert(mapping.strip_prefixes(heads_state_dict), heads_key_map(),
                      {"heads": abstract["heads"]}, where_heads)
    return {"convs": vgg["convs"], "heads": heads["heads"]}


def _state_dict(path, what: str):
    sd = find_state_dict(load_torch_file(path), ("state_dict", "model"), f"{what} {path}")
    return {k: v for k, v in sd.items() if isinstance(v, np.ndarray)}


def load_lpips(vgg_path: str | os.PathLike, heads_path: str | os.PathLike):
    """Params from torchvision's VGG16 file (``vgg16-397923af.pth``; ``classifier.*`` ignored,
    any float dtype) and the LPIPS heads file (taming / D-AR ``vgg.pth``).

    A missing file, missing or unexpected keys, or wrongly shaped tensors raise
    :class:`CheckpointError` naming the file.
    """
    return params_from_state_dicts(_state_dict(vgg_path, "VGG16 weights"),
                                   _state_dict(heads_path, "LPIPS heads"),
                                   f"VGG16 weights {vgg_path}", f"LPIPS heads {heads_path}")
