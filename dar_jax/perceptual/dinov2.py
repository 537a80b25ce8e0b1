"""DINOv2 (the REPA target of tokenizer training) as a frozen Flax network, plus REPA's pieces.

The network is the official facebookresearch/dinov2 ViT (patch 14, class token, learned position
grid of 37x37 for 518 px interpolated to the input size exactly as the official code does,
pre-LayerNorm blocks with LayerScale, final LayerNorm; GELU MLP, or the fused SwiGLU FFN of
ViT-g; optional register tokens). Official checkpoints load through the project's safe .pt reader:

    cfg, params = dinov2.load_dinov2("dinov2_vitb14_pretrain.pth")
    tokens = dinov2.patch_tokens(cfg, params, dinov2.repa_preprocess(images))   # (B, 256, 768)
    loss = dinov2.repa_loss(projected, jax.lax.stop_gradient(tokens))

Images inside dar-jax are NHWC in [-1, 1]; ``repa_preprocess`` maps them to the network's input
(D-AR's preprocessing: to [0, 1], ImageNet mean/std, torch bicubic resize to 224).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dar_jax.nn.layers import DTYPES
from dar_jax.checkpoint import mapping
from dar_jax.checkpoint.torch_pickle import CheckpointError, find_state_dict, load_torch_file
from dar_jax.config import ConfigError, sized_config
from dar_jax.nn import layers
from dar_jax.nn.functional import PureModule
from dar_jax.nn.attention import attention
from dar_jax.nn.resize import avg_pool_tokens, resize_bicubic, torch_bicubic_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REPA_SIZE = 224          # D-AR resizes the input image to 224 px for DINOv2
REPA_GRID = 16           # decoder features are pooled to (at most) 16x16 tokens

FFN_KINDS = ("mlp", "swiglu")

# The official hub models (``dinov2_vit{s,b,l,g}14``): 64-dim heads, 518 px (37x37 grid).
DINOV2_SIZES = {
    "vits14": dict(embed_dim=384, depth=12, num_heads=6, mlp_hidden=1536),
    "vitb14": dict(embed_dim=768, depth=12, num_heads=12, mlp_hidden=3072),
    "vitl14": dict(embed_dim=1024, depth=24, num_heads=16, mlp_hidden=4096),
    "vitg14": dict(embed_dim=1536, depth=40, num_heads=24, mlp_hidden=4096, ffn="swiglu"),
}


@dataclasses.dataclass(frozen=True)
class DinoV2Config:
    """Sizes of a DINOv2 ViT. ``mlp_hidden`` is the FFN width (SwiGLU: of each branch)."""
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_hidden: int = 3072
    ffn: str = "mlp"                  # "mlp" (fc1 -> exact GELU -> fc2) or "swiglu" (ViT-g)
    patch_size: int = 14
    pos_grid: int = 37                # side of the learned position grid (518 px / 14)
    num_register_tokens: int = 0
    interpolate_offset: float = 0.1   # official kludge: scale factors (grid + offset) / pos_grid
    norm_eps: float = 1e-6
    dtype: str = "float32"            # compute dtype; parameters are always float32
    attention_impl: str = "auto"      # see dar_jax.nn.attention

    def __post_init__(self):
        for name in ("embed_dim", "depth", "num_heads", "mlp_hidden", "patch_size", "pos_grid"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"DINOv2 {name} must be positive, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"DINOv2 embed_dim {self.embed_dim} is not divisible by "
                              f"num_heads {self.num_heads}")
        if self.ffn not in FFN_KINDS:
            raise ConfigError(f"DINOv2 ffn {self.ffn!r} not in {FFN_KINDS}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"DINOv2 dtype {self.dtype!r} not in {sorted(DTYPES)}")
        if self.num_register_tokens < 0 or self.interpolate_offset < 0:
            raise ConfigError("DINOv2 num_register_tokens and interpolate_offset must be >= 0")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]


def dinov2_config(model: str | None = None, **overrides: Any) -> DinoV2Config:
    """An official size (``vits14``/``vitb14``/``vitl14``/``vitg14``) with overrides, or a custom one."""
    return sized_config(DinoV2Config, DINOV2_SIZES, model, "DINOv2", **overrides)


# --- the network ------------------------------------------------------------------------------------
class Attention(nnx.Module):
    """Fused-qkv self-attention with biases (all tokens see all tokens)."""

    def __init__(self, cfg: DinoV2Config, *, rngs: nnx.Rngs):
        d, h, hd = cfg.embed_dim, cfg.num_heads, cfg.head_dim
        self.cfg = cfg
        self.qkv = layers.param(layers.trunc_normal(0.02)(rngs.params(), (d, 3, h, hd)),
                           (layers.EMBED, None, layers.HEADS, layers.HEAD_DIM))
        self.qkv_bias = layers.param(jnp.zeros((3, h, hd)), (None, layers.HEADS, layers.HEAD_DIM))
        self.proj = layers.param(layers.trunc_normal(0.02)(rngs.params(), (h, hd, d)),
                            (layers.HEADS, layers.HEAD_DIM, layers.EMBED))
        self.proj_bias = layers.param(jnp.zeros((d,)), (layers.EMBED,))

    def __call__(self, x, target=None):
        dtype = self.cfg.compute_dtype
        qkv = jnp.einsum("bld,dthk->blthk", x.astype(dtype), self.qkv[...].astype(dtype))
        qkv = qkv + self.qkv_bias[...].astype(dtype)
        y = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask="none",
                      implementation=self.cfg.attention_impl, target=target, site="dinov2.self")
        return jnp.einsum("blhk,hkd->bld", y, self.proj[...].astype(dtype)) + self.proj_bias[...].astype(dtype)


def gelu_exact(x):
    """torch ``nn.GELU()`` (erf form), DINOv2's MLP activation."""
    return jax.nn.gelu(x, approximate=False)


