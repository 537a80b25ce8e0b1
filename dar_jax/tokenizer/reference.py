"""Reader of the reference's (showlab/D-AR) tokenizer checkpoints.

A reference file is a torch pickle ``{"ema" | "model": state_dict, "config": {"model": cfg}, ...}``
(trainer files also pickle an ``argparse.Namespace`` and a ``config_util.Config``, read as plain
data by the safe reader). The config inside builds the model through
:func:`dar_jax.config.from_mapping`, so a key the reference does not read is an error; the weights
must then match that config key for key and shape for shape.

The REPA projector (``diff_decoder.net.repa_out.*``) is kept when present (it is only used in
training: the config gets ``repa_projector=True``); the quantizer's usage buffer
(``quantize.codebook_used``) is not a parameter: :func:`read_reference_tokenizer` returns it
beside the params for a trainer that wants to continue the statistics.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import numpy as np

from dar_jax.checkpoint import mapping
from dar_jax.checkpoint.torch_pickle import CheckpointError, find_state_dict, load_torch_file
from dar_jax.config import ConfigError, from_mapping
from dar_jax.tokenizer.config import TokenizerConfig
from dar_jax.tokenizer.core import abstract_params

STATE_KEYS = ("ema", "model")
REPA_PREFIX = "diff_decoder.net.repa_out."
USAGE_KEY = "quantize.codebook_used"


def _conv_patch_in(w):
    """torch patchify conv (D, 3, p, p) -> (p, p, 3, D)."""
    return w.transpose(2, 3, 1, 0)


def _pixel_in(p):
    """torch 1x1 conv on (c, p1, p2)-ordered patches (D, 3 p^2, 1, 1) -> (p, p, 3, D)."""
    return lambda w: w.reshape(w.shape[0], 3, p, p).transpose(2, 3, 1, 0)


def _pixel_out(p):
    """torch (3 p^2, D[, 1, 1]) output weights -> (D, p, p, 3)."""
    return lambda w: w.reshape(3, p, p, w.shape[1]).transpose(3, 1, 2, 0)


def _pixel_out_bias(p):
    return lambda b: b.reshape(3, p, p).transpose(1, 2, 0)


def _linear(km, torch_prefix, path):
    km[torch_prefix + ".weight"] = (path + ("kernel",), mapping.transpose)
    km[torch_prefix + ".bias"] = (path + ("bias",), mapping.identity)


def _layer_norm(km, torch_prefix, path):
    km[torch_prefix + ".weight"] = (path + ("scale",), mapping.identity)
    km[torch_prefix + ".bias"] = (path + ("bias",), mapping.identity)


def _attention(km, tp, path):
    for name in ("q", "k", "v", "proj"):
        _linear(km, f"{tp}.{name}", path + (name,))
    _layer_norm(km, f"{tp}.q_norm", path + ("q_norm",))
    _layer_norm(km, f"{tp}.k_norm", path + ("k_norm",))


def _mlp(km, tp, path, first="fc1", second="fc2"):
    _linear(km, f"{tp}.{first}", path + ("fc1",))
    _linear(km, f"{tp}.{second}", path + ("fc2",))


def _transformer_block(km, tp, path):
    _attention(km, f"{tp}.attention", path + ("attention",))
    _mlp(km, f"{tp}.mlp", path + ("mlp",))
    _layer_norm(km, f"{tp}.norm1", path + ("norm1",))
    _layer_norm(km, f"{tp}.norm2", path + ("norm2",))
    km[f"{tp}.gate1"] = (path + ("gate1",), mapping.identity)
    km[f"{tp}.gate2"] = (path + ("gate2",), mapping.identity)


def tokenizer_key_map(cfg) -> mapping.KeyMap:
    """torch key -> (param path, transform) for the D-AR tokenizer of ``cfg``."""
    dc = cfg.diff_decoder
    p = dc.patch_size
    km: mapping.KeyMap = {
        "patchify.weight": (("patchify_kernel",), _conv_patch_in),
        "patchify.bias": (("patchify_bias",), mapping.identity),
        "quant_in_conv.weight": (("quant_in",), mapping.conv1x1),
        "quant_out_conv.weight": (("quant_out",), mapping.conv1x1),
        "quantize.embedding.weight": (("codebook",), mapping.identity),
        "query_embedding.weight": (("query_embedding",), mapping.identity),
        "decoder_embedding.weight": (("decoder_embedding",), mapping.identity),
    }
    if cfg.query_low_rank:
        _linear(km, "query_linear", ("query_linear",))
    for i in range(cfg.num_encoder_layers):
        _transformer_block(km, f"encoder_layers.{i}", ("encoder_layers", i))
    for i in range(cfg.num_decoder_layers):
        _transformer_block(km, f"decoder_layers.{i}", ("decoder_layers", i))
    net, d = "diff_decoder.net", ("diff",)
    _linear(km, f"{net}.cond_mlp", d + ("cond_mlp",))
    km[f"{net}.conv_in.weight"] = (d + ("conv_in_kernel",), _pixel_in(p))
    km[f"{net}.conv_in.bias"] = (d + ("conv_in_bias",), mapping.identity)
    if dc.mlp_head:
        km[f"{net}.linear_out.linear.weight"] = (d + ("final", "kernel"), _pixel_out(p))
        km[f"{net}.linear_out.linear.bias"] = (d + ("final", "bias"), _pixel_out_bias(p))
        _linear(km, f"{net}.linear_out.adaLN_modulation.1", d + ("final", "adaLN"))
    else:
        km[f"{net}.conv_out.weight"] = (d + ("conv_out_kernel",), _pixel_out(p))
        km[f"{net}.conv_out.bias"] = (d + ("conv_out_bias",), _pixel_out_bias(p))
    if dc.share_time_encoding:
        _mlp(km, f"{net}.time_embed.mlp", d + ("time_embed", "mlp"), "0", "2")
    for i in range(dc.depth):
        tp, bp = f"{net}.blocks.{i}", d + ("blocks", i)
        _attention(km, f"{tp}.attention", bp + ("attention",))
        _attention(km, f"{tp}.cross_attn", bp + ("cross_attn",))
        _mlp(km, f"{tp}.mlp", bp + ("mlp",))
        _linear(km, f"{tp}.adaLN_modulation.1", bp + ("adaLN",))
        _mlp(km, f"{tp}.cond_embed", bp + ("cond_embed",), "0", "2")
        if not dc.share_time_encoding:
            _mlp(km, f"{tp}.time_embed.mlp", bp + ("time_embed", "mlp"), "0", "2")
    if cfg.repa_projector:
        for j, torch_index in enumerate(("0", "2", "4")):
            _linear(km, f"{net}.repa_out.{torch_index}", d + ("repa_out", j))
    return km


def _ignored(cfg):
    def ignore(key: str) -> bool:
        return key == USAGE_KEY or (not cfg.repa_projector and key.startswith(REPA_PREFIX))
    return ignore


def config_from_reference(config: Mapping[str, Any], where: str = "tokenizer config"):
    """TokenizerConfig from a reference model config (every key checked)."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{where}: the model config is not a mapping ({type(config).__name__})")
    return from_mapping(TokenizerConfig, config, where=where)


