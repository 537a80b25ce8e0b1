"""End-to-end sampling: pipeline, streaming previews, layout control, sample.py."""
from __future__ import annotations

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
from PIL import Image

from conftest import REPO
from dar_jax import ar, pipeline, sampling
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
        steps = sampling.steps_ready(cfg, sampling.tokens_in_groups(cfg, ev.group))
        ref = io["decode_adams2"] if steps == cfg.num_denoising_steps else io[f"preview_adams2_{steps}"]
        np.testing.assert_allclose(np.asarray(ev.images), nhwc(ref), atol=1e-3)


def test_stream_matches_sample_and_compiles_once(ref_models):
    keys = pipeline.sample_keys(3, 3)
    opts = pipeline.SampleOptions(cfg_scale="1.5,4.0", top_k=8)
    events = list(pipeline.stream(ref_models, [0, 1, 2], keys, opts))
    assert [e.group for e in events] == list(range(1, ref_models.tok_cfg.num_query_groups + 1))
    assert [e.final for e in events] == [False] * (len(events) - 1) + [True]
    sizes = (generation._advance_jit._cache_size(), sampling.sequential._run._cache_size())
    result = pipeline.sample(ref_models, [0, 1, 2], keys, opts, previews=True)
    assert (generation._advance_jit._cache_size(), sampling.sequential._run._cache_size()) == sizes
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
    assert k == sampling.tokens_in_groups(ref_models.tok_cfg, 2) > 0
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


def test_cli_end_to_end_reproducible(model_dirs, tmp_path):
    gpt, tok = model_dirs
    common = ["--gpt", str(gpt), "--tokenizer", str(tok), "--classes", "0,3,7", "--num-images", "5",
              "--batch-size", "4", "--seed", "11", "--npz", "--quiet"]
    a = run_cli(common + ["--out", str(tmp_path / "a")])
    assert a.returncode == 0, a.stderr
    b = run_cli(common + ["--out", str(tmp_path / "b")])
    assert b.returncode == 0, b.stderr
    files = sorted(os.listdir(tmp_path / "a"))
    assert "grid.png" in files and "previews.png" in files and "samples.npz" in files
    pngs = [f for f in files if f.endswith(".png") and f[0].isdigit() and "previews" not in f]
    assert len(pngs) == 5
    size = sampling.resolution(pipeline.load_models(str(gpt), str(tok)).tok_cfg)
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
    np.testing.assert_array_equal(npz["arr_1"], [0, 3, 7, 0, 3])
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
    save_model(tmp_path / "gpt_other", "gpt", other, big)
    cases.append((["--gpt", str(tmp_path / "gpt_other")], "does not match the tokenizer's codebook"))
    for extra, message in cases:
        rc = sample_main(base + extra)
        err = capsys.readouterr().err
        assert rc == 2 and message in err, (extra, err)
        assert "Traceback" not in err
