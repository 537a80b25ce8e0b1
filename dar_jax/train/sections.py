"""The typed sections of a run config that the trainer reads (train, optim, checkpoint,
logging): frozen dataclasses whose defaults are ``run_config.base_config``'s, each value checked
when built (:class:`ConfigError` names every bad key)."""
from __future__ import annotations

import dataclasses

from dar_jax.config import ConfigError, as_plain, from_mapping
from dar_jax.train.optim import OptimConfig, optim_config


def _positive(section: str, **values) -> list[str]:
    return [f"{section}.{k} must be >= 1, got {v!r}" for k, v in values.items()
            if isinstance(v, bool) or not isinstance(v, int) or v < 1]


def _non_negative(section: str, **values) -> list[str]:
    return [f"{section}.{k} must be >= 0, got {v!r}" for k, v in values.items()
            if isinstance(v, bool) or not isinstance(v, int) or v < 0]


def _check(bad: list[str]) -> None:
    if bad:
        raise ConfigError("; ".join(bad))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The ``train`` section: how many steps of which global batch, seeded how."""
    global_batch_size: int = 256
    steps: int = 1000
    seed: int = 0
    ema_decay: float = 0.0        # 0 = no EMA; the exported model is the EMA when > 0
    eval_every_steps: int = 0     # 0 = no periodic evaluation

    def __post_init__(self):
        bad = _positive("train", global_batch_size=self.global_batch_size)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            bad.append(f"train.steps must be positive, got {self.steps!r}")
        bad += _non_negative("train", eval_every_steps=self.eval_every_steps)
        if not (isinstance(self.ema_decay, (int, float)) and 0.0 <= self.ema_decay < 1.0):
            bad.append(f"train.ema_decay must lie in [0, 1), got {self.ema_decay!r}")
        _check(bad)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """The ``checkpoint`` section: periodic orbax checkpoints and the exported model's storage."""
    every_steps: int = 1000
    keep: int = 3
    keep_period: int = 0          # also keep every step divisible by this (0 = none)
    async_save: bool = True
    export_dtype: str = "float32"  # storage of <workdir>/model ("bfloat16" halves it; loads as float32)

    def __post_init__(self):
        from dar_jax.checkpoint.store import STORAGE_DTYPES
        bad = _positive("checkpoint", every_steps=self.every_steps, keep=self.keep)
        bad += _non_negative("checkpoint", keep_period=self.keep_period)
        if self.export_dtype not in STORAGE_DTYPES:
            bad.append(f"checkpoint.export_dtype must be one of {STORAGE_DTYPES}, got {self.export_dtype!r}")
        _check(bad)


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """The ``logging`` section: metrics every ``every_steps`` (one step late), MFU against
    ``peak_tflops_per_device`` when it is set (``dar_jax.hardware``)."""
    every_steps: int = 50
    tensorboard: bool = True
    progress: bool = True
    peak_tflops_per_device: float = 0.0

    def __post_init__(self):
        bad = _positive("logging", every_steps=self.every_steps)
        if not (isinstance(self.peak_tflops_per_device, (int, float)) and self.peak_tflops_per_device >= 0):
            bad.append(f"logging.peak_tflops_per_device must be >= 0, got {self.peak_tflops_per_device!r}")
        _check(bad)


@dataclasses.dataclass(frozen=True)
class RunSections:
    """The trainer's typed view of a run config's train / optim / checkpoint / logging sections."""
    train: TrainConfig
    optim: OptimConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig


def run_sections(cfg) -> RunSections:
    """The typed, checked sections of run config ``cfg``; :class:`ConfigError` names every bad
    or unknown key."""
    return RunSections(
        train=from_mapping(TrainConfig, as_plain(cfg.train), where="train"),
        optim=optim_config(cfg.optim),
        checkpoint=from_mapping(CheckpointConfig, as_plain(cfg.checkpoint), where="checkpoint"),
        logging=from_mapping(LoggingConfig, as_plain(cfg.logging), where="logging"))
