"""AR train-step speed (forward + backward + AdamW): steps/s, tokens/s, achieved GFLOP/s, MFU.

    python benchmarks/train_step.py                            # GPT-B, batch 8 and 32, float32
    python benchmarks/train_step.py --models GPT-L --dtypes bfloat16 --peak-tflops 989   # H100

With --reference-python/--reference-dir the PyTorch reference (GPT-B, batch 8) is timed in the
same run and the ratio printed. FLOPs are counted analytically (matmuls incl. the output head
and causal attention, x3 for the backward pass), not from XLA (which would count remat);
``fraction_of_matmul_peak`` divides them by the float32 matmul peak probed in the same run.
"""
from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import common  # noqa: E402

from dar_jax.parallel import default_target  # noqa: E402
from dar_jax.train.ar_task import ARTask, gpt_train_flops_per_example  # noqa: E402
from dar_jax.train.loop import new_train_state  # noqa: E402
from dar_jax.train.metrics import mfu  # noqa: E402
from dar_jax.train.optim import make_optimizer  # noqa: E402
from dar_jax.train.run_config import base_config  # noqa: E402


def make_step(model: str, dtype: str, batch: int, seq: int):
    c = base_config("ar")
    c.model.size = model
    c.model.dtype = dtype
    c.model.block_size = seq
    task = ARTask(c)
    tx, _ = make_optimizer(dict(c.optim), 1000)
    state = new_train_state(task, tx, task.init_params(jax.random.key(0)), extra_key=jax.random.key(2),
                            rng_key=jax.random.key(1), ema_decay=0.0)
    rng = np.random.default_rng(0)
    data = {"tokens": jnp.asarray(rng.integers(0, task.model_cfg.vocab_size, (batch, seq)), jnp.int32),
            "label": jnp.asarray(rng.integers(0, task.model_cfg.num_classes, (batch,)), jnp.int32)}
    step = jax.jit(functools.partial(task.train_step, tx=tx, ema_decay=0.0, target=default_target()),
                   donate_argnums=(0,))
    return task, step, state, data


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["GPT-B"])
    ap.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    ap.add_argument("--dtypes", nargs="+", default=["float32"])
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="per-device peak for MFU")
    common.add_reference_args(ap)
    args = ap.parse_args()
    print(f"machine: {common.machine()}")
    peak = common.probes()["matmul_gflops"]
    rows = []
    for model in args.models:
        for dtype in args.dtypes:
            for b in args.batches:
                task, step, state, data = make_step(model, dtype, b, args.seq)
                holder = {"state": state}

                def run():
                    holder["state"], m = step(holder["state"], data, {})
                    m["loss"].block_until_ready()

                sec = common.timeit(run, reps=args.steps)
                flops = gpt_train_flops_per_example(task.model_cfg) * b
                row = dict(model=model, dtype=dtype, batch=b, seconds_per_step=sec, steps_per_s=1 / sec,
                           tokens_per_s=b * args.seq / sec, gflops_per_s=flops / sec / 1e9,
                           step_tflop=flops / 1e12, fraction_of_matmul_peak=flops / sec / 1e9 / peak)
                if args.peak_tflops:
                    row["mfu"] = mfu(flops / sec, args.peak_tflops * 1e12, jax.device_count())
                rows.append(row)
                print(row, flush=True)
    print()
    common.print_table(rows, ["model", "dtype", "batch", "seconds_per_step", "steps_per_s", "tokens_per_s",
                              "step_tflop", "gflops_per_s", "fraction_of_matmul_peak", "mfu"])
    ref = common.time_reference(args, "gpt_train", 8, "GPT-B")
    ours = [r for r in rows if r["model"] == "GPT-B" and r["dtype"] == "float32" and r["batch"] == 8]
    if ref is not None and ours:
        print(f"\nPyTorch reference GPT-B batch 8 train step: {ref:.2f} s; dar-jax {ours[0]['seconds_per_step']:.2f} s "
              f"-> {ref / ours[0]['seconds_per_step']:.2f}x")


if __name__ == "__main__":
    main()