class Block(nnx.Module):
    """x + ls1 * attn(norm1(x)); x + ls2 * ffn(norm2(x))."""

    def __init__(self, cfg: DinoV2Config, *, rngs: nnx.Rngs):
        d, dtype = cfg.embed_dim, cfg.compute_dtype
        self.norm1 = layers.LayerNorm(d, eps=cfg.norm_eps)
        self.attn = Attention(cfg, rngs=rngs)
        self.ls1 = layers.param(jnp.ones((d,)), (layers.EMBED,))
        self.norm2 = layers.LayerNorm(d, eps=cfg.norm_eps)
        if cfg.ffn == "mlp":
            self.mlp = layers.Mlp(d, cfg.mlp_hidden, rngs=rngs, dtype=dtype, activation=gelu_exact)
        else:
            self.mlp = layers.SwiGLU(d, cfg.mlp_hidden, rngs=rngs, dtype=dtype, use_bias=True)
        self.ls2 = layers.param(jnp.ones((d,)), (layers.EMBED,))

    def __call__(self, x, target=None):
        dtype = x.dtype
        x = x + self.attn(self.norm1(x), target) * self.ls1[...].astype(dtype)
        return x + self.mlp(self.norm2(x)) * self.ls2[...].astype(dtype)


class DinoV2(nnx.Module):
    """The ViT. ``__call__(images)`` with images (B, H, W, 3) preprocessed, H and W multiples of
    the patch size -> final-normed tokens (B, 1 + R + H/p * W/p, D)."""

    def __init__(self, cfg: DinoV2Config, *, rngs: nnx.Rngs):
        d, p = cfg.embed_dim, cfg.patch_size
        self.cfg = cfg
        self.patch_kernel = layers.param(layers.trunc_normal(0.02)(rngs.params(), (p, p, 3, d)),
                                    (None, None, None, layers.EMBED))
        self.patch_bias = layers.param(jnp.zeros((d,)), (layers.EMBED,))
        self.cls_token = layers.param(layers.normal(1e-6)(rngs.params(), (d,)), (layers.EMBED,))
        self.pos_embed = layers.param(layers.trunc_normal(0.02)(rngs.params(), (1 + cfg.pos_grid ** 2, d)),
                                 (None, layers.EMBED))
        if cfg.num_register_tokens:
            self.register_tokens = layers.param(
                layers.normal(1e-6)(rngs.params(), (cfg.num_register_tokens, d)), (None, layers.EMBED))
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.norm = layers.LayerNorm(d, eps=cfg.norm_eps)

    def position_embedding(self, rows: int, cols: int) -> jax.Array:
        """(1 + rows * cols, D) float32: the official ``interpolate_pos_encoding``."""
        cfg, pos = self.cfg, self.pos_embed[...].astype(jnp.float32)
        m = cfg.pos_grid
        if rows * cols == m * m and rows == cols:
            return pos
        grid = pos[1:].reshape(1, m, m, -1)
        if cfg.interpolate_offset:
            sf = ((rows + cfg.interpolate_offset) / m, (cols + cfg.interpolate_offset) / m)
            size = (torch_bicubic_size(m, sf[0]), torch_bicubic_size(m, sf[1]))
            if size != (rows, cols):   # the official code asserts the same
                raise ValueError(f"DINOv2 position grid {m}x{m} scaled by {sf} gives {size}, "
                                 f"not the {rows}x{cols} patch grid")
            grid = resize_bicubic(grid, size, sf)
        else:
            grid = resize_bicubic(grid, (rows, cols))
        return jnp.concatenate([pos[:1], grid.reshape(rows * cols, -1)], axis=0)

    def __call__(self, images, target=None):
        cfg, p = self.cfg, self.cfg.patch_size
        dtype = cfg.compute_dtype
        b, h, w, c = images.shape
        if c != 3 or h % p or w % p:
            raise ValueError(f"DINOv2 needs (B, H, W, 3) images with H and W multiples of {p}; "
                             f"got {images.shape}")
        rows, cols = h // p, w // p
        patches = images.astype(dtype).reshape(b, rows, p, cols, p, c)
        x = jnp.einsum("bipjqc,pqcd->bijd", patches, self.patch_kernel[...].astype(dtype))
        x = x.reshape(b, rows * cols, -1) + self.patch_bias[...].astype(dtype)
        cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (b, 1, cfg.embed_dim))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding(rows, cols).astype(dtype)
        if cfg.num_register_tokens:
            reg = jnp.broadcast_to(self.register_tokens[...].astype(dtype),
                                   (b, cfg.num_register_tokens, cfg.embed_dim))
            x = jnp.concatenate([x[:, :1], reg, x[:, 1:]], axis=1)
        for block in self.blocks:
            x = block(x, target)
            if target is not None:
                x = target.constrain(x, ("batch", "length", "embed"))
        return self.norm(x)


