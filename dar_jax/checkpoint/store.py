"""The project's checkpoint layout for models (what sample.py and the trainer read).

A model directory holds::

    config.json   {"format": "dar-jax-model", "kind": "gpt" | "tokenizer", "config": {...}}
    params/       orbax (OCDBT) pytree of the parameters: float32, or stored in bfloat16 where
                  ``storage_dtype`` asked (half the size; restored as float32)

It is written atomically: everything goes to a temporary sibling directory that is renamed into
place, so a crash never leaves a half-written model where a good one was. ``load_model`` also
accepts a trainer checkpoint directory (see ``dar_jax.train``) and takes its latest step.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dar_jax.checkpoint.mapping import flat_paths
from dar_jax.checkpoint.torch_pickle import CheckpointError
from dar_jax.config import ConfigError, from_mapping, to_dict

FORMAT = "dar-jax-model"
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"

# kind -> (config dataclass, abstract_params(cfg) -> ShapeDtypeStruct pytree)
_KINDS: dict[str, tuple[type, Callable]] = {}


def register_kind(kind: str, config_cls: type, abstract_params: Callable) -> None:
    _KINDS[kind] = (config_cls, abstract_params)


def _kind(kind: str):
    if not _KINDS:
        _register_builtin()
    if kind not in _KINDS:
        _register_builtin()
    if kind not in _KINDS:
        raise CheckpointError(f"unknown model kind {kind!r}; known: {sorted(_KINDS)}")
    return _KINDS[kind]


def _register_builtin():
    from dar_jax import ar
    register_kind("gpt", ar.GPTConfig, ar.abstract_params)
    try:
        from dar_jax import tokenizer
        register_kind("tokenizer", tokenizer.TokenizerConfig, tokenizer.abstract_params)
    except (ImportError, AttributeError):
        pass


def _checkpointer():
    """An orbax checkpointer local to this process (model files are whole host arrays; in a
    multi-host job the caller decides which process writes)."""
    import orbax.checkpoint as ocp
    me = jax.process_index()
    return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"dar_model_p{me}"))


def save_params(directory: str, params) -> None:
    """Writes a params pytree with orbax into ``directory`` (must not exist)."""
    bad = [".".join(map(str, p)) for p, v in flat_paths(params).items()
           if not hasattr(v, "shape") or not hasattr(v, "dtype")]
    if bad:
        raise CheckpointError(f"cannot save params: leaves {bad[:8]} are not arrays")
    ck = _checkpointer()
    try:
        ck.save(os.path.abspath(directory), params)
    finally:
        try:
            ck.wait_until_finished()
        finally:
            ck.close()


STORAGE_DTYPES = ("float32", "bfloat16")


def save_model(path: str | os.PathLike, kind: str, config, params, extra: dict | None = None,
               storage_dtype: str = "float32") -> str:
    """Saves ``params`` and ``config`` (a dataclass of ``kind``) atomically at ``path``.

    ``storage_dtype="bfloat16"`` rounds floating parameters to bfloat16 on disk (shipping small
    models); :func:`load_model` restores them as the config's float32 parameters."""
    _kind(kind)
    if storage_dtype not in STORAGE_DTYPES:
        raise ConfigError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}")
    if storage_dtype != "float32":
        params = jax.tree.map(lambda a: np.asarray(a).astype(jnp.bfloat16)
                              if jnp.issubdtype(np.asarray(a).dtype, jnp.floating) else a, params)
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        save_params(os.path.join(tmp, PARAMS_DIR), params)
        meta = {"format": FORMAT, "kind": kind, "config": to_dict(config), "storage_dtype": storage_dtype}
        if extra:
            meta["extra"] = extra
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.exists(path):
            old = path + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_model_meta(path: str) -> dict:
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path):
        raise CheckpointError(f"model checkpoint not found: {path}")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{path} is not a dar-jax model directory (no {CONFIG_FILE})")
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is unreadable or corrupt: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "kind" not in meta:
        raise CheckpointError(f"{cfg_path} is not a {FORMAT} config")
    return meta


def restore_params(directory: str, abstract, where: str, shardings=None):
    """Restores a params pytree shaped like ``abstract``, checking keys and shapes first."""
    ck = _checkpointer()
    try:
        meta = ck.metadata(os.path.abspath(directory)).item_metadata.tree
    except Exception as e:  # orbax raises many types for unreadable dirs
        raise CheckpointError(f"{where}: parameters unreadable or corrupt ({type(e).__name__}: {e})") from None
    have = {tuple(str(k) for k in p): tuple(v.shape) for p, v in flat_paths(meta).items()}
    want = {tuple(str(k) for k in p): tuple(v.shape) for p, v in flat_paths(abstract).items()}
    missing, unexpected = set(want) - set(have), set(have) - set(want)
    wrong = [f"{'.'.join(p)}: {have[p]} vs {want[p]}" for p in set(want) & set(have) if have[p] != want[p]]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{where}: parameters do not match the config: missing {sorted('.'.join(p) for p in missing)[:8]}, "
            f"unexpected {sorted('.'.join(p) for p in unexpected)[:8]}, wrong shapes {wrong[:8]}")
    if shardings is None:
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract)
    else:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract, shardings)
    try:
        return ck.restore(os.path.abspath(directory), target)
    except Exception as e:
        raise CheckpointError(f"{where}: parameters unreadable or corrupt ({type(e).__name__}: {e})") from None


def load_model(path: str | os.PathLike, kind: str | None = None) -> tuple[str, Any, Any]:
    """Loads ``(kind, config, params)`` from a model directory written by :func:`save_model`."""
    path = os.path.abspath(os.fspath(path))
    meta = read_model_meta(path)
    if kind is not None and meta["kind"] != kind:
        raise CheckpointError(f"{path} holds a {meta['kind']!r} model, expected {kind!r}")
    config_cls, abstract_fn = _kind(meta["kind"])
    try:
        cfg = from_mapping(config_cls, meta["config"], where=f"{path}/{CONFIG_FILE}")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    params = restore_params(os.path.join(path, PARAMS_DIR), abstract_fn(cfg), f"model {path}")
    return meta["kind"], cfg, params


def params_to_numpy(params):
    return jax.tree.map(np.asarray, params)
