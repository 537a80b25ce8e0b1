"""Frozen perceptual networks of tokenizer training: LPIPS (VGG16), DINOv2 and REPA's pieces.

Parity against ``../shared/fixtures/perceptual`` (random weights in the layouts of the files
users download, outputs of the public PyTorch code); hand-computed cases for the rest.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch_format
from conftest import PERCEPTUAL_DIR
from dar_jax.checkpoint import CheckpointError, load_torch_file
from dar_jax.nn import resize
from dar_jax.perceptual import dinov2, lpips

RTOL = 1e-4


@pytest.fixture(scope="module")
def fixture_dir() -> pathlib.Path:
    if not PERCEPTUAL_DIR.is_dir():
        pytest.skip(f"perceptual fixtures not found at {PERCEPTUAL_DIR} (set DAR_PERCEPTUAL_FIXTURES); "
                    "they are large and live outside the repository")
    return PERCEPTUAL_DIR


@pytest.fixture(scope="module")
def fixture_config(fixture_dir) -> dict:
    return json.loads((fixture_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def lpips_params(fixture_dir):
    return lpips.load_lpips(fixture_dir / "vgg16.pth", fixture_dir / "lpips_vgg.pth")


@pytest.fixture(scope="module")
def dino(fixture_dir, fixture_config):
    return dinov2.load_dinov2(fixture_dir / "dinov2.pth",
                              num_heads=fixture_config["dinov2"]["num_heads"])


@pytest.fixture(scope="module")
def dino_io(fixture_dir):
    return dict(np.load(fixture_dir / "dinov2_io.npz"))


def nhwc(x):
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def assert_close_rel(actual, expected, rtol=RTOL):
    """Elementwise within rtol of the reference's scale (1e-4 relative for float32 parity)."""
    expected = np.asarray(expected)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol,
                               atol=rtol * float(np.abs(expected).max()))


# --- LPIPS ----------------------------------------------------------------------------------------
def test_lpips_matches_reference(fixture_dir, lpips_params):
    io = np.load(fixture_dir / "lpips_io.npz")
    x0, x1 = nhwc(io["x0"]), nhwc(io["x1"])
    dist = jax.jit(lpips.lpips)(lpips_params, x0, x1)
    assert dist.shape == (2,) and dist.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(dist), io["lpips"], rtol=RTOL)
    np.testing.assert_allclose(np.asarray(jax.jit(lpips.lpips)(lpips_params, x0, x0)), 0.0, atol=1e-7)


def test_lpips_gradient_reaches_the_images(fixture_dir, lpips_params):
    io = np.load(fixture_dir / "lpips_io.npz")
    x0, x1 = nhwc(io["x0"])[:1, :32, :32], nhwc(io["x1"])[:1, :32, :32]
    loss = lambda a: lpips.lpips(lpips_params, a, x1).sum()
    grad = jax.jit(jax.grad(loss))(x0)
    assert grad.shape == x0.shape and bool(jnp.isfinite(grad).all())
    # the directional derivative agrees with a central difference
    direction, step = jnp.sign(grad), 1e-4
    loss_jit = jax.jit(loss)
    fd = (loss_jit(x0 + step * direction) - loss_jit(x0 - step * direction)) / (2 * step)
    np.testing.assert_allclose(float(jnp.sum(grad * direction)), float(fd), rtol=1e-2)


def test_lpips_loader_takes_float32_files_with_classifier(fixture_dir, lpips_params):
    # Real torchvision files are float32 and hold classifier.* (ignored); the fixture is float16.
    vgg = {k: v.astype(np.float32) for k, v in load_torch_file(fixture_dir / "vgg16.pth").items()}
    vgg["classifier.0.weight"] = np.zeros((4, 8), np.float32)
    vgg["classifier.0.bias"] = np.zeros((4,), np.float32)
    heads = load_torch_file(fixture_dir / "lpips_vgg.pth")
    params = lpips.params_from_state_dicts(vgg, heads)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, lpips_params)


