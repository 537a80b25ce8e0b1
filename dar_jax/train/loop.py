"""The one trainer of dar-jax (AR model and tokenizer alike).

MaxText-shaped: a mesh from the config, parameters / optimizer state / EMA sharded by logical
axis rules, one pure train step compiled before the loop with explicit in/out shardings and the
state donated, metrics fetched one step late (logging never blocks the device), asynchronous
atomic orbax checkpoints holding the train state *and* the data iterator's state, automatic
resume (onto any mesh) that replays exactly the batches an uninterrupted run would see,
SIGTERM -> save and exit 0, and a stop naming the step when a step's loss, grad norm or updated
parameters are not finite (such a step is never checkpointed: the last good checkpoint stays the
latest).

A *task* (``dar_jax.train.ar_task.ARTask``, ``dar_jax.train.tokenizer_task.TokenizerTask``)
supplies the model-specific parts; see :class:`Task`.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import signal
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dar_jax.errors import DarError
from dar_jax import parallel
from dar_jax.checkpoint import store
from dar_jax.config import ConfigError, as_plain
from dar_jax.nn import remat
from dar_jax.train.checkpointing import TrainCheckpoints
from dar_jax.train.metrics import MetricsWriter, mfu
from dar_jax.train.optim import make_optimizer
from dar_jax.train.sections import run_sections

log = logging.getLogger(__name__)


class TrainingDiverged(DarError, RuntimeError):
    """A non-finite loss, grad norm or parameters: training stopped, the last good checkpoint is
    kept as the latest."""


_FINITE = "params_finite"   # metric of the compiled step: every updated parameter is finite


class _UnusableCheckpoint(Exception):
    """The first step after a restore has a non-finite loss or gradient: that depends only on the
    restored parameters (not on the learning rate), so no config can continue from them."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


