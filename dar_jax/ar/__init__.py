"""The autoregressive half of D-AR: LlamaGen's class-conditional GPT, functional API.

    cfg = ar.gpt_config("GPT-B", vocab_size=16384, num_classes=1000)
    params = ar.init_params(cfg, jax.random.key(0))
    logits = ar.forward(cfg, params, tokens, labels)              # (B, T + 1, V)
    tokens = ar.generate(cfg, params, labels, key, cfg_scale="1.2,8.0")
"""
from __future__ import annotations

import jax

from dar_jax.ar.generation import (CfgSchedule, GenState, Generation, SamplingError, check_keys,
                                   check_labels, filter_logits, generate, parse_cfg_scale,
                                   prepare_generation, sample_keys)
from dar_jax.ar.model import (GPT, PURE_GPT, GPT_SIZES, GPTConfig, bind, gpt_config,
                              graphdef_and_abstract)
from dar_jax.ar.reference import gpt_key_map, load_reference_gpt
from dar_jax.family import Family


init_params = PURE_GPT.init_params          # (cfg, key) -> params (pure dict, float32)
abstract_params = PURE_GPT.abstract_params  # (cfg) -> ShapeDtypeStruct pytree
logical_axes = PURE_GPT.logical_axes        # (cfg) -> logical axis names, like the params

FAMILY = Family(kind="gpt", config_class=GPTConfig, init_params=init_params,
                abstract_params=abstract_params, logical_axes=logical_axes, key_map=gpt_key_map)


def forward(cfg: GPTConfig, params, tokens: jax.Array, labels: jax.Array, *,
            dropout_key: jax.Array | None = None, target=None) -> jax.Array:
    """Teacher-forced logits (B, T + 1, V) for input tokens (B, T) and labels (B,).
    ``target``: the ``dar_jax.parallel.Target`` the program is built for (default: first device)."""
    return bind(cfg, params)(tokens, labels, dropout_key=dropout_key, target=target)