def test_lpips_loader_refuses_missing_and_mismatched_files(tmp_path, fixture_dir):
    vgg, heads = fixture_dir / "vgg16.pth", fixture_dir / "lpips_vgg.pth"
    with pytest.raises(CheckpointError, match="not found.*absent_vgg.pth"):
        lpips.load_lpips(tmp_path / "absent_vgg.pth", heads)
    with pytest.raises(CheckpointError, match="not found.*absent_heads.pth"):
        lpips.load_lpips(vgg, tmp_path / "absent_heads.pth")
    bad = {k: np.asarray(v) for k, v in load_torch_file(heads).items()}
    bad["lin0.model.1.weight"] = np.zeros((1, 32, 1, 1), np.float32)     # wrong width
    bad["lin5.model.1.weight"] = np.zeros((1, 8, 1, 1), np.float32)      # unexpected head
    del bad["lin4.model.1.weight"]                                       # missing head
    path = tmp_path / "bad_heads.pth"
    torch_format.save(bad, str(path))
    with pytest.raises(CheckpointError, match=r"LPIPS heads .*bad_heads\.pth.*missing keys: "
                                              r"lin4\.model\.1\.weight; unexpected keys: lin5"):
        lpips.load_lpips(vgg, path)
    del bad["lin5.model.1.weight"]
    bad["lin4.model.1.weight"] = np.zeros((1, 512, 1, 1), np.float32)
    torch_format.save(bad, str(path))
    with pytest.raises(CheckpointError, match=r"bad_heads\.pth has wrongly shaped tensors: "
                                              r"lin0\.model\.1\.weight"):
        lpips.load_lpips(vgg, path)
    # A DINOv2 file given as VGG16 weights.
    with pytest.raises(CheckpointError, match=r"VGG16 weights .*dinov2\.pth does not match.*"
                                              r"missing keys: features\.0\.bias"):
        lpips.load_lpips(fixture_dir / "dinov2.pth", heads)


# --- DINOv2 ---------------------------------------------------------------------------------------
def test_dinov2_config_is_inferred_from_the_checkpoint(dino, fixture_config):
    cfg, _ = dino
    want = fixture_config["dinov2"]
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size) == (
        want["embed_dim"], want["depth"], want["num_heads"], want["patch_size"])
    assert cfg.mlp_hidden == want["embed_dim"] * want["mlp_ratio"] and cfg.ffn == "mlp"
    assert cfg.pos_grid * cfg.patch_size == want["img_size"]
    assert cfg.num_register_tokens == want["num_register_tokens"]
    assert cfg.interpolate_offset == want["interpolate_offset"]


def test_dinov2_patch_tokens_match_reference(dino, dino_io):
    cfg, params = dino
    tokens = jax.jit(dinov2.patch_tokens, static_argnums=0)(cfg, params, nhwc(dino_io["preprocessed"]))
    assert tokens.shape == dino_io["patch_tokens"].shape == (2, 256, cfg.embed_dim)
    assert_close_rel(tokens, dino_io["patch_tokens"])


def test_bfloat16_compute_stays_close(fixture_dir, lpips_params, dino, dino_io):
    cfg, params = dino
    cfg16 = dataclasses.replace(cfg, dtype="bfloat16")
    images = nhwc(dino_io["preprocessed"])
    tokens = jax.jit(dinov2.patch_tokens, static_argnums=0)(cfg16, params, images)
    assert tokens.dtype == jnp.bfloat16
    ref = dino_io["patch_tokens"]
    assert np.abs(np.asarray(tokens, np.float32) - ref).max() < 0.1 * np.abs(ref).max()
    io = np.load(fixture_dir / "lpips_io.npz")
    dist = jax.jit(lpips.lpips, static_argnums=3)(lpips_params, nhwc(io["x0"]), nhwc(io["x1"]),
                                                  jnp.bfloat16)
    assert dist.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(dist), io["lpips"], rtol=0.1)


def test_repa_preprocess_matches_reference(dino_io):
    pre = jax.jit(dinov2.repa_preprocess)(nhwc(dino_io["images"]))
    assert pre.shape == (2, 224, 224, 3)
    assert_close_rel(pre, nhwc(dino_io["preprocessed"]))


def test_dinov2_plain_block_layout_loads_the_same(tmp_path, fixture_dir, dino):
    # Hub checkpoints store blocks.<i>.*; the fixture (block_chunks=1) stores blocks.0.<i>.*.
    cfg, params = dino
    sd = load_torch_file(fixture_dir / "dinov2.pth")
    plain = {k.replace("blocks.0.", "blocks.", 1): np.asarray(v) for k, v in sd.items()}
    assert any(k.startswith("blocks.1.") for k in plain)
    path = tmp_path / "plain.pth"
    torch_format.save(plain, str(path))
    cfg2, params2 = dinov2.load_dinov2(path, num_heads=cfg.num_heads)
    assert cfg2 == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params2, params)


