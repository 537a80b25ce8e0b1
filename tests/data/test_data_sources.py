"""Sources: the synthetic shapes, image folders, code shards, and bad input."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from dar_jax.config import ConfigError
from dar_jax.data import (CodeShards, CodeShardWriter, DataError, ImageFolder, SyntheticShapes,
                          finalize_code_shards, make_dataset, make_source, write_code_shards)
from dar_jax.data import synthetic


# ---------------------------------------------------------------- synthetic shapes

def test_synthetic_deterministic_and_varied():
    a = SyntheticShapes(num_classes=10, image_size=32)
    b = SyntheticShapes(num_classes=10, image_size=32)
    assert len(a) == 50_000
    x = a[123]
    assert x["image"].shape == (32, 32, 3) and x["image"].dtype == np.uint8
    assert x["label"] == 123 % 10
    np.testing.assert_array_equal(x["image"], b[123]["image"])
    # same class, different examples: different images; another content seed: different set
    assert not np.array_equal(a[3]["image"], a[13]["image"])
    other = SyntheticShapes(num_classes=10, image_size=32, seed=1)
    assert not np.array_equal(a[3]["image"], other[3]["image"])
    # the held-out split is another stream
    val = SyntheticShapes(num_classes=10, image_size=32, split="validation", num_examples=100)
    assert len(val) == 100 and not np.array_equal(a[3]["image"], val[3]["image"])
    # any resolution, same scene
    big = SyntheticShapes(num_classes=10, image_size=64)[123]["image"]
    assert big.shape == (64, 64, 3)
    small = np.asarray(Image.fromarray(big).resize((32, 32), Image.BOX), np.float32)
    assert np.abs(small - x["image"]).mean() < 6.0
    assert SyntheticShapes(num_classes=3, image_size=45)[7]["image"].shape == (45, 45, 3)


def _object_colour(image: np.ndarray) -> np.ndarray:
    """Mean colour of the pixels farthest from the border colour (the shape's interior)."""
    img = image.astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    dist = np.linalg.norm(img - np.median(border, 0), axis=-1)
    return img[dist >= 0.9 * dist.max()].mean(0)


def test_synthetic_classes_are_distinct_pairs():
    pairs = {(synthetic.SHAPES[c % 5], list(synthetic.COLOURS)[c % 8])
             for c in range(synthetic.MAX_CLASSES)}
    assert len(pairs) == synthetic.MAX_CLASSES == 40
    assert synthetic.class_name(0) == "red circle" and synthetic.class_name(9) == "green ring"
    # the drawn colour is the class colour (nearest palette entry), for every class and example
    palette = np.array(list(synthetic.COLOURS.values()), np.float32)
    ds = SyntheticShapes(num_classes=10, image_size=32)
    for i in range(60):
        x = ds[i]
        nearest = np.argmin(np.linalg.norm(palette - _object_colour(x["image"]), axis=-1))
        assert nearest == x["label"] % 8, (i, x["label"])


def test_synthetic_bad_arguments():
    with pytest.raises(DataError, match="num_classes must be in"):
        SyntheticShapes(num_classes=41)
    with pytest.raises(DataError, match="unknown split 'held_out'"):
        SyntheticShapes(split="held_out")
    with pytest.raises(IndexError):
        SyntheticShapes(num_examples=5)[5]


# ---------------------------------------------------------------- image folders

def _write_folder(root, sizes=((20, 30), (33, 25), (40, 40))):
    rng = np.random.default_rng(0)
    expected = []
    for label, name in enumerate(["ant", "bee"]):  # sorted class names -> labels
        os.makedirs(root / name / "sub", exist_ok=True)
        for i, (h, w) in enumerate(sizes):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            ext = [".png", ".PNG", ".bmp"][i]
            path = root / name / ("sub" if i == 2 else "") / f"img{i}{ext}"
            Image.fromarray(arr).save(path)
            expected.append((str(path), label, arr))
        gray = rng.integers(0, 256, (18, 22), dtype=np.uint8)
        Image.fromarray(gray, "L").save(root / name / "gray.png")
        expected.append((str(root / name / "gray.png"), label, np.repeat(gray[..., None], 3, -1)))
        (root / name / "notes.txt").write_text("not an image")
    return expected


def test_image_folder(tmp_path):
    expected = _write_folder(tmp_path)
    ds = ImageFolder(tmp_path)
    assert ds.classes == ["ant", "bee"] and ds.num_classes == 2 and len(ds) == 8
    # torchvision order: sorted walk of each class folder, sorted file names
    assert [os.path.basename(f) for f in ds.files[:4]] == ["gray.png", "img0.png", "img1.PNG",
                                                           "img2.bmp"]
    by_path = {p: (label, arr) for p, label, arr in expected}
    for i in range(len(ds)):
        x = ds[i]
        label, arr = by_path[ds.files[i]]
        assert x["label"] == label
        np.testing.assert_array_equal(x["image"], arr)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "missing")
    with pytest.raises(DataError, match="has no class subfolders"):
        ImageFolder(tmp_path)
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "dog" / "a.jpg")
    (tmp_path / "cat" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"no image files .* class folder\(s\) \['cat'\]"):
        ImageFolder(tmp_path)
    (tmp_path / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot read image .*broken.jpg"):
        ImageFolder(tmp_path)[0]


def test_make_source_folder_split_placeholder(tmp_path):
    _write_folder(tmp_path / "train")
    cfg = {"kind": "folder", "data_dir": str(tmp_path / "{split}"), "image_size": 16}
    assert len(make_source(cfg, "train")) == 8
    with pytest.raises(DataError, match=r"image folder '.*validation' does not exist"):
        make_source(cfg, "validation")
    with pytest.raises(DataError, match="has 2 classes, more than data.num_classes=1"):
        make_source({**cfg, "num_classes": 1}, "train")


# ---------------------------------------------------------------- code shards

def test_code_shards_writers_and_reader(tmp_path):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4096, (11, 10, 6))
    labels = rng.integers(0, 7, 11)
    # two writers (two processes), shards of 3 examples, fed in uneven pieces
    with CodeShardWriter(tmp_path, num_crops=10, seq_len=6, vocab_size=4096, shard_size=3,
                         writer_index=1) as w1:
        w1.add(codes[7:], labels[7:])
    w0 = CodeShardWriter(tmp_path, num_crops=10, seq_len=6, vocab_size=4096, shard_size=3)
    w0.add(codes[:2], labels[:2])
    w0.add(codes[2:7], labels[2:7])
    w0.close()
    assert not (tmp_path / "index.json").exists()
    index = finalize_code_shards(tmp_path, meta={"image_size": 32, "tokenizer": "tok.ckpt"})
    assert index["num_examples"] == 11 and index["num_classes"] == int(labels.max()) + 1
    assert [s["num_examples"] for s in index["shards"]] == [3, 3, 1, 3, 1]
    assert not list(tmp_path.glob("part-*.json"))
    assert np.load(tmp_path / index["shards"][0]["codes"]).dtype == np.uint16
    ds = CodeShards(tmp_path)
    assert len(ds) == 11 and ds.num_crops == 10 and ds.seq_len == 6
    assert ds.meta == {"image_size": 32, "tokenizer": "tok.ckpt"}
    for i in range(11):  # writer 0's examples, then writer 1's
        x = ds[i]
        assert x["codes"].dtype == np.int32
        np.testing.assert_array_equal(x["codes"], codes[i])
        assert x["label"] == labels[i]
    with pytest.raises(IndexError):
        ds[11]


