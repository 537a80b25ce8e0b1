"""The one config system of dar-jax.

Runs are described by ``ml_collections.ConfigDict`` files in ``configs/`` (a Python file with
``get_config(arg=None)``, as in big_vision: ``--config=file[:arg]``), locked so that a misspelt
key is an error naming it, and overridden by ``ml_collections.config_flags`` from
``--config.key.sub=value`` arguments.
Model code never sees a ConfigDict: it takes frozen dataclasses (hashable, so they can be static
arguments of ``jax.jit``), built here from mappings with :func:`from_mapping`, which names every
unknown key.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import types
import typing
from typing import Any, Mapping, Sequence

import ml_collections

from dar_jax.errors import DarError


class ConfigError(DarError, ValueError):
    """A config that cannot be used: unknown key, wrong type, missing file."""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def from_mapping(cls, mapping: Mapping[str, Any] | None, *, where: str = ""):
    """Builds dataclass ``cls`` from ``mapping``; unknown keys raise :class:`ConfigError`.

    Nested dataclass fields are built recursively from nested mappings.
    """
    where = where or cls.__name__
    mapping = dict(mapping or {})
    types_ = _field_types(cls)
    unknown = sorted(set(mapping) - set(types_))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in {where}; allowed keys: {sorted(types_)}")
    kwargs = {}
    for name, value in mapping.items():
        ftype = types_[name]
        if dataclasses.is_dataclass(ftype) and isinstance(value, Mapping):
            value = from_mapping(ftype, value, where=f"{where}.{name}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # missing required fields
        raise ConfigError(f"{where}: {e}") from None


def sized_config(cls, sizes: Mapping[str, Mapping[str, Any]], size: str | None, what: str,
                 **overrides: Any):
    """``cls`` from a named size of ``sizes`` (or none: custom) with non-None ``overrides``."""
    kwargs: dict[str, Any] = {}
    if size:
        if size not in sizes:
            raise ConfigError(f"unknown {what} size {size!r}; known: {sorted(sizes)}")
        kwargs.update(sizes[size])
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return from_mapping(cls, kwargs, where=f"{what} config")


def to_dict(obj) -> dict[str, Any]:
    """Dataclass -> plain JSON-able dict (tuples become lists)."""
    out = dataclasses.asdict(obj)

    def fix(x):
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return [fix(v) for v in x]
        return x

    return fix(out)


def load_config(path: str, overrides: Sequence[str] = (), arg: str | None = None
                ) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of a Python config file (``path`` may end in ``:arg``), locked, with
    ``overrides`` applied by :func:`apply_overrides`. A missing file, a file that fails, an
    unknown key or a value of the wrong type is a :class:`ConfigError`."""
    if arg is None and ":" in os.path.basename(path):
        path, arg = path.rsplit(":", 1)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    where = f"{path}:{arg}" if arg is not None else path
    try:
        spec = importlib.util.spec_from_file_location(
            "dar_config_" + os.path.splitext(os.path.basename(path))[0], path)
        if spec is None:
            raise ConfigError(f"{path} is not a Python config file (configs/*.py)")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not callable(getattr(module, "get_config", None)):
            raise ConfigError(f"{path} defines no get_config()")
        cfg = module.get_config(arg) if arg is not None else module.get_config()
    except ConfigError:
        raise
    except Exception as e:   # the user's file: any error in it is named, not a traceback
        raise ConfigError(f"config {where} failed to load: {type(e).__name__}: {e}") from None
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{where}: get_config() must return an ml_collections.ConfigDict, "
                          f"got {type(cfg).__name__}")
    cfg.lock()
    apply_overrides(cfg, overrides)
    return cfg


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Applies ``"a.b=value"`` / ``"--config.a.b=value"`` overrides to ``cfg`` in place with
    ``ml_collections.config_flags`` (each value parsed by the type of the field it sets; fields
    that default to None are typed placeholders). An unknown key or a bad value is a
    :class:`ConfigError` naming it."""
    from absl import flags
    from ml_collections import config_flags
    argv = ["dar_jax"]
    for item in overrides:
        item = item.strip()
        item = item[len("--config."):] if item.startswith("--config.") else item
        key = item.split("=", 1)[0]
        if "=" not in item or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _check_key(cfg, key)
        argv.append("--config." + item)
    if len(argv) == 1:
        return
    values = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", cfg, flag_values=values, sys_argv=argv)
    try:
        values(argv)
    except (flags.Error, TypeError, ValueError, KeyError, AttributeError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ConfigError(" ".join(lines) or type(e).__name__) from None


def _check_key(cfg: ml_collections.ConfigDict, key: str) -> None:
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(parts[:i]) or "the config"
            known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise ConfigError(f"unknown config key {'.'.join(parts[:i + 1])!r}"
                              + (f" (keys of {where}: {known})" if known else ""))
        node = node[part]


def typed_section(values: Mapping[str, Any], cls) -> ml_collections.ConfigDict:
    """A ConfigDict of ``values`` in which each ``None`` is a typed placeholder of the field's
    type in dataclass ``cls`` (``Optional[int]`` -> ``placeholder(int)``), so that it can be
    overridden from the command line like any other key."""
    from ml_collections import config_dict
    hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
    out = ml_collections.ConfigDict()
    for name, value in values.items():
        if value is None:
            kind = _placeholder_type(hints.get(name))
            out[name] = config_dict.placeholder(kind) if kind is not None else None
        elif isinstance(value, Mapping):
            sub = hints.get(name)
            out[name] = typed_section(value, sub if dataclasses.is_dataclass(sub) else None)
        else:
            out[name] = value
    return out


def _placeholder_type(hint):
    """``Optional[X]`` / ``X | None`` -> X for X in (int, float, str, bool); else None."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and args[0] in (int, float, str, bool):
        return args[0]
    return hint if hint in (int, float, str, bool) else None


def as_plain(x):
    """ConfigDict / FrozenConfigDict / SimpleNamespace -> nested plain dicts and lists."""
    if isinstance(x, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
        x = x.to_dict()
    if isinstance(x, types.SimpleNamespace):
        x = vars(x)
    if isinstance(x, Mapping):
        return {k: as_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [as_plain(v) for v in x]
    return x
