"""The project's checkpoint layout for models (what sample.py and the trainer read).

A model directory holds::

    config.json   {"format": "dar-jax-model", "kind": "gpt" | "tokenizer", "config": {...}}
    params/       orbax (OCDBT) pytree of the parameters: float32, or stored in bfloat16 where
                  ``storage_dtype`` asked (half the size; restored as float32)

It is written atomically: everything goes to a temporary sibling directory that is renamed into
place, so a crash never leaves a half-written model where a good one was. A writer never deletes
what it did not create: an existing folder is replaced only when it is a dar-jax model folder and
``overwrite`` was asked (see :func:`check_destination`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dar_jax.checkpoint.mapping import flat_paths
from dar_jax.checkpoint.torch_pickle import CheckpointError
from dar_jax.config import ConfigError, from_mapping, to_dict
from dar_jax.family import Family

FORMAT = "dar-jax-model"
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def _family(meta_kind: str, families: Family | Sequence[Family], where: str) -> Family:
    """The family among ``families`` whose kind a model folder records."""
    families = (families,) if isinstance(families, Family) else tuple(families)
    for fam in families:
        if fam.kind == meta_kind:
            return fam
    want = " or ".join(repr(f.kind) for f in families)
    raise CheckpointError(f"{where} holds a {meta_kind!r} model, expected {want}")


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
_MODEL_ENTRIES = {CONFIG_FILE, PARAMS_DIR}


def is_model_dir(path: str | os.PathLike) -> bool:
    """True for a folder written by :func:`save_model`: its ``config.json`` carries the
    ``dar-jax-model`` marker and it holds nothing else than that and ``params/``."""
    path = os.fspath(path)
    try:
        entries = set(os.listdir(path))
        with open(os.path.join(path, CONFIG_FILE)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return entries <= _MODEL_ENTRIES and isinstance(meta, dict) and meta.get("format") == FORMAT


def check_destination(path: str | os.PathLike, *, overwrite: bool = False,
                      sources: tuple = ()) -> bool:
    """Raises :class:`CheckpointError` unless a model may be written at ``path``; touches nothing.

    Allowed: a new path, an empty folder, or (only with ``overwrite``) a dar-jax model folder.
    Refused: a file, any other non-empty folder (even with ``overwrite``), a folder holding one of
    ``sources`` (the files being converted). Returns True when an existing model will be replaced.
    """
    from dar_jax.io import PathError, check_output_dir
    path = os.path.abspath(os.fspath(path))
    for src in sources:
        src = os.path.abspath(os.fspath(src))
        if src == path or src.startswith(path + os.sep):
            raise CheckpointError(f"{path} holds the source {src}: write the model to another folder")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{path} is a file, not a model folder: refusing to replace it")
    try:
        check_output_dir(path, "model folder")
    except PathError as e:
        raise CheckpointError(str(e)) from None
    if not os.path.isdir(path) or not os.listdir(path):
        return False
    if is_model_dir(path):
        if not overwrite:
            raise CheckpointError(f"{path} already holds a dar-jax model: pass --overwrite "
                                  "(overwrite=True) to replace it")
        return True
    shown = sorted(os.listdir(path))
    raise CheckpointError(f"{path} is a non-empty folder that is not a dar-jax model (it holds "
                          f"{', '.join(shown[:3])}{', ...' if len(shown) > 3 else ''}): refusing to "
                          "write there; choose a new or empty folder")


def save_model(path: str | os.PathLike, family: Family, config, params, extra: dict | None = None,
               storage_dtype: str = "float32", *, overwrite: bool = False,
               sources: tuple = ()) -> str:
    """Saves ``params`` and ``config`` (``family.config_class``) atomically at ``path``.

    ``path`` must be new or an empty folder; an existing dar-jax model folder is replaced only
    with ``overwrite`` (at every moment the complete old or new model is at ``path`` or at a
    backup name this writer created); anything else is refused (:func:`check_destination`).
    ``storage_dtype="bfloat16"`` rounds floating parameters to bfloat16 on disk (shipping small
    models); :func:`load_model` restores them as the config's float32 parameters."""
    from dar_jax import io
    if not isinstance(config, family.config_class):
        raise CheckpointError(f"a {family.kind} model needs a {family.config_class.__name__}, got "
                              f"{type(config).__name__}")
    if storage_dtype not in STORAGE_DTYPES:
        raise ConfigError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}")
    path = os.path.abspath(os.fspath(path))
    replace = check_destination(path, overwrite=overwrite, sources=sources)
    if storage_dtype != "float32":
        params = jax.tree.map(lambda a: np.asarray(a).astype(jnp.bfloat16)
                              if jnp.issubdtype(np.asarray(a).dtype, jnp.floating) else a, params)

    def fill(tmp):
        save_params(os.path.join(tmp, PARAMS_DIR), params)
        meta = {"format": FORMAT, "kind": family.kind, "config": to_dict(config), "storage_dtype": storage_dtype}
        if extra:
            meta["extra"] = extra
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=1)

    return io.write_dir(path, fill, replace=replace)


def read_config(path: str | os.PathLike, families: Family | Sequence[Family]):
    """(family, config dataclass) of a model folder whose kind is one of ``families`` (no
    parameters are read)."""
    path = os.path.abspath(os.fspath(path))
    meta = read_model_meta(path)
    fam = _family(meta["kind"], families, path)
    try:
        return fam, from_mapping(fam.config_class, meta["config"], where=f"{path}/{CONFIG_FILE}")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def fingerprint(params) -> str:
    """SHA-256 over the paths, shapes, dtypes and bytes of a params pytree (host-local arrays):
    the identity of a model's weights, e.g. for results that must not be reused for another."""
    import hashlib
    h = hashlib.sha256()
    for path, leaf in sorted(flat_paths(params).items(), key=lambda kv: tuple(map(str, kv[0]))):
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(repr((tuple(map(str, path)), arr.shape, arr.dtype.str)).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


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
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{cfg_path} is corrupt: its 'config' is not a mapping")
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


def load_model(path: str | os.PathLike,
               families: Family | Sequence[Family]) -> tuple[str, Any, Any]:
    """Loads ``(kind, config, params)`` from a model directory written by :func:`save_model`;
    its kind must be one of ``families`` (e.g. ``tokenizer.FAMILY``)."""
    path = os.path.abspath(os.fspath(path))
    fam, cfg = read_config(path, families)
    params = restore_params(os.path.join(path, PARAMS_DIR), fam.abstract_params(cfg), f"model {path}")
    return fam.kind, cfg, params
