"""Optimizers and learning-rate schedules from the ``optim`` section of a run config."""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import optax

from dar_jax.config import ConfigError, as_plain, from_mapping

SCHEDULES = ("constant", "cosine", "linear_tail")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The ``optim`` section of a run config: AdamW with global-norm clipping and a schedule
    (:func:`lr_schedule`). Every value is checked when it is built (a negative or NaN learning
    rate would train silently wrong): :class:`ConfigError` names each bad key."""
    name: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.05
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0        # 0 = no clipping
    warmup_steps: int = 0
    schedule: str = "constant"    # one of SCHEDULES
    min_lr_ratio: float = 0.0
    decay_steps: int = 0          # linear_tail only

    def __post_init__(self):
        if self.name != "adamw":
            raise ConfigError(f"unknown optimizer {self.name!r}; only 'adamw' is provided")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown lr schedule {self.schedule!r}; expected one of {list(SCHEDULES)}")
        finite_pos = (lambda v: 0 < v < math.inf, "a finite number > 0")
        finite_nonneg = (lambda v: 0 <= v < math.inf, "a finite number >= 0")
        unit = (lambda v: 0 <= v < 1, "in [0, 1)")
        checks = {"lr": finite_pos, "eps": finite_pos, "weight_decay": finite_nonneg,
                  "grad_clip": finite_nonneg, "warmup_steps": finite_nonneg, "b1": unit, "b2": unit,
                  "min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
                  "decay_steps": finite_nonneg}
        bad = []
        for key, (ok, what) in checks.items():
            value = getattr(self, key)
            try:
                good = not isinstance(value, (bool, str)) and ok(float(value))
            except (TypeError, ValueError):
                good = False
            if not good:
                bad.append(f"optim.{key}={value!r} must be {what}")
        if bad:
            raise ConfigError("; ".join(bad))


def optim_config(section: Mapping | OptimConfig) -> OptimConfig:
    """The ``optim`` section (a ConfigDict or mapping) as a checked :class:`OptimConfig`."""
    if isinstance(section, OptimConfig):
        return section
    return from_mapping(OptimConfig, as_plain(section), where="optim")


def lr_schedule(optim: Mapping | OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``lr``, then

    ``constant``;  ``cosine`` decay to ``lr * min_lr_ratio`` over the remaining steps;
    ``linear_tail``: constant, then linear decay to ``lr * min_lr_ratio`` over the last
    ``decay_steps`` steps of training (the D-AR paper: 4e-4 to 1e-5 over the last 50 of 300
    epochs).
    """
    o = optim_config(optim)
    lr, warmup = float(o.lr), int(o.warmup_steps)
    end = lr * float(o.min_lr_ratio)
    if o.schedule == "constant":
        after = optax.constant_schedule(lr)
    elif o.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1), alpha=float(o.min_lr_ratio))
    else:  # linear_tail
        decay = int(o.decay_steps)
        if not 0 < decay <= total_steps - warmup:
            raise ConfigError(f"schedule 'linear_tail' needs 0 < optim.decay_steps <= train.steps "
                              f"- warmup_steps ({total_steps - warmup}), got {decay}")
        hold = total_steps - warmup - decay
        after = optax.join_schedules([optax.constant_schedule(lr),
                                      optax.linear_schedule(lr, end, decay)], [hold])
    if warmup <= 0:
        return after
    # torch-style warmup as the reference (lr * (step + 1) / warmup), then the main schedule
    warm = lambda step: lr * jax.numpy.minimum(1.0, (step + 1) / warmup)
    return optax.join_schedules([warm, after], [warmup])


def decay_mask(params):
    """Weight decay on matrices and embeddings (ndim >= 2), not on norms and biases (as LlamaGen)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim: Mapping | OptimConfig, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(AdamW chain, its learning-rate schedule) of the ``optim`` section."""
    o = optim_config(optim)
    schedule = lr_schedule(o, total_steps)
    parts = []
    if float(o.grad_clip) > 0:
        parts.append(optax.clip_by_global_norm(float(o.grad_clip)))
    parts.append(optax.adamw(schedule, b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
                             weight_decay=float(o.weight_decay), mask=decay_mask))
    return optax.chain(*parts), schedule
