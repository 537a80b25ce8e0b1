"""Tokenizer speed (encode / decode images per second), memory, and the solvers' accuracy.

    python benchmarks/tokenizer.py                       # tokenizer v1, 256 px (long: ~30 min on 2 CPU cores)
    python benchmarks/tokenizer.py --quick               # a tiny tokenizer, seconds
    python benchmarks/tokenizer.py --reference-python /tmp/venv_ref/bin/python --reference-dir /tmp/dar_ref

Weights are random (speed does not depend on them); every tensor is drawn with NumPy (std
1/sqrt(fan_in), as the parity fixtures do) so that no output layer is zero and the accuracy
section measures a real flow. Timings are the median of ``--reps`` calls after one warm-up call
(which compiles). Decode = codes -> images through the public ``tokenizer.decode`` (condition
layers included), ``num_denoising_steps`` steps unless ``--steps``; encode = images -> codes.

Memory: XLA's buffer assignment of the compiled program (arguments + outputs + temporaries;
the weights are arguments), and the process's peak RSS at the end.

With ``--reference-python`` and ``--reference-dir`` the PyTorch reference is timed in a
subprocess in the same run (``shared/bench/bench_reference.py``: ``decode --batch 2`` and
``encode --batch 4``) and the ratio reference seconds / dar-jax seconds is printed (> 1: faster).

Accuracy (report only): for each solver, the RMS distance (pixel space, images in [-1, 1]) of
its decode at 8 and 16 network evaluations to a 64-step Heun decode of the same codes and noise.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from dar_jax import solvers, tokenizer as T  # noqa: E402
from dar_jax.tokenizer import core as TOK_CORE, sequential as SEQ  # noqa: E402

REFERENCE_IDLE = {"decode": 55.2, "encode": 3.30}     # shared/bench/README.md, idle machine


def mib(compiled) -> float:
    m = compiled.memory_analysis()
    if m is None:
        return float("nan")
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes) / 2 ** 20


def decode_memory(cfg, params, codes, noise, solver, steps, batch_chunk=None):
    cond = T.codes_to_cond(cfg, params, codes)
    c = SEQ._decode.lower(params, cond, noise, jnp.int32(0), jnp.int32(steps), cfg=cfg,
                          solver=solver, num_steps=steps,
                          chunk=SEQ._batch_chunk(None, cfg, noise.shape, batch_chunk)).compile()
    return mib(c)


def encode_memory(cfg, params, images):
    return mib(TOK_CORE._encode.lower(cfg, params, images).compile())


def g(x: float) -> str:
    """4 significant digits."""
    return f"{x:.4g}"


def row(cols, widths):
    return " | ".join(str(c).rjust(w) for c, w in zip(cols, widths))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny tokenizer at 32 px (smoke run)")
    ap.add_argument("--batches", default=None, help="comma list (default 1,2,8; quick 1,2)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--solvers", default=",".join(solvers.SOLVERS))
    ap.add_argument("--solver-batch", type=int, default=2, help="batch of the per-solver table")
    ap.add_argument("--steps", type=int, default=None, help="decode steps (default: the config's)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per row (default 3; quick 2)")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the solver accuracy section")
    ap.add_argument("--batch-chunks", default="auto",
                    help="comma list of decode batch_chunk values to time (auto: the platform's default, "
                         "0: the whole batch at once)")
    common.add_reference_args(ap)
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)

    base = T.tiny_config() if a.quick else T.TokenizerConfig()
    size = base.sampling_resolution
    batches = [int(b) for b in (a.batches or ("1,2" if a.quick else "1,2,8")).split(",")]
    dtypes = a.dtypes.split(",")
    solver_names = [solvers.canonical(s) for s in a.solvers.split(",")]
    reps = a.reps or (2 if a.quick else 3)
    steps = a.steps or base.num_denoising_steps
    n_tok = base.num_all_queries
    print(f"# device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"{os.cpu_count()} CPUs; jax {jax.__version__}", flush=True)
    print(f"# tokenizer: {'tiny (quick)' if a.quick else 'v1'}, {T.num_params(base) / 1e6:.1f}M params, "
          f"{size} px, {steps} decode steps, reps {reps}", flush=True)
    t0 = time.perf_counter()
    params = common.random_params(T.abstract_params(base))
    print(f"# random weights drawn in {time.perf_counter() - t0:.1f} s", flush=True)
    results = {"config": "tiny" if a.quick else "v1", "size": size, "steps": steps, "rows": []}

    # --- encode / decode (adams2) per dtype and batch --------------------------------------------
    widths = (9, 5, 11, 9, 11, 9, 11, 9, 11)
    print("\n## encode / decode (adams2) throughput")
    chunks = [None if c == "auto" else int(c) for c in a.batch_chunks.split(",")]
    print(row(("dtype", "batch", "enc s/call", "enc im/s", "enc MiB", "dec s/call", "dec im/s",
               "dec MiB", "dec compile"), widths) + "  batch_chunk")
    key = jax.random.key(0)
    for dtype in dtypes:
        cfg = dataclasses.replace(base, dtype=dtype)
        for b in batches:
            k1, k2, k3 = jax.random.split(jax.random.fold_in(key, b), 3)
            images = jax.random.uniform(k1, (b, size, size, 3), minval=-1, maxval=1)
            codes = jax.random.randint(k2, (b, n_tok), 0, cfg.vq_codebook_size)
            noise = jax.random.normal(k3, (b, size, size, 3))
            enc_s, _ = common.timed(lambda: T.encode(cfg, params, images), reps)
            enc_mib = encode_memory(cfg, params, images)
            for chunk in chunks:
                dec_s, dec_first = common.timed(lambda: T.decode(cfg, params, codes, noise, solver="adams2",
                                                          num_steps=steps, batch_chunk=chunk), reps)
                r = dict(kind="throughput", dtype=dtype, batch=b, encode_s=enc_s, decode_s=dec_s,
                         encode_mib=enc_mib,
                         decode_mib=decode_memory(cfg, params, codes, noise, "adams2", steps, chunk),
                         decode_first_s=dec_first, batch_chunk="auto" if chunk is None else chunk)
                results["rows"].append(r)
                print(row((dtype, b, g(enc_s), g(b / enc_s), f"{r['encode_mib']:.0f}", g(dec_s),
                           g(b / dec_s), f"{r['decode_mib']:.0f}", f"{dec_first - dec_s:.1f}"), widths)
                      + f"  {r['batch_chunk']}", flush=True)

    # --- solvers --------------------------------------------------------------------------------
    b = a.solver_batch
    print(f"\n## decode per solver (batch {b}, {steps} steps)")
    widths2 = (9, 9, 6, 10, 10, 9)
    print(row(("dtype", "solver", "evals", "s/call", "im/s", "s/eval"), widths2))
    k2, k3 = jax.random.split(jax.random.fold_in(key, 1000 + b))
    codes = jax.random.randint(k2, (b, n_tok), 0, base.vq_codebook_size)
    noise = jax.random.normal(k3, (b, size, size, 3))
    for dtype in dtypes:
        cfg = dataclasses.replace(base, dtype=dtype)
        for s in solver_names:
            evals = steps * solvers.EVALS_PER_STEP[s]
            sec, _ = common.timed(lambda: T.decode(cfg, params, codes, noise, solver=s, num_steps=steps), reps)
            results["rows"].append(dict(kind="solver", dtype=dtype, batch=b, solver=s, evals=evals, decode_s=sec))
            print(row((dtype, s, evals, g(sec), g(b / sec), g(sec / evals)), widths2), flush=True)

    # --- accuracy at equal network evaluations ----------------------------------------------------
    if not a.no_accuracy:
        cfg = base
        k2, k3 = jax.random.split(jax.random.fold_in(key, 7))
        codes = jax.random.randint(k2, (1, n_tok), 0, cfg.vq_codebook_size)
        noise = jax.random.normal(k3, (1, size, size, 3))
        ref = T.decode(cfg, params, codes, noise, solver="heun", num_steps=64)
        print("\n## distance to a 64-step Heun decode (RMS, images in [-1, 1]; batch 1, float32)")
        budgets = (8, 16)
        print(row(("solver",) + tuple(f"{e} evals" for e in budgets), (9, 10, 10)))
        for s in solver_names:
            dists = []
            for e in budgets:
                n = max(1, e // solvers.EVALS_PER_STEP[s])
                out = T.decode(cfg, params, codes, noise, solver=s, num_steps=n)
                dists.append(float(jnp.sqrt(jnp.mean((out - ref) ** 2))))
            results["rows"].append(dict(kind="accuracy", solver=s, evals=list(budgets), rms=dists))
            print(row((s,) + tuple(f"{d:.4f}" for d in dists), (9, 10, 10)), flush=True)

    # --- the PyTorch reference, same run ------------------------------------------------------------
    if a.reference_python and a.reference_dir:
        print("\n## PyTorch reference on this machine (float32)")
        ours = {(r["batch"]): r for r in results["rows"] if r["kind"] == "throughput" and r["dtype"] == "float32"}
        for job, batch in (("decode", 2), ("encode", 4)):
            ref_s = common.time_reference(a, job, batch)
            if ref_s is None:
                continue
            ref = {"seconds": ref_s}
            mine = None
            if job == "decode" and batch in ours and steps == 8 and not a.quick:
                mine = ours[batch]["decode_s"]
            elif job == "encode" and not a.quick:
                images = jax.random.uniform(jax.random.key(5), (batch, size, size, 3), minval=-1, maxval=1)
                mine, _ = common.timed(lambda: T.encode(base, params, images), reps)
            ratio = f"{ref['seconds'] / mine:.2f}x" if mine else "n/a (quick run or other sizes)"
            results["rows"].append(dict(kind="reference", job=job, batch=batch, reference_s=ref["seconds"],
                                        dar_jax_s=mine))
            print(f"{job} batch {batch}: reference {ref['seconds']:.2f} s (idle-machine figure "
                  f"{REFERENCE_IDLE[job]} s), dar-jax {mine if mine is None else round(mine, 2)} s, "
                  f"ratio {ratio}", flush=True)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n# process peak RSS {peak:.0f} MiB")
    results["peak_rss_mib"] = peak
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
