"""The autoregressive half of D-AR: LlamaGen's class-conditional GPT, functional API.

    cfg = ar.gpt_config("GPT-B", vocab_size=16384, num_classes=1000)
    params = ar.init_params(cfg, jax.random.key(0))
    logits = ar.forward(cfg, params, tokens, labels)              # (B, T + 1, V)
    tokens = ar.generate(cfg, params, labels, key, cfg_scale="1.2,8.0")
"""
from __future__ import annotations

import jax
from flax import nnx

from dar_jax.ar.generation import (CfgSchedule, GenState, Generation, SamplingError, filter_logits, generate, prepare,
                                 parse_cfg_scale, sample_keys)
from dar_jax.ar.model import GPT, GPT_SIZES, GPTConfig, bind, gpt_config, graphdef_and_abstract


def init_params(cfg: GPTConfig, key: jax.Array):
    """Freshly initialised parameters (pure dict pytree, float32)."""
    model = GPT(cfg, rngs=nnx.Rngs(params=key))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def abstract_params(cfg: GPTConfig):
    """ShapeDtypeStruct pytree of the parameters (nothing allocated)."""
    _, state = graphdef_and_abstract(cfg)
    return nnx.to_pure_dict(state)


def logical_axes(cfg: GPTConfig):
    """Pytree (like the params) of logical axis-name tuples for the sharding rules."""
    _, state = graphdef_and_abstract(cfg)
    return nnx.to_pure_dict(nnx.get_partition_spec(state))


def forward(cfg: GPTConfig, params, tokens: jax.Array, labels: jax.Array, *,
            dropout_key: jax.Array | None = None) -> jax.Array:
    """Teacher-forced logits (B, T + 1, V) for input tokens (B, T) and labels (B,)."""
    return bind(cfg, params)(tokens, labels, dropout_key=dropout_key)
