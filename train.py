"""Train a D-AR model (AR transformer or tokenizer) with dar-jax's one trainer.

    python train.py --config configs/ar_gpt_l.py --workdir runs/ar_l --config.optim.lr=2e-4
    python train.py --config configs/tiny_ar.py --workdir runs/tiny

Any key of the run config can be overridden with --config.<section>.<key>=<value>; an unknown
key is an error naming it. Multi-host: on TPU pods and SLURM, jax.distributed starts from the
environment; elsewhere pass --config.distributed.coordinator_address=host:port
--config.distributed.num_processes=N --config.distributed.process_id=i. Re-running the same
command resumes from the latest checkpoint in --workdir; SIGTERM saves and exits 0.
"""
from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="run config file (configs/*.py[:arg])")
    ap.add_argument("--workdir", required=True, help="checkpoints, metrics and the exported model")
    args, rest = ap.parse_known_args(argv)
    overrides, bad = [], []
    for item in rest:
        (overrides if item.startswith("--config.") and "=" in item else bad).append(item)
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like --config.optim.lr=2e-4)")
    return args, overrides


def main(argv=None) -> int:
    from dar_jax.cli import guarded_main

    def run():
        args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        from dar_jax.config import load_config
        from dar_jax.train import run_from_config
        cfg = load_config(args.config, overrides)
        run_from_config(cfg, args.workdir)

    return guarded_main(run)


if __name__ == "__main__":
    sys.exit(main())