PURE_DINOV2 = PureModule(DinoV2)
graphdef_and_abstract = PURE_DINOV2.graphdef_and_abstract
bind = PURE_DINOV2.bind
init_params = PURE_DINOV2.init_params          # random weights: tests and benchmarks
abstract_params = PURE_DINOV2.abstract_params
logical_axes = PURE_DINOV2.logical_axes


def forward_features(cfg: DinoV2Config, params, images: jax.Array,
                     target=None) -> dict[str, jax.Array]:
    """The official ``forward_features``: images (B, H, W, 3) preprocessed ->
    ``x_norm_clstoken`` (B, D), ``x_norm_regtokens`` (B, R, D), ``x_norm_patchtokens`` (B, N, D).
    ``target``: the ``dar_jax.parallel.Target`` of the program (default: the first device)."""
    x = bind(cfg, params)(images, target)
    r = cfg.num_register_tokens
    return {"x_norm_clstoken": x[:, 0], "x_norm_regtokens": x[:, 1:1 + r],
            "x_norm_patchtokens": x[:, 1 + r:]}


def patch_tokens(cfg: DinoV2Config, params, images: jax.Array, target=None) -> jax.Array:
    """``x_norm_patchtokens`` (B, H/p * W/p, D) of preprocessed images (B, H, W, 3)."""
    return forward_features(cfg, params, images, target)["x_norm_patchtokens"]


# --- official checkpoints ------------------------------------------------------------------------
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.(.*)$")   # block_chunks > 0: blocks.<chunk>.<i>.<name>
_PLAIN = re.compile(r"^blocks\.(\d+)\.(.*)$")
_IGNORED = ("mask_token",)                               # masked-image training only
_SWIGLU_SPLIT = ("mlp.w12.weight", "mlp.w12.bias")


def _split_name(key: str, half: int) -> str:
    return f"{key}[{'first' if half == 0 else 'second'} half]"


def normalize_state_dict(state_dict) -> dict[str, np.ndarray]:
    """Official DINOv2 state dict -> flat keys ``blocks.<i>.<name>`` (chunked layouts unchunked;
    ViT-g's fused ``mlp.w12`` split into its SiLU and gate halves, named ``...[first half]`` and
    ``...[second half]``)."""
    out = {}
    for key, value in mapping.strip_prefixes(state_dict, ("_orig_mod.", "module.", "backbone.")).items():
        m = _CHUNKED.match(key) or _PLAIN.match(key)
        if m:
            key = f"blocks.{int(m.group(1))}.{m.group(2)}"
        if key.endswith(_SWIGLU_SPLIT) and np.ndim(value) >= 1 and np.shape(value)[0] % 2 == 0:
            first, second = np.split(np.asarray(value), 2, axis=0)
            out[_split_name(key, 0)], out[_split_name(key, 1)] = first, second
            continue
        out[key] = value
    return out


