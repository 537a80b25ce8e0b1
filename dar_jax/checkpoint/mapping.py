"""Maps flat state dicts of the reference (``a.b.0.c`` keys, torch layouts) onto dar-jax's params.

A key map is ``{torch_key: (param_path, transform)}``; transforms use only ``.T``, ``.reshape``
and ``.transpose`` so the same map converts NumPy arrays and checks shapes abstractly
(``jax.eval_shape``) without allocating the weights.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np

from dar_jax.checkpoint.torch_pickle import CheckpointError

Path = tuple[Any, ...]
KeyMap = dict[str, tuple[Path, Callable]]


def identity(x):
    return x


def transpose(x):
    """torch Linear (out, in) -> (in, out)."""
    return x.T


def conv1x1(x):
    """torch 1x1 Conv2d (out, in, 1, 1) -> (in, out)."""
    return x.reshape(x.shape[0], x.shape[1]).T


def flat_paths(tree) -> dict[Path, Any]:
    """{path tuple: leaf} of a nested dict pytree."""
    out = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, prefix + (k,))
        else:
            out[prefix] = node

    walk(tree, ())
    return out


def unflatten(flat: Mapping[Path, Any]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return tree


def strip_prefixes(state_dict: Mapping[str, Any], prefixes: Iterable[str] = ("_orig_mod.", "module.")):
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _shape_of(x) -> tuple[int, ...]:
    return tuple(int(d) for d in (x.shape if hasattr(x, "shape") else x))


def _names(keys, limit=12):
    keys = sorted(keys)
    more = f" ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_keys(present: Iterable[str], key_map: KeyMap, where: str,
               ignore: Callable[[str], bool] = lambda k: False) -> None:
    present = {k for k in present if not ignore(k)}
    missing = set(key_map) - present
    unexpected = present - set(key_map)
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if problems:
        raise CheckpointError(f"{where} does not match the model: " + "; ".join(problems))


def convert(state_dict: Mapping[str, np.ndarray], key_map: KeyMap, abstract_params, where: str,
            ignore: Callable[[str], bool] = lambda k: False) -> dict:
    """Converts a torch state dict into a params pytree shaped like ``abstract_params``.

    Missing, unexpected (not ignored) or wrongly shaped keys raise :class:`CheckpointError`
    naming them.
    """
    check_keys(state_dict.keys(), key_map, where, ignore)
    targets = flat_paths(abstract_params)
    flat, wrong = {}, []
    for key, (path, fn) in key_map.items():
        if path not in targets:
            raise CheckpointError(f"internal key map error: {path} is not a parameter")
        want = _shape_of(targets[path])
        try:
            arr = fn(np.asarray(state_dict[key]))
        except (ValueError, TypeError) as e:  # a reshape/transpose that cannot fit the model
            wrong.append(f"{key}: file {tuple(np.shape(state_dict[key]))} cannot become model {want} ({e})")
            continue
        if tuple(arr.shape) != want:
            wrong.append(f"{key}: file {tuple(np.shape(state_dict[key]))} -> {tuple(arr.shape)}, model {want}")
            continue
        flat[path] = np.asarray(arr, dtype=np.float32)
    if wrong:
        raise CheckpointError(f"{where} has wrongly shaped tensors: " + "; ".join(wrong[:12]))
    unmapped = set(targets) - set(flat)
    if unmapped:
        raise CheckpointError(f"internal key map error: parameters not covered: {sorted(map(str, unmapped))[:8]}")
    return unflatten(flat)


def check_shapes(shapes: Mapping[str, Iterable[int]], key_map: KeyMap, abstract_params, where: str,
                 ignore: Callable[[str], bool] = lambda k: False) -> None:
    """Checks a listing {torch_key: shape} against the model without allocating anything."""
    check_keys(shapes.keys(), key_map, where, ignore)
    targets = flat_paths(abstract_params)
    wrong = []
    for key, (path, fn) in key_map.items():
        out = jax.eval_shape(fn, jax.ShapeDtypeStruct(tuple(shapes[key]), np.float32))
        if tuple(out.shape) != _shape_of(targets[path]):
            wrong.append(f"{key}: {tuple(shapes[key])} -> {tuple(out.shape)} vs model {_shape_of(targets[path])}")
    if wrong:
        raise CheckpointError(f"{where} has wrongly shaped tensors: " + "; ".join(wrong[:12]))
