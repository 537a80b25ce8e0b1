"""Turns expected errors (bad config, data, checkpoints) into a one-line message and exit code 2."""
from __future__ import annotations

import sys


def expected_errors() -> tuple[type, ...]:
    from dar_jax.checkpoint import CheckpointError
    from dar_jax.config import ConfigError
    from dar_jax.train.loop import TrainingDiverged
    errs: list[type] = [ConfigError, CheckpointError, TrainingDiverged, FileNotFoundError]
    try:
        from dar_jax.data import DataError
        errs.append(DataError)
    except ImportError:
        pass
    return tuple(errs)


def guarded_main(fn) -> int:
    try:
        fn()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except expected_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
