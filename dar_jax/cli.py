"""Command-line plumbing shared by train.py, sample.py and the evaluation command: expected
errors (bad config, data, checkpoints, inputs) become one line on stderr and exit code 2."""
from __future__ import annotations

import sys


def expected_errors() -> tuple[type, ...]:
    from dar_jax.ar import SamplingError
    from dar_jax.checkpoint import CheckpointError
    from dar_jax.config import ConfigError
    from dar_jax.data import DataError
    from dar_jax.evaluate import ImageInputError, MetricInputError, ShardError
    from dar_jax.pipeline import PipelineError
    from dar_jax.sampling import DecodeError, SolverError
    from dar_jax.tokenizer import TokenizerInputError
    from dar_jax.train.loop import TrainingDiverged
    return (ConfigError, CheckpointError, TrainingDiverged, DataError, SamplingError, PipelineError,
            DecodeError, SolverError, TokenizerInputError, MetricInputError, ImageInputError,
            ShardError, FileNotFoundError)


def guarded_main(fn) -> int:
    """Runs ``fn()``; expected errors print ``error: ...`` and return 2."""
    try:
        fn()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except expected_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def add_distributed_args(ap) -> None:
    """Flags that start ``jax.distributed`` for a run over several processes (on TPU pods and
    SLURM the environment is detected without them)."""
    g = ap.add_argument_group("multi-process")
    g.add_argument("--coordinator-address", default="", help="host:port of process 0")
    g.add_argument("--num-processes", type=int, default=0)
    g.add_argument("--process-id", type=int, default=-1)
    g.add_argument("--cpu-collectives", default="", help="CPU collectives, e.g. gloo (CPU clusters, tests)")


def init_distributed(args) -> bool:
    """Starts jax.distributed from the flags of :func:`add_distributed_args` or the cluster."""
    from dar_jax import parallel
    if args.coordinator_address and (args.num_processes < 1 or args.process_id < 0):
        from dar_jax.config import ConfigError
        raise ConfigError("--coordinator-address needs --num-processes and --process-id")
    return parallel.initialize(args.coordinator_address or None, args.num_processes or None,
                               None if args.process_id < 0 else args.process_id,
                               cpu_collectives=args.cpu_collectives or None)

