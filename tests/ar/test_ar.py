"""The AR model against the reference fixtures, and generation semantics."""
from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dar_jax import ar
from dar_jax.ar import generation as gen_lib


def test_logits_match_reference(ref_gpt, gpt_io):
    cfg, params = ref_gpt
    logits = ar.forward(cfg, params, gpt_io["tokens"][:, :-1], gpt_io["labels"])
    chex.assert_shape(logits, gpt_io["logits"].shape)
    chex.assert_type(logits, jnp.float32)
    ref = gpt_io["logits"]
    rel = np.abs(np.asarray(logits) - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, rel


@pytest.mark.parametrize("name,scale", [("greedy_cfg1", 1.0), ("greedy_cfg4", 4.0),
                                        ("greedy_cfg_sched", "1.5,6.0")])
def test_greedy_generation_matches_reference(ref_gpt, gpt_io, name, scale):
    cfg, params = ref_gpt
    tokens = ar.generate(cfg, params, gpt_io["labels"], jax.random.key(0), cfg_scale=scale,
                         greedy=True)
    np.testing.assert_array_equal(np.asarray(tokens), gpt_io[name])


def test_top_k_1_sampling_equals_greedy(ref_gpt, gpt_io):
    cfg, params = ref_gpt
    tokens = ar.generate(cfg, params, gpt_io["labels"], jax.random.key(7), cfg_scale=4.0, top_k=1)
    np.testing.assert_array_equal(np.asarray(tokens), gpt_io["greedy_cfg4"])


def test_generation_compiles_once_per_shape(ref_gpt, gpt_io):
    cfg, params = ref_gpt
    labels = gpt_io["labels"]
    opts = dict(cfg_scale=3.0, top_k=5, top_p=0.9, temperature=0.9)
    ar.generate(cfg, params, labels, jax.random.key(0), **opts).block_until_ready()
    before = gen_lib._generate_jit._cache_size()
    # other keys, labels, guidance scales, temperatures and top-p values: same program
    for seed, scale, temp, top_p in [(1, 2.0, 1.0, 0.8), (2, "1.5,6.0", 0.7, 0.95), (3, 7.5, 1.3, 0.5)]:
        ar.generate(cfg, params, (labels + seed) % cfg.num_classes, jax.random.key(seed),
                    cfg_scale=scale, top_k=5, top_p=top_p, temperature=temp).block_until_ready()
    assert gen_lib._generate_jit._cache_size() == before


def test_fixed_key_is_reproducible_and_keys_matter(ref_gpt, gpt_io):
    cfg, params = ref_gpt
    run = lambda seed: np.asarray(ar.generate(cfg, params, gpt_io["labels"], jax.random.key(seed),
                                              cfg_scale=2.0, temperature=1.5))
    a, b, c = run(3), run(3), run(4)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_sample_tokens_depend_only_on_their_own_key(ref_gpt):
    cfg, params = ref_gpt
    labels = jnp.array([1, 2, 3, 4]) % cfg.num_classes
    keys = ar.sample_keys(jax.random.key(11), 4)
    together = ar.generate(cfg, params, labels, keys, cfg_scale=2.0, temperature=1.5)
    alone = ar.generate(cfg, params, labels[2:3], keys[2:3], cfg_scale=2.0, temperature=1.5)
    np.testing.assert_array_equal(np.asarray(together[2:3]), np.asarray(alone))


def test_prefix_tokens_are_kept_verbatim(ref_gpt, gpt_io):
    cfg, params = ref_gpt
    k = cfg.block_size // 4
    prefix = gpt_io["tokens"]
    out = np.asarray(ar.generate(cfg, params, gpt_io["labels"], jax.random.key(5), cfg_scale=2.0,
                                 prefix=prefix, prefix_len=k, temperature=1.5))
    np.testing.assert_array_equal(out[:, :k], prefix[:, :k])
    free = np.asarray(ar.generate(cfg, params, gpt_io["labels"], jax.random.key(5), cfg_scale=2.0,
                                  temperature=1.5))
    assert (out[:, k:] != free[:, k:]).any()


def test_top_k_restricts_to_k_most_likely():
    logits = jnp.array([[0.1, 3.0, 2.0, -1.0, 2.5]])
    kept = np.isfinite(np.asarray(gen_lib.filter_logits(logits, 2, None)))
    np.testing.assert_array_equal(kept, [[False, True, False, False, True]])
    # nucleus: softmax of sorted logits is [0.49, 0.30, 0.18, ...]; top_p 0.6 keeps 2 tokens
    kept = np.isfinite(np.asarray(gen_lib.filter_logits(logits, 0, jnp.float32(0.6))))
    np.testing.assert_array_equal(kept, [[False, True, False, False, True]])
    kept = np.isfinite(np.asarray(gen_lib.filter_logits(logits, 0, jnp.float32(0.01))))
    assert kept.sum() == 1 and kept[0, 1]


def test_cfg_schedule_parsing():
    assert gen_lib.parse_cfg_scale("1.5,6.0") == gen_lib.CfgSchedule(1.5, 6.0)
    assert gen_lib.parse_cfg_scale(4) == gen_lib.CfgSchedule(4.0, 4.0)
    assert gen_lib.parse_cfg_scale("1.0,8.0").start == pytest.approx(1.001)
    assert not gen_lib.parse_cfg_scale(1.0).active
    for bad in ("a,b", "1,2,3", "", "4,"):
        with pytest.raises(gen_lib.SamplingError, match="CFG"):
            gen_lib.parse_cfg_scale(bad)


def test_bad_generation_inputs(ref_gpt):
    cfg, params = ref_gpt
    with pytest.raises(ar.SamplingError, match="class labels"):
        ar.generate(cfg, params, jnp.array([cfg.num_classes]), jax.random.key(0))
    with pytest.raises(ar.SamplingError, match="prefix"):
        ar.generate(cfg, params, jnp.array([0]), jax.random.key(0),
                    prefix=jnp.zeros((2, 4), jnp.int32), prefix_len=2)


def test_training_forward_dropout_and_label_drop(ref_gpt, gpt_io):
    cfg, params = ref_gpt
    tokens, labels = gpt_io["tokens"][:, :-1], gpt_io["labels"]
    plain = ar.forward(cfg, params, tokens, labels)
    noisy = ar.forward(cfg, params, tokens, labels, dropout_key=jax.random.key(0))
    noisy2 = ar.forward(cfg, params, tokens, labels, dropout_key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(noisy), np.asarray(noisy2))
    assert not np.allclose(np.asarray(noisy), np.asarray(plain), atol=1e-3)
    # class dropout alone (p = 1): every label becomes the null class
    only_labels = dataclasses.replace(cfg, token_dropout_p=0.0, resid_dropout_p=0.0,
                                      ffn_dropout_p=0.0, class_dropout_prob=1.0)
    dropped = ar.forward(only_labels, params, tokens, labels, dropout_key=jax.random.key(1))
    null = ar.forward(cfg, params, tokens, jnp.full_like(labels, cfg.num_classes))
    np.testing.assert_allclose(np.asarray(dropped), np.asarray(null), rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params(ref_gpt, gpt_io):
    cfg, params = ref_gpt
    bf = dataclasses.replace(cfg, dtype="bfloat16")
    chex.assert_trees_all_equal_dtypes(params, jax.tree.map(lambda x: x.astype(jnp.float32), params))
    logits = ar.forward(bf, params, gpt_io["tokens"][:, :-1], gpt_io["labels"])
    chex.assert_type(logits, jnp.float32)
    ref = gpt_io["logits"]
    assert np.abs(np.asarray(logits) - ref).max() / np.abs(ref).max() < 5e-2


def test_named_sizes_and_logical_axes():
    for name, (layers, heads, dim) in {"GPT-B": (12, 12, 768), "GPT-L": (24, 16, 1024),
                                       "GPT-XL": (36, 20, 1280)}.items():
        cfg = ar.gpt_config(name)
        assert (cfg.n_layer, cfg.n_head, cfg.dim) == (layers, heads, dim)
    cfg = ar.gpt_config("GPT-B")
    assert cfg.ffn_hidden == 2048  # 2/3 * 4 * 768 = 2048, already a multiple of 256
    assert ar.gpt_config("GPT-L").ffn_hidden == 2816
    axes = ar.logical_axes(cfg)
    assert tuple(axes["layers"][0]["feed_forward"]["w1"]["kernel"]) == ("embed", "mlp")
    assert tuple(axes["tok_embeddings"]) == ("vocab", "embed")
    from dar_jax.config import ConfigError
    with pytest.raises(ConfigError, match="unknown key"):
        ar.gpt_config("GPT-B", n_layers=3)
