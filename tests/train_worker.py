"""Runs a tiny AR training in its own process (fake devices, several processes) for the trainer
tests, and prints a JSON line with the losses and a digest of the final parameters.

    python tests/train_worker.py '{"workdir": ..., "mesh": {...}, "devices": 8, "steps": 5, ...}'

Faults are injected through the trainer's ``hooks`` argument: ``"signals": [[event, step, name]]``
sends SIGTERM or SIGKILL to this process at that moment (events: compile, checkpoint, step;
see ``Trainer``), ``"kill_at": n`` is SIGKILL after step n. ``"mode": "cli"`` runs through the
command-line error handling and reports its exit code; ``"mode": "set_json"`` edits a JSON file
(``"path"``, ``"set"``) between runs.
"""
from __future__ import annotations

import json
import os
import sys

spec = json.loads(sys.argv[1])
if spec.get("fake_devices"):
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={spec['fake_devices']}"

import jax  # noqa: E402

if spec.get("num_processes", 1) > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=spec["coordinator"], num_processes=spec["num_processes"],
                               process_id=spec["process_id"])
jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402

from dar_jax.train.ar_task import ARTask  # noqa: E402
from dar_jax.train.loop import Trainer  # noqa: E402
from dar_jax.train.metrics import read_jsonl  # noqa: E402
from dar_jax.train.run_config import base_config  # noqa: E402


class TokenBatches:
    """Deterministic global batches of learnable token sequences; this process's rows only."""

    def __init__(self, global_batch, block, vocab, classes, process_index, process_count):
        self.i, self.gb, self.block, self.vocab, self.classes = 0, global_batch, block, vocab, classes
        self.lo = process_index * global_batch // process_count
        self.hi = (process_index + 1) * global_batch // process_count

    def __next__(self):
        rng = np.random.default_rng((1234, self.i))
        self.i += 1
        labels = rng.integers(0, self.classes, self.gb)
        tokens = (labels[:, None] * 5 + np.arange(self.block)[None] * (labels[:, None] + 1)) % self.vocab
        noise = rng.random(tokens.shape) < 0.1
        tokens = np.where(noise, rng.integers(0, self.vocab, tokens.shape), tokens)
        return {"tokens": tokens[self.lo:self.hi].astype(np.int32), "label": labels[self.lo:self.hi].astype(np.int32)}

    def get_state(self):
        return {"step": self.i}

    def set_state(self, state):
        self.i = int(state["step"])


class WorkerTask(ARTask):
    def make_data(self, *, split, process_index, process_count):
        m = self.model_cfg
        return TokenBatches(int(self.cfg.train.global_batch_size), m.block_size, m.vocab_size,
                            m.num_classes, process_index, process_count)


def config(spec):
    if spec.get("task") == "tokenizer":
        from dar_jax.config import load_config
        c = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_tokenizer.py"),
                        spec.get("overrides", []))
        c.train.update(dict(global_batch_size=spec.get("batch", 8), steps=spec.get("steps", 5), seed=0,
                            ema_decay=spec.get("ema", 0.99), eval_every_steps=spec.get("eval_every", 0)))
        if spec.get("gan"):
            c.gan.update(dict(enabled=True, start_step=spec["gan"], ndf=16, n_layers=2))
    elif spec.get("task") == "tiny_ar":  # the shipped tiny AR config, real data pipeline
        from dar_jax.config import load_config
        c = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_ar.py"),
                        spec.get("overrides", []))
        c.train.update(dict(global_batch_size=spec.get("batch", 16), steps=spec.get("steps", 5)))
    else:
        c = base_config("ar")
        c.model.update(dict(size="", dim=64, n_layer=2, n_head=4, vocab_size=64, block_size=32,
                            num_classes=10, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0,
                            class_dropout_prob=0.0))
        c.model.update(spec.get("model", {}))
        c.train.update(dict(global_batch_size=spec.get("batch", 16), steps=spec.get("steps", 5), seed=0,
                            ema_decay=spec.get("ema", 0.0)))
        c.optim.update(dict(lr=spec.get("lr", 3e-3), warmup_steps=0))
        c.optim.update(spec.get("optim", {}))
        from dar_jax.config import apply_overrides
        apply_overrides(c, spec.get("overrides", []))
    c.mesh.update(spec.get("mesh", {"data": -1}))
    c.checkpoint.update(dict(every_steps=spec.get("ckpt_every", 100), async_save=True))
    c.logging.update(dict(every_steps=1, tensorboard=False, progress=False))
    return c


