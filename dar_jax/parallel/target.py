"""What a program is built for: its platform and, for sharded programs, its mesh and rules.

A :class:`Target` is passed explicitly to the models (``ar.forward(..., target=)``, the
tokenizer's functions, sampling) the way MaxText passes its mesh and config. It decides

* the platform-dependent code paths: which attention kernel ``auto`` picks (splash on TPU, this
  project's Triton kernels on GPU, XLA on CPU), XLA attention's CPU-only per-head loop, the
  weight casts of decoding;
* the sharding of activations: ``target.constrain(x, ("batch", "length", "embed"))`` maps
  logical axes to mesh axes by the same rules as the parameters;
* the ``shard_map`` specs of kernels (``dar_jax.nn.attention.sharded_attention``).

The platform comes from the mesh's devices (a TPU topology's devices when cross-compiling on a
CPU host), or from an explicit argument; never from ``jax.default_backend()``. Without a mesh
and without a platform the program runs where jax runs it by default: on the first device.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dar_jax.parallel.sharding import DEFAULT_RULES, normalize_rules, spec_for

PLATFORMS = ("cpu", "gpu", "tpu")

# TPU, sharded without tensor parallelism: no collective-matmul ("windowed einsum") rewrite of the
# FSDP matmuls. With weights sharded on their contracting (embed) dimension, XLA's rewrite
# computes N partial products of 1/N of that dimension and adds each into the whole output in
# HBM: N times the output's HBM traffic and matmuls with a contracting dimension of D/N. GPT-XL on
# v5p-32 (16 chips, 64 per chip): 1.38 TB -> see BENCHMARKS.md "Pod scale". Gathering the weight
# (what FSDP means) is cheap next to the matmul and overlaps with the previous layer.
_FSDP_TPU_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                     "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def device_platform(device) -> str:
    """"cpu" | "gpu" | "tpu" of a device (CUDA and ROCm devices are "gpu")."""
    p = device.platform.lower()
    return "gpu" if p in ("cuda", "rocm", "gpu") else p


@dataclasses.dataclass(frozen=True)
class Target:
    """The platform a program is traced for, and its mesh and logical-axis rules (if sharded).

    Hashable: it is a static argument of the jitted functions that take it.
    """
    platform: str
    mesh: Mesh | None = None
    rules: tuple = normalize_rules(DEFAULT_RULES)

    def __post_init__(self):
        if self.platform not in PLATFORMS:
            raise ValueError(f"unknown platform {self.platform!r}; expected one of {PLATFORMS}")
        object.__setattr__(self, "rules", normalize_rules(self.rules))

    @property
    def sharded(self) -> bool:
        """Whether arrays are spread over several devices (constraints and shard_map apply)."""
        return self.mesh is not None and self.mesh.size > 1

    def spec(self, logical: Sequence[str | None], shape: Sequence[int]) -> P:
        """PartitionSpec of an array with ``logical`` axes (P() when not sharded)."""
        if not self.sharded:
            return P()
        return spec_for(tuple(logical), tuple(shape), self.mesh, self.rules)

    def constrain(self, x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
        """``with_sharding_constraint`` of an activation by its logical axes (no-op unsharded)."""
        if not self.sharded:
            return x
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(self.mesh, self.spec(logical, x.shape)))

    def compiler_options(self) -> dict:
        """XLA options of a sharded program built for this target (jax.jit's
        ``compiler_options``): on TPU without a tensor axis, no windowed-einsum rewrite of the
        FSDP matmuls (see ``_FSDP_TPU_OPTIONS``); nothing otherwise."""
        if self.platform != "tpu" or not self.sharded or self.mesh.shape.get("tensor", 1) > 1:
            return {}
        return dict(_FSDP_TPU_OPTIONS)

    def local(self) -> "Target":
        """The same platform without a mesh (the code inside a ``shard_map``)."""
        return Target(self.platform, None, self.rules)


def target_for(mesh: Mesh | None = None, rules=DEFAULT_RULES, platform: str | None = None) -> Target:
    """Target of ``mesh`` (platform of its devices) or of ``platform`` (default: the first device)."""
    if platform is None:
        device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
        platform = device_platform(device)
    return Target(platform, mesh, rules)


def default_target() -> Target:
    """One device, the first one jax runs on (notebooks, tests, single-device sampling)."""
    return target_for()
