"""Host-side views of arrays that may span several processes.

A global ``jax.Array`` whose shards live on other hosts cannot be read with ``np.asarray`` or
``jax.device_get``. :func:`host_local_values` gives a process the rows it holds (for checks of
inputs), :func:`gather_to_host` the whole array on every process (for outputs and exports); both
accept NumPy arrays and single-host arrays unchanged.
"""
from __future__ import annotations

import jax
import numpy as np


def _is_global(x) -> bool:
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def host_local_values(x) -> np.ndarray:
    """The values this process holds: all of a host-local array, or the distinct addressable
    shards of a global one stacked along the first axis (enough to check their values)."""
    if not _is_global(x):
        return np.asarray(x)
    seen, parts = set(), []
    for shard in sorted(x.addressable_shards, key=lambda s: _start(s.index)):
        key = tuple((sl.start, sl.stop) for sl in shard.index)
        if key not in seen:
            seen.add(key)
            parts.append(np.asarray(shard.data))
    if x.ndim == 0:
        return parts[0]
    return np.concatenate(parts, axis=0)


def _start(index) -> tuple:
    return tuple(sl.start or 0 for sl in index)


def gather_to_host(tree):
    """Every leaf as a whole NumPy array on every process (a collective when arrays span hosts:
    all processes must call it)."""
    leaves = jax.tree.leaves(tree)
    if not any(_is_global(x) for x in leaves):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    flat, treedef = jax.tree.flatten(tree)
    idx = [i for i, x in enumerate(flat) if _is_global(x)]
    gathered = multihost_utils.process_allgather([flat[i] for i in idx], tiled=True)
    out = [None if _is_global(x) else np.asarray(jax.device_get(x)) for x in flat]
    for i, g in zip(idx, gathered):
        out[i] = np.asarray(g)
    return jax.tree.unflatten(treedef, out)


def put_global(tree, sharding):
    """Host values (the same on every process) -> global arrays with ``sharding``; each process
    transfers only the blocks its devices hold. Leaves that are jax.Arrays already are kept."""
    def put(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(put, tree)


def batch_sharding(target, shape):
    """NamedSharding of an array whose first axis is the batch, by the target's rules (None
    when the target is not sharded)."""
    from jax.sharding import NamedSharding
    if not target.sharded:
        return None
    return NamedSharding(target.mesh, target.spec(("batch",) + (None,) * (len(shape) - 1), shape))


def put_batch(x, target):
    """Host values (the same on every process) of a batch -> an array sharded over the target's
    batch axes (a plain device array when the target is not sharded)."""
    x = np.asarray(x)
    sharding = batch_sharding(target, x.shape)
    return jax.numpy.asarray(x) if sharding is None else put_global(x, sharding)


def put_replicated(tree, target):
    """Host values -> arrays replicated over the target's mesh (unchanged when unsharded)."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    if not target.sharded:
        return tree
    return put_global(tree, NamedSharding(target.mesh, P()))
