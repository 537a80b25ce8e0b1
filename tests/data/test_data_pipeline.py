"""grain pipelines: per-epoch shuffle, per-process sharding, deterministic augmentation, exact
resume from a JSON-able state, evaluation padding, and make_dataset for every kind."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dar_jax.config import ConfigError
from dar_jax.data import (DataError, Pipeline, collate, make_dataset, steps_for_epochs,
                          write_code_shards)


class Indexed:
    """Source whose records name their index."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"index": int(i)}


def tag(record, rng):
    """Keeps the index and one augmentation draw."""
    return {"index": record["index"], "draw": rng.integers(1 << 30)}


def pipe(n=22, g=6, p=0, pc=1, **kw):
    return Pipeline(Indexed(n), tag, global_batch_size=g, seed=7, process_index=p,
                    process_count=pc, num_threads=2, **kw)


def take(it, k):
    return [next(it) for _ in range(k)]


def test_epochs_are_shuffled_permutations():
    pl = pipe()  # 22 examples, global batch 6: 3 steps per epoch, 4 examples dropped
    assert pl.steps_per_epoch == 3 and steps_for_epochs(pl, 2.5) == 7
    batches = take(pl.iterator(), 9)
    epochs = [np.concatenate([b["index"] for b in batches[e * 3:(e + 1) * 3]]) for e in range(3)]
    for e in epochs:
        assert len(set(e.tolist())) == 18 and e.min() >= 0 and e.max() < 22
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
    assert not np.array_equal(epochs[0], np.sort(epochs[0]))
    # the augmentation draw is a function of (seed, epoch, index): same run -> same draws,
    # the same example in another epoch -> another draw
    again = take(pipe().iterator(), 9)
    for a, b in zip(batches, again):
        np.testing.assert_array_equal(a["draw"], b["draw"])
    first = {int(i): int(d) for b in batches[:3] for i, d in zip(b["index"], b["draw"])}
    second = {int(i): int(d) for b in batches[3:6] for i, d in zip(b["index"], b["draw"])}
    common = set(first) & set(second)
    assert common and all(first[i] != second[i] for i in common)