def dinov2_key_map(cfg: DinoV2Config) -> mapping.KeyMap:
    """Normalized torch key -> (param path, transform)."""
    d, h, hd = cfg.embed_dim, cfg.num_heads, cfg.head_dim
    km: mapping.KeyMap = {
        "cls_token": (("cls_token",), lambda w: w.reshape(-1)),
        "pos_embed": (("pos_embed",), lambda w: w.reshape(w.shape[-2], w.shape[-1])),
        "patch_embed.proj.weight": (("patch_kernel",), lambda w: w.transpose(2, 3, 1, 0)),
        "patch_embed.proj.bias": (("patch_bias",), mapping.identity),
        "norm.weight": (("norm", "scale"), mapping.identity),
        "norm.bias": (("norm", "bias"), mapping.identity),
    }
    if cfg.num_register_tokens:
        km["register_tokens"] = (("register_tokens",), lambda w: w.reshape(w.shape[-2], w.shape[-1]))
    for i in range(cfg.depth):
        p, b = f"blocks.{i}.", ("blocks", i)
        km[p + "attn.qkv.weight"] = (b + ("attn", "qkv"), lambda w: w.T.reshape(d, 3, h, hd))
        km[p + "attn.qkv.bias"] = (b + ("attn", "qkv_bias"), lambda w: w.reshape(3, h, hd))
        km[p + "attn.proj.weight"] = (b + ("attn", "proj"), lambda w: w.T.reshape(h, hd, d))
        km[p + "attn.proj.bias"] = (b + ("attn", "proj_bias"), mapping.identity)
        for norm in ("norm1", "norm2"):
            km[p + f"{norm}.weight"] = (b + (norm, "scale"), mapping.identity)
            km[p + f"{norm}.bias"] = (b + (norm, "bias"), mapping.identity)
        km[p + "ls1.gamma"] = (b + ("ls1",), mapping.identity)
        km[p + "ls2.gamma"] = (b + ("ls2",), mapping.identity)
        if cfg.ffn == "mlp":
            names = {"fc1": "fc1", "fc2": "fc2"}
        else:  # torch: w3(silu(x1) * x2) with x1, x2 = w12(x).chunk(2)
            names = {_split_name("w12", 0): "w1", _split_name("w12", 1): "w3", "w3": "w2"}
        for torch_name, ours in names.items():
            base = torch_name.split("[")[0]
            suffix = torch_name[len(base):]
            km[p + f"mlp.{base}.weight{suffix}"] = (b + ("mlp", ours, "kernel"), mapping.transpose)
            km[p + f"mlp.{base}.bias{suffix}"] = (b + ("mlp", ours, "bias"), mapping.identity)
    return km


def _ignored(key: str) -> bool:
    return key in _IGNORED


def config_from_state_dict(state_dict, where: str = "DINOv2 checkpoint", num_heads: int | None = None,
                           **overrides: Any) -> DinoV2Config:
    """The config an official DINOv2 state dict implies.

    Embed dim from ``cls_token``, depth from the block indices, FFN kind and width from
    ``mlp.fc1`` / ``mlp.w12``, patch size from the patch conv, position grid from ``pos_embed``,
    registers from ``register_tokens``. Heads are not visible in the weights: ``num_heads``
    defaults to embed_dim / 64 (every official model).
    """
    sd = normalize_state_dict(state_dict)
    try:
        d = int(np.shape(sd["cls_token"])[-1])
        patch = int(np.shape(sd["patch_embed.proj.weight"])[-1])
        n_pos = int(np.shape(sd["pos_embed"])[-2]) - 1
    except KeyError as e:
        raise CheckpointError(f"{where} is not a DINOv2 state dict: no {e}") from None
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos:
        raise CheckpointError(f"{where}: pos_embed holds {n_pos} patch positions, not a square grid")
    if "blocks.0.mlp.fc1.weight" in sd:
        ffn, hidden = "mlp", int(np.shape(sd["blocks.0.mlp.fc1.weight"])[0])
    elif _split_name("blocks.0.mlp.w12.weight", 0) in sd:
        ffn, hidden = "swiglu", int(np.shape(sd[_split_name("blocks.0.mlp.w12.weight", 0)])[0])
    else:
        raise CheckpointError(f"{where}: block 0 has neither mlp.fc1 nor mlp.w12 (not DINOv2)")
    if num_heads is None:
        if d % 64:
            raise CheckpointError(f"{where}: embed dim {d} is not a multiple of 64; the number of "
                                  "heads cannot be inferred, pass num_heads")
        num_heads = d // 64
    regs = int(np.shape(sd["register_tokens"])[-2]) if "register_tokens" in sd else 0
    kwargs = dict(embed_dim=d, depth=depth, num_heads=num_heads, mlp_hidden=hidden, ffn=ffn,
                  patch_size=patch, pos_grid=grid, num_register_tokens=regs)
    kwargs.update(overrides)
    return dinov2_config(**kwargs)