def release_freed_host_memory() -> None:
    """Hands the host heap's free pages back to the OS (glibc's ``malloc_trim``; nothing where
    the C library has none). Initialising, restoring and compiling a large train step free
    gigabytes of small buffers that would otherwise stay in the process and add to the step's
    own peak: 0.9 GiB of tokenizer v1's 10.3 GiB at batch 2 on CPU (#18 item 4)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


HOST_MALLOC_ARENAS = 2   # glibc arenas of a training process (glibc's default: 8 per core)
_M_ARENA_MAX = -8        # mallopt parameter number (malloc.h)


def limit_host_malloc_arenas(arenas: int = HOST_MALLOC_ARENAS) -> bool:
    """Caps glibc's malloc arenas (``mallopt(M_ARENA_MAX)``) for the rest of the process, unless
    the user set ``MALLOC_ARENA_MAX``; True when a cap was set. Call it before the first JAX
    device is created: XLA's worker threads each take an arena of their own at their first
    allocation, and the compiler's and runtime's freed blocks then stay resident, scattered
    over many heaps that ``malloc_trim`` cannot hand back. Tokenizer v1 at batch 2 on 2 CPU
    cores (#18 item 4): peak RSS 9.14 GiB with glibc's 16 arenas, 8.96 with 2 at the same speed,
    8.89 with 1 but 5% slower (the threads then queue for one heap's lock)."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    mallopt = getattr(_libc(), "mallopt", None)
    return bool(mallopt is not None and mallopt(_M_ARENA_MAX, int(arenas)) == 1)


@functools.lru_cache(maxsize=1)
def _libc():
    import ctypes
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def _non_finite(metrics) -> tuple[dict, list[str]]:
    """({loss, grad_norm} as floats, the names of those that are not finite) of a step."""
    values = {k: float(np.asarray(metrics[k])) for k in ("loss", "grad_norm") if k in metrics}
    return values, [k.replace("_", " ") for k, v in values.items() if not math.isfinite(v)]


class Task:
    """Model-specific parts of training. Subclasses set ``family`` and ``model_cfg`` (the
    parameters' init, shapes and axes come from the family) and implement ``loss`` and data."""
    family: Any = None        # dar_jax.family.Family of the model (exported model directory)
    model_cfg: Any = None     # frozen dataclass of the model
    workdir: str | None = None  # set by the trainer (evaluation outputs go there)

    def init_params(self, key):
        return self.family.init_params(self.model_cfg, key)

    def abstract_params(self):
        return self.family.abstract_params(self.model_cfg)

    def logical_axes(self):
        return self.family.logical_axes(self.model_cfg)

    def loss(self, params, batch, key, consts, step, target, extra):
        """-> (scalar loss, aux): differentiated w.r.t. ``params``. ``key``: this step's key;
        ``extra``: the task state beside the params (read only here); ``target``: the program's
        platform, mesh and rules (``dar_jax.parallel.Target``), passed to the model. ``aux`` is
        handed to :meth:`after_update` (by default it is the step's {name: scalar} metrics)."""
        raise NotImplementedError

    def after_update(self, params, extra, batch, aux, key, step):
        """Task work after the optimizer update, inside the step (the tokenizer's discriminator
        step and dead-code restarts): -> (params, extra, {name: scalar metric})."""
        return params, extra, aux

    def init_extra(self, key, params):
        """Task state beside the params (e.g. a discriminator and its optimizer state)."""
        return {}

    def extra_shardings(self, abstract_extra, mesh, rules):
        return jax.tree.map(lambda _: parallel.replicated(mesh), abstract_extra)

    def consts(self):
        """Frozen inputs of the step (e.g. a tokenizer's params); replicated."""
        return {}

    def abstract_batch(self, global_batch: int) -> dict:
        """ShapeDtypeStructs of one global batch as ``prepare_batch`` makes it (for compiling
        the step without data, ``dar_jax.aot``)."""
        raise NotImplementedError

    def make_data(self, *, split: str, process_index: int, process_count: int):
        """Iterator of per-process batches (dicts of NumPy arrays) with get_state/set_state."""
        raise NotImplementedError

    def prepare_batch(self, batch: Mapping[str, np.ndarray]) -> dict:
        return dict(batch)

    def flops_per_example(self) -> float:
        """Model FLOPs (forward + backward) per example, for MFU."""
        return 0.0

    def tokens_per_example(self) -> int:
        return 1

    @property
    def remat_policy(self) -> str:
        """The model's training remat policy (``dar_jax.nn.remat``)."""
        return self.model_cfg.remat_policy

    def train_step(self, state, batch, consts, *, tx, ema_decay: float, target):
        """The one update of every task: this step's key, gradients of :meth:`loss`, the
        optimizer update, :meth:`after_update`, the EMA of the params (pure; jitted by the
        trainer with the state donated)."""
        step = state["step"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        extra = state.get("extra", {})
        (loss, aux), grads = jax.value_and_grad(self.loss, has_aux=True)(
            state["params"], batch, key, consts, step, target, extra)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        params, extra, metrics = self.after_update(params, extra, batch, aux, key, step)
        new = dict(state, params=params, opt_state=opt_state, step=step + 1)
        if "extra" in state:
            new["extra"] = extra
        if ema_decay > 0:
            new["ema"] = jax.tree.map(lambda e, p: e * ema_decay + p * (1.0 - ema_decay), state["ema"], params)
        return new, {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}

    def evaluate(self, state, step: int, writer: MetricsWriter, target) -> dict:
        """Optional periodic evaluation, on the trainer's ``target`` (every process takes part;
        the returned metrics are the same on all of them; files are written by process 0)."""
        return {}


def new_train_state(task: Task, tx, params, *, extra_key, rng_key, ema_decay: float) -> dict:
    """The state the train step takes and returns: step, params, optimizer state, PRNG state,
    the task's extras and, with ``ema_decay > 0``, an EMA copy of the params (own buffers, so
    the state can be donated)."""
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
             "rng": jax.random.key_data(rng_key), "extra": task.init_extra(extra_key, params)}
    if ema_decay > 0:
        state["ema"] = jax.tree.map(jnp.copy, params)
    return state


def check_workdir(workdir: str) -> str:
    """A workdir that can hold checkpoints, metrics and the exported ``model`` folder (which
    must be new, empty or a dar-jax model: the trainer replaces only its own export)."""
    from dar_jax.io import PathError, check_output_dir
    try:
        workdir = check_output_dir(workdir, "workdir")
    except PathError as e:
        raise ConfigError(str(e)) from None
    store.check_destination(os.path.join(workdir, "model"), overwrite=True)
    return workdir


def check_run_config(cfg):
    """The trainer's typed sections of ``cfg`` (train, optim, checkpoint, logging), each value
    checked: :class:`ConfigError` names every bad or unknown key."""
    return run_sections(cfg)


class Trainer:
    """Builds everything from a run config and runs ``task`` for the configured steps.

    ``hooks(event, step)``, if given, is called at fixed moments of :meth:`run` (for tests that
    stop or kill a run at an exact point, and for instrumentation): ``"compile"`` before the
    train step is compiled (``step`` = the start step), ``"checkpoint"`` right after a periodic
    checkpoint of ``step`` was started, and ``"step"`` when everything of ``step`` is done.
    """

    def __init__(self, cfg, task: Task, workdir: str | None, devices=None, hooks=None):
        """``devices``: the devices of the mesh (default: all devices of all processes);
        ``workdir=None``: a trainer that only lowers its step (``dar_jax.aot``) and writes nothing."""
        self.sections = check_run_config(cfg)
        self.cfg, self.task = cfg, task
        self.workdir = check_workdir(workdir) if workdir is not None else None
        self.hooks = hooks or (lambda event, step: None)
        self.is_main = jax.process_index() == 0
        tr = self.sections.train
        self.global_batch = tr.global_batch_size
        self.total_steps = tr.steps
        self.ema_decay = float(tr.ema_decay)
        self.mesh = parallel.make_mesh(dict(cfg.mesh), devices)
        self.rules = parallel.normalize_rules(cfg.sharding_rules)
        self.target = parallel.target_for(self.mesh, self.rules)
        div = parallel.batch_divisor(self.mesh, self.rules)
        if self.global_batch % div:
            raise ConfigError(f"global batch {self.global_batch} is not divisible by the data axes "
                              f"of the mesh ({div} shards: {dict(self.mesh.shape)})")
        if self.global_batch % jax.process_count():
            raise ConfigError(f"global batch {self.global_batch} is not divisible by the "
                              f"{jax.process_count()} processes")
        self.tx, self.schedule = make_optimizer(self.sections.optim, self.total_steps)
        self._stop_requested = False

    # --- state -------------------------------------------------------------------------------
    def _init_state(self, key):
        k_params, k_extra, k_rng = jax.random.split(key, 3)
        return new_train_state(self.task, self.tx, self.task.init_params(k_params),
                               extra_key=k_extra, rng_key=k_rng, ema_decay=self.ema_decay)

    def _state_shardings(self, abstract_state):
        mesh, rules = self.mesh, self.rules
        p_sh = parallel.tree_shardings(self.task.logical_axes(), abstract_state["params"], mesh, rules)
        # the optimizer's moments where the params are, its counters replicated (optax knows
        # which leaves of its state mirror the params)
        opt_sh = optax.tree_map_params(self.tx, lambda _, s: s, abstract_state["opt_state"], p_sh,
                                       transform_non_params=lambda _: parallel.replicated(mesh),
                                       is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
        sh = {"step": parallel.replicated(mesh), "params": p_sh, "opt_state": opt_sh,
              "rng": parallel.replicated(mesh),
              "extra": self.task.extra_shardings(abstract_state["extra"], mesh, rules)}
        if "ema" in abstract_state:
            sh["ema"] = p_sh
        return sh

    def fresh_state(self, seed: int = 0, shardings=None):
        """The train state of step 0 from ``seed``, laid out with the state's shardings (those
        of :meth:`abstract_state` unless given)."""
        if shardings is None:
            shardings = self.abstract_state(seed)[1]
        state = jax.block_until_ready(
            jax.jit(self._init_state, out_shardings=shardings)(jax.random.key(seed)))
        release_freed_host_memory()
        return state

    def abstract_state(self, seed: int = 0):
        """(abstract state with shardings, state shardings): the step's first argument."""
        abstract = jax.eval_shape(self._init_state, jax.random.key(seed))
        shardings = self._state_shardings(abstract)
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             abstract, shardings)
        return state, shardings

    def lower_train_step(self, abstract_batch, consts, state=None) -> jax.stages.Lowered:
        """The train step (jit with explicit in/out shardings, state donated) lowered for the
        mesh's devices: what ``run`` compiles, and what ``dar_jax.aot`` compiles for a TPU
        topology. ``abstract_batch``: ShapeDtypeStructs of a global batch; ``consts``: the
        task's consts (arrays or ShapeDtypeStructs)."""
        mesh = self.mesh
        if state is None:
            state, state_sh = self.abstract_state()
        else:
            state_sh = jax.tree.map(lambda a: a.sharding, state)
        batch_sh = parallel.batch_shardings(abstract_batch, mesh, self.rules)
        batch = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             abstract_batch, batch_sh)
        consts_sh = jax.tree.map(lambda _: parallel.replicated(mesh), consts)
        step_fn = _with_finite_flag(functools.partial(
            self.task.train_step, tx=self.tx, ema_decay=self.ema_decay, target=self.target))
        return jax.jit(step_fn, in_shardings=(state_sh, batch_sh, consts_sh),
                       out_shardings=(state_sh, parallel.replicated(mesh)), donate_argnums=(0,),
                       compiler_options=self.compiler_options()).lower(state, batch, consts)

    def compiler_options(self) -> dict | None:
        """XLA options of the train step: the remat policy's and the target's."""
        options = {**(remat.compiler_options(self.task.remat_policy, self.target.platform) or {}),
                   **self.target.compiler_options()}
        return options or None

    def compile_train_step(self, abstract_batch, consts, state=None) -> jax.stages.Compiled:
        """:meth:`lower_train_step` compiled (what ``run`` executes), the compiler's freed host
        memory handed back before the first step."""
        compiled = self.lower_train_step(abstract_batch, consts, state).compile()
        release_freed_host_memory()
        return compiled

    # --- signals -----------------------------------------------------------------------------
    def _on_sigterm(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and exiting")
        self._stop_requested = True

    def _should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    return True
            except Exception:  # preemption service not available
                pass
            flags = multihost_utils.process_allgather(np.array(self._stop_requested))
            return bool(np.any(flags))
        return self._stop_requested

    # --- run -------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Restores (or initialises), compiles the step and trains to ``train.steps``; exports
        ``<workdir>/model`` at the end. -> {step, start_step, stopped, last logged metrics}."""
        if self.workdir is None:
            raise ConfigError("this trainer has no workdir (it was built to lower its step only)")
        ck, lg = self.sections.checkpoint, self.sections.logging
        old_handler = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        writer = MetricsWriter(self.workdir, tensorboard=lg.tensorboard, enabled=self.is_main)
        ckpts = TrainCheckpoints(os.path.join(self.workdir, "checkpoints"), keep=ck.keep,
                                 keep_period=ck.keep_period or None, async_save=ck.async_save)
        try:
            try:
                return self._restore_compile_train(writer, ckpts)
            except _UnusableCheckpoint as e:
                # finite but poisoned parameters (e.g. the step before a divergence): once, fall
                # back to the previous checkpoint, whose next step was checked finite
                log.warning("%s: moving checkpoint step %d aside and resuming from the previous one",
                            e, e.step)
                ckpts.move_aside([e.step], "diverged")
                return self._restore_compile_train(writer, ckpts, check_resumed=False)
        finally:
            ckpts.close()
            writer.close()
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)

    def _restore_compile_train(self, writer, ckpts, check_resumed=True) -> dict:
        self.task.workdir = self.workdir
        data = self.task.make_data(split="train", process_index=jax.process_index(),
                                   process_count=jax.process_count())
        start, state, abstract = self._restore(ckpts, data)
        writer.resume_at(start)  # rows of steps after the checkpoint are replayed: drop them
        consts = parallel.put_global(self.task.consts(), parallel.replicated(self.mesh))  # host values
        data_state = _snapshot(data.get_state())  # the iterator's state for the state's step
        first = self.task.prepare_batch(next(data))
        compiled = self._compile(start, abstract, first, consts)
        state, step, stopped, last_metrics = self._train(
            compiled, state, consts, data, first, data_state, start, writer, ckpts, check_resumed)
        if not stopped:
            self._export(state, step)
        return {"step": step, "start_step": start, "stopped": stopped, **last_metrics}

    def _restore(self, ckpts, data):
        """(start step, train state, abstract state): the latest checkpoint (the data iterator
        set to its state) or a fresh state from ``train.seed``."""
        seed = self.sections.train.seed
        abstract, state_sh = self.abstract_state(seed)
        restored = ckpts.restore(abstract, data_template=data.get_state())
        if restored is None:
            return 0, self.fresh_state(seed, state_sh), abstract
        start, state, saved_data, _ = restored
        release_freed_host_memory()
        if saved_data:
            data.set_state(saved_data)
        log.info("resumed from step %d", start)
        return start, state, abstract

    def _compile(self, start, abstract, first_batch, consts):
        """The train step compiled for the first batch's shapes (before the loop)."""
        abstract_batch = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((self.global_batch,) + np.shape(x)[1:], np.asarray(x).dtype),
            first_batch)
        self.hooks("compile", start)
        t0 = time.perf_counter()
        compiled = self.compile_train_step(abstract_batch, consts, abstract)
        log.info("train step compiled in %.1f s", time.perf_counter() - t0)
        return compiled

    def _train(self, compiled, state, consts, data, batch, data_state, start, writer, ckpts,
               check_resumed):
        """The loop from ``start`` to ``train.steps`` (or a stop request): -> (state, step,
        stopped, last logged metrics). Metrics are fetched one step late."""
        task, mesh = self.task, self.mesh
        log_every = self.sections.logging.every_steps
        ckpt_every = self.sections.checkpoint.every_steps
        eval_every = self.sections.train.eval_every_steps
        meta = {"kind": task.family.kind if task.family else "",
                "model_config": _dataclass_dict(task.model_cfg), "run_config": as_plain(self.cfg)}
        rate = _Throughput(task.flops_per_example() * self.global_batch,
                           task.tokens_per_example() * self.global_batch,
                           self.sections.logging.peak_tflops_per_device * 1e12)
        bar = (_progress(self.total_steps, start)
               if self.is_main and self.sections.logging.progress else None)
        pending: tuple[int, Any] | None = None
        last_metrics: dict = {}
        step = start
        if eval_every and start == 0:  # the baseline every later evaluation is compared with
            writer.write(0, task.evaluate(state, 0, writer, self.target))
        while step < self.total_steps:
            if self._should_stop(step):
                if pending is not None:
                    self._check_finite(*pending, ckpts)
                last_metrics = self._log(pending, writer, rate) if pending else last_metrics
                saved = ckpts.save(step, state, data_state, meta, force=True)
                ckpts.wait()
                log.warning("%s step %d after SIGTERM; exiting", "saved" if saved else "already saved", step)
                return state, step, True, last_metrics
            state, metrics = compiled(state, parallel.global_batch(batch, mesh, self.rules), consts)
            step += 1
            rate.steps += 1
            data_state = _snapshot(data.get_state())  # exactly `step` batches consumed
            if step == start + 1 and start > 0 and check_resumed:
                self._check_resumed(step, metrics)
            # metrics of the previous step, fetched while this one runs
            if pending is not None:
                self._check_finite(*pending, ckpts)
                if pending[0] % log_every == 0:
                    last_metrics = self._log(pending, writer, rate, exclude_running=True)
            pending = (step, metrics)
            if bar is not None:
                bar.update(1)
            if step % ckpt_every == 0 or step == self.total_steps:
                self._check_finite(step, metrics, ckpts)  # nothing non-finite is checkpointed
                ckpts.save(step, state, data_state, meta)
                self.hooks("checkpoint", step)
            if eval_every and step % eval_every == 0:
                writer.write(step, task.evaluate(state, step, writer, self.target))
            self.hooks("step", step)
            if step < self.total_steps:
                batch = task.prepare_batch(next(data))
        last_metrics = self._log(pending, writer, rate) if pending else last_metrics
        ckpts.wait()
        if bar is not None:
            bar.close()
        return state, step, False, last_metrics

    def _export(self, state, step):
        """``<workdir>/model``: the EMA (or the params) of the final state, in the family's format."""
        task = self.task
        if task.family is None:
            return
        final = state["ema"] if self.ema_decay > 0 else state["params"]
        # every process takes part in the gather (the params may span hosts); one writes
        host_params = parallel.gather_to_host(final)
        if self.is_main:
            store.save_model(os.path.join(self.workdir, "model"), task.family, task.model_cfg,
                             host_params, extra={"step": step, "ema": self.ema_decay > 0},
                             storage_dtype=self.sections.checkpoint.export_dtype,
                             overwrite=True)  # replaces only a previous export (check_workdir)
        _barrier("dar_export")

    # --- helpers ---------------------------------------------------------------------------------
    def _check_finite(self, step, metrics, ckpts=None):
        """Raises TrainingDiverged when step ``step``'s loss, grad norm or parameters are not finite."""
        values, bad = _non_finite(metrics)
        if _FINITE in metrics and not bool(np.asarray(metrics[_FINITE])):
            bad.append("parameters")
        if bad:
            last = ckpts.latest_step() if ckpts is not None else None
            kept = (f"the last good checkpoint (step {last}) stays the latest" if last is not None
                    else "no checkpoint was written")
            raise TrainingDiverged(
                f"non-finite {' and '.join(bad)} at step {step} "
                f"({', '.join(f'{k}={v:.4g}' for k, v in values.items())}): training diverged and "
                f"stopped; {kept}; rerun with a lower learning rate to resume from it")

    def _check_resumed(self, step, metrics):
        """The first step after a restore: a non-finite loss or grad norm condemns the checkpoint."""
        _, bad = _non_finite(metrics)
        if bad:
            raise _UnusableCheckpoint(step - 1, f"the first step after resuming from step {step - 1} "
                                                f"has a non-finite {' and '.join(bad)}")

    def _log(self, pending, writer, rate: "_Throughput", exclude_running: bool = False) -> dict:
        """Writes the metrics of ``pending = (step, metrics)`` with the throughput since the last
        log (``exclude_running``: the step just dispatched is not finished, so not counted)."""
        step, metrics = pending
        self._check_finite(step, metrics)
        values = {k: float(np.asarray(v)) for k, v in metrics.items() if k != _FINITE}
        values["lr"] = float(self.schedule(step - 1))
        values.update(rate.take(exclude_running))
        writer.write(step, values)   # process 0 only (the writer of the other processes is off)
        if self.is_main:
            log.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in values.items()))
        return values


