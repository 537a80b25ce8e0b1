"""ODE solvers of the decoder's flow (dx/dt = v(x, t), t from 0 = noise to 1 = data).

One step rule per solver, shared by the tokenizer's decode loop and by :func:`integrate`:

``euler``     x += dt v                                     (the reference's, 1 evaluation / step)
``adams2``    first step Euler, then x += dt (1.5 v_i - 0.5 v_{i-1})   (the reference's default;
              constant coefficients, exactly as the reference, also on its non-uniform grid)
``heun``      predictor Euler, corrector trapezoid          (2 evaluations / step); a step that
              ends at t = 1 is Euler (as EDM's Heun at sigma = 0): the corrector would evaluate
              the network at the data end, where flow matching never trains it (t ~ U[0, 1)),
              and that evaluation made finals and previews noisy
``dpmpp_2m``  DPM-Solver++(2M) in data-prediction form for the flow x_t = t x1 + (1 - t) x0,
              i.e. alpha_t = t, sigma_t = 1 - t, lambda = log(t / (1 - t)), data prediction
              x1_hat = x + (1 - t) v. First order (= Euler for this flow) on a run's first step
              and on steps ending at t = 1 (lambda = inf), second order in between.

A step rule is ``step(solver, evaluate, x, v, hist, t, t_next) -> (x_next, hist_next)`` where
``v = evaluate(x, t)`` was computed by the caller (so a preview jump and the regular step can
share it) and ``evaluate`` is called again only by Heun's corrector.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from dar_jax.errors import DarError

SOLVERS = ("euler", "adams2", "heun", "dpmpp_2m")
ALIASES = {"dpm++": "dpmpp_2m", "dpm++2m": "dpmpp_2m", "dpm++_2m": "dpmpp_2m", "dpmpp": "dpmpp_2m",
           "dpm-solver++": "dpmpp_2m"}
EVALS_PER_STEP = {"euler": 1, "adams2": 1, "heun": 2, "dpmpp_2m": 1}


class SolverError(DarError, ValueError):
    """An unknown solver or an impossible step schedule."""


def canonical(solver: str) -> str:
    name = ALIASES.get(solver.lower(), solver.lower()) if isinstance(solver, str) else solver
    if name not in SOLVERS:
        raise SolverError(f"unknown solver {solver!r}; expected one of {SOLVERS} "
                          f"(aliases {sorted(ALIASES)})")
    return name


class History(NamedTuple):
    """What multistep rules keep between steps (per sample batch, fixed shapes)."""
    prev: jax.Array       # previous velocity (adams2) or previous data prediction (dpmpp_2m)
    prev_t: jax.Array     # () float32: time of the previous evaluation
    has_prev: jax.Array   # () bool: False on a run's first step


def init_history(x: jax.Array) -> History:
    return History(jnp.zeros_like(x), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.bool_))


def _log_snr(t):
    return jnp.log(t) - jnp.log1p(-t)


def step(solver: str, evaluate: Callable, x, v, hist: History, t, t_next):
    """One step from t to t_next given v = evaluate(x, t). Returns (x_next, hist_next)."""
    t = jnp.asarray(t, jnp.float32)
    t_next = jnp.asarray(t_next, jnp.float32)
    dt = t_next - t
    if solver == "euler":
        return x + dt * v, hist
    if solver == "adams2":
        d = jnp.where(hist.has_prev, 1.5 * v - 0.5 * hist.prev, v)
        return x + dt * d, History(v, t, jnp.ones((), jnp.bool_))
    if solver == "heun":
        x_pred = x + dt * v
        corrected = lambda: x + dt * (0.5 * (v + evaluate(x_pred, t_next)))
        return jax.lax.cond(t_next < 1.0, corrected, lambda: x_pred), hist
    if solver == "dpmpp_2m":
        sigma, sigma_next = 1.0 - t, 1.0 - t_next
        x1_hat = x + sigma * v
        ratio = sigma_next / sigma
        # second order needs a finite previous lambda (prev_t > 0) and a finite next one (t_next < 1)
        second = hist.has_prev & (hist.prev_t > 0) & (t_next < 1.0)
        safe = lambda u: jnp.clip(u, 1e-7, 1.0 - 1e-7)
        lam, lam_next, lam_prev = _log_snr(safe(t)), _log_snr(safe(t_next)), _log_snr(safe(hist.prev_t))
        r = (lam - lam_prev) / (lam_next - lam)
        c = jnp.where(second, 0.5 / jnp.where(second, r, 1.0), 0.0)
        d = (1.0 + c) * x1_hat - c * hist.prev
        x_next = ratio * x + (t_next - t * ratio) * d
        return x_next, History(x1_hat, t, jnp.ones((), jnp.bool_))
    raise SolverError(f"unknown solver {solver!r}")


def integrate(fn: Callable, x0: jax.Array, times, solver: str = "adams2") -> jax.Array:
    """Solves dx/dt = fn(x, t) over the grid ``times`` (T + 1,) from x0 with a step rule.

    A generic ODE driver (used to check each solver's order on problems with known solutions);
    the tokenizer's decode loop uses the same :func:`step`.
    """
    solver = canonical(solver)
    times = jnp.asarray(times, jnp.float32)

    def body(i, carry):
        x, hist = carry
        t, t_next = times[i], times[i + 1]
        return step(solver, fn, x, fn(x, t), hist, t, t_next)

    x, _ = jax.lax.fori_loop(0, times.shape[0] - 1, body, (x0, init_history(x0)))
    return x
