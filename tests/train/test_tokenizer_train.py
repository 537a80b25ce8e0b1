"""Tokenizer training: loss terms by hand, learning on the synthetic set, resume, sharding, errors."""
from __future__ import annotations

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import PERCEPTUAL_DIR, REPO
from dar_jax.tokenizer import flow, quantizer
from dar_jax.perceptual import gan
from dar_jax.evaluate.metrics import psnr, ssim
from dar_jax.train.tokenizer_task import entropy_loss
from test_train import run_worker


def test_vq_losses_average_over_the_window_prefix():
    # 1 image, 4 queries, 2 dims; window ends at query 1 -> only queries 0 and 1 count
    z = jnp.array([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]]])
    codebook = jnp.array([[1.0, 0.0], [0.0, -1.0]])
    q = quantizer.quantize(z, codebook)
    np.testing.assert_array_equal(np.asarray(q.codes), [[0, 0, 0, 1]])
    vq, commit = quantizer.vq_losses(q, jnp.array([1]), beta=0.25)
    # per-query mean squared distance: q0: 0, q1: ((1-0)^2 + (0-1)^2)/2 = 1
    np.testing.assert_allclose(float(vq), (0.0 + 1.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(commit), 0.25 * 0.5, rtol=1e-6)
    vq_all, _ = quantizer.vq_losses(q, jnp.array([3]))
    # q2 -> code 0: ((1-.6)^2 + .8^2)/2 = 0.4; q3 -> code 1: (1^2 + 1^2)/2 = 1
    np.testing.assert_allclose(float(vq_all), (0 + 1 + 0.4 + 1) / 4, rtol=1e-6)


def test_flow_matching_pieces_by_hand():
    x1 = jnp.full((1, 2, 2, 3), 0.6)
    x0 = jnp.zeros((1, 2, 2, 3))
    t = jnp.array([0.25])
    xt = flow.interpolate(x1, x0, t)
    np.testing.assert_allclose(np.asarray(xt), 0.15, rtol=1e-6)
    v = flow.target_velocity(x1, x0)
    np.testing.assert_allclose(float(flow.flow_matching_loss(v + 0.3, v, 0.6)), 0.09 / 0.36, rtol=1e-6)
    # the one-step prediction of the exact velocity is the image
    np.testing.assert_allclose(np.asarray(flow.predict_data(xt, v, t, 0.6)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(flow.time_shift(jnp.float32(0.5), 2.0)), 1 / 3, rtol=1e-6)


def test_entropy_loss_matches_numpy():
    rng = np.random.default_rng(0)
    z = quantizer.l2_normalize(jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32))
    cb = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    e = np.asarray(quantizer.l2_normalize(cb))
    flat = np.asarray(z).reshape(-1, 4)
    d = (flat ** 2).sum(1, keepdims=True) + (e ** 2).sum(1) - 2 * flat @ e.T
    a = -d / 0.01
    p = np.exp(a - a.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    la = a + 1e-5
    logp = la - la.max(1, keepdims=True) - np.log(np.exp(la - la.max(1, keepdims=True)).sum(1, keepdims=True))
    avg = p.mean(0)
    want = -(p * logp).sum(1).mean() + (avg * np.log(avg + 1e-5)).sum()
    np.testing.assert_allclose(float(entropy_loss(z, cb)), want, rtol=1e-4)


def test_gan_losses_and_image_metrics_by_hand():
    real, fake = jnp.zeros((2, 3, 3, 1)), jnp.zeros((2, 3, 3, 1))
    np.testing.assert_allclose(float(gan.d_loss(real, fake)), np.log(2), rtol=1e-6)
    np.testing.assert_allclose(float(gan.g_loss(fake)), np.log(2), rtol=1e-6)
    w = jnp.array([0.0, 1.0])
    np.testing.assert_allclose(float(gan.d_loss(real, fake, w)), 0.5 * np.log(2), rtol=1e-6)
    x = jnp.zeros((1, 16, 16, 3))
    np.testing.assert_allclose(float(psnr(x + 0.1, x)[0]), 10 * np.log10(4 / 0.01), rtol=1e-5)
    y = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 16, 16, 3)), jnp.float32)
    np.testing.assert_allclose(float(ssim(y, y)[0]), 1.0, rtol=1e-5)
    assert float(ssim(y, -y)[0]) < 0.1
    disc_cfg = gan.DiscriminatorConfig(ndf=8, n_layers=2, groups=4)
    params = gan.init_params(disc_cfg, jax.random.key(0))
    logits = gan.apply(disc_cfg, params, jnp.zeros((2, 32, 32, 3)), jnp.array([0.1, 0.9]))
    assert logits.shape[0] == 2 and logits.shape[-1] == 1
    # time conditioning reaches the output
    other = gan.apply(disc_cfg, params, jnp.zeros((2, 32, 32, 3)), jnp.array([0.9, 0.1]))
    assert not np.allclose(np.asarray(logits), np.asarray(other))


