"""Preemption-safe training checkpoints: orbax ``CheckpointManager`` with the train state, the
data iterator's state and the run metadata saved together at each step.

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames on
commit), so a crash mid-save never corrupts the latest complete checkpoint. Restoring takes the
shardings of the *current* mesh, so a run can resume on another device count or layout. A
latest checkpoint that fails to restore is skipped, with a warning, for the previous one.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import orbax.checkpoint as ocp

from dar_jax.checkpoint.torch_pickle import CheckpointError

log = logging.getLogger(__name__)


class TrainCheckpoints:
    def __init__(self, directory: str, *, keep: int = 3, keep_period: int | None = None,
                 async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_period or None, create=True,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state, data_state: Any, meta: dict, *, force: bool = False) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state if data_state is not None else {}),
            meta=ocp.args.JsonSave(meta)), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, abstract_state, step: int | None = None):
        """Restores (step, state, data_state, meta) from ``step`` or the latest good checkpoint.

        ``abstract_state`` is a ShapeDtypeStruct pytree with the target shardings.
        Returns None when there is no checkpoint.
        """
        candidates = [step] if step is not None else list(reversed(self.steps()))
        errors = []
        for s in candidates:
            try:
                out = self.manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
            except Exception as e:  # corrupt or partial: fall back to the previous step
                msg = f"checkpoint step {s} in {self.directory} could not be restored ({type(e).__name__}: {e})"
                errors.append(msg)
                log.warning("%s; trying the previous one", msg)
                continue
            return s, out["state"], out["data"], out["meta"]
        if errors:
            raise CheckpointError("no checkpoint could be restored: " + "; ".join(errors))
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def read_meta(directory: str, step: int) -> dict:
    path = os.path.join(directory, str(step), "meta", "metadata")
    with open(path) as f:
        return json.load(f)
