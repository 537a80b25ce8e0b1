"""The shipped default model: it loads, its samples are recognised by the independent
classifier, `python sample.py` works with no arguments, and damage is reported clearly."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from dar_jax import pipeline
from dar_jax.evaluate import shapes_classifier as sc
from dar_jax.sample_cli import main as sample_main

DEFAULT = REPO / "models" / "default"


@pytest.fixture(scope="module")
def default_models():
    return pipeline.load_models(str(DEFAULT / "gpt"), str(DEFAULT / "tokenizer"))


def test_samples_are_recognised_by_the_independent_classifier(default_models):
    """The quality bar: 10 samples per class from a fixed seed, >= 90% classified as asked."""
    classes = default_models.num_classes
    labels = np.repeat(np.arange(classes), 10)
    images = []
    for start in range(0, len(labels), 50):
        idx = np.arange(start, min(start + 50, len(labels)))
        res = pipeline.sample(default_models, labels[idx], pipeline.keys_for(0, idx), pipeline.SampleOptions())
        images.append(np.clip(np.asarray(res.images), -1, 1))
    pred = sc.predict(sc.load(str(REPO / "models" / "shape_classifier.npz")), np.concatenate(images))
    accuracy = float((pred == labels).mean())
    assert accuracy >= 0.9, accuracy


def test_sample_py_without_arguments(tmp_path):
    # a copy of the repository's entry point and models, so that ./samples lands in tmp_path
    shutil.copy(REPO / "sample.py", tmp_path / "sample.py")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "sample.py"], cwd=tmp_path, capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "samples"
    assert str(out.resolve()) in res.stdout
    pngs = sorted(out.glob("*.png"))
    assert (out / "grid.png").exists() and (out / "previews.png").exists()
    for p in pngs:
        arr = np.asarray(Image.open(p))
        assert arr.ndim == 3 and arr.shape[-1] == 3 and arr.std() > 1.0


def test_missing_or_corrupt_shipped_model_says_how_to_restore(tmp_path, capsys, monkeypatch):
    broken = tmp_path / "default"
    shutil.copytree(DEFAULT, broken)
    rc = sample_main(["--gpt", str(tmp_path / "nothing" / "gpt"), "--tokenizer", str(broken / "tokenizer"),
                      "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2 and "checkpoint not found" in capsys.readouterr().err
    # damage the shipped model's copy: its config and then its weights
    (broken / "gpt" / "config.json").write_text("{broken")
    from dar_jax import sample_cli
    monkeypatch.setenv(sample_cli.DEFAULT_MODEL_ENV, str(broken))   # the search order's first place
    assert sample_cli.default_model_dir() == broken.resolve()
    rc = sample_main(["--gpt", str(broken / "gpt"), "--tokenizer", str(broken / "tokenizer"),
                      "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "git checkout -- models/default" in err and "train_default.sh" in err
    shutil.copy(DEFAULT / "gpt" / "config.json", broken / "gpt" / "config.json")
    for root, _, files in os.walk(broken / "gpt" / "params"):
        for f in files:
            (broken / "gpt" / "params" / root / f).write_bytes(b"\0" * 16)
    rc = sample_main(["--gpt", str(broken / "gpt"), "--tokenizer", str(broken / "tokenizer"),
                      "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "corrupt" in err and "git checkout -- models/default" in err
    shutil.rmtree(broken / "gpt")
    rc = sample_main(["--out", str(tmp_path / "o"), "--quiet", "--gpt", str(broken / "gpt"),
                      "--tokenizer", str(broken / "tokenizer")])
    err = capsys.readouterr().err
    assert rc == 2 and "git checkout -- models/default" in err
