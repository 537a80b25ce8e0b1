"""The models give the reference's results with the Pallas kernels (interpret mode on CPU)."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from dar_jax import ar
from dar_jax import tokenizer as tok


def test_ar_model_with_pallas_kernels_matches_fixtures(ref_gpt, gpt_io):
    cfg, params = ref_gpt
    pcfg = dataclasses.replace(cfg, attention_impl="pallas")
    logits = ar.forward(pcfg, params, gpt_io["tokens"][:, :-1], gpt_io["labels"])
    ref = gpt_io["logits"]
    assert np.abs(np.asarray(logits) - ref).max() / np.abs(ref).max() < 1e-4
    tokens = ar.generate(pcfg, params, gpt_io["labels"], jax.random.key(0), cfg_scale=4.0, greedy=True)
    np.testing.assert_array_equal(np.asarray(tokens), gpt_io["greedy_cfg4"])


def test_tokenizer_with_pallas_kernels_matches_fixtures(ref_tokenizer, ref_dir):
    cfg, params = ref_tokenizer
    pcfg = dataclasses.replace(cfg, attention_impl="pallas")
    io = np.load(ref_dir / "tokenizer_io.npz")
    images = io["images"].transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.asarray(tok.encode(pcfg, params, images)), io["codes"])
    cond = tok.codes_to_cond(pcfg, params, io["codes"])
    np.testing.assert_allclose(np.asarray(cond), io["cond"], rtol=1e-4, atol=1e-5)
    decoded = tok.decode(pcfg, params, io["codes"], io["decode_noise"].transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(decoded), io["decode_code"].transpose(0, 2, 3, 1), atol=1e-3)
