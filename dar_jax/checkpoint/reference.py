"""Readers of the reference's (showlab/D-AR, LlamaGen) PyTorch checkpoints."""
from __future__ import annotations

import os

import numpy as np

from dar_jax import ar
from dar_jax.checkpoint import mapping as M
from dar_jax.checkpoint.torch_pickle import CheckpointError, find_state_dict, load_torch_file

GPT_STATE_KEYS = ("model", "module", "state_dict")


def gpt_key_map(cfg: ar.GPTConfig) -> M.KeyMap:
    """torch key -> (param path, transform) for LlamaGen's c2i GPT."""
    d, h, hd = cfg.dim, cfg.n_head, cfg.head_dim
    km: M.KeyMap = {
        "tok_embeddings.weight": (("tok_embeddings",), M.identity),
        "cls_embedding.embedding_table.weight": (("cls_embedding",), M.identity),
        "norm.weight": (("norm", "weight"), M.identity),
        "output.weight": (("output",), M.transpose),
    }
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        km[p + "attention.wqkv.weight"] = (("layers", i, "attention", "wqkv"),
                                           lambda w: w.T.reshape(d, 3, h, hd))
        km[p + "attention.wo.weight"] = (("layers", i, "attention", "wo"),
                                         lambda w: w.T.reshape(h, hd, d))
        for name in ("w1", "w2", "w3"):
            km[p + f"feed_forward.{name}.weight"] = (("layers", i, "feed_forward", name, "kernel"), M.transpose)
        km[p + "attention_norm.weight"] = (("layers", i, "attention_norm", "weight"), M.identity)
        km[p + "ffn_norm.weight"] = (("layers", i, "ffn_norm", "weight"), M.identity)
    return km


def _gpt_ignored(key: str) -> bool:
    # KV caches exist in a state dict saved after generate(); RoPE tables are not buffers.
    return ".kv_cache." in key or key == "freqs_cis"


def gpt_params_from_state_dict(state_dict, cfg: ar.GPTConfig, where: str = "GPT checkpoint"):
    sd = M.strip_prefixes(state_dict)
    return M.convert(sd, gpt_key_map(cfg), ar.abstract_params(cfg), where, ignore=_gpt_ignored)


def check_gpt_shapes(shapes, cfg: ar.GPTConfig, where: str = "GPT listing") -> None:
    M.check_shapes(M.strip_prefixes(shapes), gpt_key_map(cfg), ar.abstract_params(cfg), where,
                   ignore=_gpt_ignored)


def load_reference_gpt(path: str | os.PathLike, cfg: ar.GPTConfig):
    """Params for ``cfg`` from a LlamaGen / D-AR GPT ``.pt`` (state dict under model/module/...)."""
    ckpt = load_torch_file(path)
    sd = find_state_dict(ckpt, GPT_STATE_KEYS, str(path))
    return gpt_params_from_state_dict(sd, cfg, where=f"GPT checkpoint {path}")


def infer_gpt_sizes(state_dict) -> dict:
    """vocab_size / num_classes / dim / n_layer visible in a GPT state dict (n_head is not)."""
    sd = M.strip_prefixes(state_dict)
    try:
        vocab, dim = np.shape(sd["tok_embeddings.weight"])
        classes = np.shape(sd["cls_embedding.embedding_table.weight"])[0] - 1
    except KeyError as e:
        raise CheckpointError(f"not a LlamaGen GPT state dict: no {e}") from None
    layers = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    return dict(vocab_size=int(vocab), dim=int(dim), num_classes=int(classes), n_layer=layers)
