"""The GPT's reference key map and readers of the reference's (showlab/D-AR, LlamaGen) PyTorch
checkpoints, with the GPT config inferred from a state dict's shapes."""
from __future__ import annotations

import os

import numpy as np

from dar_jax.checkpoint import mapping
from dar_jax.checkpoint.torch_pickle import CheckpointError, find_state_dict, load_torch_file
from dar_jax.ar.model import PURE_GPT, GPT_SIZES, GPTConfig, gpt_config
from dar_jax.config import ConfigError

GPT_STATE_KEYS = ("model", "module", "state_dict")


def gpt_key_map(cfg: GPTConfig) -> mapping.KeyMap:
    """torch key -> (param path, transform) for LlamaGen's c2i GPT."""
    d, h, hd = cfg.dim, cfg.n_head, cfg.head_dim
    km: mapping.KeyMap = {
        "tok_embeddings.weight": (("tok_embeddings",), mapping.identity),
        "cls_embedding.embedding_table.weight": (("cls_embedding",), mapping.identity),
        "norm.weight": (("norm", "weight"), mapping.identity),
        "output.weight": (("output",), mapping.transpose),
    }
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        km[p + "attention.wqkv.weight"] = (("layers", i, "attention", "wqkv"),
                                           lambda w: w.T.reshape(d, 3, h, hd))
        km[p + "attention.wo.weight"] = (("layers", i, "attention", "wo"),
                                         lambda w: w.T.reshape(h, hd, d))
        for name in ("w1", "w2", "w3"):
            km[p + f"feed_forward.{name}.weight"] = (("layers", i, "feed_forward", name, "kernel"), mapping.transpose)
        km[p + "attention_norm.weight"] = (("layers", i, "attention_norm", "weight"), mapping.identity)
        km[p + "ffn_norm.weight"] = (("layers", i, "ffn_norm", "weight"), mapping.identity)
    return km


def _gpt_ignored(key: str) -> bool:
    # KV caches exist in a state dict saved after generate(); RoPE tables are not buffers.
    return ".kv_cache." in key or key == "freqs_cis"


def gpt_params_from_state_dict(state_dict, cfg: GPTConfig, where: str = "GPT checkpoint"):
    sd = mapping.strip_prefixes(state_dict)
    return mapping.convert(sd, gpt_key_map(cfg), PURE_GPT.abstract_params(cfg), where, ignore=_gpt_ignored)


def check_gpt_shapes(shapes, cfg: GPTConfig, where: str = "GPT listing") -> None:
    mapping.check_shapes(mapping.strip_prefixes(shapes), gpt_key_map(cfg), PURE_GPT.abstract_params(cfg), where,
                   ignore=_gpt_ignored)


def load_reference_gpt(path: str | os.PathLike, cfg: GPTConfig):
    """Params for ``cfg`` from a LlamaGen / D-AR GPT ``.pt`` (state dict under model/module/...)."""
    ckpt = load_torch_file(path)
    sd = find_state_dict(ckpt, GPT_STATE_KEYS, str(path))
    return gpt_params_from_state_dict(sd, cfg, where=f"GPT checkpoint {path}")


GPT_SIZE_FLAGS = ("gpt_model", "dim", "n_layer", "n_head", "block_size", "num_classes", "vocab_size")
_FLAG = {k: "--" + k.replace("_", "-") for k in GPT_SIZE_FLAGS}


def infer_gpt_sizes(state_dict) -> dict:
    """What the shapes of a GPT state dict determine: vocab_size, dim, num_classes, n_layer and
    the FFN width ``ffn_hidden`` (n_head and block_size are not stored)."""
    sd = mapping.strip_prefixes(state_dict)
    try:
        vocab, dim = np.shape(sd["tok_embeddings.weight"])
        classes = np.shape(sd["cls_embedding.embedding_table.weight"])[0] - 1
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"not a LlamaGen GPT state dict: no 2-D {e}") from None
    layers = {k.split(".")[1] for k in sd if k.startswith("layers.")}
    if not all(i.isdigit() for i in layers) or sorted(map(int, layers)) != list(range(len(layers))):
        raise CheckpointError(f"GPT state dict has non-contiguous layers: {sorted(layers)[:8]}")
    w1 = sd.get("layers.0.feed_forward.w1.weight")
    hidden = int(np.shape(w1)[0]) if w1 is not None and np.ndim(w1) == 2 else None
    return dict(vocab_size=int(vocab), dim=int(dim), num_classes=int(classes), n_layer=len(layers),
                ffn_hidden=hidden)