def params_from_state_dict(state_dict, cfg: DinoV2Config, where: str = "DINOv2 checkpoint"):
    return mapping.convert(normalize_state_dict(state_dict), dinov2_key_map(cfg),
                     abstract_params(cfg), where, ignore=_ignored)


def load_dinov2(path: str | os.PathLike, cfg: DinoV2Config | None = None,
                num_heads: int | None = None, **overrides: Any):
    """(cfg, params) from an official DINOv2 ``.pth`` (e.g. ``dinov2_vitb14_pretrain.pth``).

    Without ``cfg`` the sizes are inferred from the weights (see :func:`config_from_state_dict`;
    ``overrides`` such as ``dtype`` apply to the inferred config). Missing, unexpected or
    wrongly shaped tensors raise :class:`CheckpointError` naming the file and the keys.
    """
    where = f"DINOv2 checkpoint {path}"
    sd = find_state_dict(load_torch_file(path), ("model", "teacher", "state_dict"), str(path))
    if cfg is None:
        cfg = config_from_state_dict(sd, where, num_heads=num_heads, **overrides)
    return cfg, params_from_state_dict(sd, cfg, where)


# --- REPA -----------------------------------------------------------------------------------------
def repa_preprocess(images: jax.Array, size: int = REPA_SIZE) -> jax.Array:
    """D-AR's DINOv2 input: images (B, H, W, 3) in [-1, 1] -> (B, size, size, 3) float32.

    0.5 x + 0.5, then ImageNet mean/std, then torch's bicubic resize (no antialias) to ``size``.
    """
    x = images.astype(jnp.float32) * 0.5 + 0.5
    x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
    return resize_bicubic(x, (size, size))


def repa_pool(hidden: jax.Array, rows: int, cols: int, grid: int = REPA_GRID) -> jax.Array:
    """The decoder's hidden state (B, rows * cols, C) average-pooled for REPA.

    As the reference: stride ``rows // grid`` on both axes (16x16 tokens at 256 px). Where the
    token grid is smaller than ``grid`` (where the reference's stride is 0 and crashes) the
    tokens are kept as they are; :func:`repa_loss` pools the DINOv2 tokens to match.
    """
    return avg_pool_tokens(hidden, rows, cols, max(rows // grid, 1))


def _square_side(n: int, what: str) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"REPA: {what} has {n} tokens, not a square grid")
    return side


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    """torch ``F.cosine_similarity(a, b, dim=-1)``: each side divided by max(its norm, eps)."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)

    def norm(x):
        sq = jnp.sum(x * x, axis=-1, keepdims=True)
        safe = jnp.where(sq > 0, sq, 1.0)   # finite gradient at the zero vector
        return jnp.maximum(jnp.where(sq > 0, jnp.sqrt(safe), 0.0), eps)

    return jnp.sum((a / norm(a)) * (b / norm(b)), axis=-1)


def repa_loss(projected: jax.Array, dino_tokens: jax.Array) -> jax.Array:
    """REPA alignment loss, as the reference: ``mean(1 - cos(dino_tokens, projected))`` over
    batch and tokens (minimising it maximises the mean cosine similarity).

    projected: (B, N, C) the decoder's pooled, projected hidden state; dino_tokens: (B, M, C)
    DINOv2 patch tokens (frozen: pass them through ``stop_gradient``). When the grids differ
    (small images: N < M = 256), the DINOv2 tokens are average-pooled onto the decoder's grid;
    both grids must then be square, the larger side a multiple of the smaller.
    """
    if projected.ndim != 3 or dino_tokens.ndim != 3 or projected.shape[0] != dino_tokens.shape[0] \
            or projected.shape[-1] != dino_tokens.shape[-1]:
        raise ValueError(f"REPA: projected {projected.shape} and DINOv2 tokens {dino_tokens.shape} "
                         "must be (B, N, C) with equal batch and channels")
    n, m = projected.shape[1], dino_tokens.shape[1]
    if n != m:
        side_n, side_m = _square_side(n, "the projection"), _square_side(m, "DINOv2")
        if side_n > side_m or side_m % side_n:
            raise ValueError(f"REPA: cannot pool the {side_m}x{side_m} DINOv2 grid onto the "
                             f"{side_n}x{side_n} decoder grid")
        dino_tokens = avg_pool_tokens(dino_tokens, side_m, side_m, side_m // side_n)
    return jnp.mean(1.0 - cosine_similarity(dino_tokens, projected))
