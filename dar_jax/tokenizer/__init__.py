"""The D-AR sequential diffusion tokenizer, functional API (images NHWC float32 in [-1, 1]).

    cfg, params = tokenizer.load_reference_tokenizer("tokenizer_v1.pt")
    codes = tokenizer.encode(cfg, params, images)                  # (B, 256) int32
    cond = tokenizer.codes_to_cond(cfg, params, codes)             # (B, 256, 768)
    images = tokenizer.decode(cfg, params, codes, jax.random.key(0), solver="adams2")

Training pieces: :func:`encode_latents` (quantizer output with the straight-through estimator),
:func:`quant_to_cond`, :func:`velocity` (one network evaluation, REPA features on request) and
the flow-matching functions of :mod:`dar_jax.tokenizer.flow` / losses of
:mod:`dar_jax.tokenizer.quantizer`. Group-by-group (streaming) decoding, one compiled program
for every range of steps (:mod:`dar_jax.tokenizer.sequential`)::

    state = tokenizer.init_state(cfg, noise)
    kv = tokenizer.cross_kv(cfg, params, cond)        # cond of the tokens known so far
    state, preview = tokenizer.run_steps(cfg, params, kv, state, done, tokenizer.steps_ready(cfg, n))

:data:`FAMILY` is the record the model store, the converters and the pipeline take.
"""
from __future__ import annotations

from dar_jax.family import Family
from dar_jax.tokenizer import flow, quantizer
from dar_jax.tokenizer.config import (DiffDecoderConfig, ImageSizeError, TokenizerConfig,
                                      TokenizerInputError, tiny_config, tokenizer_config)
from dar_jax.tokenizer.core import (CodeRangeError, ImageRangeError, abstract_params, check_codes,
                                    check_images, codes_to_cond, codes_to_quant, encode,
                                    encode_latents, init_params, logical_axes, num_params,
                                    quant_to_cond, velocity)
from dar_jax.tokenizer.model import Tokenizer, bind, graphdef_and_abstract
from dar_jax.tokenizer.quantizer import Quantized
from dar_jax.tokenizer.reference import (load_reference_tokenizer, read_reference_tokenizer,
                                         tokenizer_key_map)
from dar_jax.tokenizer.sequential import (DecodeError, DecodeState, check_size, cross_kv, decode,
                                          init_state, postprocess, reconstruct, resolution,
                                          run_steps, steps_ready, time_points, tokens_in_groups,
                                          window_starts)

FAMILY = Family(kind="tokenizer", config_class=TokenizerConfig, init_params=init_params,
                abstract_params=abstract_params, logical_axes=logical_axes,
                key_map=tokenizer_key_map)

__all__ = [
    "FAMILY", "TokenizerConfig", "DiffDecoderConfig", "tokenizer_config", "tiny_config",
    "Tokenizer", "bind", "graphdef_and_abstract", "init_params", "abstract_params",
    "logical_axes", "num_params", "encode", "encode_latents", "quant_to_cond", "codes_to_quant",
    "codes_to_cond", "velocity", "cross_kv", "decode", "reconstruct", "init_state", "run_steps",
    "steps_ready", "tokens_in_groups", "time_points", "window_starts", "resolution", "check_size",
    "postprocess", "DecodeState", "DecodeError", "load_reference_tokenizer",
    "read_reference_tokenizer", "tokenizer_key_map", "check_images", "check_codes", "flow",
    "quantizer", "Quantized", "TokenizerInputError", "ImageRangeError", "CodeRangeError",
    "ImageSizeError",
]
