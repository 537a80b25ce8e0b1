"""Meshes, logical-axis sharding rules and multi-host start-up (used by train, sample, evaluate)."""
from dar_jax.parallel.distributed import initialize
from dar_jax.parallel.host import (batch_sharding, gather_to_host, host_local_values, put_batch,
                                   put_global, put_replicated)
from dar_jax.parallel.mesh import MESH_AXES, local_mesh, make_mesh, resolve_mesh_shape
from dar_jax.parallel.sharding import (DEFAULT_RULES, batch_divisor, batch_shardings, batch_spec,
                                       global_batch, normalize_rules, replicated,
                                       spec_for, tree_shardings)
from dar_jax.parallel.target import Target, default_target, device_platform, target_for