def test_tiny_tokenizer_learns_on_synthetic_shapes(tmp_path):
    out, _ = run_worker({"task": "tokenizer", "workdir": str(tmp_path / "w"), "steps": 240, "batch": 16,
                         "eval_every": 240, "ckpt_every": 240})
    first, last = out["evals"][0], out["evals"][-1]
    assert first["step"] == 0 and last["step"] == 240
    assert last["eval_psnr"] > first["eval_psnr"] + 3.0, out["evals"]
    # more than half of the codebook in use (the reference's rolling usage statistic)
    assert out["result"]["codebook_usage"] > 0.5, out["result"]
    assert os.path.exists(tmp_path / "w" / "samples" / "recon_0000240.png")
    assert os.path.exists(tmp_path / "w" / "samples" / "preview_0000240.png")
    assert os.path.isdir(tmp_path / "w" / "model")


# A one-block tokenizer (every kind of layer once) for the tests of the trainer's mechanics, which
# do not need the tiny recipe's depth: half the compilation.
ONE_BLOCK = ["model.num_encoder_layers=1", "model.num_decoder_layers=1", "model.diff_decoder.depth=1"]


def test_kill_and_resume_bit_exact_with_ema_and_gan(tmp_path):
    spec = dict(task="tokenizer", steps=6, batch=4, ckpt_every=2, gan=2, report_shards=True,
                overrides=ONE_BLOCK)
    straight, _ = run_worker({**spec, "workdir": str(tmp_path / "a")})
    _, res = run_worker({**spec, "workdir": str(tmp_path / "b"), "kill_at": 5}, check=False)
    assert res.returncode == -signal.SIGKILL
    resumed, _ = run_worker({**spec, "workdir": str(tmp_path / "b")})
    assert resumed["result"]["start_step"] in (2, 4)
    assert resumed["state_digest"] == straight["state_digest"]


def test_tokenizer_fsdp_on_8_devices_matches_one(tmp_path):
    runs = [{"workdir": str(tmp_path / "one"), "devices": 1, "mesh": {"data": 1}},
            {"workdir": str(tmp_path / "fsdp"), "mesh": {"data": 1, "fsdp": 8}, "report_shards": True}]
    out, _ = run_worker(dict(task="tokenizer", fake_devices=8, steps=3, batch=8, ckpt_every=3, runs=runs,
                             overrides=ONE_BLOCK))
    np.testing.assert_allclose(out[1]["losses"], out[0]["losses"], rtol=1e-3)
    assert any(abs(f - 1 / 8) < 1e-9 for f in out[1]["shards"].values())


def test_missing_or_mismatched_weight_files_fail_before_training(tmp_path):
    from dar_jax.checkpoint import CheckpointError
    from dar_jax.config import ConfigError, load_config
    from dar_jax.train.tokenizer_task import TokenizerTask
    cfg = load_config(str(REPO / "configs" / "tiny_tokenizer.py"),
                      [f"perceptual.dinov2={tmp_path / 'nope.pth'}", "model.repa_projector=True",
                       "model.diff_decoder.repa_layer=1"])
    with pytest.raises(CheckpointError, match="not found"):
        TokenizerTask(cfg)
    perceptual = PERCEPTUAL_DIR
    if perceptual.exists():
        cfg = load_config(str(REPO / "configs" / "tiny_tokenizer.py"),
                          [f"perceptual.lpips_vgg={perceptual / 'dinov2.pth'}",
                           f"perceptual.lpips_heads={perceptual / 'lpips_vgg.pth'}"])
        with pytest.raises(CheckpointError):
            TokenizerTask(cfg)
    cfg = load_config(str(REPO / "configs" / "tiny_tokenizer.py"), [f"perceptual.lpips_vgg={tmp_path / 'x'}"])
    with pytest.raises(ConfigError, match="needs both"):
        TokenizerTask(cfg)
    # REPA at a block the diffusion decoder does not have: refused before any tracing
    cfg = load_config(str(REPO / "configs" / "tiny_tokenizer.py"),
                      ["model.repa_projector=True", "model.diff_decoder.repa_layer=2"])
    with pytest.raises(ConfigError, match="repa_layer 2 must name one of the 2"):
        TokenizerTask(cfg)
