"""Device meshes with named axes (data, fsdp, tensor) sized from a config."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

from dar_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Mesh shape for ``sizes`` ({axis: size}, at most one -1 meaning "the rest of the devices").

    Raises ConfigError when the sizes do not divide the device count.
    """
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"unknown mesh axes {unknown}; known: {list(MESH_AXES)}")
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    rest = [i for i, s in enumerate(shape) if s == -1]
    if len(rest) > 1:
        raise ConfigError(f"mesh {dict(sizes)}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"mesh {dict(sizes)}: sizes must be positive or -1")
    fixed = math.prod(s for s in shape if s != -1)
    if rest:
        if num_devices % fixed:
            raise ConfigError(f"mesh {dict(sizes)} does not divide the {num_devices} devices "
                              f"(the fixed axes use {fixed})")
        shape[rest[0]] = num_devices // fixed
    if math.prod(shape) != num_devices:
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, shape))} uses {math.prod(shape)} devices "
                          f"but {num_devices} are available")
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: all devices of all processes).

    Axis types are Auto (GSPMD propagation from the shardings the trainer gives jit), passed
    explicitly because jax.make_mesh defaults to Explicit.
    """
    devices = list(devices) if devices is not None else jax.devices()
    shape = resolve_mesh_shape(dict(sizes or {"data": -1}), len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def local_mesh(sizes: Mapping[str, int] | None = None) -> Mesh:
    """A mesh over this process's devices only (e.g. for sampling without collectives)."""
    return make_mesh(sizes, jax.local_devices())
