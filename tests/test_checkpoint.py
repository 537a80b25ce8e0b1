"""The safe .pt reader, reference converters and the project's model directory layout."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch_format
from conftest import OFFICIAL_SHAPES, REPO
from dar_jax import ar
from dar_jax.checkpoint import (CheckpointError, UnsafePickleError, load_model, load_torch_file,
                                reference, save_model)
from dar_jax.config import ConfigError


class _RunsCommand:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _WritesFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("payload_cls,global_name", [(_RunsCommand, "system"), (_WritesFile, "open")])
def test_malicious_pickle_is_refused_without_effect(tmp_path, payload_cls, global_name):
    victim = tmp_path / "pwned"
    arg = f"touch {victim}" if payload_cls is _RunsCommand else str(victim)
    path = tmp_path / "evil.pt"
    torch_format.save({"model": {"w": np.zeros(3, np.float32)}, "x": payload_cls(arg)}, str(path))
    with pytest.raises(UnsafePickleError, match=global_name):
        load_torch_file(path)
    assert not victim.exists()


def test_truncated_and_garbage_files_give_clear_errors(tmp_path, ref_dir):
    data = (ref_dir / "gpt.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_torch_file(cut)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_torch_file(junk)
    with pytest.raises(CheckpointError, match="not found"):
        load_torch_file(tmp_path / "absent.pt")


def test_reader_roundtrips_dtypes_and_plain_objects(tmp_path):
    arrays = {"f32": np.arange(6, dtype=np.float32).reshape(2, 3), "f16": np.ones(4, np.float16),
              "i64": np.arange(5, dtype=np.int64), "u8": np.arange(3, dtype=np.uint8),
              "b": np.array([True, False]), "t": np.arange(6, dtype=np.float32).reshape(2, 3).T.copy()}
    path = tmp_path / "ok.pt"
    torch_format.save({"model": arrays, "steps": 3}, str(path))
    back = load_torch_file(path)
    assert back["steps"] == 3
    for k, v in arrays.items():
        np.testing.assert_array_equal(back["model"][k], v)
        assert back["model"][k].dtype == v.dtype


def test_wrong_key_names_it(tmp_path, ref_dir, ref_config):
    sd = load_torch_file(ref_dir / "gpt.pt")["model"]
    sd["layers.0.attention.wqkv.weight_typo"] = sd.pop("layers.0.attention.wqkv.weight")
    path = tmp_path / "typo.pt"
    torch_format.save({"model": sd}, str(path))
    cfg = ar.gpt_config(**ref_config["gpt"])
    with pytest.raises(CheckpointError, match=r"missing keys: layers\.0\.attention\.wqkv\.weight.*"
                                              r"unexpected keys: layers\.0\.attention\.wqkv\.weight_typo"):
        reference.load_reference_gpt(path, cfg)
    sd2 = load_torch_file(ref_dir / "gpt.pt")["model"]
    sd2["norm.weight"] = np.ones(3, np.float32)
    with pytest.raises(CheckpointError, match="norm.weight"):
        reference.gpt_params_from_state_dict(sd2, cfg)


def test_orig_mod_prefix_is_accepted(ref_dir, ref_config, ref_gpt):
    sd = load_torch_file(ref_dir / "gpt.pt")["model"]
    sd = {"_orig_mod." + k: v for k, v in sd.items()}
    params = reference.gpt_params_from_state_dict(sd, ref_gpt[0])
    jax.tree.map(np.testing.assert_array_equal, params, ref_gpt[1])


@pytest.mark.parametrize("size", ["GPT-B", "GPT-L", "GPT-XL"])
def test_full_size_key_and_shape_mapping(size):
    listing = json.loads(OFFICIAL_SHAPES.read_text())[size]["model"]
    cfg = ar.gpt_config(size, vocab_size=16384, block_size=256, num_classes=1000)
    reference.check_gpt_shapes(listing, cfg, where=size)
    with pytest.raises(CheckpointError, match="wrongly shaped"):
        reference.check_gpt_shapes(listing, ar.gpt_config(size, num_classes=999), where=size)


def test_model_directory_roundtrip_and_atomic_overwrite(tmp_path, ref_gpt):
    cfg, params = ref_gpt
    out = tmp_path / "gpt"
    save_model(out, "gpt", cfg, params)
    kind, cfg2, params2 = load_model(out)
    assert kind == "gpt" and cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    # a failing save leaves the previous model intact
    bad = jax.tree.map(lambda x: x, params)
    bad["norm"]["weight"] = object()
    with pytest.raises(Exception):
        save_model(out, "gpt", cfg, bad)
    _, _, params3 = load_model(out)
    jax.tree.map(np.testing.assert_array_equal, params3, params)
    assert [p for p in os.listdir(tmp_path) if ".tmp-" in p] == []



def _dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def test_bfloat16_storage_halves_the_model_and_restores_float32(tmp_path, ref_gpt):
    cfg, params = ref_gpt
    save_model(tmp_path / "f32", "gpt", cfg, params)
    save_model(tmp_path / "bf16", "gpt", cfg, params, storage_dtype="bfloat16")
    assert _dir_bytes(tmp_path / "bf16" / "params") < 0.6 * _dir_bytes(tmp_path / "f32" / "params")
    _, cfg2, restored = load_model(tmp_path / "bf16")
    assert cfg2 == cfg
    chex.assert_trees_all_equal_dtypes(restored, params)
    rounded = jax.tree.map(lambda a: np.asarray(a).astype(jnp.bfloat16).astype(np.float32), params)
    jax.tree.map(np.testing.assert_array_equal, restored, rounded)
    with pytest.raises(ConfigError, match="storage_dtype"):
        save_model(tmp_path / "f16", "gpt", cfg, params, storage_dtype="float16")
    assert not (tmp_path / "f16").exists()

def test_mismatched_model_directory_is_refused(tmp_path, ref_gpt):
    cfg, params = ref_gpt
    out = tmp_path / "gpt"
    save_model(out, "gpt", cfg, params)
    meta = json.loads((out / "config.json").read_text())
    meta["config"]["n_layer"] += 1
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(out)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nothing")


def test_convert_command(tmp_path, ref_dir, ref_config, ref_gpt):
    g = ref_config["gpt"]
    out = tmp_path / "converted"
    cmd = [sys.executable, "-m", "dar_jax.checkpoint.convert", "gpt", str(ref_dir / "gpt.pt"), str(out),
           "--dim", str(g["dim"]), "--n-layer", str(g["n_layer"]), "--n-head", str(g["n_head"]),
           "--block-size", str(g["block_size"]), "--num-classes", str(g["num_classes"])]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    _, cfg, params = load_model(out, kind="gpt")
    assert cfg == ref_gpt[0]
    jax.tree.map(np.testing.assert_array_equal, params, ref_gpt[1])
    res = subprocess.run(cmd[:-2] + ["--num-classes", str(g["num_classes"] + 1)], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 2 and "num_classes" in res.stderr and "Traceback" not in res.stderr