def tokenizer_params_from_state_dict(state_dict, cfg, where: str = "tokenizer checkpoint"):
    """Params for ``cfg`` from a reference state dict (REPA kept iff cfg.repa_projector)."""
    sd = mapping.strip_prefixes(state_dict)
    return mapping.convert(sd, tokenizer_key_map(cfg), abstract_params(cfg), where,
                     ignore=_ignored(cfg))


def check_tokenizer_shapes(shapes, cfg, where: str = "tokenizer listing") -> None:
    """Checks a {torch_key: shape} listing against ``cfg`` without allocating anything."""
    mapping.check_shapes(mapping.strip_prefixes(shapes), tokenizer_key_map(cfg), abstract_params(cfg),
                   where, ignore=_ignored(cfg))


def _model_config(ckpt, path: str):
    cfg = ckpt.get("config") if isinstance(ckpt, dict) else None
    if isinstance(cfg, Mapping) and isinstance(cfg.get("model"), Mapping):
        return cfg["model"]
    raise CheckpointError(f"{path}: no tokenizer config under config -> model (reference "
                          f"tokenizer checkpoints carry their model config)")


def read_reference_tokenizer(path: str | os.PathLike, *, keep_repa: bool = True):
    """(cfg, params, extras) of a reference tokenizer file; extras = {"codebook_used": array or
    None, "args": the pickled training arguments as a dict or None}."""
    path = os.fspath(path)
    ckpt = load_torch_file(path)
    try:
        cfg = config_from_reference(_model_config(ckpt, path), where=f"{path}: config.model")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    sd = mapping.strip_prefixes(find_state_dict(ckpt, STATE_KEYS, path))
    has_repa = any(k.startswith(REPA_PREFIX) for k in sd)
    cfg = dataclasses.replace(cfg, repa_projector=bool(has_repa and keep_repa))
    params = tokenizer_params_from_state_dict(sd, cfg, where=f"tokenizer checkpoint {path}")
    usage = sd.get(USAGE_KEY)
    extras = {"codebook_used": None if usage is None else np.asarray(usage),
              "args": ckpt.get("args") if isinstance(ckpt, dict) else None}
    return cfg, params, extras


def load_reference_tokenizer(path: str | os.PathLike, *, keep_repa: bool = True):
    """(TokenizerConfig, params) from a reference tokenizer ``.pt``; see the module doc."""
    cfg, params, _ = read_reference_tokenizer(path, keep_repa=keep_repa)
    return cfg, params
