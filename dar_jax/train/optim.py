"""Optimizers and learning-rate schedules from the ``optim`` section of a run config."""
from __future__ import annotations

import math
from typing import Mapping

import jax
import optax

from dar_jax.config import ConfigError

OPTIM_KEYS = ("name", "lr", "weight_decay", "b1", "b2", "eps", "grad_clip", "warmup_steps",
              "schedule", "min_lr_ratio", "decay_steps")
SCHEDULES = ("constant", "cosine", "linear_tail")


def lr_schedule(optim: Mapping, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``lr``, then

    ``constant``;  ``cosine`` decay to ``lr * min_lr_ratio`` over the remaining steps;
    ``linear_tail``: constant, then linear decay to ``lr * min_lr_ratio`` over the last
    ``decay_steps`` steps of training (the D-AR paper: 4e-4 to 1e-5 over the last 50 of 300
    epochs).
    """
    lr = float(optim["lr"])
    warmup = int(optim.get("warmup_steps", 0))
    kind = optim.get("schedule", "constant")
    end = lr * float(optim.get("min_lr_ratio", 0.0))
    if kind == "constant":
        after = optax.constant_schedule(lr)
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1),
                                            alpha=float(optim.get("min_lr_ratio", 0.0)))
    elif kind == "linear_tail":
        decay = int(optim.get("decay_steps", 0))
        if not 0 < decay <= total_steps - warmup:
            raise ConfigError(f"schedule 'linear_tail' needs 0 < optim.decay_steps <= train.steps "
                              f"- warmup_steps ({total_steps - warmup}), got {decay}")
        hold = total_steps - warmup - decay
        after = optax.join_schedules([optax.constant_schedule(lr),
                                      optax.linear_schedule(lr, end, decay)], [hold])
    else:
        raise ConfigError(f"unknown lr schedule {kind!r}; expected one of {list(SCHEDULES)}")
    if warmup <= 0:
        return after
    # torch-style warmup as the reference (lr * (step + 1) / warmup), then the main schedule
    warm = lambda step: lr * jax.numpy.minimum(1.0, (step + 1) / warmup)
    return optax.join_schedules([warm, after], [warmup])


def decay_mask(params):
    """Weight decay on matrices and embeddings (ndim >= 2), not on norms and biases (as LlamaGen)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def check_optim(optim: Mapping) -> None:
    """Every value of the ``optim`` section in its range (a negative or NaN learning rate would
    train silently wrong); raises :class:`ConfigError` naming each bad key."""
    unknown = sorted(set(optim) - set(OPTIM_KEYS))
    if unknown:
        raise ConfigError(f"unknown optim keys {unknown}; allowed: {list(OPTIM_KEYS)}")
    if optim.get("name", "adamw") != "adamw":
        raise ConfigError(f"unknown optimizer {optim.get('name')!r}; only 'adamw' is provided")
    finite_pos = (lambda v: 0 < v < math.inf, "a finite number > 0")
    finite_nonneg = (lambda v: 0 <= v < math.inf, "a finite number >= 0")
    unit = (lambda v: 0 <= v < 1, "in [0, 1)")
    checks = {"lr": finite_pos, "eps": finite_pos, "weight_decay": finite_nonneg,
              "grad_clip": finite_nonneg, "warmup_steps": finite_nonneg, "b1": unit, "b2": unit,
              "min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]")}
    bad = []
    for key, (ok, what) in checks.items():
        if key in optim:
            try:
                good = ok(float(optim[key]))
            except (TypeError, ValueError):
                good = False
            if not good:
                bad.append(f"optim.{key}={optim[key]!r} must be {what}")
    if bad:
        raise ConfigError("; ".join(bad))


def make_optimizer(optim: Mapping, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    check_optim(optim)
    schedule = lr_schedule(optim, total_steps)
    parts = []
    if float(optim.get("grad_clip", 0.0)) > 0:
        parts.append(optax.clip_by_global_norm(float(optim["grad_clip"])))
    parts.append(optax.adamw(schedule, b1=float(optim.get("b1", 0.9)), b2=float(optim.get("b2", 0.999)),
                             eps=float(optim.get("eps", 1e-8)),
                             weight_decay=float(optim.get("weight_decay", 0.0)), mask=decay_mask))
    return optax.chain(*parts), schedule
