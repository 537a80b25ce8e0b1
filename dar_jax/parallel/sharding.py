"""Logical axis names -> mesh axes, by rules from the config (MaxText style).

Parameters carry logical names (``embed``, ``mlp``, ``heads``, ``vocab``, ...); a rule list such as
``(("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ...)`` maps them to mesh
axes, so data parallel, FSDP, tensor parallel and their mixes differ only in the mesh sizes (and,
if wanted, the rules). A mesh axis is used at most once per array, and a dimension that the mesh
axes do not divide stays replicated.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, Any]]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("queries", None),
    ("head_dim", None),
    ("classes", None),
    ("norm", None),
)


def normalize_rules(rules: Iterable) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Rules from config lists/tuples -> ((logical, (mesh axes...)), ...)."""
    out = []
    for item in rules:
        name, axes = item[0], item[1] if len(item) > 1 else None
        if axes is None:
            axes = ()
        elif isinstance(axes, str):
            axes = (axes,)
        out.append((str(name), tuple(axes)))
    return tuple(out)


def spec_for(logical: Sequence[str | None] | P | None, shape: Sequence[int], mesh: Mesh,
             rules: Rules = DEFAULT_RULES) -> P:
    """PartitionSpec of one array from its logical axes and shape."""
    if logical is None:
        return P()
    table = dict(normalize_rules(rules))
    used: set[str] = set()
    out = []
    for name, dim in zip(tuple(logical), shape):
        axes = []
        if name is not None:
            for ax in table.get(name, ()):
                if ax in used or ax not in mesh.shape or mesh.shape[ax] == 1:
                    continue
                if dim % (math.prod(mesh.shape[a] for a in axes) * mesh.shape[ax]):
                    continue
                axes.append(ax)
        used.update(axes)
        out.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return P(*out)


def tree_shardings(logical_tree, abstract_tree, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """NamedSharding pytree for arrays (``abstract_tree``) with logical axes (``logical_tree``)."""
    return jax.tree.map(
        lambda spec, a: NamedSharding(mesh, spec_for(spec, a.shape, mesh, rules)),
        logical_tree, abstract_tree, is_leaf=lambda x: isinstance(x, P) or x is None)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_spec(ndim: int, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> P:
    """Leading (batch) dim over the rule of ``batch``, the rest replicated."""
    axes = tuple(a for a in dict(normalize_rules(rules)).get("batch", ()) if a in mesh.shape)
    lead = axes if len(axes) > 1 else (axes[0] if axes else None)
    return P(lead, *([None] * (ndim - 1)))


def batch_divisor(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
    axes = [a for a in dict(normalize_rules(rules)).get("batch", ()) if a in mesh.shape]
    return math.prod(mesh.shape[a] for a in axes)


def batch_shardings(batch_tree, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    return jax.tree.map(lambda x: NamedSharding(mesh, batch_spec(np.ndim(x), mesh, rules)), batch_tree)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Per-process batch (this process's rows) -> global jax.Arrays sharded over the batch axes."""
    shardings = batch_shardings(local_batch, mesh, rules)
    return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)),
                        dict(local_batch), shardings)
