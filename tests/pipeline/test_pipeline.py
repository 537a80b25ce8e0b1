"""End-to-end sampling: pipeline, streaming previews, layout control, sample.py."""
from __future__ import annotations

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from dar_jax import ar, pipeline
from dar_jax import tokenizer as T
from dar_jax.tokenizer import sequential
from dar_jax.ar import generation
from dar_jax.sample_cli import main as sample_main


def nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


def test_streaming_previews_match_reference(ref_models, ref_dir):
    io = np.load(ref_dir / "tokenizer_io.npz")
    cfg = ref_models.tok_cfg
    events = list(pipeline.decode_groups(ref_models, io["codes"], nhwc(io["decode_noise"])))
    assert len(events) == cfg.num_query_groups and events[-1].final
    for ev in events:
        steps = T.steps_ready(cfg, T.tokens_in_groups(cfg, ev.group))
        ref = io["decode_adams2"] if steps == cfg.num_denoising_steps else io[f"preview_adams2_{steps}"]
        np.testing.assert_allclose(np.asarray(ev.images), nhwc(ref), atol=1e-3)


def test_stream_matches_sample_and_compiles_once(ref_models):
    keys = pipeline.sample_keys(3, 3)
    opts = pipeline.SampleOptions(cfg_scale="1.5,4.0", top_k=8)
    events = list(pipeline.stream(ref_models, [0, 1, 2], keys, opts))
    assert [e.group for e in events] == list(range(1, ref_models.tok_cfg.num_query_groups + 1))
    assert [e.final for e in events] == [False] * (len(events) - 1) + [True]
    sizes = (generation._advance_jit._cache_size(), sequential._integrate._cache_size())
    result = pipeline.sample(ref_models, [0, 1, 2], keys, opts, previews=True)
    assert (generation._advance_jit._cache_size(), sequential._integrate._cache_size()) == sizes
    np.testing.assert_array_equal(np.asarray(result.images), np.asarray(events[-1].images))
    np.testing.assert_array_equal(np.asarray(result.tokens), np.asarray(events[-1].tokens))
    assert result.previews.shape[1] == len(events)
    # streamed tokens equal the one-program AR generation with the same per-sample keys
    direct = ar.generate(ref_models.gpt_cfg, ref_models.gpt_params, jnp.array([0, 1, 2]),
                         pipeline.token_keys(keys), cfg_scale="1.5,4.0", top_k=8)
    np.testing.assert_array_equal(np.asarray(direct), np.asarray(result.tokens))


def test_layout_control_keeps_prefix_and_changes_samples(ref_models, ref_dir):
    io = np.load(ref_dir / "tokenizer_io.npz")
    image = nhwc(io["images"][:1])
    codes, k = pipeline.layout_prefix(ref_models, image, 2)
    assert k == T.tokens_in_groups(ref_models.tok_cfg, 2) > 0
    keys = pipeline.sample_keys(5, 4)
    labels = [1, 1, 2, 2]
    opts = pipeline.SampleOptions(cfg_scale=2.0, temperature=1.5)
    prefix = jnp.repeat(codes, 4, 0)
    guided = pipeline.sample(ref_models, labels, keys, opts, prefix=prefix, prefix_len=k)
    free = pipeline.sample(ref_models, labels, keys, opts)
    np.testing.assert_array_equal(np.asarray(guided.tokens[:, :k]), np.asarray(prefix[:, :k]))
    assert (np.asarray(guided.tokens[:, :k]) != np.asarray(free.tokens[:, :k])).any()
    assert np.abs(np.asarray(guided.images) - np.asarray(free.images)).max() > 1e-2


def run_cli(args, env=None):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600)


