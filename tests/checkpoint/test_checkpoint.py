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
from dar_jax import tokenizer as tok
from dar_jax.pipeline import FAMILIES
from dar_jax.checkpoint import (CheckpointError, UnsafePickleError, load_model, load_torch_file,
                                save_model)
from dar_jax.ar import reference
from dar_jax.checkpoint.convert import main as convert_main
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
    save_model(out, ar.FAMILY, cfg, params)
    kind, cfg2, params2 = load_model(out, FAMILIES)
    assert kind == "gpt" and cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    # a failing save leaves the previous model intact
    bad = jax.tree.map(lambda x: x, params)
    bad["norm"]["weight"] = object()
    with pytest.raises(Exception):
        save_model(out, ar.FAMILY, cfg, bad, overwrite=True)
    _, _, params3 = load_model(out, FAMILIES)
    jax.tree.map(np.testing.assert_array_equal, params3, params)
    assert sorted(os.listdir(tmp_path)) == ["gpt"]



def _dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def test_bfloat16_storage_halves_the_model_and_restores_float32(tmp_path, ref_gpt):
    cfg, params = ref_gpt
    save_model(tmp_path / "f32", ar.FAMILY, cfg, params)
    save_model(tmp_path / "bf16", ar.FAMILY, cfg, params, storage_dtype="bfloat16")
    assert _dir_bytes(tmp_path / "bf16" / "params") < 0.6 * _dir_bytes(tmp_path / "f32" / "params")
    _, cfg2, restored = load_model(tmp_path / "bf16", FAMILIES)
    assert cfg2 == cfg
    chex.assert_trees_all_equal_dtypes(restored, params)
    rounded = jax.tree.map(lambda a: np.asarray(a).astype(jnp.bfloat16).astype(np.float32), params)
    jax.tree.map(np.testing.assert_array_equal, restored, rounded)
    with pytest.raises(ConfigError, match="storage_dtype"):
        save_model(tmp_path / "f16", ar.FAMILY, cfg, params, storage_dtype="float16")
    assert not (tmp_path / "f16").exists()

def test_mismatched_model_directory_is_refused(tmp_path, ref_gpt):
    cfg, params = ref_gpt
    out = tmp_path / "gpt"
    save_model(out, ar.FAMILY, cfg, params)
    meta = json.loads((out / "config.json").read_text())
    meta["config"]["n_layer"] += 1
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(out, FAMILIES)
    (out / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(out, FAMILIES)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nothing", FAMILIES)


def test_convert_command(tmp_path, ref_dir, ref_config, ref_gpt, capsys):
    """Every size flag is optional (inferred from the shapes, heads = dim / 64 by default); flags
    that contradict the file name both values; the named size is checked."""
    g = ref_config["gpt"]
    out = tmp_path / "converted"
    src = str(ref_dir / "gpt.pt")
    flags = ["--n-head", str(g["n_head"]), "--block-size", str(g["block_size"])]
    assert convert_main(["gpt", src, str(out), *flags]) == 0, capsys.readouterr().err
    _, cfg, params = load_model(out, ar.FAMILY)
    assert cfg == ref_gpt[0]
    jax.tree.map(np.testing.assert_array_equal, params, ref_gpt[1])
    full = ["--dim", str(g["dim"]), "--n-layer", str(g["n_layer"]), "--num-classes", str(g["num_classes"]),
            "--vocab-size", str(g["vocab_size"])]
    assert convert_main(["gpt", src, str(tmp_path / "full"), *flags, *full]) == 0
    assert load_model(tmp_path / "full", ar.FAMILY)[1] == ref_gpt[0]
    bad = [(["--num-classes", str(g["num_classes"] + 1)], f"--num-classes {g['num_classes'] + 1}",
            f"num_classes={g['num_classes']}"),
           (["--dim", str(g["dim"] * 2)], f"--dim {g['dim'] * 2}", f"dim={g['dim']}"),
           (["--gpt-model", "GPT-L"], "GPT-L has dim=1024", f"dim={g['dim']}")]
    for extra, *messages in bad:
        rc = convert_main(["gpt", src, str(tmp_path / "bad"), *flags, *extra])
        err = capsys.readouterr().err
        assert rc == 2 and all(m in err for m in messages) and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "bad").exists()


