"""The trainer (one for every model), its tasks, optimizers, checkpoints and metrics."""
from __future__ import annotations

import logging

from dar_jax.config import ConfigError

log = logging.getLogger(__name__)


def make_task(cfg):
    if cfg.task == "ar":
        from dar_jax.train.ar_task import ARTask
        return ARTask(cfg)
    if cfg.task == "tokenizer":
        from dar_jax.train.tokenizer_task import TokenizerTask
        return TokenizerTask(cfg)
    raise ConfigError(f"unknown task {cfg.task!r}; expected 'ar' or 'tokenizer'")


def run_from_config(cfg, workdir: str, hooks=None) -> dict:
    """Checks the run config and workdir, initialises multi-host if configured, builds the task
    and runs the trainer (``hooks``: see :class:`dar_jax.train.loop.Trainer`)."""
    from dar_jax import parallel
    from dar_jax.train.loop import Trainer, check_run_config, check_workdir, limit_host_malloc_arenas
    check_workdir(workdir)        # before anything is initialised, loaded or written
    check_run_config(cfg)         # the typed train / optim / checkpoint / logging sections
    limit_host_malloc_arenas()    # before the first device: XLA's threads share few heaps
    d = cfg.distributed
    parallel.initialize(d.coordinator_address or None, d.num_processes or None,
                        d.process_id if d.process_id >= 0 else None,
                        cpu_collectives=d.cpu_collectives or None)
    task = make_task(cfg)
    return Trainer(cfg, task, workdir, hooks=hooks).run()
