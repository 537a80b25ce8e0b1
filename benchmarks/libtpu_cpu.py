"""Does having libtpu installed (the tpu extra, for dar_jax.aot) change CPU runs?

    python benchmarks/libtpu_cpu.py [--reps 5]

Runs the same CPU workload in fresh processes three ways: libtpu installed (as the tests run
after ``pip install -e '.[test,tpu]'``), libtpu installed with ``JAX_PLATFORMS=cpu``, and libtpu
hidden from the process (as without the extra). Each process reports its start-up (import jax
and list the devices) and the median of ``--reps`` timed calls of a jitted GPT train step
(dim 256, 4 layers, batch 16 x 32 tokens) and of a 1024^2 float32 matmul; the variants
alternate so that load on the machine hits them alike.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

CHILD = r'''
import sys, time
if HIDE:
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "libtpu" or name.startswith("libtpu."):
                raise ImportError("libtpu hidden for the benchmark")
    sys.meta_path.insert(0, _Block())
t0 = time.perf_counter()
import jax
devices = jax.devices()
startup = time.perf_counter() - t0
import functools, statistics
import jax.numpy as jnp
import numpy as np
from dar_jax.parallel import default_target
from dar_jax.train.ar_task import ARTask
from dar_jax.train.loop import new_train_state
from dar_jax.train.optim import make_optimizer
from dar_jax.train.run_config import base_config
c = base_config("ar")
c.model.update(dict(size="", dim=256, n_layer=4, n_head=4, vocab_size=512, block_size=32, num_classes=10))
task = ARTask(c)
tx, _ = make_optimizer(dict(c.optim), 100)
state = new_train_state(task, tx, task.init_params(jax.random.key(0)), extra_key=jax.random.key(1),
                        rng_key=jax.random.key(2), ema_decay=0.0)
rng = np.random.default_rng(0)
batch = {"tokens": jnp.asarray(rng.integers(0, 512, (16, 32)), jnp.int32),
         "label": jnp.asarray(rng.integers(0, 10, (16,)), jnp.int32)}
step = jax.jit(functools.partial(task.train_step, tx=tx, ema_decay=0.0, target=default_target()),
               donate_argnums=(0,))
x = jnp.ones((1024, 1024), jnp.float32)
mm = jax.jit(lambda a: a @ a)
def timed(fn, reps):
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return statistics.median(out)
holder = {"s": state}
def train():
    holder["s"], m = step(holder["s"], batch, {})
    m["loss"].block_until_ready()
print("RESULT", json.dumps({"startup_s": startup, "platform": devices[0].platform,
      "train_step_s": timed(train, REPS), "matmul_s": timed(lambda: mm(x).block_until_ready(), REPS)}))
'''

VARIANTS = {
    "libtpu installed": ({}, False),
    "libtpu installed, JAX_PLATFORMS=cpu": ({"JAX_PLATFORMS": "cpu"}, False),
    "libtpu hidden": ({}, True),
}


def run_child(env_extra: dict, hide: bool, reps: int) -> dict:
    code = f"import json\nHIDE = {hide}\nREPS = {reps}\n" + CHILD
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env.update(env_extra)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=common.REPO, timeout=1800)
    lines = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")]
    if res.returncode or not lines:
        raise SystemExit(f"child failed ({res.returncode}): {res.stderr[-2000:]}")
    return json.loads(lines[-1][7:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5, help="timed calls per process")
    ap.add_argument("--rounds", type=int, default=3, help="processes per variant (alternating)")
    args = ap.parse_args()
    print(f"machine: {common.machine()}; libtpu importable: "
          f"{importlib.util.find_spec('libtpu') is not None}")
    results = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        for name, (env, hide) in VARIANTS.items():
            out = run_child(env, hide, args.reps)
            results[name].append(out)
            print(f"round {r} {name}: {out}", flush=True)
    rows = []
    for name, outs in results.items():
        rows.append({"variant": name, "platform": outs[0]["platform"],
                     **{k: statistics.median(o[k] for o in outs)
                        for k in ("startup_s", "train_step_s", "matmul_s")}})
    print()
    common.print_table(rows, ["variant", "platform", "startup_s", "train_step_s", "matmul_s"])


if __name__ == "__main__":
    main()