def test_cli_end_to_end_reproducible(model_dirs, ref_gpt, tmp_path):
    gpt, tok = model_dirs
    n = ref_gpt[0].num_classes      # three distinct classes of the fixture's model, any size
    classes = [0, n // 2, n - 1]
    common = ["--gpt", str(gpt), "--tokenizer", str(tok), "--classes", ",".join(map(str, classes)),
              "--num-images", "5",
              "--batch-size", "4", "--seed", "11", "--npz", "--quiet"]
    a = run_cli(common + ["--out", str(tmp_path / "a")])
    assert a.returncode == 0, a.stderr
    b = run_cli(common + ["--out", str(tmp_path / "b")])
    assert b.returncode == 0, b.stderr
    files = sorted(os.listdir(tmp_path / "a"))
    assert "grid.png" in files and "previews.png" in files and "samples.npz" in files
    pngs = [f for f in files if f.endswith(".png") and f[0].isdigit() and "previews" not in f]
    assert len(pngs) == 5
    size = T.resolution(pipeline.load_models(str(gpt), str(tok)).tok_cfg)
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() or f.endswith(".npz")
    for f in pngs:
        arr = np.asarray(Image.open(tmp_path / "a" / f))
        assert arr.shape == (*size, 3) and arr.std() > 1.0
    strip = np.asarray(Image.open(tmp_path / "a" / pngs[0].replace(".png", "_previews.png")))
    groups = pipeline.load_models(str(gpt), str(tok)).tok_cfg.num_query_groups
    assert strip.shape == (size[0], size[1] * groups, 3)
    npz = np.load(tmp_path / "a" / "samples.npz")
    assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (5, *size, 3)
    np.testing.assert_array_equal(npz["arr_1"], classes + classes[:2])
    np.testing.assert_array_equal(npz["arr_0"], np.load(tmp_path / "b" / "samples.npz")["arr_0"])


def test_eight_devices_match_one_device(model_dirs, tmp_path):
    gpt, tok = model_dirs
    common = ["--gpt", str(gpt), "--tokenizer", str(tok), "--classes", "all", "--per-class", "1",
              "--top-k", "1", "--batch-size", "8", "--npz", "--no-images", "--no-previews", "--quiet"]
    one = run_cli(common + ["--out", str(tmp_path / "one")],
                  env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    eight = run_cli(common + ["--out", str(tmp_path / "eight")],
                    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert one.returncode == 0, one.stderr
    assert eight.returncode == 0, eight.stderr
    a, b = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "eight" / "samples.npz")
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1


def test_cli_bad_inputs(model_dirs, tmp_path, capsys, ref_gpt):
    gpt, tok = model_dirs
    base = ["--gpt", str(gpt), "--tokenizer", str(tok), "--out", str(tmp_path / "o"), "--quiet"]
    cases = [
        (["--gpt", str(tmp_path / "none")], "checkpoint not found"),
        (["--classes", "1,999"], "class ids must lie in"),
        (["--cfg-scale", "2,x"], "malformed CFG scale"),
        (["--layout-from", str(tmp_path / "missing.png")], "layout image not found"),
    ]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    cases.append((["--layout-from", str(tmp_path / "bad.png")], "cannot read layout image"))
    from dar_jax.checkpoint import save_model
    import dataclasses
    cfg, params = ref_gpt
    other = dataclasses.replace(cfg, vocab_size=cfg.vocab_size * 2)
    big = dict(params, tok_embeddings=np.zeros((other.vocab_size, cfg.dim), np.float32),
               output=np.zeros((cfg.dim, other.vocab_size), np.float32))
    save_model(tmp_path / "gpt_other", ar.FAMILY, other, big)
    cases.append((["--gpt", str(tmp_path / "gpt_other")], "does not match the tokenizer's codebook"))
    for extra, message in cases:
        rc = sample_main(base + extra)
        err = capsys.readouterr().err
        assert rc == 2 and message in err, (extra, err)
        assert "Traceback" not in err


# --- bad input: a clear error naming the problem, before any model is read, nothing written -------
def _tree(root):
    return sorted((os.path.relpath(os.path.join(r, n), root) for r, ds, fs in os.walk(root) for n in ds + fs))


def test_cli_refuses_bad_options_before_reading_a_model(model_dirs, tmp_path, capsys, monkeypatch):
    gpt, tok = model_dirs
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    base = ["--gpt", str(gpt), "--tokenizer", str(tok), "--quiet"]
    cases = [(["--steps", "-5"], "--steps must be >= 0"),
             (["--temperature", "nan"], "--temperature must be a finite number"),
             (["--temperature", "inf"], "--temperature must be a finite number"),
             (["--num-images", "-3"], "--num-images must be >= 0"),
             (["--per-class", "-2"], "--per-class must be >= 0"),
             (["--num-images", "3", "--per-class", "2"], "not both"),
             (["--top-p", "0"], "--top-p must lie in (0, 1]"),
             (["--seed", str(2 ** 70)], "--seed must fit in 64 bits"),
             (["--size", "33"], "sizes must be multiples of"),
             (["--out", str(a_file)], "is a file"),
             (["--out", str(a_file / "sub")], "is a file")]
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((["--out", str(locked / "o")], "not writable"))

    def no_loading(*a, **k):
        raise AssertionError("a model was read before the options were checked")

    monkeypatch.setattr(pipeline, "load_tokenizer", no_loading)
    monkeypatch.setattr(pipeline, "load_gpt", no_loading)
    before = _tree(tmp_path)
    for extra, message in cases:
        out = [] if "--out" in extra else ["--out", str(tmp_path / "o")]
        rc = sample_main(base + out + extra)
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, (extra, err)
        assert _tree(tmp_path) == before, extra
    assert a_file.read_text() == "mine"


def test_cli_refuses_a_folder_where_an_image_goes_and_writes_nothing(model_dirs, tmp_path, capsys):
    gpt, tok = model_dirs
    out = tmp_path / "o"
    (out / "000001_class1.png").mkdir(parents=True)
    rc = sample_main(["--gpt", str(gpt), "--tokenizer", str(tok), "--classes", "0,1", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "000001_class1.png" in err and "is a directory" in err and "Traceback" not in err, err
    assert _tree(tmp_path) == ["o", "o/000001_class1.png"]


def test_cli_reads_a_gpt_pt_of_any_size_with_the_shared_size_flags(ref_dir, ref_config, tmp_path, capsys):
    """No --gpt-model needed: the size comes from the shapes (heads given: dim / 64 is only the
    default), the block size from the tokenizer; a contradicting flag names both values."""
    g = ref_config["gpt"]
    base = ["--gpt", str(ref_dir / "gpt.pt"), "--tokenizer", str(ref_dir / "tokenizer.pt"), "--classes", "0",
            "--n-head", str(g["n_head"]), "--no-previews", "--npz", "--no-images", "--quiet"]
    assert sample_main(base + ["--out", str(tmp_path / "ok")]) == 0, capsys.readouterr().err
    assert np.load(tmp_path / "ok" / "samples.npz")["arr_0"].shape[0] == 1
    rc = sample_main(base + ["--dim", str(g["dim"] + 64), "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == 2 and f"--dim {g['dim'] + 64}" in err and f"dim={g['dim']}" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_errors_about_the_users_tokenizer_do_not_blame_the_default_model(tmp_path, capsys):
    mine = tmp_path / "my_tokenizer"
    mine.mkdir()
    (mine / "config.json").write_text("{broken")
    rc = sample_main(["--tokenizer", str(mine), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and str(mine) in err and "corrupt" in err
    assert "default model" not in err and "git checkout" not in err


def test_api_refuses_bad_labels_keys_and_options(ref_models):
    m = ref_models
    keys = pipeline.sample_keys(0, 2)
    with pytest.raises(ValueError, match="integer class ids, got float"):
        pipeline.sample(m, [0.5, 1.0], keys)
    with pytest.raises(ValueError, match="integer class ids"):
        pipeline.sample(m, ["a", "b"], keys)
    with pytest.raises(ValueError, match="labels is empty"):
        pipeline.sample(m, [], keys[:0])
    with pytest.raises(ValueError, match="keys must be PRNG keys"):
        pipeline.sample(m, [0, 1], [0, 1])
    with pytest.raises(ValueError, match="one key per label"):
        pipeline.sample(m, [0, 1], keys[:1])
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, "):
        pipeline.sample(m, [0, m.num_classes], keys)
    with pytest.raises(ValueError, match="num_steps=-2"):
        pipeline.SampleOptions(num_steps=-2)
    for t in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="temperature"):
            pipeline.SampleOptions(temperature=t)
    with pytest.raises(ValueError, match="top_p"):
        pipeline.SampleOptions(top_p=float("nan"))
    with pytest.raises(ValueError, match="temperature"):
        ar.prepare_generation(m.gpt_cfg, m.gpt_params, [0], pipeline.sample_keys(0, 1), temperature=float("nan"))
    res = m.tok_cfg.sampling_resolution
    patch = m.tok_cfg.diff_decoder.patch_size
    for size in (res - patch, res + 1):
        with pytest.raises(ValueError, match=f"multiples of {patch}"):
            pipeline.sample(m, [0, 1], keys, pipeline.SampleOptions(size=size))
    codes = np.zeros((1, m.tok_cfg.num_all_queries - 1), np.int32)
    noise = np.zeros((1, res, res, 3), np.float32)
    with pytest.raises(ValueError, match=f"all {m.tok_cfg.num_all_queries} codes"):
        list(pipeline.decode_groups(m, codes, noise))
    with pytest.raises(ValueError, match="noise must be"):
        list(pipeline.decode_groups(m, np.zeros((1, m.tok_cfg.num_all_queries), np.int32), noise[0]))


def test_api_decodes_at_a_larger_valid_size(ref_models):
    m = ref_models
    size = m.tok_cfg.sampling_resolution + m.tok_cfg.diff_decoder.patch_size
    res = pipeline.sample(m, [0], pipeline.sample_keys(0, 1), pipeline.SampleOptions(size=size, num_steps=2))
    r = m.tok_cfg.output_resolution
    assert res.images.shape[1:3] == ((r, r) if r and r < size else (size, size))