def _ffn_options(dim: int, hidden: int | None) -> dict:
    """``multiple_of`` / ``ffn_dim_multiplier`` that give the SwiGLU width ``hidden``."""
    from dar_jax.nn.layers import swiglu_hidden
    if hidden is None or swiglu_hidden(dim) == hidden:
        return {}
    base = int(2 * (4 * dim) / 3)
    if base <= hidden:  # rounding up to a multiple of the width itself gives the width
        return dict(multiple_of=hidden)
    return dict(multiple_of=hidden, ffn_dim_multiplier=(hidden + 0.5) / base)


def gpt_config_from_state_dict(state_dict, *, gpt_model: str | None = None, dim: int | None = None,
                               n_layer: int | None = None, n_head: int | None = None,
                               block_size: int | None = None, num_classes: int | None = None,
                               vocab_size: int | None = None, default_block_size: int = 256,
                               where: str = "the GPT checkpoint") -> GPTConfig:
    """The GPT config of a reference state dict: one place for convert, sample.py and evaluate.

    dim, layers, FFN width, vocabulary and classes come from the shapes; ``n_head`` defaults to
    dim / 64 (GPT-B/L/XL/XXL; pass it for others, e.g. LlamaGen's 3B) and ``block_size`` to
    ``default_block_size`` (the tokenizer's token count where one is known). A named size
    (``gpt_model``) or flag that contradicts the shapes is an error naming both."""
    seen = infer_gpt_sizes(state_dict)
    given = dict(dim=dim, n_layer=n_layer, num_classes=num_classes, vocab_size=vocab_size)
    for key, value in given.items():
        if value is not None and value != seen[key]:
            raise CheckpointError(f"{_FLAG[key]} {value} contradicts {where}: its shapes give "
                                  f"{key}={seen[key]}")
    heads = n_head
    if gpt_model is not None:
        if gpt_model not in GPT_SIZES:
            raise CheckpointError(f"unknown GPT size {gpt_model!r}; known: {sorted(GPT_SIZES)}")
        size = GPT_SIZES[gpt_model]
        bad = [k for k in ("dim", "n_layer") if size[k] != seen[k]]
        if bad:
            raise CheckpointError(
                f"--gpt-model {gpt_model} has {', '.join(f'{k}={size[k]}' for k in bad)} but {where} has "
                f"{', '.join(f'{k}={seen[k]}' for k in bad)}")
        heads = heads or size["n_head"]
    if heads is None:
        if seen["dim"] % 64:
            raise CheckpointError(f"{where} has dim={seen['dim']}, not a multiple of 64: pass --n-head")
        heads = seen["dim"] // 64
    if seen["dim"] % heads:
        raise CheckpointError(f"--n-head {heads} does not divide the dim {seen['dim']} of {where}")
    try:
        return gpt_config(dim=seen["dim"], n_layer=seen["n_layer"], n_head=heads,
                             vocab_size=seen["vocab_size"], num_classes=seen["num_classes"],
                             block_size=block_size or default_block_size,
                             **_ffn_options(seen["dim"], seen["ffn_hidden"]))
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def check_size_flags(cfg: GPTConfig, where: str, **flags) -> None:
    """Size flags given for a model whose config is known (a model folder) must agree with it."""
    named = GPT_SIZES.get(flags.get("gpt_model") or "", {})
    for key in GPT_SIZE_FLAGS:
        value = flags.get(key)
        if value is None:
            continue
        have = {k: getattr(cfg, k) for k in named} if key == "gpt_model" else {key: getattr(cfg, key)}
        want = named if key == "gpt_model" else {key: value}
        if key == "gpt_model" and not named:
            raise CheckpointError(f"unknown GPT size {value!r}; known: {sorted(GPT_SIZES)}")
        if have != want:
            raise CheckpointError(f"{_FLAG[key]} {value} contradicts {where}, whose config has "
                                  f"{', '.join(f'{k}={v}' for k, v in have.items())}")