def test_gpt_size_inference_defaults_heads_and_infers_the_ffn_width(ref_gpt):
    from dar_jax.checkpoint import mapping
    cfg, params = ref_gpt
    sd = {k: np.zeros(s, np.float32) for k, s in _torch_shapes(cfg).items()}
    got = reference.gpt_config_from_state_dict(sd, n_head=cfg.n_head, block_size=cfg.block_size)
    assert got == cfg
    # a custom width and FFN: heads default to dim / 64, block size to the given default
    custom = ar.gpt_config(dim=128, n_layer=1, n_head=2, vocab_size=40, num_classes=3, multiple_of=1,
                           ffn_dim_multiplier=0.5)
    sd = {k: np.zeros(s, np.float32) for k, s in _torch_shapes(custom).items()}
    got = reference.gpt_config_from_state_dict(sd, default_block_size=custom.block_size)
    assert (got.dim, got.n_layer, got.n_head, got.vocab_size, got.num_classes, got.ffn_hidden) == \
        (128, 1, 2, 40, 3, custom.ffn_hidden)
    mapping.check_shapes(mapping.strip_prefixes({k: v.shape for k, v in sd.items()}), reference.gpt_key_map(got),
                         ar.abstract_params(got), "custom")
    with pytest.raises(CheckpointError, match="--n-head 3 does not divide the dim 128"):
        reference.gpt_config_from_state_dict(sd, n_head=3)


def _torch_shapes(cfg) -> dict:
    d, h = cfg.dim, cfg.ffn_hidden
    shapes = {"tok_embeddings.weight": (cfg.vocab_size, d), "cls_embedding.embedding_table.weight":
              (cfg.num_classes + 1, d), "norm.weight": (d,), "output.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        shapes.update({p + "attention.wqkv.weight": (3 * d, d), p + "attention.wo.weight": (d, d),
                       p + "feed_forward.w1.weight": (h, d), p + "feed_forward.w3.weight": (h, d),
                       p + "feed_forward.w2.weight": (d, h), p + "attention_norm.weight": (d,),
                       p + "ffn_norm.weight": (d,)})
    return shapes


# --- A. writing a model never deletes what the writer did not create ----------------------------
def _snapshot(root) -> dict:
    """{relative path: (mode, bytes or None)} of everything under ``root``."""
    out = {}
    for r, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(r, name)
            out[os.path.relpath(p, root)] = (os.stat(p).st_mode,
                                             open(p, "rb").read() if os.path.isfile(p) else None)
    return out


