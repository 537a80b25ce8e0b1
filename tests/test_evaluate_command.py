"""``python -m dar_jax.evaluate`` end to end on the fixture models (tiny N), with resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np

from conftest import REPO


def run(args, env=None):
    return subprocess.run([sys.executable, "-m", "dar_jax.evaluate", *args, "--quiet"], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})})


def test_generation_protocol_resumes_after_kill(model_dirs, inception_dir, tmp_path):
    gpt, tok = model_dirs
    ref = tmp_path / "ref.npz"
    rng = np.random.default_rng(0)
    np.savez(ref, arr_0=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    out = tmp_path / "eval"
    args = ["--gpt", str(gpt), "--tokenizer", str(tok), "--inception", str(inception_dir / "pt_inception_random.pth"),
            "--reference", str(ref), "--num-samples", "10", "--shard-size", "4", "--batch-size", "4",
            "--inception-batch-size", "4", "--out", str(out), "--npz"]
    killed = run(args, env={"DAR_DEBUG_KILL_AFTER_SHARDS": "1"})
    assert killed.returncode == -signal.SIGKILL
    assert sorted(os.listdir(out / "samples")) == ["labels.npy", "manifest.json", "shard_00000.npz"]
    first = np.load(out / "samples" / "shard_00000.npz")["images"]
    done = run(args)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["shards"] == {"generated": [1, 2], "skipped": [0]}
    np.testing.assert_array_equal(np.load(out / "samples" / "shard_00000.npz")["images"], first)
    for key in ("fid", "inception_score", "precision", "recall"):
        assert np.isfinite(res[key]), key
    s = res["settings"]
    assert s["cfg_scale"] == "1.2,8.0" and s["top_k"] == 0 and s["top_p"] == 1.0 and s["label_mode"] == "random"
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (10, 32, 32, 3)
    # other settings in the same directory: refused rather than mixed
    clash = run(args[:-3] + ["--out", str(out), "--seed", "1"])
    assert clash.returncode == 2 and "another run" in clash.stderr


def test_rfid_on_center_crops_reuses_them(model_dirs, inception_dir, tmp_path):
    _, tok = model_dirs
    out = tmp_path / "rfid"
    args = ["--rfid", "--tokenizer", str(tok), "--inception", str(inception_dir / "pt_inception_random.pth"),
            "--data-kind", "synthetic", "--image-size", "32", "--num-samples", "6", "--shard-size", "3",
            "--batch-size", "3", "--inception-batch-size", "3", "--out", str(out)]
    res1 = run(args)
    assert res1.returncode == 0, res1.stderr[-3000:]
    r1 = json.loads((out / "results.json").read_text())
    assert np.isfinite(r1["rfid"]) and os.path.exists(out / "crops_reference.npz")
    crops = np.load(out / "crops" / "shard_00000.npz")["images"]
    assert crops.shape == (3, 32, 32, 3) and crops.dtype == np.uint8
    res2 = run(args)
    assert res2.returncode == 0, res2.stderr[-3000:]
    r2 = json.loads((out / "results.json").read_text())
    assert r2["shards"]["crops"]["generated"] == [] and r2["shards"]["reconstructions"]["generated"] == []
    assert r2["rfid"] == r1["rfid"]


def test_missing_inception_weights_is_one_line_error(model_dirs, tmp_path):
    gpt, tok = model_dirs
    res = run(["--gpt", str(gpt), "--tokenizer", str(tok), "--inception", str(tmp_path / "none.pth"),
               "--out", str(tmp_path / "o")])
    assert res.returncode == 2 and "not found" in res.stderr and "Traceback" not in res.stderr