def test_dinov2_swiglu_layout_maps_the_fused_halves():
    """ViT-g's FFN: w3(silu(x1) * x2) with x1, x2 = w12(x).chunk(2), with biases."""
    cfg = dinov2.dinov2_config(embed_dim=64, depth=1, num_heads=1, mlp_hidden=24, ffn="swiglu",
                               pos_grid=2, num_register_tokens=2)
    rng = np.random.default_rng(0)
    shapes = {"cls_token": (1, 1, 64), "pos_embed": (1, 5, 64), "mask_token": (1, 64),
              "register_tokens": (1, 2, 64), "patch_embed.proj.weight": (64, 3, 14, 14),
              "patch_embed.proj.bias": (64,), "norm.weight": (64,), "norm.bias": (64,),
              "blocks.0.norm1.weight": (64,), "blocks.0.norm1.bias": (64,),
              "blocks.0.attn.qkv.weight": (192, 64), "blocks.0.attn.qkv.bias": (192,),
              "blocks.0.attn.proj.weight": (64, 64), "blocks.0.attn.proj.bias": (64,),
              "blocks.0.ls1.gamma": (64,), "blocks.0.norm2.weight": (64,),
              "blocks.0.norm2.bias": (64,), "blocks.0.mlp.w12.weight": (48, 64),
              "blocks.0.mlp.w12.bias": (48,), "blocks.0.mlp.w3.weight": (64, 24),
              "blocks.0.mlp.w3.bias": (64,), "blocks.0.ls2.gamma": (64,)}
    sd = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    assert dinov2.config_from_state_dict(sd) == cfg     # heads = 64 / 64, registers, swiglu width
    params = dinov2.params_from_state_dict(sd, cfg)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    w12, b12, w3, b3 = (sd[f"blocks.0.mlp.{n}"] for n in ("w12.weight", "w12.bias", "w3.weight", "w3.bias"))
    h = x @ w12.T + b12
    x1, x2 = h[:, :24], h[:, 24:]
    want = (x1 / (1 + np.exp(-x1)) * x2) @ w3.T + b3
    got = dinov2.bind(cfg, params).blocks[0].mlp(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    out = dinov2.forward_features(cfg, params, jnp.zeros((1, 28, 42, 3)))
    assert out["x_norm_patchtokens"].shape == (1, 6, 64) and out["x_norm_regtokens"].shape == (1, 2, 64)


def test_dinov2_loader_refuses_missing_and_mismatched_files(tmp_path, fixture_dir, fixture_config):
    heads = fixture_config["dinov2"]["num_heads"]
    with pytest.raises(CheckpointError, match="not found.*absent.pth"):
        dinov2.load_dinov2(tmp_path / "absent.pth", num_heads=heads)
    sd = {k: np.asarray(v) for k, v in load_torch_file(fixture_dir / "dinov2.pth").items()}
    bad = dict(sd)
    del bad["blocks.0.1.ls2.gamma"]
    bad["head.weight"] = np.zeros((10, 96), np.float32)
    path = tmp_path / "bad_dino.pth"
    torch_format.save(bad, str(path))
    with pytest.raises(CheckpointError, match=r"DINOv2 checkpoint .*bad_dino\.pth does not match.*"
                                              r"missing keys: blocks\.1\.ls2\.gamma; unexpected keys: head\.weight"):
        dinov2.load_dinov2(path, num_heads=heads)
    bad = dict(sd)
    bad["blocks.0.0.attn.qkv.weight"] = np.zeros((96, 96), np.float32)
    torch_format.save(bad, str(path))
    with pytest.raises(CheckpointError, match=r"bad_dino\.pth has wrongly shaped tensors: "
                                              r"blocks\.0\.attn\.qkv\.weight"):
        dinov2.load_dinov2(path, num_heads=heads)
    with pytest.raises(CheckpointError, match="not a multiple of 64.*pass num_heads"):
        dinov2.load_dinov2(fixture_dir / "dinov2.pth")
    with pytest.raises(CheckpointError, match=r"vgg16\.pth is not a DINOv2 state dict"):
        dinov2.load_dinov2(fixture_dir / "vgg16.pth")
    # Sizes given explicitly that disagree with the file.
    with pytest.raises(CheckpointError, match="wrongly shaped tensors"):
        dinov2.load_dinov2(fixture_dir / "dinov2.pth",
                           cfg=dinov2.dinov2_config(embed_dim=96, depth=2, num_heads=2, mlp_hidden=192))


# --- torch bicubic --------------------------------------------------------------------------------
def test_bicubic_matches_torch_on_a_tiny_case():
    """Values from torch 2.x ``F.interpolate(x, mode="bicubic", align_corners=False)``."""
    x = jnp.asarray([0.0, 1.0, 4.0, 9.0, 16.0]).reshape(1, 1, 5, 1)
    up = resize.resize_bicubic(x, (1, 8))
    np.testing.assert_allclose(np.asarray(up).ravel(), [
        -0.09283447265625, 0.18756103515625, 1.176513671875, 2.619384765625, 5.441650390625,
        8.471435546875, 13.39508056640625, 16.64984130859375], rtol=1e-6, atol=1e-6)
    down = resize.resize_bicubic(x, (1, 3))
    np.testing.assert_allclose(np.asarray(down).ravel(), [0.1481490135192871, 4.0, 14.074070930480957],
                               rtol=1e-6, atol=2e-6)
    # The scale-factor path takes source coordinates from the factor, not from the size ratio.
    sf = 3.1 / 5
    assert resize.torch_bicubic_size(5, sf) == 3
    by_factor = resize.resize_bicubic(x, (1, 3), scale_factors=(1.0, sf))
    np.testing.assert_allclose(np.asarray(by_factor).ravel(),
                               [0.13933372497558594, 3.5535757541656494, 13.19059944152832],
                               rtol=1e-6, atol=2e-6)


# --- REPA -----------------------------------------------------------------------------------------
def test_repa_loss_hand_computed():
    projected = jnp.asarray([[[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [1.0, 1.0]]])
    dino = jnp.asarray([[[2.0, 0.0], [1.0, 1.0], [-1.0, 0.0], [0.0, 0.0]]])
    # cos: 1, 1/sqrt(2), -1, 0 (a zero vector: torch clamps the norm at 1e-8)
    want = np.mean([0.0, 1 - 1 / np.sqrt(2), 2.0, 1.0])
    np.testing.assert_allclose(float(dinov2.repa_loss(projected, dino)), want, rtol=1e-6)
    grad = jax.grad(dinov2.repa_loss)(projected, dino)
    assert bool(jnp.isfinite(grad).all())
    # a zero projected token has a finite gradient too (torch: the norm is clamped at 1e-8)
    zero = jax.grad(dinov2.repa_loss)(projected.at[0, 1].set(0.0), dino)
    assert bool(jnp.isfinite(zero).all())
    # the aligned direction is a stationary point: no gradient on token 0
    np.testing.assert_allclose(np.asarray(grad[0, 0]), 0.0, atol=1e-7)


def test_repa_pool_and_grid_mismatch():
    # 32x32 decoder grid (512 px) -> stride 2 -> 16x16, as the reference's avg_pool2d.
    h = jnp.arange(32 * 32, dtype=jnp.float32).reshape(1, 32 * 32, 1)
    pooled = dinov2.repa_pool(h, 32, 32)
    assert pooled.shape == (1, 256, 1)
    assert float(pooled[0, 0, 0]) == (0 + 1 + 32 + 33) / 4
    assert float(pooled[0, 17, 0]) == np.mean([32 * 2 + 2, 32 * 2 + 3, 32 * 3 + 2, 32 * 3 + 3])
    # A grid smaller than 16 (where the reference's stride is 0) is kept as it is.
    small = jnp.ones((2, 64, 3))
    assert dinov2.repa_pool(small, 8, 8).shape == (2, 64, 3)
    # ... and REPA pools the 16x16 DINOv2 tokens onto it: each 2x2 block averages to (1, 0).
    block = np.array([[1.0, 1.0], [1.0, -1.0], [1.0, 1.0], [1.0, -1.0]])  # rows of one 2x2 block
    dino = np.zeros((1, 16, 16, 2))
    dino[0, 0::2, 0::2], dino[0, 0::2, 1::2] = block[0], block[1]
    dino[0, 1::2, 0::2], dino[0, 1::2, 1::2] = block[2], block[3]
    projected = jnp.tile(jnp.asarray([[[3.0, 0.0]]]), (1, 64, 1))
    np.testing.assert_allclose(float(dinov2.repa_loss(projected, jnp.asarray(dino.reshape(1, 256, 2)))),
                               0.0, atol=1e-6)
    with pytest.raises(ValueError, match="cannot pool"):
        dinov2.repa_loss(jnp.ones((1, 36, 2)), jnp.ones((1, 256, 2)))
    with pytest.raises(ValueError, match="equal batch and channels"):
        dinov2.repa_loss(jnp.ones((1, 256, 3)), jnp.ones((1, 256, 2)))
