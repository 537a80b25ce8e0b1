"""Tokenizer training-step speed and memory (tokenizer v1 at 256 px) under each remat policy:
seconds per step, GFLOP/s and its fraction of the matmul peak probed in the same run, XLA's
buffer assignment of the compiled step, the process's peak RSS, and the losses of every step
against the first policy's (remat must not change the numerics).

    python benchmarks/tokenizer_train_step.py                                 # batch 2, float32, CPU
    python benchmarks/tokenizer_train_step.py --remats none full --steps 10
    python benchmarks/tokenizer_train_step.py --batches 32 --dtype bfloat16 --peak-tflops 989

Each (policy, batch) runs in its own process, so its peak RSS is its own. The step is the
trainer's (flow matching + VQ losses; with --perceptual also LPIPS and REPA with random-weight
VGG16 / DINOv2-B/14 networks of the real sizes) with AdamW and EMA, its state donated,
built by the trainer (Trainer.compile_train_step, with its compiler options) on one device. FLOPs are
the analytic count of the tokenizer itself (encoder, decoder layers, one velocity evaluation),
forward + backward. Policies: dar_jax.nn.remat ("none", "full", "dots", or names; "config" is
configs/tokenizer_v1.py's).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import jax
import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import common  # noqa: E402

from dar_jax import parallel  # noqa: E402
from dar_jax.config import load_config  # noqa: E402
from dar_jax.perceptual import dinov2, lpips  # noqa: E402
from dar_jax.train.loop import Trainer, limit_host_malloc_arenas  # noqa: E402
from dar_jax.train.metrics import mfu  # noqa: E402
from dar_jax.train.tokenizer_task import TokenizerTask  # noqa: E402


class BenchTask(TokenizerTask):
    """The tokenizer-v1 task with random-weight perceptual networks (no files needed)."""

    def __init__(self, cfg, perceptual: bool):
        super().__init__(cfg)
        if perceptual:
            self.lpips = common.random_params(lpips.abstract_params(), 3)
            dcfg = dinov2.DinoV2Config(embed_dim=768, depth=12, num_heads=12)
            self.dino = (dcfg, common.random_params(dinov2.abstract_params(dcfg), 4))


def measure(remat: str, batch: int, dtype: str, perceptual: bool, steps: int) -> dict:
    """One policy at one batch size, in this process: the trainer's compiled step on the first
    device, its timings, XLA's buffer assignment and the losses of ``steps`` steps."""
    limit_host_malloc_arenas()   # as train.py does, before the first device
    overrides = [f"model.dtype={dtype}", "perceptual.dinov2=", f"train.global_batch_size={batch}"]
    if remat != "config":
        overrides.append(f"model.remat={remat}")
    cfg = load_config(str(common.REPO / "configs" / "tokenizer_v1.py"), overrides)
    cfg.perceptual.lpips_vgg = cfg.perceptual.lpips_heads = ""
    cfg.model.repa_projector = perceptual
    task = BenchTask(cfg, perceptual)
    trainer = Trainer(cfg, task, workdir=None, devices=jax.devices()[:1])
    state, consts = trainer.fresh_state(0), task.consts()
    images = np.random.default_rng(0).uniform(-1, 1, (batch, 256, 256, 3)).astype(np.float32)
    batch_in = parallel.global_batch({"image": images}, trainer.mesh, trainer.rules)
    compiled = trainer.compile_train_step(task.abstract_batch(batch), consts, state)
    mem = compiled.memory_analysis()
    holder, losses = {"state": state}, []

    def run():
        holder["state"], m = compiled(holder["state"], batch_in, consts)
        losses.append(m["loss"])
        return m["loss"]

    sec, first = common.timed(run, steps - 1)
    flops = task.flops_per_example() * batch
    gib = lambda n: n / 2 ** 30  # noqa: E731
    return dict(remat=task.remat_policy, batch=batch, dtype=dtype, perceptual=perceptual,
                seconds_per_step=sec, images_per_s=batch / sec, gflops_per_s=flops / sec / 1e9,
                first_step_s=first, flops_per_step=flops,
                xla_temp_gib=gib(mem.temp_size_in_bytes), xla_args_gib=gib(mem.argument_size_in_bytes),
                xla_total_gib=gib(mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                  + mem.output_size_in_bytes - mem.alias_size_in_bytes),
                peak_rss_gib=common.peak_host_memory_gib(), **common.resident_memory_gib(),
                losses=[float(l) for l in losses])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--remats", nargs="+", default=["none", "config", "full"])
    ap.add_argument("--batches", nargs="+", type=int, default=[2])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--perceptual", action="store_true", help="include LPIPS and REPA (random weights)")
    ap.add_argument("--steps", type=int, default=10, help="steps per run (>= 2; losses compared over all)")
    ap.add_argument("--peak-tflops", type=float, default=0.0)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # JSON spec of one child run
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(measure(**json.loads(a.one))), flush=True)
        return
    if a.steps < 2:
        ap.error("--steps must be at least 2")
    print(f"machine: {common.machine()}")
    peak = common.probes()["matmul_gflops"]
    rows = []
    for b in a.batches:
        base = None
        for remat in a.remats:
            spec = json.dumps(dict(remat=remat, batch=b, dtype=a.dtype, perceptual=a.perceptual, steps=a.steps))
            res = subprocess.run([sys.executable, __file__, "--one", spec], capture_output=True, text=True)
            lines = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")]
            if res.returncode != 0 or not lines:
                sys.exit(f"run {spec} failed:\n{res.stderr[-3000:]}")
            row = json.loads(lines[-1][len("RESULT "):])
            row["fraction_of_matmul_peak"] = row["gflops_per_s"] / peak
            if a.peak_tflops:
                row["mfu"] = mfu(row["flops_per_step"] / row["seconds_per_step"], a.peak_tflops * 1e12,
                                 jax.device_count())
            base = base or row
            row["loss_max_rel_diff"] = max(abs(x - y) / max(abs(y), 1e-30)
                                           for x, y in zip(row["losses"], base["losses"]))
            rows.append(row)
            print({k: v for k, v in row.items() if k != "losses"}, flush=True)
    print()
    common.print_table(rows, ["remat", "batch", "dtype", "perceptual", "seconds_per_step", "images_per_s",
                              "gflops_per_s", "fraction_of_matmul_peak", "mfu", "xla_temp_gib", "xla_args_gib",
                              "xla_total_gib", "peak_rss_gib", "rss_anon_gib", "rss_file_gib",
                              "loss_max_rel_diff"])


if __name__ == "__main__":
    main()
