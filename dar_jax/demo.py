"""Short demo of the AR model: loads the fixture GPT shipped with the tests and generates tokens.

    python -m dar_jax.demo
"""
from __future__ import annotations

import json
import pathlib
import time

import jax
import numpy as np

from dar_jax import ar
from dar_jax.checkpoint import reference

FIXTURE = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "dar_reference" / "tiny"


def main() -> None:
    cfg = ar.gpt_config(**json.loads((FIXTURE / "config.json").read_text())["gpt"])
    params = reference.load_reference_gpt(FIXTURE / "gpt.pt", cfg)
    labels = np.arange(min(4, cfg.num_classes))
    t0 = time.perf_counter()
    tokens = ar.generate(cfg, params, labels, jax.random.key(0), cfg_scale=4.0, top_k=8)
    tokens.block_until_ready()
    print(f"generated {tokens.shape} tokens in {time.perf_counter() - t0:.2f} s (incl. compile)")
    print(np.asarray(tokens))


if __name__ == "__main__":
    main()
