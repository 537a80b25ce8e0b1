"""Command-line plumbing shared by train.py, sample.py, the converter and the evaluation command:
expected errors (bad config, data, checkpoints, inputs) become one line on stderr and exit code
2, and the GPT size flags every command that reads a GPT ``.pt`` accepts."""
from __future__ import annotations

import argparse
import math
import sys


def expected_errors() -> tuple[type, ...]:
    """What the command lines turn into ``error: ...`` and exit status 2: the package's clear
    errors (:class:`dar_jax.errors.DarError`) and missing files."""
    from dar_jax.errors import DarError
    return (DarError, FileNotFoundError)


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


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_gpt_size_flags(ap: argparse.ArgumentParser, *aliases: str) -> None:
    """The size flags of a GPT ``.pt`` (which holds no config), all optional: what its shapes
    determine is inferred and a contradicting flag is an error naming both."""
    from dar_jax.ar import GPT_SIZES
    g = ap.add_argument_group("size of a GPT .pt (inferred from its shapes where they determine it)")
    g.add_argument("--gpt-model", *aliases, dest="gpt_model", choices=sorted(GPT_SIZES), default=None,
                   help="a named size (checked against the file)")
    g.add_argument("--dim", type=positive_int, help="width (inferred)")
    g.add_argument("--n-layer", type=positive_int, help="layers (inferred)")
    g.add_argument("--n-head", type=positive_int, help="attention heads (default: dim / 64)")
    g.add_argument("--block-size", type=positive_int,
                   help="tokens per image (default: the tokenizer's token count, 256 without one)")
    g.add_argument("--num-classes", type=positive_int, help="classes (inferred)")
    g.add_argument("--vocab-size", type=positive_int, help="vocabulary (inferred)")


def gpt_size_flags(args) -> dict:
    from dar_jax.ar.reference import GPT_SIZE_FLAGS
    return {k: getattr(args, k) for k in GPT_SIZE_FLAGS}


def sampling_flag_errors(args, minimums: dict[str, int]) -> list[str]:
    """Messages for the sampling flags sample.py and the evaluation command share (steps, top-k,
    top-p, temperature, CFG interval, seed) and for ``minimums`` ({"--flag": lowest value})."""
    minimums = {"--steps": 0, "--top-k": 0, "--cfg-interval": -1, **minimums}
    bad = [f"{flag} must be >= {lo}, got {getattr(args, flag[2:].replace('-', '_'))}"
           for flag, lo in minimums.items() if getattr(args, flag[2:].replace("-", "_")) < lo]
    if not 0 <= args.temperature < math.inf:
        bad.append(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        bad.append(f"--top-p must lie in (0, 1], got {args.top_p}")
    if not -2 ** 63 <= args.seed < 2 ** 63:
        bad.append(f"--seed must fit in 64 bits, got {args.seed}")
    return bad


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
