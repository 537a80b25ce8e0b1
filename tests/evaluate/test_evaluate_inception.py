"""FID Inception: parity with pytorch-fid (fixture), resizing, input checks, sharded extraction."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import torch_format
from dar_jax.checkpoint import CheckpointError
from dar_jax.config import ConfigError
from dar_jax.evaluate import inception as I

from conftest import REPO


@pytest.fixture(scope="module")
def fixture_dir(inception_dir) -> pathlib.Path:
    return inception_dir


@pytest.fixture(scope="module")
def fixture_params(fixture_dir):
    return I.load_params(fixture_dir / "pt_inception_random.pth")


@pytest.fixture(scope="module")
def fixture_io(fixture_dir):
    return dict(np.load(fixture_dir / "inception_io.npz"))


def _close(actual, expected, rel=1e-4):
    """Within ``rel`` of the largest reference magnitude (the tensors contain exact zeros)."""
    np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel * np.abs(expected).max())


def test_pool3_and_logits_match_pytorch_fid(fixture_params, fixture_io):
    images = fixture_io["images"].transpose(0, 2, 3, 1)            # NCHW -> NHWC, in [0, 1]
    pool3, logits = jax.jit(lambda p, x: I.forward(I.InceptionConfig(), p, x))(fixture_params, images)
    assert pool3.shape == (2, I.POOL3_DIM) and logits.shape == (2, I.NUM_LOGITS)
    _close(np.asarray(pool3), fixture_io["pool3"])
    _close(np.asarray(logits), fixture_io["logits"])


def test_feature_extractor_uint8_and_adm_logits(fixture_params, fixture_io):
    """uint8 input equals float input /255; the adm protocol drops the fc bias from the logits."""
    images = fixture_io["images"].transpose(0, 2, 3, 1)
    u8 = np.round(images * 255).astype(np.uint8)
    extract = I.feature_extractor(I.InceptionConfig(), fixture_params, batch_size=2)
    feats = extract(u8)
    ref = jax.jit(lambda p, x: I.forward(I.InceptionConfig(), p, x))(fixture_params, u8 / 255.0)
    _close(feats.pool3, np.asarray(ref[0]), 1e-5)
    adm = I.feature_extractor(I.InceptionConfig(protocol="adm"), fixture_params, batch_size=2)(u8)
    kernel = np.asarray(fixture_params["fc"]["kernel"])
    _close(adm.logits, adm.pool3 @ kernel, 1e-5)
    # different resize and normalisation: close to, but not equal to, pytorch-fid's features
    assert not np.allclose(adm.pool3, feats.pool3, rtol=1e-4, atol=1e-4)


def _torch_bilinear_axis(in_size, out_size):
    """torch's F.interpolate(bilinear, align_corners=False) weights along one axis (its formula)."""
    w = np.zeros((out_size, in_size))
    scale = in_size / out_size
    for i in range(out_size):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(np.floor(src)), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        lam = src - i0
        w[i, i0] += 1 - lam
        w[i, i1] += lam
    return w


@pytest.mark.parametrize("h,w", [(64, 64), (37, 300), (512, 384)])
def test_resize_matches_torch_bilinear_formula(h, w):
    """jax.image.resize(antialias=False) follows torch's bilinear formula, up- and downsampling.

    Against torch itself (F.interpolate, when this was written) the error was 1.2e-7 for these
    sizes; against the float64 formula both carry the float32 rounding of the source positions
    (~1e-5 at 512 px), far below what another convention (legacy TF, antialias) changes (~1e-1).
    """
    x = np.random.default_rng(0).random((1, h, w, 2)).astype(np.float32)
    expect = np.einsum("oh,bhwc->bowc", _torch_bilinear_axis(h, 299), x)
    expect = np.einsum("pw,bowc->bopc", _torch_bilinear_axis(w, 299), expect)
    np.testing.assert_allclose(np.asarray(I.resize_bilinear_torch(x, 299)), expect, rtol=0, atol=5e-5)


