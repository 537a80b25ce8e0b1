"""FID, Inception Score, precision/recall and reference files, on features directly."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dar_jax.evaluate import metrics as Mt
from dar_jax.evaluate.inception import Features


def _gaussian(rng, n, mu, sigma):
    return rng.multivariate_normal(mu, sigma, size=n)


def test_running_stats_equal_numpy_cov():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(1000, 12)).astype(np.float32)
    rs = Mt.RunningStats()
    for start in range(0, 1000, 77):                # uneven batches, one of 76
        rs.update(x[start:start + 77])
    x64 = x.astype(np.float64)
    assert rs.count == 1000
    np.testing.assert_allclose(rs.mean, x64.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rs.cov, np.cov(x64, rowvar=False), rtol=1e-10, atol=1e-12)
    assert rs.mean.dtype == np.float64 and rs.cov.dtype == np.float64


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 32)) @ rng.normal(size=(32, 32))
    assert abs(Mt.fid_from_features(x, x)) < 1e-8
    few = x[:10]                                    # 10 samples, 32 features: singular covariance
    scale = np.trace(np.cov(few, rowvar=False))
    assert abs(Mt.fid_from_features(few, few)) < 1e-10 * scale


def test_fid_matches_closed_forms():
    rng = np.random.default_rng(2)
    d = 6
    a = rng.normal(size=(d, d))
    s1 = a @ a.T + 0.1 * np.eye(d)
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    # sigma2 = c sigma1: (s1 s2)^(1/2) = sqrt(c) s1, FID = |dm|^2 + (1 - sqrt c)^2 tr s1
    c = 2.5
    fid = Mt.frechet_distance(Mt.ReferenceStats(m1, s1), Mt.ReferenceStats(m2, c * s1))
    assert fid == pytest.approx(np.sum((m1 - m2) ** 2) + (1 - np.sqrt(c)) ** 2 * np.trace(s1), rel=1e-10)
    # 2x2, non-commuting: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M with non-negative eigenvalues
    rot = np.array([[np.cos(0.7), -np.sin(0.7)], [np.sin(0.7), np.cos(0.7)]])
    p, q = np.diag([4.0, 0.25]), rot @ np.diag([1.0, 9.0]) @ rot.T
    prod = p @ q
    tr_sqrt = np.sqrt(np.trace(prod) + 2 * np.sqrt(np.linalg.det(prod)))
    fid = Mt.frechet_distance(Mt.ReferenceStats([1.0, 0.0], p), Mt.ReferenceStats([0.0, 2.0], q))
    assert fid == pytest.approx(5.0 + np.trace(p) + np.trace(q) - 2 * tr_sqrt, rel=1e-10)
    # and from samples of the two Gaussians (sampling error only)
    x, y = _gaussian(rng, 200_000, [1.0, 0.0], p), _gaussian(rng, 200_000, [0.0, 2.0], q)
    assert Mt.fid_from_features(x, y) == pytest.approx(fid, rel=0.02)


def test_fid_rank_deficient_covariances_stay_finite():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 64))
    y = rng.normal(size=(7, 64)) + 1.0
    fid = Mt.fid_from_features(x, y)
    assert np.isfinite(fid) and fid > 0


def test_inception_score_known_values():
    uniform = np.zeros((100, 1008))
    assert Mt.inception_score(uniform) == pytest.approx(1.0, abs=1e-12)
    classes = 10
    onehot = 1e4 * np.eye(classes)[np.arange(200) % classes]     # every split holds each class 5x
    assert Mt.inception_score(onehot, split_size=50) == pytest.approx(classes, rel=1e-9)
    np.testing.assert_allclose(Mt.inception_score_splits(onehot, split_size=50), classes, rtol=1e-9)
    # ADM splits: consecutive chunks of split_size, the last one shorter
    assert len(Mt.inception_score_splits(onehot[:120], split_size=50)) == 3
    # a split that holds a single class scores 1
    assert Mt.inception_score_splits(1e4 * np.eye(2)[[0, 0, 1, 1]], split_size=2).tolist() == [1.0, 1.0]


def test_inception_score_matches_adm_formula():
    logits = np.random.default_rng(4).normal(size=(30, 7)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for i in range(0, 30, 10):                       # the ADM evaluator's loop
        part = p[i:i + 10]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    assert Mt.inception_score(logits, split_size=10) == pytest.approx(np.mean(scores), rel=1e-12)


def _toy_pr():
    """1-D points: references at 0..9; samples at 0..4 and a tight cluster far away.

    k = 3 radii (squared): references 0 and 9 -> 9, others -> 4; samples 0 and 4 -> 9, 1..3 -> 4,
    far cluster -> <= 0.09. Precision: samples 0..4 are references -> 5/10. Recall: references
    covered by sample balls = 0..7 (sample 4 reaches 7) -> 8/10.
    """
    ref = np.zeros((10, 5), np.float32)
    ref[:, 0], ref[:, 1] = np.arange(10), 3.0
    smp = np.zeros((10, 5), np.float32)
    smp[:5, 0], smp[5:, 0], smp[:, 1] = np.arange(5), 1000 + 0.1 * np.arange(5), 3.0
    return ref, smp


@pytest.mark.parametrize("block_size", [10000, 3])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_precision_recall_toy(block_size, dtype):
    ref, smp = _toy_pr()
    np.testing.assert_allclose(Mt.manifold_radii(ref, block_size=block_size, distance_dtype=dtype),
                               [9, 4, 4, 4, 4, 4, 4, 4, 4, 9])
    assert Mt.precision_recall(ref, smp, block_size=block_size, distance_dtype=dtype) == (0.5, 0.8)
    assert Mt.precision_recall(ref, ref, block_size=block_size, distance_dtype=dtype) == (1.0, 1.0)


def test_precision_recall_brute_force():
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(53, 8)).astype(np.float32)
    smp = (rng.normal(size=(41, 8)) * 1.3 + 0.4).astype(np.float32)

    def sq(a, b):
        return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)

    r_ref = np.sort(sq(ref, ref), axis=1)[:, 3]
    r_smp = np.sort(sq(smp, smp), axis=1)[:, 3]
    d = sq(ref, smp)
    precision = np.mean((d <= r_ref[:, None]).any(axis=0))
    recall = np.mean((d <= r_smp[None, :]).any(axis=1))
    np.testing.assert_allclose(Mt.manifold_radii(ref, block_size=16), r_ref, rtol=1e-5)
    assert 0 < precision < 1 and 0 < recall < 1
    assert Mt.precision_recall(ref, smp, block_size=16) == pytest.approx((precision, recall))


def test_float16_distances_round_and_fall_back():
    import jax.numpy as jnp
    u = np.array([[0.1, 0.2, 0.3]], np.float32)
    v = np.array([[0.3, 0.1, 0.7]], np.float32)
    d32 = float(Mt._sq_distances(jnp.asarray(u), jnp.asarray(v), "float32")[0, 0])
    d16 = float(Mt._sq_distances(jnp.asarray(u), jnp.asarray(v), "float16")[0, 0])
    assert d32 == pytest.approx(0.21, rel=1e-5)
    assert d16 != d32 and d16 == pytest.approx(0.21, rel=2e-2)            # float16 arithmetic
    big = np.array([[300.0, 0.0, 0.0]], np.float32)                         # 300^2 overflows float16
    assert float(Mt._sq_distances(jnp.asarray(big), jnp.asarray(u), "float16")[0, 0]) == pytest.approx(
        (299.9 ** 2 + 0.04 + 0.09), rel=1e-5)


def test_reference_roundtrip(tmp_path):
    x = np.random.default_rng(6).normal(size=(20, 4))
    ref = Mt.compute_stats(x, keep_activations=True, meta={"protocol": "adm", "images": "val"})
    path = tmp_path / "ref.npz"
    Mt.save_reference(path, ref)
    back = Mt.read_reference(path, need_activations=True, expected_dim=4)
    np.testing.assert_array_equal(back.mu, ref.mu)
    np.testing.assert_array_equal(back.sigma, ref.sigma)
    np.testing.assert_array_equal(back.activations, x.astype(np.float32))
    assert back.count == 20 and back.meta["protocol"] == "adm" and back.meta["source"] == str(path)
    Mt.save_reference(path, Mt.ReferenceStats(ref.mu, ref.sigma))       # unknown count, no acts
    back = Mt.read_reference(path)
    assert back.count is None and back.activations is None


def _fake_extract(images):
    """Features from pixel values (stands in for the Inception network)."""
    flat = images.reshape(len(images), -1).astype(np.float32) / 255.0
    return Features(flat[:, :6], flat[:, :10])


def test_read_adm_reference_batch(tmp_path):
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (25, 4, 4, 3), dtype=np.uint8)
    mu, sigma = rng.normal(size=6), np.eye(6)
    path = tmp_path / "VIRTUAL_toy.npz"
    np.savez(path, arr_0=images, mu=mu, sigma=sigma, mu_s=np.zeros(3), sigma_s=np.eye(3))
    ref = Mt.read_reference(path, _fake_extract, batch_size=7, need_activations=True)
    np.testing.assert_array_equal(ref.mu, mu)                 # the file's whole-dataset statistics
    np.testing.assert_array_equal(ref.sigma, sigma)
    np.testing.assert_allclose(ref.activations, _fake_extract(images).pool3)   # from arr_0
    assert ref.count is None and ref.meta["format"] == "adm" and ref.meta["stats_from"].startswith("file")
    # without mu/sigma (an ADM *sample* batch): statistics from the activations
    np.savez(path, arr_0=images)
    ref = Mt.read_reference(path, _fake_extract, batch_size=10)
    np.testing.assert_allclose(ref.sigma, np.cov(_fake_extract(images).pool3.astype(np.float64), rowvar=False),
                               rtol=1e-6, atol=1e-9)
    assert ref.count == 25
    with pytest.raises(Mt.ReferenceFileError, match="no mu/sigma"):
        Mt.read_reference(path)
    np.savez(path, mu=mu, sigma=sigma)
    with pytest.raises(Mt.ReferenceFileError, match="pass an Inception feature extractor"):
        Mt.read_reference(path, need_activations=True)


def test_bad_reference_files(tmp_path):
    path = tmp_path / "ref.npz"
    Mt.save_reference(path, Mt.compute_stats(np.random.default_rng(8).normal(size=(10, 3))))
    with pytest.raises(Mt.FeatureSizeError, match="size 3, expected 2048"):
        Mt.read_reference(path, expected_dim=2048)
    ref = Mt.read_reference(path)
    with pytest.raises(Mt.FeatureSizeError, match="feature size 4 with 3"):
        Mt.frechet_distance(Mt.compute_stats(np.ones((5, 4)) + np.eye(5, 4)), ref)
    with pytest.raises(Mt.FeatureSizeError, match="reference feature size 3"):
        Mt.evaluate_features(np.zeros((5, 2048)), None, ref)
    with pytest.raises(Mt.FeatureSizeError, match="size 2048 vs reference feature size 3"):
        Mt.evaluate_features(Mt.compute_stats(np.eye(5, 2048)), None, ref)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(Mt.ReferenceFileError, match="cannot read"):
        Mt.read_reference(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", features=np.zeros(3))
    with pytest.raises(Mt.ReferenceFileError, match="neither"):
        Mt.read_reference(tmp_path / "other.npz")
    with pytest.raises(Mt.MetricInputError, match="mu"):
        Mt.ReferenceStats(np.zeros(3), np.zeros((3, 4)))


def test_too_few_samples_and_bad_values():
    with pytest.raises(Mt.MetricInputError, match="at least 2 samples, got 1"):
        Mt.compute_stats(np.zeros((1, 8)))
    with pytest.raises(Mt.MetricInputError, match="need more than 3"):
        Mt.precision_recall(np.zeros((3, 8)), np.ones((10, 8)))
    with pytest.raises(Mt.FeatureSizeError):
        Mt.precision_recall(np.zeros((10, 8)), np.ones((10, 9)))
    with pytest.raises(Mt.MetricInputError, match="NaN"):
        Mt.RunningStats().update(np.full((4, 2), np.nan))
    with pytest.raises(Mt.FeatureSizeError, match="size 3 added to statistics of size 2"):
        Mt.RunningStats().update(np.zeros((4, 2))).update(np.zeros((4, 3)))
    with pytest.raises(Mt.MetricInputError, match="logits"):
        Mt.inception_score(np.zeros((0, 10)))
    with pytest.raises(Mt.MetricInputError, match="distance dtype"):
        Mt.manifold_radii(np.zeros((5, 2)), distance_dtype="bfloat16")


def test_evaluate_features_result():
    rng = np.random.default_rng(9)
    ref_acts = rng.normal(size=(40, 5))
    ref = Mt.compute_stats(ref_acts, keep_activations=True)
    out = Mt.evaluate_features(ref_acts, np.zeros((40, 10)), ref, split_size=20)
    assert out["num_samples"] == 40 and abs(out["fid"]) < 1e-6
    assert out["inception_score"] == pytest.approx(1.0)
    assert (out["precision"], out["recall"]) == (1.0, 1.0)
    json.dumps(out)                                           # plain numbers, ready for the results file
    no_acts = Mt.evaluate_features(Mt.compute_stats(ref_acts), None, ref)
    assert set(no_acts) == {"num_samples", "fid"}