def make_task(cfg):
    if cfg.task == "tokenizer":
        from dar_jax.train.tokenizer_task import TokenizerTask
        return TokenizerTask(cfg)
    if spec.get("task") == "tiny_ar":
        return ARTask(cfg)
    return WorkerTask(cfg)


def params_digest(params) -> str:
    """sha256 of every leaf (gathered to this host: the arrays may span processes)."""
    import hashlib
    from dar_jax.parallel import gather_to_host
    h = hashlib.sha256()
    params = gather_to_host(params)
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda t: jax.tree_util.keystr(t[0])):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


def restore_latest(trainer):
    from dar_jax.train.checkpointing import TrainCheckpoints
    ck = TrainCheckpoints(os.path.join(trainer.workdir, "checkpoints"))
    abstract = jax.eval_shape(trainer._init_state, jax.random.key(0))
    sh = trainer._state_shardings(abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sh)
    step, state, _, _ = ck.restore(target)
    ck.close()
    return step, state


def make_hooks(sub):
    """Trainer hooks sending the asked signals at (event, step)."""
    import signal
    plan = [tuple(x) for x in sub.get("signals", [])]
    if sub.get("kill_at"):
        plan.append(("step", sub["kill_at"], "SIGKILL"))

    def hooks(event, step):
        for ev, at, name in plan:
            if ev == event and at == step:
                os.kill(os.getpid(), getattr(signal, name))
    return hooks


def run_one(sub):
    if sub.get("mode") == "set_json":
        with open(sub["path"]) as f:
            data = json.load(f)
        data.update(sub["set"])
        with open(sub["path"], "w") as f:
            json.dump(data, f)
        return {}
    if sub.get("mode") == "garble":  # overwrite every file of a checkpoint item with garbage
        for root, _, files in os.walk(sub["path"]):
            for f in files:
                if f != "_CHECKPOINT_METADATA":
                    with open(os.path.join(root, f), "wb") as fh:
                        fh.write(b"garbage")
        return {}
    if sub.get("mode") == "cli":  # the error handling of train.py: exit code and one-line message
        from dar_jax.cli import guarded_main
        out = {}
        out["rc"] = guarded_main(lambda: out.update(run_one({**sub, "mode": "train"})))
        return out
    if sub.get("mode") == "expect_error":
        try:
            run_one({**sub, "mode": "train"})
        except Exception as e:  # reported to the test, which checks the message
            return {"error": type(e).__name__, "message": str(e)}
        return {"error": None}
    cfg = config(sub)
    devices = jax.devices()[: sub["devices"]] if sub.get("devices") else None
    trainer = Trainer(cfg, make_task(cfg), sub["workdir"], devices=devices, hooks=make_hooks(sub))
    if sub.get("mode") == "restore":
        step, state = restore_latest(trainer)
        finite = all(bool(np.isfinite(np.asarray(jax.device_get(x))).all()) for x in jax.tree.leaves(state["params"]))
        return {"step": step, "digest": params_digest(state["params"]), "finite": finite}
    out = {"result": trainer.run()}
    if jax.process_index() == 0:
        rows = read_jsonl(os.path.join(sub["workdir"], "metrics.jsonl"))
        out["losses"] = [r["loss"] for r in rows if "loss" in r]
        out["loss_steps"] = [r["step"] for r in rows if "loss" in r]
        out["evals"] = [r for r in rows if any(k.startswith("eval_") for k in r)]
        if sub.get("report_export"):
            from dar_jax.checkpoint import load_model
            from dar_jax.pipeline import FAMILIES
            out["export_digest"] = params_digest(load_model(os.path.join(sub["workdir"], "model"), FAMILIES)[2])
    if sub.get("report_shards"):
        _, state = restore_latest(trainer)
        out["digest"] = params_digest(state["params"])
        out["state_digest"] = params_digest({k: v for k, v in state.items() if k != "opt_state"})
        out["shards"] = shard_fractions(state)
    return out


def main():
    if "runs" in spec:  # several runs in this process (shares start-up and compilation caches)
        out = [run_one({**spec, **sub}) for sub in spec["runs"]]
    else:
        out = run_one(spec)
    print("RESULT " + json.dumps(out), flush=True)


def shard_fractions(state):
    """Fraction of each large parameter held by one device."""
    fracs = {}
    for path, arr in jax.tree_util.tree_flatten_with_path(state["params"])[0]:
        if arr.size >= 4096:
            fracs[jax.tree_util.keystr(path)] = arr.addressable_shards[0].data.size / arr.size
    return fracs


if __name__ == "__main__":
    main()
