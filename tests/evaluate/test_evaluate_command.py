"""``python -m dar_jax.evaluate`` end to end on the fixture models (tiny N), in-process through
its ``main(argv, hooks)``: resume after an interruption, never stale or wrong numbers, clear
errors for bad input before anything is written."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from dar_jax import ar
from dar_jax.checkpoint import save_model
from dar_jax.evaluate.command import main as evaluate_main


class Interrupted(Exception):
    """Stands for a kill: raised by a hook after the first new shard."""


def stop_after(n):
    def hooks(event, done):
        if event == "shard" and done >= n:
            raise Interrupted(f"stopped after {done} shards")
    return hooks


def run(args, capsys, hooks=None):
    rc = evaluate_main([*args, "--quiet"], hooks=hooks)
    out = capsys.readouterr()
    return rc, out.err


@pytest.fixture
def setup(model_dirs, inception_dir, tmp_path):
    gpt, tok = model_dirs
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    out = tmp_path / "eval"
    args = ["--gpt", str(gpt), "--tokenizer", str(tok), "--inception", str(inception_dir / "pt_inception_random.pth"),
            "--reference", str(ref), "--num-samples", "10", "--shard-size", "4", "--batch-size", "4",
            "--inception-batch-size", "4", "--out", str(out)]
    return args, out, ref


def _tree(root):
    return sorted(os.path.relpath(os.path.join(r, n), root) for r, ds, fs in os.walk(root) for n in ds + fs)


def test_generation_protocol_resumes_after_an_interruption(setup, capsys, caplog):
    args, out, _ = setup
    with pytest.raises(Interrupted):
        evaluate_main(args + ["--npz", "--quiet"], hooks=stop_after(1))
    assert sorted(os.listdir(out / "samples")) == ["labels.npy", "manifest.json", "shard_00000.npz"]
    first = np.load(out / "samples" / "shard_00000.npz")["images"]
    rc, err = run(args + ["--npz"], capsys)
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["shards"] == {"generated": [1, 2], "skipped": [0]}
    np.testing.assert_array_equal(np.load(out / "samples" / "shard_00000.npz")["images"], first)
    for key in ("fid", "inception_score", "precision", "recall"):
        assert np.isfinite(res[key]), key
    s = res["settings"]
    assert s["cfg_scale"] == "1.2,8.0" and s["top_k"] == 0 and s["top_p"] == 1.0 and s["label_mode"] == "random"
    assert len(s["gpt_fingerprint"]) == 64 and len(s["tokenizer_fingerprint"]) == 64
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape[0] == 10
    # other settings in the same directory: refused rather than mixed
    rc, err = run(args + ["--seed", "1"], capsys)
    assert rc == 2 and "another run" in err and "settings.seed" in err

    # a damaged shard is named, moved aside and regenerated; the numbers do not change
    path = out / "samples" / "shard_00001.npz"
    good = np.load(path)["images"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    rc, err = run(args, capsys)
    assert rc == 0, err
    warned = caplog.text + err  # the warning (stderr outside pytest's log capture)
    assert "shard 1" in warned and "shard_00001.npz" in warned and "damaged" in warned
    assert "Traceback" not in err
    again = json.loads((out / "results.json").read_text())
    assert again["shards"]["generated"] == [1] and again["shards"]["corrupt"] == [1]
    assert (out / "samples" / "shard_00001.npz.corrupt").read_bytes() == bytes(data)
    np.testing.assert_array_equal(np.load(path)["images"], good)
    assert again["fid"] == res["fid"] and again["inception_score"] == res["inception_score"]


def test_a_replaced_model_is_refused_and_its_shards_never_reused(setup, ref_gpt, tmp_path, capsys):
    args, out, _ = setup
    gpt = tmp_path / "m" / "gpt"
    cfg, params = ref_gpt
    save_model(gpt, ar.FAMILY, cfg, params)
    args = list(args)
    args[1] = str(gpt)
    with pytest.raises(Interrupted):  # a shard of the first model exists
        evaluate_main(args + ["--quiet"], hooks=stop_after(1))
    before = {f: (out / "samples" / f).read_bytes() for f in os.listdir(out / "samples")}
    other = jax.tree.map(lambda a: np.asarray(a) * 0.5, params)
    save_model(gpt, ar.FAMILY, cfg, other, overwrite=True)     # other parameters at the same path
    rc, err = run(args, capsys)
    assert rc == 2 and "gpt_fingerprint" in err and "parameters" in err and "Traceback" not in err, err
    assert {f: (out / "samples" / f).read_bytes() for f in os.listdir(out / "samples")} == before
    assert not (out / "results.json").exists()


def test_every_bad_option_or_input_is_refused_before_anything_is_written(setup, tmp_path, capsys):
    args, out, ref = setup
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    objects = tmp_path / "objects.npz"
    np.savez(objects, arr_0=np.array([{"x": 1}, None], dtype=object))
    stats = tmp_path / "stats.npz"
    np.savez(stats, format=np.asarray("dar_jax.reference_stats.v1"), meta=np.asarray("{broken"),
             mu=np.zeros(3), sigma=np.eye(3), count=np.asarray(3))

    def with_(flag, value):
        a = list(args)
        a[a.index(flag) + 1] = value
        return a

    cases = [(args + ["--cfg-scale", "1,2,3"], "malformed CFG scale"),
             (args + ["--temperature", "nan"], "--temperature"),
             (args + ["--steps", "-1"], "--steps must be >= 0"),
             (with_("--num-samples", "0"), "--num-samples must be >= 1"),
             (with_("--reference", str(tmp_path / "missing.npz")), "--reference not found"),
             (with_("--out", str(a_file)), "is a file"),
             (with_("--reference", str(objects)), "objects.npz"),
             (with_("--reference", str(stats)), "stats.npz")]
    before = _tree(tmp_path)
    for argv, message in cases:
        rc, err = run(argv, capsys)
        assert rc == 2 and message in err and "Traceback" not in err, (argv[-2:], err)
        assert _tree(tmp_path) == before, argv
    assert a_file.read_text() == "mine"
    # after a refused command, the corrected one runs in the same --out (it is not locked)
    with pytest.raises(Interrupted):
        evaluate_main(args + ["--quiet"], hooks=stop_after(1))
    assert os.path.exists(out / "samples" / "shard_00000.npz")


def test_an_unreadable_manifest_beside_samples_is_a_clear_error(setup, capsys):
    args, out, _ = setup
    args = list(args)
    args[args.index("--num-samples") + 1] = "4"
    with pytest.raises(Interrupted):
        evaluate_main(args + ["--quiet"], hooks=stop_after(1))
    (out / "samples" / "manifest.json").write_text("{broken")
    rc, err = run(args, capsys)
    assert rc == 2 and "manifest.json" in err and "unreadable" in err and "Traceback" not in err


def test_rfid_on_center_crops_reuses_them(model_dirs, inception_dir, tmp_path, capsys):
    _, tok = model_dirs
    out = tmp_path / "rfid"
    args = ["--rfid", "--tokenizer", str(tok), "--inception", str(inception_dir / "pt_inception_random.pth"),
            "--data-kind", "synthetic", "--image-size", "32", "--num-samples", "6", "--shard-size", "3",
            "--batch-size", "3", "--inception-batch-size", "3", "--out", str(out)]
    rc, err = run(args, capsys)
    assert rc == 0, err
    r1 = json.loads((out / "results.json").read_text())
    assert np.isfinite(r1["rfid"]) and os.path.exists(out / "crops_reference.npz")
    crops = np.load(out / "crops" / "shard_00000.npz")["images"]
    assert crops.shape == (3, 32, 32, 3) and crops.dtype == np.uint8
    rc, err = run(args, capsys)
    assert rc == 0, err
    r2 = json.loads((out / "results.json").read_text())
    assert r2["shards"]["crops"]["generated"] == [] and r2["shards"]["reconstructions"]["generated"] == []
    assert r2["rfid"] == r1["rfid"]


def test_missing_inception_weights_is_one_line_error(model_dirs, tmp_path, capsys):
    gpt, tok = model_dirs
    rc, err = run(["--gpt", str(gpt), "--tokenizer", str(tok), "--inception", str(tmp_path / "none.pth"),
                   "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "not found" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