class _Throughput:
    """Steps / tokens / FLOPs per second (and MFU) over the window since the last log."""

    def __init__(self, flops_per_step: float, tokens_per_step: int, peak_flops_per_device: float):
        self.flops, self.tokens, self.peak = flops_per_step, tokens_per_step, peak_flops_per_device
        self.start, self.steps = time.perf_counter(), 0

    def take(self, exclude_running: bool) -> dict:
        """The rates of the window, which then restarts (keeping a still-running step)."""
        done = self.steps - 1 if exclude_running else self.steps
        elapsed = time.perf_counter() - self.start
        out = {}
        if done > 0 and elapsed > 0:
            sps = done / elapsed
            out = {"steps_per_s": sps, "tokens_per_s": sps * self.tokens}
            if self.flops:
                out["tflops_per_s_per_device"] = sps * self.flops / jax.device_count() / 1e12
                if self.peak:
                    out["mfu"] = mfu(sps * self.flops, self.peak, jax.device_count())
        self.start, self.steps = time.perf_counter(), self.steps - done
        return out


def _with_finite_flag(step_fn):
    """The train step, with a metric saying whether every updated parameter (params, EMA and the
    task's extras, e.g. a discriminator) is finite."""
    def step(state, batch, consts):
        new, metrics = step_fn(state, batch, consts)
        leaves = [x for x in jax.tree.leaves((new["params"], new.get("ema"), new.get("extra")))
                  if jnp.issubdtype(x.dtype, jnp.inexact)]
        finite = jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])) if leaves else jnp.array(True)
        return new, dict(metrics, **{_FINITE: finite})
    return step


def _snapshot(data_state):
    """A copy of a data iterator state (JSON: what the checkpoint stores), so that later batches
    cannot change it."""
    import json
    return json.loads(json.dumps(data_state))


def _dataclass_dict(obj):
    import dataclasses
    from dar_jax.config import to_dict
    return to_dict(obj) if dataclasses.is_dataclass(obj) else None


def _barrier(name: str) -> None:
    """Waits for every process (no-op on one): nobody reads an export before it is complete."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _progress(total, start):
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
