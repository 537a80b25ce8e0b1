"""Metrics to JSONL and TensorBoard (tensorboardX: no TensorFlow needed), from process 0 only."""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Mapping

import numpy as np

log = logging.getLogger(__name__)


def mfu(flops_per_second: float, peak_flops_per_device: float, num_devices: int) -> float:
    """Model FLOPs utilisation: achieved (analytic) FLOP/s over the peak of all devices."""
    return flops_per_second / (num_devices * peak_flops_per_device)


class MetricsWriter:
    """``write(step, {name: scalar})`` appends to ``metrics.jsonl`` and TensorBoard event files."""

    def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def resume_at(self, step: int) -> None:
        """Drops the rows after ``step`` (all rows for a run starting at 0): a resumed run
        replays those steps, so every step keeps one row of the run that the checkpoints hold.
        Unreadable rows (a line cut by a kill) are dropped too. The file is rewritten atomically."""
        if not self.enabled:
            return
        from dar_jax import io
        path = self._jsonl.name
        self._jsonl.close()
        keep = []
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if step > 0 and isinstance(row, dict) and int(row.get("step", step + 1)) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
        io.write_file(path, lambda f: f.write("".join(keep).encode()))
        self._jsonl = open(path, "a")

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(np.asarray(v)) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **{k: (v if math.isfinite(v) else str(v))
                                                            for k, v in clean.items()}}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, int(step))

    def write_images(self, step: int, name: str, image_hwc_uint8: np.ndarray) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_image(name, image_hwc_uint8, int(step), dataformats="HWC")

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
