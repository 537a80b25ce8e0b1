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