@pytest.mark.parametrize("pc", [2, 3])
def test_processes_split_the_global_batch(pc):
    whole = take(pipe(g=6).iterator(), 7)
    parts = [take(pipe(g=6, p=p, pc=pc).iterator(), 7) for p in range(pc)]
    for step in range(7):
        rows = [parts[p][step] for p in range(pc)]
        assert all(len(r["index"]) == 6 // pc for r in rows)
        # disjoint, and stacked in process order they are the one-process global batch
        stacked = {k: np.concatenate([r[k] for r in rows]) for k in ("index", "draw")}
        assert len(set(stacked["index"].tolist())) == 6
        for k in stacked:
            np.testing.assert_array_equal(stacked[k], whole[step][k])
    # one epoch over all processes covers steps_per_epoch * G distinct examples
    epoch = np.concatenate([parts[p][s]["index"] for p in range(pc) for s in range(3)])
    assert len(set(epoch.tolist())) == 18


def test_resume_is_exact():
    pl = pipe()
    uninterrupted = take(pl.iterator(), 10)
    it = pl.iterator()
    take(it, 4)  # mid-epoch (epoch 1, step 1)
    assert it.epoch == 1
    state = json.loads(json.dumps(it.get_state()))  # JSON-able
    assert state["step"] == 4
    it.close()
    resumed = pipe().iterator(state)
    for b in uninterrupted[4:]:
        r = next(resumed)
        for k in b:
            np.testing.assert_array_equal(r[k], b[k])
    # set_state on a running iterator jumps there too
    resumed.set_state({**state, "step": 2})
    np.testing.assert_array_equal(next(resumed)["index"], uninterrupted[2]["index"])
    # the state is the same on every process and restores onto another process count
    two = [pipe(p=p, pc=2).iterator(state) for p in range(2)]
    stacked = np.concatenate([next(t)["index"] for t in two])
    np.testing.assert_array_equal(stacked, uninterrupted[4]["index"])


def test_state_from_another_pipeline_is_refused():
    state = pipe(g=6).iterator().get_state()
    with pytest.raises(DataError, match="global_batch_size: saved 6, now 4"):
        pipe(g=4).iterator(state)
    with pytest.raises(DataError, match="no 'step'"):
        pipe().iterator({"next_index": 3})


def test_finite_epochs_and_eval_padding():
    pl = pipe(num_epochs=2)
    assert pl.num_steps == 6 and len(list(pl.iterator())) == 6
    # eval: source order, every example once, last batch padded with mask False
    parts = [list(pipe(n=10, g=4, p=p, pc=2, shuffle=False, drop_remainder=False,
                       num_epochs=1).iterator()) for p in range(2)]
    assert len(parts[0]) == len(parts[1]) == 3
    index = np.concatenate([np.concatenate([parts[p][s]["index"] for p in range(2)])
                            for s in range(3)])
    mask = np.concatenate([np.concatenate([parts[p][s]["mask"] for p in range(2)])
                           for s in range(3)])
    np.testing.assert_array_equal(index[mask], np.arange(10))
    assert mask.dtype == bool and mask.sum() == 10 and not mask[10:].any()


def test_bad_batching():
    with pytest.raises(DataError, match="global batch size 6 is not divisible by the number of "
                                        "processes 4"):
        pipe(g=6, pc=4)
    with pytest.raises(DataError, match="has 5 examples, fewer than one global batch of 6"):
        pipe(n=5, g=6)
    with pytest.raises(DataError, match="is empty"):
        pipe(n=0)
    with pytest.raises(DataError, match=r"seed must be in \[0, 2\*\*32\), got -1"):
        Pipeline(Indexed(8), tag, global_batch_size=2, seed=-1, process_index=0, process_count=1)


def test_collate():
    out = collate([{"image": np.full((2, 2, 3), 255, np.uint8), "label": 3},
                   {"image": np.zeros((2, 2, 3), np.uint8), "label": 4}])
    assert out["image"].dtype == np.float32 and out["label"].dtype == np.int32
    np.testing.assert_array_equal(out["image"][:, 0, 0, 0], [1.0, -1.0])


def test_make_dataset_synthetic_purposes():
    cfg = {"kind": "synthetic", "image_size": 16, "num_classes": 10, "num_train_examples": 40,
           "num_eval_examples": 12}
    kw = dict(global_batch_size=8, seed=1, process_index=0, process_count=1)
    for purpose in ("ar", "tokenizer"):
        pl = make_dataset(cfg, purpose=purpose, **kw)
        b = next(pl.iterator())
        assert b["image"].shape == (8, 16, 16, 3) and b["image"].dtype == np.float32
        assert b["label"].dtype == np.int32 and set(b) == {"image", "label"}
        assert -1.0 <= b["image"].min() < 0 < b["image"].max() <= 1.0
        assert pl.batch_spec() == {"image": ((8, 16, 16, 3), np.float32),
                                   "label": ((8,), np.int32)}
        assert pl.num_classes == 10
    ev = make_dataset(cfg, purpose="eval", **kw)  # the held-out split, in order
    assert ev.fingerprint["split"] == "validation" and ev.num_steps == 2
    batches = list(ev.iterator())
    np.testing.assert_array_equal(batches[0]["label"], np.arange(8) % 10)
    assert ev.batch_spec(global_batch=True)["mask"] == ((8,), np.bool_)


def test_make_dataset_extract():
    cfg = {"kind": "synthetic", "image_size": 16, "num_train_examples": 10,
           "extract_crops": 10}
    pl = make_dataset(cfg, global_batch_size=4, seed=0, purpose="extract", process_index=1,
                      process_count=2)  # rows 2, 3 of each global batch of 4
    assert pl.fingerprint["split"] == "train" and pl.num_steps == 3
    assert pl.batch_spec()["image"] == ((2, 10, 16, 16, 3), np.float32)
    batches = list(pl.iterator())
    assert batches[0]["image"].shape == (2, 10, 16, 16, 3)
    np.testing.assert_array_equal(batches[0]["label"], [2, 3])  # source order
    np.testing.assert_array_equal(batches[2]["mask"], [False, False])  # 10 examples, padded
    flip = make_dataset({**cfg, "extract_crops": 2}, global_batch_size=4, seed=0,
                        purpose="extract", process_index=0, process_count=1)
    b = next(flip.iterator())["image"]
    np.testing.assert_array_equal(b[:, 1], b[:, 0, :, ::-1])
    with pytest.raises(ConfigError, match="extract_crops must be 10, 2 or 1"):
        make_dataset({**cfg, "extract_crops": 3}, global_batch_size=4, seed=0,
                     purpose="extract", process_index=0, process_count=1)


def test_make_dataset_folder(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(
                tmp_path / c / f"{i}.jpg")
    cfg = {"kind": "folder", "data_dir": str(tmp_path), "image_size": 16, "num_classes": 5}
    pl = make_dataset(cfg, global_batch_size=4, seed=0, process_index=0, process_count=1)
    labels = np.concatenate([b["label"] for b in take(pl.iterator(), 2)])
    assert pl.num_classes == 3 and set(labels.tolist()) <= {0, 1, 2}


def test_make_dataset_codes(tmp_path):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 64, (12, 10, 5))
    write_code_shards(tmp_path, codes, np.arange(12) % 3, vocab_size=64, shard_size=5,
                      meta={"image_size": 32})
    cfg = {"kind": "codes", "data_dir": str(tmp_path), "image_size": 32}
    kw = dict(global_batch_size=4, seed=2, process_index=0, process_count=1)
    pl = make_dataset(cfg, **kw)
    assert pl.batch_spec() == {"tokens": ((4, 5), np.int32), "label": ((4,), np.int32)}
    batches = take(pl.iterator(), 12)  # 4 epochs of 3 steps

    seen = {}
    for b in batches:
        assert b["tokens"].dtype == np.int32 and b["tokens"].shape == (4, 5)
        for t, label in zip(b["tokens"], b["label"]):
            hits = [(i, k) for i in range(12) for k in range(10) if np.array_equal(codes[i, k], t)]
            assert hits and all(i % 3 == label for i, _ in hits)
            seen.setdefault(hits[0][0], set()).add(hits[0][1])
    assert max(len(v) for v in seen.values()) > 1  # another crop in another epoch
    again = take(make_dataset(cfg, **kw).iterator(), 12)
    for a, b in zip(batches, again):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_worker_processes_give_the_same_batches():
    cfg = {"kind": "synthetic", "image_size": 16, "num_train_examples": 64}
    kw = dict(global_batch_size=8, seed=0, process_index=0, process_count=1)
    plain = take(make_dataset(cfg, **kw).iterator(), 3)
    with make_dataset({**cfg, "worker_count": 1}, **kw).iterator({"step": 1, "fingerprint": {
            **make_dataset(cfg, **kw).fingerprint}}) as it:
        for b in plain[1:]:
            r = next(it)
            for k in b:
                np.testing.assert_array_equal(r[k], b[k])
