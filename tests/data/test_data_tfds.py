"""A small dataset really prepared with tensorflow-datasets (array_record), read without
TensorFlow through the same input pipeline as ImageNet."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from dar_jax.data import DataError, SyntheticShapes, TfdsSource, make_dataset  # noqa: E402

NAME = "dar_test_shapes"
TRAIN, VAL, SIZE = 20, 6, 24


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


class DarTestShapes(tfds.core.GeneratorBasedBuilder):
    """Synthetic shapes as a tfds dataset; images given as encoded PNG bytes, so that tfds
    prepares it without TensorFlow (as ImageNet's builder gives the archive's JPEG bytes)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=5),
            "index": np.int64,
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train", TRAIN),
                "validation": self._generate_examples("validation", VAL)}

    def _generate_examples(self, split, n):
        ds = SyntheticShapes(num_classes=5, image_size=SIZE, split=split, num_examples=n)
        for i in range(n):
            x = ds[i]
            yield i, {"image": _png(x["image"]), "label": x["label"], "index": i}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    DarTestShapes(data_dir=str(path), file_format="array_record").download_and_prepare()
    return str(path)


def _digest(x) -> tuple:
    return x["label"], hashlib.sha256(np.ascontiguousarray(x["image"]).tobytes()).hexdigest()


def test_prepared_as_array_record(data_dir):
    files = os.listdir(os.path.join(data_dir, NAME, "1.0.0"))
    assert any(f.startswith(f"{NAME}-train.array_record") for f in files), files
    info = json.load(open(os.path.join(data_dir, NAME, "1.0.0", "dataset_info.json")))
    assert info["fileFormat"] == "array_record"


def test_source_reads_every_image(data_dir):
    tf_imported_before = "tensorflow" in sys.modules
    src = TfdsSource(NAME, split="train", data_dir=data_dir)
    assert len(src) == TRAIN and src.num_classes == 5
    ref = SyntheticShapes(num_classes=5, image_size=SIZE, num_examples=TRAIN)
    got = sorted(_digest(src[i]) for i in range(len(src)))
    assert got == sorted(_digest(ref[i]) for i in range(TRAIN))
    assert src[0]["image"].dtype == np.uint8 and isinstance(src[0]["label"], int)
    assert len(TfdsSource(NAME, split="validation[:4]", data_dir=data_dir)) == 4
    if not tf_imported_before:
        assert "tensorflow" not in sys.modules


def test_pipeline_like_imagenet(data_dir):
    cfg = {"kind": "tfds", "name": NAME, "data_dir": data_dir, "image_size": 16,
           "num_classes": 5}
    kw = dict(global_batch_size=4, seed=3, process_index=0, process_count=1)
    pipe = make_dataset(cfg, **kw)
    assert pipe.steps_per_epoch == TRAIN // 4 and pipe.num_classes == 5
    it = pipe.iterator()
    batches = [next(it) for _ in range(7)]  # crosses the epoch boundary (5 steps per epoch)
    assert batches[0]["image"].shape == (4, 16, 16, 3) and batches[0]["image"].dtype == np.float32
    assert -1.0 <= batches[0]["image"].min() and batches[0]["image"].max() <= 1.0
    # resume exactly from a state saved after 3 batches
    it2 = pipe.iterator()
    for _ in range(3):
        next(it2)
    state = json.loads(json.dumps(it2.get_state()))
    it2.close()
    resumed = make_dataset(cfg, **kw).iterator(state)
    for b in batches[3:]:
        r = next(resumed)
        for k in b:
            np.testing.assert_array_equal(r[k], b[k])
    # evaluation: every validation image once, centre crop
    ev = make_dataset(cfg, global_batch_size=4, seed=0, purpose="eval", process_index=0,
                      process_count=1)
    out = list(ev.iterator())
    assert len(out) == 2 and sum(int(b["mask"].sum()) for b in out) == VAL


def test_reading_needs_no_tensorflow(data_dir):
    """A fresh process without TensorFlow reads the dataset by name from its files (the builder
    class is not defined there), and never imports TensorFlow."""
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed here; this test checks reading without it")
    code = textwrap.dedent(f"""
        import sys
        from dar_jax.data import make_dataset
        cfg = {{"kind": "tfds", "name": "{NAME}", "data_dir": {data_dir!r}, "image_size": 16}}
        it = make_dataset(cfg, global_batch_size=4, seed=0, process_index=0,
                          process_count=1).iterator()
        b = next(it)
        print(b["image"].shape, b["label"].shape, "tensorflow" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(4, 16, 16, 3) (4,) False" in out.stdout


def test_tfds_errors(data_dir, tmp_path):
    with pytest.raises(DataError, match="unknown tfds dataset 'no_such_dataset_xyz'"):
        TfdsSource("no_such_dataset_xyz", split="train", data_dir=data_dir)
    with pytest.raises(DataError, match=r"tfds data_dir '.*missing' does not exist"):
        TfdsSource(NAME, split="train", data_dir=str(tmp_path / "missing"))
    with pytest.raises(DataError, match=r"no split 'test'; splits: \['train', 'validation'\]"):
        TfdsSource(NAME, split="test", data_dir=data_dir)
    with pytest.raises(DataError, match="no feature 'img'"):
        TfdsSource(NAME, split="train", data_dir=data_dir, image_key="img")
    # ImageNet not prepared: the message says how, with tfds' manual-download directory
    with pytest.raises(DataError, match=r"'imagenet2012' is not prepared .*--manual_dir="
                       + str(tmp_path / "downloads" / "manual")):
        TfdsSource("imagenet2012", split="train", data_dir=str(tmp_path))
