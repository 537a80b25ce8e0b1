"""Preemption-safe training checkpoints: orbax ``CheckpointManager`` with the train state, the
data iterator's state and the run metadata saved together at each step.

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames on
commit), so a crash mid-save never corrupts the latest complete checkpoint. Restoring takes the
shardings of the *current* mesh, so a run can resume on another device count or layout.

Restoring checks what it reads: the state's step and the data iterator's step must be the
checkpoint's step. A checkpoint that does not restore or does not check is corrupt: it is
skipped, with a warning, for the previous one, and once an older one restored it is moved aside
to ``<step>.corrupt`` (so it takes no keep slot and is never tried again). A checkpoint of
another model shape is not corrupt: it is an error naming the first key that differs.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from dar_jax import io
from dar_jax.checkpoint.torch_pickle import CheckpointError

log = logging.getLogger(__name__)


class _Corrupt(Exception):
    pass


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _saved_leaves(tree) -> dict[str, tuple]:
    """{dotted name: shape} of an orbax metadata tree."""
    out = {}

    def walk(node):
        if hasattr(node, "shape") and hasattr(node, "name"):
            out[str(node.name)] = tuple(node.shape)
        elif isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)

    walk(tree)
    return out


def first_difference(saved: dict[str, tuple], abstract_state) -> str | None:
    """The first leaf (in the state's order) whose presence or shape differs, as a sentence."""
    want = {".".join(_key_name(k) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    for name, shape in sorted(want.items(), key=lambda kv: not kv[0].startswith("params.")):
        if name not in saved:
            return f"{name} {shape} is not in the checkpoint"
        if saved[name] != shape:
            return f"{name} has shape {saved[name]} in the checkpoint and {shape} in this run"
    extra = sorted(set(saved) - set(want))
    if extra:
        return f"the checkpoint has {extra[0]} {saved[extra[0]]}, which this run does not"
    return None


def _host_int(x) -> int:
    """A replicated scalar's value from this host's own shard (never a cross-host fetch)."""
    if isinstance(x, jax.Array):
        x = x.addressable_shards[0].data
    return int(x)


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

    def save(self, step: int, state, data_state: Any, meta: dict, *, force: bool = False) -> bool:
        """Saves ``step`` unless it is already saved (a stop right after a periodic save, or before
        the first step of a resumed run); returns whether a save was started."""
        if step in self.manager.all_steps():
            return False
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state if data_state is not None else {}),
            meta=ocp.args.JsonSave(meta)), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def _restore_one(self, s: int, abstract_state, data_template):
        try:
            saved = _saved_leaves(self.manager.item_metadata(s)["state"].tree)
        except Exception as e:  # unreadable metadata: corrupt
            raise _Corrupt(f"{type(e).__name__}: {e}") from None
        diff = first_difference(saved, abstract_state)
        if diff:
            raise CheckpointError(
                f"checkpoint step {s} in {self.directory} was written for another model or run "
                f"config: {diff}; resume with the config it was made with, or use a new workdir")
        try:
            out = self.manager.restore(s, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        except Exception as e:  # corrupt or partial
            raise _Corrupt(f"{type(e).__name__}: {str(e)[:300]}") from None
        state, data = out["state"], out["data"]
        if isinstance(data_template, dict) and (not isinstance(data, dict) or set(data) != set(data_template)):
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise _Corrupt(f"its data iterator state has {got}, expected the keys {sorted(data_template)}")
        state_step = _host_int(state["step"]) if "step" in state else s
        if state_step != s:
            raise _Corrupt(f"its train state is at step {state_step}")
        if isinstance(data, dict) and "step" in data:
            try:
                data_step = int(data["step"])
            except (TypeError, ValueError):
                raise _Corrupt(f"its data iterator state has step {data['step']!r}") from None
            if data_step != s:
                raise _Corrupt(f"its data iterator state is at step {data_step}: resuming from it "
                               "would not replay the right batches")
        return s, state, data, out["meta"]

    def restore(self, abstract_state, step: int | None = None, data_template: Any = None):
        """Restores (step, state, data_state, meta) from ``step`` or the latest good checkpoint.

        ``abstract_state`` is a ShapeDtypeStruct pytree with the target shardings;
        ``data_template``, a fresh data iterator's state: a saved state with other keys is
        corrupt. Returns None when there is no checkpoint. Corrupt newer checkpoints are moved
        to ``<step>.corrupt`` once an older one restored.
        """
        candidates = [step] if step is not None else list(reversed(self.steps()))
        errors, corrupt = [], []
        for s in candidates:
            try:
                restored = self._restore_one(s, abstract_state, data_template)
            except _Corrupt as e:
                msg = f"checkpoint step {s} in {self.directory} could not be restored ({e})"
                errors.append(msg)
                corrupt.append(s)
                log.warning("%s; trying the previous one", msg)
                continue
            self.move_aside(corrupt)
            return restored
        if errors:
            raise CheckpointError("no checkpoint could be restored: " + "; ".join(errors))
        return None

    def move_aside(self, steps: list[int], tag: str = "corrupt") -> None:
        """Renames checkpoints to ``<step>.<tag>`` (nothing is deleted; orbax no longer sees them)."""
        if not steps:
            return
        self.wait()
        if jax.process_index() == 0:
            for s in steps:
                dst = io.move_aside(os.path.join(self.directory, str(s)), tag)
                log.warning("moved the %s checkpoint step %d aside to %s", tag, s, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("dar_checkpoints_moved_aside")
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