def test_tf1_resize_is_the_legacy_op():
    """TF1 ResizeBilinear(align_corners=False): source = i * in / out, no half-pixel offset."""
    np.testing.assert_allclose(I.tf1_bilinear_matrix(2, 4) @ np.array([1.0, 3.0]), [1, 2, 3, 3])
    np.testing.assert_allclose(I.tf1_bilinear_matrix(4, 2) @ np.array([1.0, 2, 3, 4]), [1, 3])
    np.testing.assert_allclose(I.tf1_bilinear_matrix(256, 299).sum(axis=1), 1.0, rtol=1e-6)
    x = np.random.default_rng(1).random((2, 5, 7, 3)).astype(np.float32)
    y = np.asarray(I.resize_bilinear_tf1(x, 10))
    assert y.shape == (2, 10, 10, 3)
    np.testing.assert_allclose(y[:, 0, 0], x[:, 0, 0], rtol=1e-6)           # corner is sampled exactly
    np.testing.assert_allclose(y[:, 2, 0], x[:, 1, 0], rtol=1e-6)           # 2 * 5/10 = row 1


@pytest.mark.parametrize("images,match", [
    (np.zeros((2, 3, 80, 80), np.uint8), "NCHW"),
    (np.zeros((2, 80, 80), np.uint8), "NHWC"),
    (np.full((2, 80, 80, 3), -0.5, np.float32), r"\[-1, 1\]"),
    (np.full((2, 80, 80, 3), 200.0, np.float32), r"\[0, 255\]: pass uint8"),
    (np.full((2, 80, 80, 3), np.nan, np.float32), "NaN"),
    (np.zeros((2, 80, 80, 3), np.int32), "dtype int32"),
])
def test_bad_images_are_rejected(images, match):
    with pytest.raises(I.ImageInputError, match=match):
        I.check_images(images)


def test_bad_config_and_weights(tmp_path):
    with pytest.raises(ConfigError, match="protocol"):
        I.InceptionConfig(protocol="clean")
    with pytest.raises(ConfigError, match=">= 75"):
        I.InceptionConfig(image_size=64)
    path = tmp_path / "not_inception.pth"
    torch_format.save({"fc.weight": np.zeros((10, 2048), np.float32)}, str(path))
    with pytest.raises(CheckpointError, match="missing keys: Conv2d_1a_3x3"):
        I.load_params(path)


def test_wrongly_shaped_weights(fixture_dir):
    from dar_jax.checkpoint import load_torch_file
    sd = load_torch_file(fixture_dir / "pt_inception_random.pth")
    sd["fc.weight"] = np.zeros((1000, 2048), np.float16)        # torchvision's 1000-way head
    sd["fc.bias"] = np.zeros((1000,), np.float16)
    with pytest.raises(CheckpointError, match="fc.weight"):
        I.params_from_state_dict(sd)


SHARDED = textwrap.dedent("""
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from dar_jax.evaluate import inception as I
    assert jax.local_device_count() == 8, jax.devices()
    cfg = I.InceptionConfig(image_size=75)
    params = I.init_params(jax.random.key(0))
    images = np.random.default_rng(0).integers(0, 256, (11, 80, 80, 3), dtype=np.uint8)
    extract = I.feature_extractor(cfg, params, batch_size=6)       # rounded up to 8 per chunk
    assert extract.batch_size == 8 and extract.mesh.devices.size == 8
    feats = extract(images)
    single = I.feature_extractor(cfg, params, batch_size=16, devices=jax.devices()[:1])(images)
    np.testing.assert_allclose(feats.pool3, single.pool3, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats.logits, single.logits, rtol=1e-5, atol=1e-6)
    assert feats.pool3.shape == (11, 2048) and feats.logits.shape == (11, 1008)
    print("SHARDED_OK")
""")


def test_feature_extractor_sharded_over_8_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert "SHARDED_OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
