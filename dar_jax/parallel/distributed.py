"""Multi-host start-up: ``jax.distributed.initialize`` from flags or the cluster's environment."""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

_CLUSTER_ENV = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None, cpu_collectives: str | None = None) -> bool:
    """Starts the JAX distributed runtime when running on several hosts.

    Explicit arguments win; otherwise the cluster environment (TPU pods, SLURM, Open MPI) is
    detected by ``jax.distributed.initialize()`` itself. Returns True if initialised. On CPU
    clusters (and in tests) pass ``cpu_collectives="gloo"``.
    """
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if coordinator_address:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id,
                                   local_device_ids=local_device_ids)
    elif any(k in os.environ for k in _CLUSTER_ENV):
        jax.distributed.initialize()
    else:
        return False
    log.info("distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True

