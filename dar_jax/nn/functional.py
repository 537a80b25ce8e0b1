"""NNX definitions seen as pure functions over params pytrees (MaxText's split-once pattern).

    PURE_GPT = PureModule(GPT)                 # GPT(cfg, rngs=...) defines the model
    params = PURE_GPT.init_params(cfg, key)    # plain nested dict of float32 arrays
    model = PURE_GPT.bind(cfg, params)         # inside jit: merge the cached graphdef, call it

The graphdef and the abstract state of each config are built once (``nnx.eval_shape``, nothing
allocated) and cached; ``bind`` is free at run time (trace-time only under jit).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
from flax import nnx


class PureModule:
    """Pure-function view of an NNX module class ``module_cls(cfg, rngs=...)`` (or
    ``module_cls(rngs=...)`` for modules without a config: pass ``cfg=None``)."""

    def __init__(self, module_cls: Callable[..., nnx.Module]):
        self.module_cls = module_cls
        self._split = functools.lru_cache(maxsize=None)(self._build_split)
        self._init = jax.jit(self._init_impl, static_argnames=("cfg",))

    def _new(self, cfg: Any, rngs: nnx.Rngs) -> nnx.Module:
        return self.module_cls(rngs=rngs) if cfg is None else self.module_cls(cfg, rngs=rngs)

    def _build_split(self, cfg):
        return nnx.split(nnx.eval_shape(lambda: self._new(cfg, nnx.Rngs(0))))

    def _init_impl(self, cfg, key):
        return nnx.to_pure_dict(nnx.state(self._new(cfg, nnx.Rngs(params=key)), nnx.Param))

    def graphdef_and_abstract(self, cfg=None):
        """(graphdef, abstract State) for ``cfg``, without allocating weights."""
        return self._split(cfg)

    def bind(self, cfg, params) -> nnx.Module:
        """The module for ``cfg`` holding ``params`` (a pure dict pytree)."""
        return nnx.merge(self._split(cfg)[0], params)

    def init_params(self, cfg, key: jax.Array):
        """Freshly initialised parameters (pure dict, float32), one compiled program."""
        return self._init(cfg, key)

    def abstract_params(self, cfg=None):
        """ShapeDtypeStruct pytree of the parameters."""
        return nnx.to_pure_dict(self._split(cfg)[1])

    def logical_axes(self, cfg=None):
        """Pytree (like the params) of logical axis-name tuples for the sharding rules."""
        return nnx.to_pure_dict(nnx.get_partition_spec(self._split(cfg)[1]))
