"""Sample protocol: uint8 conversion, labels, resumable shards, the ADM arr_0 file, features."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from dar_jax.evaluate import metrics as Mt
from dar_jax.evaluate import protocol as P
from dar_jax.evaluate.inception import Features

H = W = 4


def test_to_uint8_is_dar_conversion():
    x = np.array([-1.5, -1.0, -0.5, 0.0, 0.999, 1.0, 2.0], np.float32)
    expect = [0, 0, 64, 128, 255, 255, 255]           # 127.5 x + 128, clamped, truncated
    assert P.to_uint8(x).tolist() == expect
    assert np.asarray(P.to_uint8(jnp.asarray(x))).tolist() == expect
    assert P.to_uint8(np.float32([-0.004])).tolist() == [127]  # 127.49 truncates, it does not round


def test_sample_labels():
    r = P.sample_labels(1000, 10, "random", seed=3)
    assert r.dtype == np.int32 and r.min() >= 0 and r.max() < 10 and len(np.unique(r)) == 10
    np.testing.assert_array_equal(r, P.sample_labels(1000, 10, "random", seed=3))
    assert not np.array_equal(r, P.sample_labels(1000, 10, "random", seed=4))
    b = P.sample_labels(100, 10, "balanced")
    assert (np.bincount(b[:50]) == 5).all()            # balanced in every split too
    with pytest.raises(P.ShardError, match="multiple"):
        P.sample_labels(105, 10, "balanced")
    with pytest.raises(P.ShardError, match="label mode"):
        P.sample_labels(10, 10, "stratified")


class FakeGenerator:
    """Images that encode their index and label; can crash before a given call."""

    def __init__(self, crash_at: int | None = None):
        self.calls: list[list[int]] = []
        self.crash_at = crash_at

    def __call__(self, labels, indices):
        if self.crash_at is not None and len(self.calls) == self.crash_at:
            raise KeyboardInterrupt("killed between shards")
        self.calls.append(indices.tolist())
        img = np.zeros((len(indices), H, W, 3), np.uint8)
        img[:, 0, 0, 0] = indices % 256
        img[:, 0, 0, 1] = labels
        return img


def test_generation_resumes_without_regenerating(tmp_path):
    labels = P.sample_labels(10, 5, "random", seed=0)
    settings = {"cfg_scale": "1.2,8.0", "seed": 0}
    plan = P.prepare_shards(tmp_path / "s", labels, shard_size=3, settings=settings)
    assert plan.num_shards == 4 and plan.indices(3).tolist() == [9]
    gen = FakeGenerator(crash_at=2)
    with pytest.raises(KeyboardInterrupt):
        P.generate_samples(plan, gen, process_index=0, process_count=1)
    assert P.finished_shards(plan) == [0, 1]
    assert not list((tmp_path / "s").glob("*.tmp*"))
    with pytest.raises(P.ShardError, match="2 of 4 shards are missing"):
        P.assemble_npz(plan, tmp_path / "partial.npz")

    plan = P.prepare_shards(tmp_path / "s", labels, shard_size=3, settings=settings)    # restart
    gen2 = FakeGenerator()
    report = P.generate_samples(plan, gen2, process_index=0, process_count=1)
    assert report == {"generated": [2, 3], "skipped": [0, 1]}
    assert gen2.calls == [[6, 7, 8], [9]]
    assert P.generate_samples(plan, FakeGenerator(crash_at=0), process_index=0, process_count=1) == {
        "generated": [], "skipped": [0, 1, 2, 3]}                 # all done: nothing generated

    out = P.assemble_npz(plan, tmp_path / "samples.npz")
    with np.load(out) as z:
        assert z["arr_0"].shape == (10, H, W, 3) and z["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(z["arr_0"][:, 0, 0, 0], np.arange(10))
        np.testing.assert_array_equal(z["arr_0"][:, 0, 0, 1], labels)
        np.testing.assert_array_equal(z["arr_1"], labels)
    chunks = list(Mt.npz_batches(out, "arr_0", 4))                 # the streaming reader
    assert [len(c) for c in chunks] == [4, 4, 2]


def test_processes_split_the_shards(tmp_path):
    plan = P.prepare_shards(tmp_path, np.arange(10) % 3, shard_size=2)
    gens = [FakeGenerator(), FakeGenerator()]
    reports = [P.generate_samples(plan, g, process_index=i, process_count=2) for i, g in enumerate(gens)]
    assert reports[0]["generated"] == [0, 2, 4] and reports[1]["generated"] == [1, 3]
    assert P.finished_shards(plan) == [0, 1, 2, 3, 4]


def test_corrupt_or_foreign_shards_are_regenerated(tmp_path):
    plan = P.prepare_shards(tmp_path, np.zeros(4, np.int32), shard_size=2)
    P.generate_samples(plan, FakeGenerator(), process_index=0, process_count=1)
    with open(plan.path(0), "r+b") as f:                            # truncate shard 0
        f.truncate(20)
    np.savez(plan.path(1), images=np.zeros((2, H, W, 3), np.uint8), labels=np.zeros(2), indices=np.array([7, 8]))
    assert P.finished_shards(plan) == []
    gen = FakeGenerator()
    assert P.generate_samples(plan, gen, process_index=0, process_count=1)["generated"] == [0, 1]


def test_resume_with_other_settings_is_refused(tmp_path):
    labels = P.sample_labels(8, 4, "balanced")
    # a plan without a sample on disk holds nothing to mix up: another run may replace it
    P.prepare_shards(tmp_path, labels, 4, {"cfg_scale": "4.0"})
    plan = P.prepare_shards(tmp_path, labels, 4, {"cfg_scale": "1.2,8.0"})
    with pytest.raises(KeyboardInterrupt):
        P.generate_samples(plan, FakeGenerator(crash_at=1))      # one shard written
    with pytest.raises(P.ShardError, match="settings.cfg_scale"):
        P.prepare_shards(tmp_path, labels, 4, {"cfg_scale": "4.0"})
    with pytest.raises(P.ShardError, match="shard_size"):
        P.prepare_shards(tmp_path, labels, 2, {"cfg_scale": "1.2,8.0"})
    with pytest.raises(P.ShardError, match="labels"):
        P.prepare_shards(tmp_path, labels[::-1].copy(), 4, {"cfg_scale": "1.2,8.0"})
    manifest = json.loads((tmp_path / P.MANIFEST).read_text())
    assert manifest["settings"] == {"cfg_scale": "1.2,8.0"} and manifest["num_samples"] == 8
    assert P.finished_shards(P.prepare_shards(tmp_path, labels, 4, {"cfg_scale": "1.2,8.0"})) == [0]


def test_bad_generator_output(tmp_path):
    plan = P.prepare_shards(tmp_path, np.zeros(4, np.int32), shard_size=2)
    with pytest.raises(P.ShardError, match="float32 images.*to_uint8"):
        P.generate_samples(plan, lambda l, i: np.zeros((len(i), H, W, 3), np.float32),
                           process_index=0, process_count=1)
    with pytest.raises(P.ShardError, match=r"expected \(2, H, W, 3\)"):
        P.generate_samples(plan, lambda l, i: np.zeros((len(i), 3, H, W), np.uint8),
                           process_index=0, process_count=1)
    with pytest.raises(P.ShardError, match="integer"):
        P.prepare_shards(tmp_path / "x", np.zeros(4, np.float32), 2)
    assert P.finished_shards(plan) == []


def test_sample_features_from_shards(tmp_path):
    plan = P.prepare_shards(tmp_path, np.arange(7) % 2, shard_size=3)
    rng = np.random.default_rng(0)
    P.generate_samples(plan, lambda l, i: rng.integers(0, 256, (len(i), H, W, 3), dtype=np.uint8),
                       process_index=0, process_count=1)
    images = np.concatenate([im for _, _, im in P.iter_shards(plan)])

    def extract(x):
        flat = x.reshape(len(x), -1).astype(np.float32) / 255
        return Features(flat[:, :5], flat[:, 5:9])

    stats, logits = P.sample_features(plan, extract)
    ref = extract(images)
    np.testing.assert_allclose(stats.activations, ref.pool3)
    np.testing.assert_allclose(logits, ref.logits)
    np.testing.assert_allclose(stats.sigma, np.cov(ref.pool3.astype(np.float64), rowvar=False), atol=1e-12)
    assert stats.count == 7 and stats.meta["source"] == str(tmp_path)
    ref_stats = Mt.compute_stats(ref.pool3[::-1].copy(), keep_activations=True)    # same set, reordered
    out = Mt.evaluate_features(stats, logits, ref_stats, split_size=4)
    assert abs(out["fid"]) < 1e-9 and (out["precision"], out["recall"]) == (1.0, 1.0)
