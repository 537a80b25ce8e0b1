"""Tokenizer training-step speed (tokenizer v1 at 256 px): steps/s, images/s, achieved
GFLOP/s and MFU (with --peak-tflops), on the local backend.

    python benchmarks/tokenizer_train_step.py                      # batch 2, float32, CPU
    python benchmarks/tokenizer_train_step.py --batches 32 --dtype bfloat16 --peak-tflops 989

The step is the trainer's (flow matching + VQ losses; with --perceptual also LPIPS and REPA with
random-weight VGG16 / DINOv2-B/14 networks of the real sizes) with AdamW and EMA. FLOPs are the
analytic count of the tokenizer itself (encoder, decoder layers, one velocity evaluation),
forward + backward.
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

from dar_jax.config import load_config  # noqa: E402
from dar_jax.parallel import default_target  # noqa: E402
from dar_jax.perceptual import dinov2, lpips  # noqa: E402
from dar_jax.train.loop import new_train_state  # noqa: E402
from dar_jax.train.metrics import mfu  # noqa: E402
from dar_jax.train.optim import make_optimizer  # noqa: E402
from dar_jax.train.tokenizer_task import TokenizerTask  # noqa: E402


class BenchTask(TokenizerTask):
    """The tokenizer-v1 task with random-weight perceptual networks (no files needed)."""

    def __init__(self, cfg, perceptual: bool):
        super().__init__(cfg)
        if perceptual:
            self.lpips = common.random_params(lpips.abstract_params(), 3)
            dcfg = dinov2.DinoV2Config(embed_dim=768, depth=12, num_heads=12)
            self.dino = (dcfg, common.random_params(dinov2.abstract_params(dcfg), 4))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", nargs="+", type=int, default=[2])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--perceptual", action="store_true", help="include LPIPS and REPA (random weights)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=0.0)
    a = ap.parse_args()
    print(f"machine: {common.machine()}")
    overrides = [f"model.dtype='{a.dtype}'", "perceptual.dinov2=''"]
    cfg = load_config(str(common.REPO / "configs" / "tokenizer_v1.py"), overrides)
    cfg.perceptual.lpips_vgg = cfg.perceptual.lpips_heads = ""
    cfg.model.repa_projector = a.perceptual
    task = BenchTask(cfg, a.perceptual)
    tx, _ = make_optimizer(dict(cfg.optim), 1000)
    params = common.random_params(task.abstract_params(), 0)
    rows = []
    for b in a.batches:
        # the state is donated: each batch size gets its own copy of the params
        state = new_train_state(task, tx, jax.tree.map(jnp.copy, params), extra_key=jax.random.key(2),
                                rng_key=jax.random.key(1), ema_decay=0.999)
        images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (b, 256, 256, 3)), jnp.float32)
        step = jax.jit(functools.partial(task.train_step, tx=tx, ema_decay=0.999,
                                         target=default_target()), donate_argnums=(0,))
        holder = {"state": state}

        def run():
            holder["state"], m = step(holder["state"], {"image": images}, task.consts())
            return m["loss"]

        sec, first = common.timed(run, a.steps)
        flops = task.flops_per_example() * b
        row = dict(batch=b, dtype=a.dtype, perceptual=a.perceptual, seconds_per_step=sec, steps_per_s=1 / sec,
                   images_per_s=b / sec, gflops_per_s=flops / sec / 1e9, compile_s=first - sec,
                   peak_rss_gib=common.peak_host_memory_gib())
        if a.peak_tflops:
            row["mfu"] = mfu(flops / sec, a.peak_tflops * 1e12, jax.device_count())
        rows.append(row)
        print(row, flush=True)
    print()
    common.print_table(rows, ["batch", "dtype", "perceptual", "seconds_per_step", "steps_per_s", "images_per_s",
                              "gflops_per_s", "mfu", "compile_s", "peak_rss_gib"])


if __name__ == "__main__":
    main()