def test_write_code_shards_one_crop_int32(tmp_path):
    codes = np.arange(4 * 5).reshape(4, 1, 5) * 5000  # > 2**16: int32 storage
    index = write_code_shards(tmp_path, codes, [0, 1, 2, 3], num_classes=10)
    assert index["dtype"] == "int32" and index["num_classes"] == 10
    np.testing.assert_array_equal(CodeShards(tmp_path)[3]["codes"], codes[3])


def test_code_shards_errors(tmp_path):
    with pytest.raises(DataError, match="code directory .* does not exist"):
        CodeShards(tmp_path / "nope")
    with pytest.raises(DataError, match="has no index.json"):
        CodeShards(tmp_path)
    w = CodeShardWriter(tmp_path / "a", num_crops=2, seq_len=4, vocab_size=16)
    with pytest.raises(DataError, match=r"do not match \(n, num_crops, seq_len\) = \(3, 2, 4\)"):
        w.add(np.zeros((3, 10, 4), int), [0, 1, 2])
    with pytest.raises(DataError, match=r"codes outside \[0, 16\)"):
        w.add(np.full((1, 2, 4), 16), [0])
    with pytest.raises(DataError, match="no writer part files"):
        finalize_code_shards(tmp_path / "a")
    CodeShardWriter(tmp_path / "b", num_crops=2, seq_len=4).close()
    CodeShardWriter(tmp_path / "b", num_crops=1, seq_len=4, writer_index=1).close()
    with pytest.raises(DataError, match="writers .* disagree"):
        finalize_code_shards(tmp_path / "b")
    write_code_shards(tmp_path / "c", np.zeros((2, 1, 3), int), [0, 1], meta={"image_size": 64})
    os.remove(tmp_path / "c" / json.loads((tmp_path / "c" / "index.json").read_text())
              ["shards"][0]["codes"])
    with pytest.raises(DataError, match="missing shard files"):
        CodeShards(tmp_path / "c")
    write_code_shards(tmp_path / "d", np.zeros((2, 1, 3), int), [0, 1], meta={"image_size": 64})
    with pytest.raises(DataError, match="extracted at image_size 64, data.image_size is 32"):
        make_source({"kind": "codes", "data_dir": str(tmp_path / "d"), "image_size": 32},
                    "train")


# ---------------------------------------------------------------- config errors

def test_bad_config(tmp_path):
    kw = dict(global_batch_size=4, seed=0, process_index=0, process_count=1)
    with pytest.raises(ConfigError, match="unknown data kind 'imagenet'"):
        make_dataset({"kind": "imagenet"}, **kw)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['image_szie'\] in data"):
        make_dataset({"kind": "synthetic", "image_szie": 32}, **kw)
    with pytest.raises(ConfigError, match="needs data.data_dir"):
        make_dataset({"kind": "folder"}, **kw)
    with pytest.raises(DataError, match=r"image folder '.*nowhere' does not exist"):
        make_dataset({"kind": "folder", "data_dir": str(tmp_path / "nowhere")}, **kw)
    with pytest.raises(DataError, match="unknown data purpose 'gan'"):
        make_dataset({"kind": "synthetic"}, purpose="gan", **kw)
    with pytest.raises(DataError, match="code shards feed the AR model only"):
        make_dataset({"kind": "codes", "data_dir": str(tmp_path)}, purpose="tokenizer", **kw)
