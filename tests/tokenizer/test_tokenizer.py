"""The tokenizer against the reference fixtures (every size and option from config.json), its
loader, config and input checks, and the training-facing pieces."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch_format
from conftest import OFFICIAL_SHAPES
from dar_jax import solvers, tokenizer as T
from dar_jax.tokenizer import sequential as SEQ
from dar_jax.checkpoint import CheckpointError, load_model, load_torch_file
from dar_jax.checkpoint import convert as convert_cmd
from dar_jax.tokenizer import reference as RT
from dar_jax.config import ConfigError
from dar_jax.tokenizer import flow, quantizer


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def abs_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


_velocity = jax.jit(T.velocity, static_argnums=0, static_argnames="return_repa")


# ---------------------------------------------------------------------------------------------
# parity with the reference
# ---------------------------------------------------------------------------------------------
def test_config_comes_from_the_file(tok_case):
    cfg, ref = tok_case.cfg, tok_case.config["tokenizer"]
    for key, value in ref.items():
        if key == "diff_decoder":
            for k, v in value.items():
                assert getattr(cfg.diff_decoder, k) == v, k
        else:
            assert getattr(cfg, key) == value, key
    h = tok_case.config["image_size"]
    assert tok_case.io["images"].shape[1:] == (h, h, 3)


def test_codes_are_exact(tok_case):
    c = tok_case
    codes = T.encode(c.cfg, c.params, c.io["images"], check_range=True)
    chex.assert_type(codes, jnp.int32)
    np.testing.assert_array_equal(np.asarray(codes), c.io["codes"])
    q = T.encode_latents(c.cfg, c.params, c.io["images"])
    np.testing.assert_array_equal(np.asarray(q.codes), c.io["codes"])
    assert rel_err(q.quant, c.io["quant"]) < 1e-4


def test_quant_and_cond(tok_case):
    c = tok_case
    quant = T.codes_to_quant(c.cfg, c.params, c.io["codes"])
    assert rel_err(quant, c.io["quant"]) < 1e-4
    cond = T.codes_to_cond(c.cfg, c.params, c.io["codes"])
    chex.assert_shape(cond, c.io["cond"].shape)
    assert rel_err(cond, c.io["cond"]) < 1e-4
    # causal: a prefix of the codes gives the prefix of the condition
    k = c.cfg.queries_per_step
    assert rel_err(T.codes_to_cond(c.cfg, c.params, c.io["codes"][:, :k]), c.io["cond"][:, :k]) < 1e-4


def test_velocity(tok_case):
    c = tok_case
    v = _velocity(c.cfg, c.params, c.io["vel_xt"], c.io["vel_t"], c.io["vel_cond"])
    chex.assert_shape(v, c.io["vel_out"].shape)
    assert rel_err(v, c.io["vel_out"]) < 1e-4


@pytest.mark.parametrize("solver", ["adams2", "euler"])
def test_decode_and_previews(tok_case, solver):
    c = tok_case
    steps = c.cfg.num_denoising_steps
    out = T.decode(c.cfg, c.params, c.io["cond"], c.io["decode_noise"], solver=solver)
    assert abs_err(out, c.io[f"decode_{solver}"]) < 1e-3
    before = SEQ._decode._cache_size()
    for k in range(1, steps):
        prev = T.decode(c.cfg, c.params, c.io["cond"], c.io["decode_noise"], solver=solver,
                        preview_steps=k)
        assert abs_err(prev, c.io[f"preview_{solver}_{k}"]) < 1e-3, k
    assert SEQ._decode._cache_size() == before, "previews recompiled the decode"


def test_decode_code_entry_point(tok_case):
    c = tok_case
    out = T.decode(c.cfg, c.params, c.io["codes"], c.io["decode_noise"])
    assert abs_err(out, c.io["decode_code"]) < 1e-3


def test_preview_groups_and_streaming_steps(tok_default):
    """preview_groups picks the steps covered by g groups; run_steps group by group (one program)
    yields the previews and the final image of the one-call decode."""
    c = tok_default
    cfg, steps = c.cfg, c.cfg.num_denoising_steps
    n_tok = cfg.num_all_queries
    state = T.init_state(cfg, c.io["decode_noise"])
    done = 0
    compiled = None
    for g in range(1, cfg.num_query_groups + 1):
        ready = T.steps_ready(cfg, T.tokens_in_groups(cfg, g))
        if ready <= done:
            continue
        # only the tokens known after g groups, the rest padded: causality keeps the prefix exact
        known = T.tokens_in_groups(cfg, g)
        codes = np.where(np.arange(n_tok)[None] < known, c.io["codes"], 0)
        kv = T.cross_kv(cfg, c.params, T.codes_to_cond(cfg, c.params, codes))
        state, preview = T.run_steps(cfg, c.params, kv, state, done, ready)
        want = c.io["decode_adams2"] if ready == steps else c.io[f"preview_adams2_{ready}"]
        assert abs_err(preview, want) < 1e-3, (g, ready)
        by_groups = T.decode(cfg, c.params, c.io["cond"], c.io["decode_noise"], preview_groups=g)
        assert abs_err(by_groups, want) < 1e-3
        if compiled is None:
            compiled = SEQ._integrate._cache_size()
        assert SEQ._integrate._cache_size() == compiled
        done = ready
    assert done == steps


# ---------------------------------------------------------------------------------------------
# config, loader, converter
# ---------------------------------------------------------------------------------------------
def test_config_keys_are_checked(ref_config):
    ref = dict(ref_config["tokenizer"])
    cfg = T.tokenizer_config(ref)
    assert cfg.queries_per_step == ref.get("queries_per_step", ref["num_all_queries"] // ref["num_query_groups"])
    for extra in ({"sampling_resolution": 64, "output_resolution": 32, "rope_base_len": 100},
                  {"diff_decoder": {"repa_layer": 1, "grad_checkpointing": False, "cfg": 1.0,
                                    "rope_base_len": 100}}):
        T.tokenizer_config(ref, **extra)   # legal keys of the reference
    with pytest.raises(ConfigError, match="bogus_key"):
        T.tokenizer_config({**ref, "bogus_key": 1})
    with pytest.raises(ConfigError, match="typo"):
        T.tokenizer_config(ref, diff_decoder={"typo": 1})
    with pytest.raises(ConfigError, match="vq_enable"):
        T.tokenizer_config({**ref, "vq_enable": False})
    with pytest.raises(ConfigError, match="share_time_encoding"):
        T.tokenizer_config(ref, diff_decoder={"mlp_head": True, "share_time_encoding": False})
    with pytest.raises(ConfigError, match="cond_dim"):
        T.tokenizer_config(ref, diff_decoder={"cond_dim": ref["decoder_dim"] + 64})


def test_official_v1_listing_maps_onto_the_model():
    v1 = json.loads(OFFICIAL_SHAPES.read_text())["tokenizer_v1"]
    cfg = T.tokenizer_config(v1["config"])
    assert cfg == T.TokenizerConfig()          # the defaults are tokenizer v1
    listing = dict(v1["ema"])
    RT.check_tokenizer_shapes(listing, dataclasses.replace(cfg, repa_projector=True), where="v1")
    RT.check_tokenizer_shapes(listing, cfg, where="v1 (REPA ignored)")
    n = T.num_params(cfg)
    assert 280e6 < n < 330e6, n
    wrong = {**listing, "diff_decoder.net.conv_out.weight": [3 * 8 * 8, 512, 1, 1]}
    with pytest.raises(CheckpointError, match=r"wrongly shaped.*conv_out\.weight"):
        RT.check_tokenizer_shapes(wrong, cfg, where="v1")
    short = {k: v for k, v in listing.items() if not k.startswith("decoder_layers.7.")}
    with pytest.raises(CheckpointError, match=r"missing keys: decoder_layers\.7\."):
        RT.check_tokenizer_shapes(short, cfg, where="v1")


def _rewrite(src, dst, edit):
    ckpt = load_torch_file(src)
    edit(ckpt)
    torch_format.save(ckpt, str(dst))
    return dst


def test_checkpoint_that_does_not_match_its_config_is_refused(tmp_path, tok_default):
    src = tok_default.path / "tokenizer.pt"

    def more_layers(ck):
        ck["config"]["model"]["num_encoder_layers"] += 1

    def wider_codes(ck):
        ck["config"]["model"]["vq_dim"] *= 2

    def unknown_key(ck):
        ck["config"]["model"]["not_a_key"] = 3

    def no_config(ck):
        del ck["config"]

    for edit, match in ((more_layers, r"missing keys: encoder_layers\."), (wider_codes, "wrongly shaped"),
                        (unknown_key, "not_a_key"), (no_config, "no tokenizer config")):
        path = _rewrite(src, tmp_path / f"{edit.__name__}.pt", edit)
        with pytest.raises(CheckpointError, match=match):
            T.load_reference_tokenizer(path)


def test_trainer_file_layout_loads(tmp_path, tok_default):
    """'model' instead of 'ema', a pickled argparse.Namespace, and REPA dropped on request."""
    def trainer_layout(ck):
        ck["model"] = ck.pop("ema")
        ck["args"] = argparse.Namespace(lr=2e-4, results_dir="runs")
        ck["steps"] = 7

    path = _rewrite(tok_default.path / "tokenizer.pt", tmp_path / "trainer.pt", trainer_layout)
    cfg, params, extras = RT.read_reference_tokenizer(path)
    assert cfg == tok_default.cfg
    jax.tree.map(np.testing.assert_array_equal, params, tok_default.params)
    assert extras["args"]["lr"] == 2e-4
    assert extras["codebook_used"].shape == (65536,)
    cfg2, params2 = T.load_reference_tokenizer(path, keep_repa=False)
    assert not cfg2.repa_projector and "repa_out" not in params2["diff"]


def test_convert_command(tmp_path, tok_default):
    out = tmp_path / "tok"
    assert convert_cmd.main(["tokenizer", str(tok_default.path / "tokenizer.pt"), str(out)]) == 0
    kind, cfg, params = load_model(out, T.FAMILY)
    assert kind == "tokenizer" and cfg == tok_default.cfg
    jax.tree.map(np.testing.assert_array_equal, params, tok_default.params)
    bad = _rewrite(tok_default.path / "tokenizer.pt", tmp_path / "bad.pt",
                   lambda ck: ck["config"]["model"].update(decoder_dim=ck["config"]["model"]["decoder_dim"] + 64,
                                                           diff_decoder={**ck["config"]["model"]["diff_decoder"],
                                                                         "cond_dim": ck["config"]["model"]["decoder_dim"] + 64}))
    assert convert_cmd.main(["tokenizer", str(bad), str(tmp_path / "bad")]) == 2


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_bad_images_and_codes_give_clear_errors(tok_default):
    c = tok_default
    cfg, img = c.cfg, c.io["images"]
    h = img.shape[1]
    p = cfg.encoder_patch_size
    with pytest.raises(T.ImageSizeError, match="not a multiple of the encoder patch size"):
        T.encode(cfg, c.params, np.zeros((1, h + p // 2, h, 3), np.float32))
    with pytest.raises(T.TokenizerInputError, match="3 channels"):
        T.encode(cfg, c.params, np.transpose(img, (0, 3, 1, 2))[:, :, :, :4])
    with pytest.raises(T.TokenizerInputError, match="3 channels"):
        T.encode(cfg, c.params, np.concatenate([img, img[..., :1]], axis=-1))
    with pytest.raises(T.ImageRangeError, match=r"\[-1, 1\]"):
        T.encode(cfg, c.params, img * 2.0 + 0.5, check_range=True)
    T.encode(cfg, c.params, img * 2.0 + 0.5)          # no check unless asked
    with pytest.raises(T.CodeRangeError, match=f"0, {cfg.vq_codebook_size}"):
        T.codes_to_cond(cfg, c.params, c.io["codes"] + cfg.vq_codebook_size)
    with pytest.raises(T.CodeRangeError):
        T.decode(cfg, c.params, c.io["codes"] - 100, jax.random.key(0))
    with pytest.raises(T.TokenizerInputError, match="integers"):
        T.codes_to_cond(cfg, c.params, c.io["codes"].astype(np.float32))
    with pytest.raises(T.TokenizerInputError, match="queries"):
        T.codes_to_cond(cfg, c.params, np.zeros((1, cfg.num_all_queries + 1), np.int32))
    with pytest.raises(T.DecodeError, match="patch size"):
        T.decode(cfg, c.params, c.io["cond"], c.io["decode_noise"][:, 1:])
    with pytest.raises(solvers.SolverError, match="unknown solver"):
        T.decode(cfg, c.params, c.io["cond"], c.io["decode_noise"], solver="rk45")
    with pytest.raises(T.DecodeError, match="range"):
        T.decode(cfg, c.params, c.io["cond"], c.io["decode_noise"], preview_steps=0)


# ---------------------------------------------------------------------------------------------
# parameters, REPA, training pieces
# ---------------------------------------------------------------------------------------------
def _small_cfg(**kw):
    base = dict(encoder_patch_size=4, num_encoder_layers=1, num_decoder_layers=1, encoder_dim=64,
                decoder_dim=64, vq_dim=4, vq_codebook_size=16, num_denoising_steps=2,
                num_query_groups=2, num_all_queries=8, queries_per_step=4, sampling_resolution=16,
                diff_decoder=dict(dim=64, cond_dim=64, patch_size=2, depth=2, repa_layer=1,
                                  data_std=0.6, time_shift=2.0))
    return T.tokenizer_config(base, **kw)


@pytest.fixture(scope="module")
def small_model():
    cfg = _small_cfg(repa_projector=True)
    return cfg, T.init_params(cfg, jax.random.key(0))


def test_params_axes_and_repa_projector(small_model):
    cfg, params = small_model
    chex.assert_trees_all_equal_shapes(params, T.abstract_params(cfg))
    axes = T.logical_axes(cfg)
    assert jax.tree.structure(params) == jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple))
    assert params["diff"]["repa_out"][2]["kernel"].shape == (2048, 768)
    assert "repa_out" not in T.abstract_params(_small_cfg())["diff"]
    # REPA pooling: grid 8 (< 16) is kept as is; grid 32 is pooled by 2 to 16 x 16
    t = jnp.array([0.2, 0.7])
    cond = jax.random.normal(jax.random.key(2), (2, cfg.queries_per_step, cfg.decoder_dim))
    for size, grid in ((16, 8), (64, 16)):
        x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
        v, repa = _velocity(cfg, params, x, t, cond, return_repa=True)
        chex.assert_shape(repa, (2, grid * grid, 768))
        if size == 16:   # asking for REPA does not change the velocity
            np.testing.assert_allclose(np.asarray(v), np.asarray(_velocity(cfg, params, x, t, cond)),
                                       atol=1e-6)
    # the pooled features are the projector applied to the average of each s x s cell
    model = T.bind(cfg, params)
    tok, gridhw = model.diff.patchify(x)
    from dar_jax.parallel import default_target
    tok = model.diff.blocks[0](tok, model.diff.time_embedding(t), model.diff.prepare_cond(cond)[0],
                               model.diff.rope(*gridhw), default_target())
    h = np.asarray(tok).reshape(2, 32, 32, -1).reshape(2, 16, 2, 16, 2, -1).mean(axis=(2, 4))
    for i, lin in enumerate(params["diff"]["repa_out"].values()):
        h = h @ np.asarray(lin["kernel"]) + np.asarray(lin["bias"])
        h = h / (1 + np.exp(-h)) if i < 2 else h
    np.testing.assert_allclose(np.asarray(repa), h.reshape(2, 256, 768), rtol=1e-4, atol=1e-5)


def test_flow_matching_pieces():
    cfg = T.tiny_config()
    steps = cfg.num_denoising_steps
    t = jnp.asarray([i / steps for i in range(steps)], jnp.float32)
    np.testing.assert_array_equal(np.asarray(flow.window_start(cfg, t)), T.window_starts(cfg))
    np.testing.assert_allclose(np.asarray(flow.time_shift(t, cfg.time_shift)),
                               T.time_points(steps, cfg.time_shift)[:-1], rtol=1e-6)
    assert float(flow.time_shift(jnp.float32(0.5), 2.0)) == pytest.approx(1 / 3)
    starts = flow.window_start(cfg, jnp.array([0.0, 0.124, 0.126, 0.99, 1.0]))
    np.testing.assert_array_equal(np.asarray(starts), [0, 0, 8, 24, 24])   # clamped to N - qps
    key = jax.random.key(0)
    images = jax.random.uniform(key, (3, 32, 32, 3), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.key(1), images.shape)
    fb = flow.flow_batch(cfg, images, jnp.array([0.0, 0.5, 0.99]), noise)
    np.testing.assert_array_equal(np.asarray(fb.start), [0, 16, 24])
    np.testing.assert_array_equal(np.asarray(fb.query_end), [7, 23, 31])
    # with the exact velocity the one-step prediction recovers the image and the loss is zero
    assert float(flow.flow_matching_loss(fb.target, fb.target, cfg.data_std)) == 0.0
    np.testing.assert_allclose(np.asarray(flow.predict_data(fb.x_t, fb.target, fb.t, cfg.data_std)),
                               np.asarray(images), atol=1e-5)
    x1 = images * cfg.data_std
    np.testing.assert_allclose(np.asarray(fb.x_t[1]), np.asarray(fb.t[1] * x1[1] + (1 - fb.t[1]) * noise[1]),
                               atol=1e-6)
    window = flow.gather_window(jnp.arange(2 * 32 * 1.0).reshape(2, 32, 1), jnp.array([3, 10]), 4)
    np.testing.assert_array_equal(np.asarray(window)[..., 0], [[3, 4, 5, 6], [42, 43, 44, 45]])


def test_quantizer_losses_and_usage():
    z = jax.random.normal(jax.random.key(0), (2, 6, 4))
    book = jax.random.normal(jax.random.key(1), (10, 4))
    q = quantizer.quantize(z, book)
    emb = np.asarray(book) / np.linalg.norm(np.asarray(book), axis=-1, keepdims=True)
    zn = np.asarray(z) / np.linalg.norm(np.asarray(z), axis=-1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(q.codes), np.argmax(zn @ emb.T, axis=-1))
    np.testing.assert_allclose(np.asarray(q.quant), emb[np.asarray(q.codes)], atol=1e-6)
    end = jnp.array([1, 4])
    vq, commit = quantizer.vq_losses(q, end)
    per = ((emb[np.asarray(q.codes)] - zn) ** 2).mean(-1)
    mask = np.arange(6)[None] <= np.asarray(end)[:, None]
    assert float(vq) == pytest.approx(per[mask].mean(), rel=1e-5)
    assert float(commit) == pytest.approx(0.25 * per[mask].mean(), rel=1e-5)
    # straight-through: the gradient of a function of quant reaches z unchanged
    g = jax.grad(lambda zz: jnp.sum(quantizer.quantize(zz, book).quant * 3.0))(z)
    assert float(jnp.abs(g).sum()) > 0
    buf = jnp.zeros((64,), jnp.float32)
    buf, usage = quantizer.update_usage(buf, q.codes, jax.random.key(2), 10, sample=8)
    assert buf.shape == (64,)
    seen = set(np.asarray(buf[-8:]).astype(int)) | {0}
    assert float(usage) == pytest.approx(len(seen) / 10)
    assert float(quantizer.dead_code_rate(jnp.array([[1, 2], [1, 3]]))) == 0.5


def test_training_losses_have_gradients(small_model):
    """The pieces issue 7 composes: encoder -> VQ (straight-through) -> decoder layers -> window
    -> velocity (+REPA); gradients reach the encoder, the codebook and the diffusion network."""
    cfg, params = small_model
    # the reference zero-inits gates and output layers: perturb so that every path is live
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(9), len(leaves))
    params = jax.tree.unflatten(treedef, [p + 0.05 * jax.random.normal(k, p.shape)
                                          for p, k in zip(leaves, keys)])
    images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)

    def loss_fn(p, remat):
        model = T.bind(cfg, p)
        q = quantizer.quantize(model.encode(images, remat=remat), p["codebook"])
        cond = model.decoder_layers_forward(q.quant, remat=remat)
        fb = flow.sample_flow_batch(cfg, images, jax.random.key(3))
        group = flow.gather_window(cond, fb.start, cfg.queries_per_step)
        v, repa = T.velocity(cfg, p, fb.x_t, fb.t, group, return_repa=True, remat=remat)
        vq, commit = quantizer.vq_losses(q, fb.query_end)
        return flow.flow_matching_loss(v, fb.target, cfg.data_std) + vq + commit + 1e-3 * jnp.mean(repa ** 2)

    grads = jax.jit(jax.grad(functools.partial(loss_fn, remat=False)))(params)
    grads_remat = jax.jit(jax.grad(functools.partial(loss_fn, remat=True)))(params)
    # a saveable-names policy gives the same gradients too
    grads_names = jax.jit(jax.grad(functools.partial(loss_fn, remat="qkv,context,mlp_hidden,adaln")))(params)
    for a, b in zip(jax.tree.leaves(grads_names), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    for path in (("encoder_layers", 0, "attention", "q", "kernel"), ("codebook",), ("patchify_kernel",),
                 ("diff", "blocks", 1, "adaLN", "kernel"), ("diff", "repa_out", 0, "kernel"),
                 ("decoder_layers", 0, "mlp", "fc1", "kernel")):
        g, gr = grads, grads_remat
        for k in path:
            g, gr = g[k], gr[k]
        assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).sum()) > 0, path
        np.testing.assert_allclose(np.asarray(gr), np.asarray(g), rtol=1e-4, atol=1e-6)
