"""The one config system of dar-jax.

Runs are described by ``ml_collections.ConfigDict`` files in ``configs/`` (a Python file with
``get_config(arg=None)``), locked so that a misspelt key is an error, and overridable with
``key.sub=value`` strings (the same syntax as ``--config.key.sub=value`` on the command line).
Model code never sees a ConfigDict: it takes frozen dataclasses (hashable, so they can be static
arguments of ``jax.jit``), built here from mappings with :func:`from_mapping`, which names every
unknown key.
"""
from __future__ import annotations

import ast
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
    """Loads ``get_config(arg)`` from a Python config file, locks it and applies overrides.

    ``path`` may end in ``:arg`` (as with ``config_flags``). Overrides are ``"a.b=value"``
    strings; values are parsed as Python literals when possible.
    """
    if arg is None and ":" in os.path.basename(path):
        path, arg = path.rsplit(":", 1)
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(
        "dar_config_" + os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config()")
    cfg = module.get_config(arg) if arg is not None else module.get_config()
    if not isinstance(cfg, ml_collections.ConfigDict):
        cfg = ml_collections.ConfigDict(cfg)
    cfg.lock()
    apply_overrides(cfg, overrides)
    return cfg


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Applies ``"a.b=value"`` overrides in place; an unknown key is a :class:`ConfigError`."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if key.startswith("--config."):
            key = key[len("--config."):]
        parts = key.split(".")
        node = cfg
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ConfigError(f"unknown config key {'.'.join(parts[:i + 1])!r}")
            node = node[part]
        last = parts[-1]
        if not isinstance(node, ml_collections.ConfigDict) or last not in node:
            raise ConfigError(f"unknown config key {key!r}")
        value = _parse_value(text)
        old = node[last]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(old, str) and not isinstance(value, str):
            value = text
        try:
            node[last] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"cannot set {key!r} to {text!r}: {e}") from None


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
