"""Sampling the tokenizer's diffusion decoder: solvers, the sequential decode loop, previews.

    images = sampling.decode(cfg, params, codes, key, solver="dpmpp_2m", num_steps=16)

Group-by-group (streaming) use, one compiled program for every range of steps::

    state = sampling.init_state(cfg, noise)
    kv = sampling.prepare(cfg, params, cond)           # cond of the tokens known so far
    state, preview = sampling.run_steps(cfg, params, kv, state, done, sampling.steps_ready(cfg, n))
"""
from dar_jax.sampling.sequential import (DecodeError, DecodeState, check_size, decode, init_state,
                                         postprocess, prepare, resize_bicubic, resolution, run_steps,
                                         steps_ready, time_points, tokens_in_groups, window_starts)
from dar_jax.sampling.solvers import (EVALS_PER_STEP, SOLVERS, History, SolverError, canonical,
                                      init_history, integrate, step)