def test_converter_refuses_every_destination_it_did_not_create(tmp_path, ref_dir, capsys):
    src = ref_dir / "tokenizer.pt"
    foreign = tmp_path / "d"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "thesis.txt").write_text("x")
    (foreign / "sub" / "notes.txt").write_text("y")
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "tokenizer.pt").write_bytes(src.read_bytes())
    a_file = tmp_path / "model.bin"
    a_file.write_bytes(b"mine")
    under_file = a_file / "m"
    cases = [(foreign, [], "not a dar-jax model"), (foreign, ["--overwrite"], "not a dar-jax model"),
             (ck, [], "holds the source"), (ck, ["--overwrite"], "holds the source"),
             (a_file, ["--overwrite"], "is a file"), (under_file, [], "is a file")]
    for dst, extra, message in cases:
        before = _snapshot(tmp_path)
        source = ck / "tokenizer.pt" if dst == ck else src
        rc = convert_main(["tokenizer", str(source), str(dst), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and str(dst) in err and "Traceback" not in err, (dst, err)
        assert _snapshot(tmp_path) == before, dst


def test_converter_writes_new_and_empty_folders_and_replaces_models_only_when_asked(tmp_path, ref_dir, capsys):
    src = str(ref_dir / "tokenizer.pt")
    old_umask = os.umask(0o022)
    try:
        empty = tmp_path / "empty"
        empty.mkdir()
        assert convert_main(["tokenizer", src, str(empty)]) == 0
        new = tmp_path / "new"
        assert convert_main(["tokenizer", src, str(new)]) == 0
    finally:
        os.umask(old_umask)
    for d in (empty, new):
        load_model(d, tok.FAMILY)
        assert os.stat(d).st_mode & 0o777 == 0o755, oct(os.stat(d).st_mode)
        for r, dirs, files in os.walk(d):
            for f in files:
                assert os.stat(os.path.join(r, f)).st_mode & 0o044 == 0o044, f  # readable by others
    # an existing model: refused without --overwrite; the user's <dst>.old is kept
    users_old = tmp_path / "new.old"
    users_old.mkdir()
    (users_old / "keep.txt").write_text("mine")
    before = _snapshot(tmp_path)
    assert convert_main(["tokenizer", src, str(new)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before
    assert convert_main(["tokenizer", src, str(new), "--overwrite"]) == 0
    load_model(new, tok.FAMILY)
    assert (users_old / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["empty", "new", "new.old"]


def test_replacing_a_model_keeps_a_complete_model_at_every_moment(tmp_path, ref_gpt, monkeypatch):
    """A replace interrupted between its renames leaves the old model at a backup name the writer
    created (never deleted), and a failing write leaves the old model in place."""
    cfg, params = ref_gpt
    out = tmp_path / "gpt"
    save_model(out, ar.FAMILY, cfg, params)
    other = jax.tree.map(lambda a: np.asarray(a) + 1, params)
    seen = []
    real = {"rename": os.rename, "replace": os.replace}

    def recording(name):
        def move(a, b):  # which complete models exist, at dst or a writer-made backup, at each move
            seen.append(sorted(p for p in os.listdir(tmp_path) if (p == "gpt" or p.startswith("gpt.old-"))
                               and os.path.exists(os.path.join(tmp_path, p, "config.json"))))
            return real[name](a, b)
        return move

    monkeypatch.setattr(os, "rename", recording("rename"))
    monkeypatch.setattr(os, "replace", recording("replace"))
    save_model(out, ar.FAMILY, cfg, other, overwrite=True)
    monkeypatch.undo()
    assert seen and all(entries for entries in seen), seen
    jax.tree.map(np.testing.assert_array_equal, load_model(out, FAMILIES)[2], other)
    assert sorted(os.listdir(tmp_path)) == ["gpt"]


# --- B. the safe .pt reader is memory-safe ---------------------------------------------------------
_HOSTILE = {  # (100000,) with stride (-1000,) crashed the process: tested in a subprocess below
    "negative_stride_far": (np.arange(64, dtype=np.float32), 64 * 999, (64,), (-1000,)),
    "negative_stride_offset": (np.arange(64, dtype=np.float32), 3, (64,), (-1,)),
    "zero_strides_huge": (np.arange(64, dtype=np.float32), 0, (1_000_000, 100_000), (0, 0)),
    "zero_stride_small": (np.arange(64, dtype=np.float32), 0, (4, 16), (0, 1)),
    "past_the_end": (np.arange(64, dtype=np.float32), 10, (8, 8), (8, 1)),
    "negative_offset": (np.arange(64, dtype=np.float32), -1, (4,), (1,)),
    "overlapping": (np.arange(64, dtype=np.float32), 0, (16, 16), (1, 1)),
}


@pytest.mark.parametrize("case", sorted(_HOSTILE))
def test_hostile_tensor_views_are_refused_naming_the_key(tmp_path, case):
    storage, offset, size, stride = _HOSTILE[case]
    path = tmp_path / f"{case}.pt"
    torch_format.save({"model": {"ok": np.ones(3, np.float32),
                                 "bad.weight": torch_format.RawTensor(storage, offset, size, stride)}}, str(path))
    with pytest.raises(CheckpointError, match=r"model\.bad\.weight"):
        load_torch_file(path)


def test_in_bounds_strided_views_read_exactly(tmp_path):
    storage = np.arange(64, dtype=np.float32)
    views = {"reversed": (63, (64,), (-1,)), "transposed": (0, (4, 8), (1, 8)), "offset": (5, (3, 4), (4, 1)),
             "scalar": (7, (), ())}
    torch_format.save({k: torch_format.RawTensor(storage, o, s, st) for k, (o, s, st) in views.items()},
                      str(tmp_path / "ok.pt"))
    back = load_torch_file(tmp_path / "ok.pt")
    for k, (o, s, st) in views.items():
        want = np.lib.stride_tricks.as_strided(storage[o:], s, tuple(4 * x for x in st)) if s else storage[o]
        np.testing.assert_array_equal(back[k], want, err_msg=k)


def test_hostile_gpt_file_is_a_clear_error_in_every_command(tmp_path, ref_dir, model_dirs, capsys):
    """The converter (in a subprocess: before the bounds check this case crashed the process)
    and sample.py exit 2 naming the tensor; nothing is written."""
    sd = load_torch_file(ref_dir / "gpt.pt")["model"]
    sd["norm.weight"] = torch_format.RawTensor(np.arange(64, dtype=np.float32), 0, (100000,), (-1000,))
    bad = tmp_path / "bad.pt"
    torch_format.save({"model": sd}, str(bad))
    res = subprocess.run([sys.executable, "-m", "dar_jax.checkpoint.convert", "gpt", str(bad),
                          str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "norm.weight" in res.stderr and "Traceback" not in res.stderr, res.stderr
    sd["norm.weight"] = torch_format.RawTensor(np.arange(64, dtype=np.float32), 3, (64,), (-1,))
    torch_format.save({"model": sd}, str(bad))
    from dar_jax.sample_cli import main as sample_main
    rc = sample_main(["--gpt", str(bad), "--tokenizer", str(model_dirs[1]), "--out", str(tmp_path / "s"),
                      "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "norm.weight" in err and "outside its storage" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["bad.pt"]
